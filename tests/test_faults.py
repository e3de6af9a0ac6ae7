"""Faults: unreachable or failing providers, streams that die, bad input. The client always gets an error it
can parse, the interception ends failed with what was seen, and the gateway keeps serving others."""

from __future__ import annotations

import gzip
import json
import socket
import time

import anthropic
import httpx
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY, Gateway, free_port
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, openai_client


@pytest.fixture(scope="module")
def blackhole():
    """A port that never completes a TCP handshake: a listener whose accept queue is full drops new SYNs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    addr = sock.getsockname()
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.settimeout(0.5)
        try:
            c.connect(addr)
        except (TimeoutError, OSError):
            c.close()
            break
        fillers.append(c)
    else:
        pytest.skip("this kernel accepts connections beyond the listen backlog")
    yield f"http://127.0.0.1:{addr[1]}"
    for c in fillers:
        c.close()
    sock.close()


@pytest.fixture(scope="module")
def fgw(tmp_path_factory, upstream, blackhole):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = Gateway(tmp_path_factory.mktemp("faults"), upstream.url, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/", "key": UPSTREAM_ANTHROPIC_KEY},
        {"name": "openai", "type": "openai", "base_url": upstream.url + "/v1/", "key": UPSTREAM_OPENAI_KEY},
        {"name": "deadant", "type": "anthropic", "base_url": dead + "/", "key": UPSTREAM_ANTHROPIC_KEY},
        {"name": "deadoai", "type": "openai", "base_url": dead + "/v1/", "key": UPSTREAM_OPENAI_KEY},
        {"name": "blackhole", "type": "anthropic", "base_url": blackhole + "/", "key": UPSTREAM_ANTHROPIC_KEY},
    ], extra={"circuit_breaker": {"failures": 2, "open_seconds": 1, "half_open_requests": 1},
              "limits": {"max_request_body_mb": 1},
              "timeouts": {"connect_seconds": 2, "response_seconds": 1.5, "stream_idle_seconds": 1}}).start()
    gw.token = gw.new_user("faulty")
    yield gw
    gw.stop()


def hi(model="claude-sonnet-4-0"):
    return {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def ended(gw, model):
    """The finished interception for `model` (each test uses its own model name), once it is recorded."""
    return gw.wait_for(f"SELECT * FROM aibridge_interceptions WHERE model = '{model}' AND status <> 'in_progress'",
                       lambda rows: len(rows) == 1)[0]


def latest(gw, n=1):
    return gw.wait_for("SELECT * FROM aibridge_interceptions WHERE status <> 'in_progress' ORDER BY started_at DESC",
                       lambda rows: len(rows) >= n)


def test_unreachable_provider_gives_a_parseable_error_in_both_sdks(fgw, mock):
    client = anthropic.Anthropic(base_url=fgw.url + "/deadant", api_key=fgw.token, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as e:
        client.messages.create(**hi(model="claude-unreachable"))
    assert e.value.status_code == 502 and "aibridge" in e.value.message and e.value.body["error"]["type"] == "api_error"
    oai = openai.OpenAI(base_url=fgw.url + "/deadoai/v1", api_key=fgw.token, max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        oai.chat.completions.create(model="gpt-unreachable", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and "aibridge" in e.value.message
    rows = latest(fgw, 2)
    assert {r["model"] for r in rows[:2]} == {"claude-unreachable", "gpt-unreachable"}
    assert all(r["status"] == "failed" and r["error"] for r in rows[:2])


def test_connection_reset_before_headers_is_a_502_in_each_providers_format(fgw, mock):
    mock.script(Reply(reset=True), Reply(reset=True))
    with pytest.raises(anthropic.InternalServerError) as e:
        anthropic_client(fgw, fgw.token).messages.create(**hi(model="claude-reset"))
    assert e.value.status_code == 502 and e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"
    with pytest.raises(openai.InternalServerError) as e:
        openai_client(fgw, fgw.token).chat.completions.create(model="gpt-reset", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and e.value.body["type"] == "server_error" and "aibridge" in e.value.message
    for model in ("claude-reset", "gpt-reset"):
        row = ended(fgw, model)
        assert row["status"] == "failed" and row["http_status"] is None and row["error"]


def test_circuit_opens_after_consecutive_failures_and_closes_after_a_good_trial(fgw, mock):
    client = anthropic_client(fgw, fgw.token)
    fail = Reply.json({"type": "error", "error": {"type": "api_error", "message": "boom"}}, 500)
    mock.script(fail, fail)
    for _ in range(2):
        with pytest.raises(anthropic.InternalServerError):
            client.messages.create(**hi(model="claude-flaky"))
    with pytest.raises(anthropic.APIStatusError) as e:  # open: answered by the gateway
        client.messages.create(**hi(model="claude-flaky"))
    assert e.value.status_code == 503 and "circuit open" in e.value.message
    assert e.value.response.headers["retry-after"] == "1"
    assert len(mock.seen) == 2
    # Other models and endpoints are not affected.
    mock.script(Reply.from_capture(capture("anthropic/simple.txtar"), False))
    client.messages.create(**hi(model="claude-healthy"))
    time.sleep(1.1)
    mock.script(Reply.from_capture(capture("anthropic/simple.txtar"), False),
                Reply.from_capture(capture("anthropic/simple.txtar"), False))
    client.messages.create(**hi(model="claude-flaky"))  # the half-open trial succeeds
    client.messages.create(**hi(model="claude-flaky"))  # closed again
    metrics = httpx.get(fgw.url + "/aibridge/metrics", trust_env=False).text
    assert 'aibridge_circuit_breaker_trips_total{endpoint="/v1/messages",model="claude-flaky",provider="anthropic"} 1.0' in metrics


def test_clients_hanging_up_before_the_answer_do_not_open_the_circuit(fgw, mock):
    """A load generator stopping, or a user pressing Esc, cancels requests still waiting for the provider: that
    says nothing about the provider, and must not let one client open the circuit for everyone."""
    slow = Reply.from_capture(capture("anthropic/simple.txtar"), False)
    slow.hang = 1.0
    mock.script(*[slow] * 4)
    for _ in range(4):  # twice the breaker's threshold
        with socket.create_connection(("127.0.0.1", fgw.port)) as s:
            body = json.dumps(hi(model="claude-abandoned")).encode()
            s.sendall(b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                      b"x-api-key: " + fgw.token.encode() + b"\r\ncontent-length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
            time.sleep(0.3)  # the request reached the provider; the client leaves before it answers
    rows = fgw.wait_for("SELECT * FROM aibridge_interceptions WHERE model = 'claude-abandoned' "
                        "AND status <> 'in_progress'", lambda rows: len(rows) == 4)
    assert all(r["status"] == "failed" for r in rows)
    mock.script(Reply.from_capture(capture("anthropic/simple.txtar"), False))
    anthropic_client(fgw, fgw.token).messages.create(**hi(model="claude-abandoned"))  # not 503 "circuit open"


def test_overloaded_529_reaches_the_client_unchanged(fgw, mock):
    mock.script(Reply.json({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 529))
    with pytest.raises(anthropic.APIStatusError) as e:
        anthropic_client(fgw, fgw.token).messages.create(**hi(model="claude-busy"))
    assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
    assert ended(fgw, "claude-busy")["http_status"] == 529


def test_stream_that_dies_midway_ends_with_the_api_error_event_and_usage_seen(fgw, mock):
    reply = Reply.from_capture(capture("anthropic/simple.txtar"), True)
    reply.cut_after = 5
    mock.script(reply)
    client = anthropic_client(fgw, fgw.token)
    events = []
    with pytest.raises(anthropic.APIStatusError) as e:
        for ev in client.messages.create(stream=True, **hi(model="claude-dies")):
            events.append(ev.type)
    assert events[0] == "message_start" and "message_stop" not in events
    assert "aibridge" in e.value.message and e.value.body["error"]["type"] == "api_error"
    row = ended(fgw, "claude-dies")
    assert row["status"] == "failed" and row["error"]
    usage = fgw.sql(f"SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = '{row['id']}'")
    assert usage == [{"input_tokens": 21, "output_tokens": 1}]
    # The same client (and connection pool) keeps working: the gateway ended the stream, not the connection.
    mock.script(Reply.from_capture(capture("anthropic/simple.txtar"), True))
    assert anthropic_call(client, {**hi(model="claude-after")}, True)[-1].type == "message_stop"


def test_chat_stream_that_dies_midway_raises_an_api_error_in_the_openai_sdk(fgw, mock):
    cap = capture("openai/chatcompletions/simple.txtar")
    reply = Reply.from_capture(cap, True)
    reply.cut_after = 3
    mock.script(reply)
    seen = []
    with pytest.raises(openai.APIError) as e:
        for chunk in openai_client(fgw, fgw.token).chat.completions.create(
                model="gpt-dies", messages=[{"role": "user", "content": "hi"}], stream=True):
            seen.append(chunk)
    assert len(seen) == 3 and "aibridge" in e.value.message
    assert ended(fgw, "gpt-dies")["status"] == "failed"


def test_responses_stream_that_dies_midway_ends_with_error_and_response_failed(fgw, mock):
    cap = capture("openai/responses/streaming/simple.txtar")
    reply = Reply.from_capture(cap, True)
    reply.cut_after = 4
    mock.script(reply)
    events = list(openai_client(fgw, fgw.token).responses.create(model="gpt-resp-dies", input="hi", stream=True))
    assert [ev.type for ev in events[-2:]] == ["error", "response.failed"]
    seqs = [ev.sequence_number for ev in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # the gateway's events continue the numbering
    assert "aibridge" in events[-2].message and events[-1].response.status == "failed"
    row = ended(fgw, "gpt-resp-dies")
    assert row["status"] == "failed"


def test_stream_that_ends_without_its_final_event_gets_an_error_event(fgw, mock):
    events = Reply.from_capture(capture("anthropic/simple.txtar"), True).events
    mock.script(Reply.sse(events[:4]))  # a clean end of the HTTP body, but no message_stop
    with pytest.raises(anthropic.APIStatusError, match="final event"):
        anthropic_call(anthropic_client(fgw, fgw.token), hi(model="claude-short"), True)
    row = ended(fgw, "claude-short")
    assert row["status"] == "failed"


def test_silent_stream_is_ended_after_the_idle_timeout(fgw, mock):
    reply = Reply.from_capture(capture("anthropic/simple.txtar"), True)
    reply.stall_after = 3
    mock.script(reply)
    t = time.monotonic()
    with pytest.raises(anthropic.APIStatusError, match="silent for more than 1 s"):
        anthropic_call(anthropic_client(fgw, fgw.token), hi(model="claude-silent"), True)
    assert time.monotonic() - t < 10
    row = ended(fgw, "claude-silent")
    assert row["status"] == "failed" and "silent" in row["error"]
    deadline = time.time() + 5
    while mock.aborted == 0 and time.time() < deadline:  # the provider connection was closed, not left open
        time.sleep(0.05)
    assert mock.aborted == 1


def test_provider_that_never_answers_times_out_with_504_in_provider_format(fgw, mock):
    mock.script(Reply(**{**Reply.json({"object": "chat.completion"}).__dict__, "hang": 4}))
    t = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        openai_client(fgw, fgw.token).chat.completions.create(model="gpt-hangs", messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - t < 4
    assert e.value.status_code == 504 and "did not answer within 1.5 s" in e.value.message
    assert e.value.body["type"] == "server_error"  # OpenAI's error shape: {"error": {...}}
    row = ended(fgw, "gpt-hangs")
    assert row["status"] == "failed" and "did not answer" in row["error"]


def test_provider_that_cannot_be_reached_times_out_connecting_with_504(fgw, mock):
    client = anthropic.Anthropic(base_url=fgw.url + "/blackhole", api_key=fgw.token, max_retries=0)
    t = time.monotonic()
    with pytest.raises(anthropic.InternalServerError) as e:
        client.messages.create(**hi(model="claude-blackhole"))
    assert time.monotonic() - t < 10  # the kernel alone would keep retrying the SYN for minutes
    assert e.value.status_code == 504 and "could not connect to the provider within 2 s" in e.value.message
    row = ended(fgw, "claude-blackhole")
    assert row["status"] == "failed" and "could not connect" in row["error"]


@pytest.mark.parametrize("n,body", list(enumerate([b"<html>502 Bad Gateway</html>", b"[1, 2]", b'{"truncated": '])))
def test_blocking_200_that_is_not_json_becomes_a_502_in_provider_format(fgw, mock, n, body):
    mock.script(Reply(200, {"content-type": "application/json"}, body))
    with pytest.raises(anthropic.InternalServerError) as e:
        anthropic_client(fgw, fgw.token).messages.create(**hi(model=f"claude-garbled-{n}"))
    assert e.value.status_code == 502 and e.value.body["error"]["type"] == "api_error"
    row = ended(fgw, f"claude-garbled-{n}")
    assert row["status"] == "failed" and row["http_status"] == 200


def test_client_disconnect_mid_stream_reads_the_answer_to_its_end_and_leaks_nothing(fgw, mock):
    """The client leaves after two chunks: the gateway reads the provider's answer to its end (each chunk within
    stream_idle_seconds, the whole longer than it), records the call complete with the provider's final usage and
    notes the disconnect; no connection or task is left behind."""
    health = lambda: httpx.get(fgw.url + "/aibridge/healthz", trust_env=False).json()
    before = health()
    reply = Reply.from_capture(capture("anthropic/simple.txtar"), True, delay=0.2)
    mock.script(reply)
    with httpx.Client(trust_env=False, timeout=10) as c:
        with c.stream("POST", fgw.url + "/anthropic/v1/messages", json={**hi(model="claude-leaves"), "stream": True},
                      headers={"x-api-key": fgw.token}) as r:
            chunks = r.iter_raw()
            next(chunks), next(chunks)
            assert health()["inflight"] == 1
    deadline = time.time() + 15
    while time.time() < deadline and not (mock.active == 0 and health()["inflight"] == 0):
        time.sleep(0.1)
    assert mock.aborted == 0 and mock.active == 0
    after = health()
    assert after["inflight"] == 0
    assert after["connections"] <= before["connections"] and after["tasks"] <= before["tasks"]
    row = ended(fgw, "claude-leaves")
    assert row["status"] == "completed" and row["error"] is None
    assert json.loads(row["metadata"])["client_disconnected"] is True
    usage = fgw.sql(f"SELECT input_tokens, output_tokens, usage_estimated FROM aibridge_token_usages "
                    f"WHERE interception_id = '{row['id']}'")
    assert usage == [{"input_tokens": 21, "output_tokens": 187, "usage_estimated": False}]


def test_stream_longer_than_the_idle_timeout_is_not_cut_while_its_chunks_keep_coming(fgw, mock):
    """stream_idle_seconds (1 s here) is the silence between two chunks, not the length of the stream: it was
    measured from the response's start (the tap's monotonic clock against the watch's wall clock)."""
    mock.script(Reply.from_capture(capture("anthropic/simple.txtar"), True, delay=0.3))
    with httpx.Client(trust_env=False, timeout=10) as c:
        with c.stream("POST", fgw.url + "/anthropic/v1/messages", json={**hi(model="claude-long"), "stream": True},
                      headers={"x-api-key": fgw.token}) as r:
            body = b"".join(r.iter_raw())
    assert b"message_stop" in body and b"silent" not in body
    row = ended(fgw, "claude-long")
    assert row["status"] == "completed" and row["error"] is None


