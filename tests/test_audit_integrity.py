"""Exact records under real client behaviour: early hang-ups, tool rounds, spend-bearing endpoints, hostile text,
crashes and queries issued right after a response."""

from __future__ import annotations

import io
import json
import signal

import httpx
import openai
import pytest

from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client, openai_client
from tests.support.wire import (
    FINAL_MARKERS,
    PATHS,
    anthropic_message,
    api_request,
    chat_completion,
    request_body,
    status_of,
    stream_reply,
)


def one(gateway, name: str) -> dict:
    (ic,) = gateway.interceptions(name)
    return ic


def usages(gateway, iid: str) -> list[tuple[int, int]]:
    rows = gateway.sql(f"SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = '{iid}'")
    return [(r["input_tokens"], r["output_tokens"]) for r in rows]


def prompts(gateway, name: str) -> list[str]:
    return [r["prompt"] for r in gateway.sql(
        "SELECT p.prompt FROM aibridge_user_prompts p JOIN aibridge_interceptions i ON i.id = p.interception_id "
        f"JOIN aibridge_users u ON u.id = i.initiator_id WHERE u.name = '{name}' ORDER BY p.created_at")]


# --- complete streams ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["anthropic", "chat", "responses"])
def test_stream_is_completed_when_the_client_hangs_up_right_after_the_final_event(gateway, mock, user, api):
    """llm and aider close the connection as soon as they read the final event, before the chunk terminator."""
    name, token = user
    mock.script(stream_reply(api, tail_delay=1.5))
    got = api_request(gateway.port, PATHS[api], token, request_body(api), read_until=FINAL_MARKERS[api])
    assert FINAL_MARKERS[api] in got
    ic = one(gateway, name)
    assert ic["status"] == "completed" and ic["error"] is None
    assert usages(gateway, ic["id"]) == [(12, 7)]


@pytest.mark.parametrize("api", ["anthropic", "chat", "responses"])
def test_stream_left_by_the_client_before_its_final_event_is_read_to_its_end_and_recorded(gateway, mock, user, api):
    """The client leaves at its first event: the provider's answer is still read to its end (within
    timeouts.drain_after_disconnect_seconds), so the record has the provider's outcome and final usage, and says
    the client left."""
    name, token = user
    mock.script(stream_reply(api, delay=0.2))
    api_request(gateway.port, PATHS[api], token, request_body(api), read_until=b"data:")
    ic = one(gateway, name)
    assert ic["status"] == "completed" and ic["error"] is None
    assert json.loads(ic["metadata"])["client_disconnected"] is True
    assert usages(gateway, ic["id"]) == [(12, 7)]


# --- tool rounds -------------------------------------------------------------------------------------

TOOL_ROUNDS = {
    "anthropic": {"model": "claude-sonnet-4-20250514", "max_tokens": 64, "messages": [
        {"role": "user", "content": "list the files"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_A", "name": "ls", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_A", "content": "a.txt"},
                                     {"type": "text", "text": "<system-reminder>keep going</system-reminder>"}]},
    ]},
    "chat": {"model": "gpt-4.1", "messages": [
        {"role": "user", "content": "list the files"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_A", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_A", "content": "a.txt"},
    ]},
    "responses": {"model": "gpt-5", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "list the files"}]},
        {"type": "function_call", "call_id": "call_A", "name": "ls", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_A", "output": "a.txt"},
    ]},
}


def _metric(gateway, name: str, user_id: str) -> float:
    text = httpx.get(gateway.url + "/aibridge/metrics", trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'initiator_id="{user_id}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("api", ["anthropic", "chat", "responses"])
def test_tool_rounds_record_no_new_prompt(gateway, mock, user, api):
    """One prompt that loops on tools is one prompt row, not one per round (opencode: 341 identical rows)."""
    name, token = user
    first = request_body(api, prompt="list the files", stream=False)
    round_body = {**TOOL_ROUNDS[api], "stream": False}
    for _ in range(4):
        mock.script(Reply.json(anthropic_message() if api == "anthropic" else chat_completion()))
    for body in (first, round_body, round_body, round_body):
        assert status_of(api_request(gateway.port, PATHS[api], token, body)) == 200
    gateway.interceptions(name, 4)
    assert prompts(gateway, name) == ["list the files"]
    uid = gateway.sql(f"SELECT CAST(id AS VARCHAR) AS id FROM aibridge_users WHERE name = '{name}'")[0]["id"]
    assert _metric(gateway, "aibridge_prompts_total", uid) == 1


# --- spend-bearing endpoints ---------------------------------------------------------------------------


def test_embeddings_are_authenticated_and_recorded_with_usage(gateway, mock, user):
    name, token = user
    mock.script(Reply.json({"object": "list", "model": "text-embedding-3-small",
                            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                            "usage": {"prompt_tokens": 9, "total_tokens": 9}}))
    r = openai_client(gateway, token).embeddings.create(model="text-embedding-3-small", input="hello world",
                                                         encoding_format="float")
    assert r.data[0].embedding == [0.1, 0.2]
    ic = one(gateway, name)
    assert ic["api"] == "openai.embeddings" and ic["model"] == "text-embedding-3-small" and ic["status"] == "completed"
    assert usages(gateway, ic["id"]) == [(9, 0)]
    assert mock.seen[-1].path == "/v1/embeddings" and mock.seen[-1].headers["authorization"].endswith("SECRET")
    with pytest.raises(openai.AuthenticationError):
        openai_client(gateway, "aib_not-a-token").embeddings.create(model="text-embedding-3-small", input="x")
    assert len(mock.seen) == 1


def test_legacy_completions_stream_is_metered_and_recorded(gateway, mock, user):
    name, token = user
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct",
             "choices": [{"text": "hi", "index": 0, "logprobs": None, "finish_reason": None}]}
    mock.script(Reply.sse([f"data: {json.dumps(chunk)}\n\n".encode(),
                           f"data: {json.dumps({**chunk, 'choices': [], 'usage': {'prompt_tokens': 3, 'completion_tokens': 2, 'total_tokens': 5}})}\n\n".encode(),
                           b"data: [DONE]\n\n"]))
    out = list(openai_client(gateway, token).completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi",
                                                                stream=True))
    assert out[0].choices[0].text == "hi"
    ic = one(gateway, name)
    assert ic["api"] == "openai.completions" and ic["status"] == "completed" and ic["stream"] is True
    assert usages(gateway, ic["id"]) == [(3, 2)]
    assert prompts(gateway, name) == ["say hi"]
    assert mock.seen[-1].json()["stream_options"] == {"include_usage": True}


def test_audio_transcription_multipart_and_speech_bytes_are_recorded(gateway, mock, user):
    name, token = user
    client = openai_client(gateway, token)
    mock.script(Reply.json({"text": "hello", "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 3,
                                                       "total_tokens": 17}}))
    t = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", io.BytesIO(b"RIFF....WAVE")))
    assert t.text == "hello"
    mock.script(Reply(200, {"content-type": "audio/mpeg"}, b"ID3\x00\x01fake-mp3-bytes"))
    speech = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hello")
    assert speech.content == b"ID3\x00\x01fake-mp3-bytes"
    a, b = gateway.interceptions(name, 2)
    assert (a["api"], a["model"], a["status"]) == ("openai.audio.transcriptions", "gpt-4o-transcribe", "completed")
    assert usages(gateway, a["id"]) == [(14, 3)]
    assert (b["api"], b["model"], b["status"]) == ("openai.audio.speech", "gpt-4o-mini-tts", "completed")