def test_oversized_body_is_413_in_provider_format(fgw, mock):
    big = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    r = httpx.post(fgw.url + "/openai/v1/chat/completions", json=big, trust_env=False,
                   headers={"authorization": f"Bearer {fgw.token}"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert mock.seen == []


def test_gzip_request_body_is_parsed_and_forwarded(fgw, mock):
    cap = capture("openai/chatcompletions/simple.txtar")
    mock.script(Reply.from_capture(cap, False))
    body = {**cap.request, "model": "gpt-gzip"}
    r = httpx.post(fgw.url + "/openai/v1/chat/completions", content=gzip.compress(json.dumps(body).encode()),
                   trust_env=False, headers={"authorization": f"Bearer {fgw.token}", "content-encoding": "gzip",
                                             "content-type": "application/json"})
    assert r.status_code == 200
    seen = mock.seen[0]
    raw = gzip.decompress(seen.body) if seen.headers.get("content-encoding") == "gzip" else seen.body
    assert json.loads(raw)["model"] == "gpt-gzip"
    row = ended(fgw, "gpt-gzip")
    assert row["status"] == "completed"


@pytest.mark.parametrize("body", [b"\xff\xfe{\"model\": 1}", b'{"model": "m", "messages": [1, 2]}',
                                  b'{"model": "m", "messages": [], "stream": "yes"}'])
def test_bad_bodies_are_clean_400s(fgw, mock, body):
    r = httpx.post(fgw.url + "/anthropic/v1/messages", content=body, trust_env=False,
                   headers={"x-api-key": fgw.token, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert mock.seen == []


def test_many_messages_and_tools_are_handled(fgw, mock):
    cap = capture("anthropic/simple.txtar")
    mock.script(Reply.from_capture(cap, False))
    body = {"model": "claude-many", "max_tokens": 10,
            "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(5001)],
            "tools": [{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(500)]}
    r = httpx.post(fgw.url + "/anthropic/v1/messages", json=body, trust_env=False, timeout=30,
                   headers={"x-api-key": fgw.token})
    assert r.status_code == 200
    assert ended(fgw, "claude-many")["status"] == "completed"