def test_anthropic_message_batches_are_recorded(gateway, mock, user):
    name, token = user
    mock.script(Reply.json({"id": "msgbatch_01", "type": "message_batch", "processing_status": "in_progress",
                            "request_counts": {"processing": 1, "succeeded": 0, "errored": 0, "canceled": 0,
                                               "expired": 0}, "created_at": "2026-11-23T00:00:00Z",
                            "expires_at": "2026-11-24T00:00:00Z", "ended_at": None, "archived_at": None,
                            "cancel_initiated_at": None, "results_url": None}))
    batch = anthropic_client(gateway, token).messages.batches.create(requests=[
        {"custom_id": "one", "params": {"model": "claude-haiku-4-5", "max_tokens": 10,
                                        "messages": [{"role": "user", "content": "hi"}]}}])
    assert batch.id == "msgbatch_01"
    ic = one(gateway, name)
    assert (ic["api"], ic["model"], ic["status"]) == ("anthropic.message_batches", "claude-haiku-4-5", "completed")


def test_spend_endpoints_are_budget_checked(own_gateway, upstream):
    gw = own_gateway("budget", extra={"budgets": {"default": {"requests_per_minute": 1}}})
    token = gw.new_user("spender")
    upstream.default = Reply.json({"object": "list", "model": "m",
                                   "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                                   "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    client = openai_client(gw, token)
    client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="text-embedding-3-small", input="b", encoding_format="float")
    assert len(upstream.seen) == 1


def test_read_only_endpoints_pass_and_unknown_ones_never_get_the_central_key(gateway, mock, user):
    name, token = user
    assert [m.id for m in openai_client(gateway, token).models.list().data] == ["mock-model"]
    assert [m.id for m in anthropic_client(gateway, token).models.list().data] == ["mock-model"]
    n = len(mock.seen)
    for path in ("/openai/v1/organization/admin_api_keys", "/openai/v1/assistants", "/anthropic/v1/organizations/me",
                 "/openai/v1/files"):
        r = httpx.get(gateway.url + path, headers={"authorization": f"Bearer {token}"}, trust_env=False)
        assert r.status_code == 404, path
        assert "not an endpoint this gateway relays" in json.dumps(r.json())
    assert len(mock.seen) == n
    assert gateway.sql(
        f"SELECT count(*) AS n FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
        f"WHERE u.name = '{name}'")[0]["n"] == 0


# --- hostile text in records ----------------------------------------------------------------------------


def test_lone_surrogates_and_undecodable_header_bytes_are_stored_escaped_never_dropped(gateway, mock, user):
    name, token = user
    mock.script(Reply.json(chat_completion(model="gpt-4.1")))
    body = b'{"model": "gpt-4.1\\ud800", "messages": [{"role": "user", "content": "hi \\udfff there"}]}'
    got = api_request(gateway.port, "/openai/v1/chat/completions", token, body,
                      [(b"x-session-id", b"abc\xff"), (b"user-agent", b"ua\xff")])
    assert status_of(got) == 200
    ic = one(gateway, name)
    assert ic["model"] == "gpt-4.1\\ud800"
    assert ic["client_session_id"] == "abc\\xff" and ic["user_agent"] == "ua\\xff"
    assert prompts(gateway, name) == ["hi \\udfff there"]
    health = httpx.get(gateway.url + "/aibridge/healthz", trust_env=False).json()
    assert health["records_dead_lettered"] == 0


def test_a_record_the_store_cannot_take_is_dead_lettered_alone(tmp_path, monkeypatch):
    """One bad row costs a few bisection steps, never the whole batch row by row, and is kept, not dropped."""
    import datetime as dt
    import stat
    import uuid

    from aibridge_gw.store import writer
    from aibridge_gw.store.writer import Insert, Store

    store = Store(tmp_path / "dl.duckdb")
    store.open()
    calls = []
    apply = Store._apply
    monkeypatch.setattr(Store, "_apply", lambda self, batch, tolerant=False: (calls.append(len(batch)),
                                                                              apply(self, batch, tolerant))[1])
    now = dt.datetime.now(dt.UTC)
    good = [Insert("aibridge_users", (str(uuid.uuid4()), f"u{n}", "member", now)) for n in range(1000)]
    bad = Insert("aibridge_users", (str(uuid.uuid4()), None, "member", now))  # NOT NULL name
    store._write(good[:500] + [bad] + good[500:])
    assert store.written == 1000 and store.dead_lettered == 1
    assert len(calls) <= 40  # bisection: a few statements per halving, not 1001 single-row retries
    lines = store.dead_letter_path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["record"][1] == "aibridge_users"
    assert stat.S_IMODE(store.dead_letter_path.stat().st_mode) == 0o600
    assert store.read(lambda c: c.execute("SELECT count(*) FROM aibridge_users").fetchone()[0]).result() == 1000
    store.close()
    assert writer.MAX_BATCH >= 1000


# --- crashes and read-your-writes -----------------------------------------------------------------------


def test_interceptions_left_in_progress_by_kill_9_end_failed_at_the_next_start(tmp_path, upstream):
    upstream.reset()
    gw = Gateway(tmp_path / "crash", upstream.url).start()
    client = httpx.Client(trust_env=False, timeout=30)
    try:
        token = gw.new_user("crash")
        stalled = stream_reply("chat")
        stalled.stall_after = 2  # the provider goes silent mid-stream: the interception is in progress at the kill
        upstream.script(stalled)
        stream = client.stream("POST", gw.url + PATHS["chat"], json=request_body("chat"),
                               headers={"authorization": f"Bearer {token}"})
        resp = stream.__enter__()  # the client stays connected, reading, while the gateway dies
        assert resp.status_code == 200
        gw.wait_for("SELECT * FROM aibridge_interceptions WHERE status = 'in_progress'", timeout=10)
    finally:
        gw.stop(signal.SIGKILL)
        client.close()
    gw.start()
    try:
        (row,) = gw.sql("SELECT status, error, ended_at FROM aibridge_interceptions")
        assert row["status"] == "failed" and row["error"] == "gateway stopped" and row["ended_at"] is not None
        assert httpx.get(gw.url + "/aibridge/healthz", trust_env=False).json()["stale_interceptions_closed"] == 1
    finally:
        gw.stop()
        upstream.reset()


def test_queries_right_after_a_response_see_that_interception(gateway, mock, user):
    name, token = user
    uid = gateway.sql(f"SELECT CAST(id AS VARCHAR) AS id FROM aibridge_users WHERE name = '{name}'")[0]["id"]
    admin = gateway.new_user(f"{name}-admin")
    gateway.op("users.set_role", name=f"{name}-admin", role="admin")
    client = openai_client(gateway, token)
    for n in range(5):
        mock.script(Reply.json(chat_completion()))
        client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": f"q{n}"}])
        api = httpx.get(gateway.url + "/aibridge/api/v1/interceptions", params={"initiator": name},
                        headers={"authorization": f"Bearer {admin}"}, trust_env=False).json()
        assert len(api["data"]) == n + 1
        cli = gateway.sql(f"SELECT count(*) AS n FROM aibridge_interceptions WHERE initiator_id = '{uid}' "
                          "AND status = 'completed'")
        assert cli[0]["n"] == n + 1


def test_json_interception_log_keeps_lines_with_undecodable_client_text(tmp_path):
    from aibridge_gw.interception_log import InterceptionLog

    log = InterceptionLog(str(tmp_path / "i.jsonl"))
    log.write({"msg": "interception log", "model": "gpt-4.1\ud800", "session_id": b"abc\xff".decode("utf-8", "surrogateescape")})
    log.close()
    (line,) = (tmp_path / "i.jsonl").read_text().splitlines()
    assert json.loads(line)["model"] == "gpt-4.1\\ud800" and json.loads(line)["session_id"] == "abc\\xff"
