"""Paid work that is not a single call (#22): realtime sessions, message batches and their results, the OpenAI Batch
API's output files, background responses — through a real gateway with the official SDKs, against a stand-in
upstream speaking the providers' documented wire formats."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.gateway import UPSTREAM_OPENAI_KEY
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client, openai_client

REALTIME_SECRET = {"value": "ek_upstream_ephemeral", "expires_at": 1900000000,
                   "session": {"type": "realtime", "model": "gpt-realtime", "object": "realtime.session"}}


def openai_providers(upstream_url: str, **extra) -> list[dict]:
    return [{"name": "openai", "type": "openai", "base_url": upstream_url + "/v1/", "key": UPSTREAM_OPENAI_KEY,
             **extra}]


# --- realtime sessions ------------------------------------------------------------------------------


def test_realtime_client_secrets_and_sessions_are_refused_by_default(gateway, mock, user):
    """An ephemeral realtime key is billed to the central key and used straight against the provider."""
    name, token = user
    client = openai_client(gateway, token)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.realtime.client_secrets.create(session={"type": "realtime", "model": "gpt-realtime"})
    assert "allow_realtime" in e.value.message
    with pytest.raises(openai.PermissionDeniedError):
        client.beta.realtime.sessions.create(model="gpt-4o-realtime-preview")
    with pytest.raises(openai.PermissionDeniedError):
        client.beta.realtime.transcription_sessions.create()
    assert mock.seen == []  # nothing reached the provider


def test_realtime_is_relayed_and_recorded_when_the_instance_allows_it(own_gateway, upstream):
    gw = own_gateway("realtime", providers=openai_providers(upstream.url, allow_realtime=True))
    token = gw.new_user("rt")
    upstream.script(Reply.json(REALTIME_SECRET))
    secret = openai_client(gw, token).realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-realtime"})
    assert secret.value == "ek_upstream_ephemeral"
    (ic,) = gw.interceptions("rt")
    assert (ic["api"], ic["status"]) == ("openai.realtime", "completed")


def test_allow_realtime_must_be_a_boolean(own_gateway, upstream):
    with pytest.raises(RuntimeError, match="allow_realtime"):
        own_gateway("bad", providers=openai_providers(upstream.url, allow_realtime="sometimes"))


# --- Anthropic message batches ------------------------------------------------------------------------


def anthropic_batch(upstream_url: str, bid: str, ended: bool) -> dict:
    return {"id": bid, "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
            "request_counts": {"processing": 0 if ended else 3, "succeeded": 2 if ended else 0,
                               "errored": 1 if ended else 0, "canceled": 0, "expired": 0},
            "created_at": "2026-12-05T00:00:00Z", "expires_at": "2026-12-06T00:00:00Z",
            "ended_at": "2026-12-05T00:10:00Z" if ended else None, "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{upstream_url}/v1/messages/batches/{bid}/results" if ended else None}


def anthropic_result(custom_id: str, usage: tuple[int, int], model: str = "claude-haiku-4-5-20251001") -> dict:
    return {"custom_id": custom_id, "result": {"type": "succeeded", "message": {
        "id": f"msg_{custom_id}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Done: " + custom_id}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4,
                  "output_tokens": usage[1]}}}}


ANTHROPIC_RESULTS = [
    anthropic_result("a", (40, 30)),
    anthropic_result("b", (50, 20)),
    {"custom_id": "c", "result": {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: too large"}}}},
]


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def anthropic_results_replies(upstream_url: str, bid: str, lines: list[dict] = ANTHROPIC_RESULTS) -> list[Reply]:
    """What `client.messages.batches.results(id)` reads: the batch (for its results_url), then the JSONL."""
    return [Reply.json(anthropic_batch(upstream_url, bid, True)),
            Reply(200, {"content-type": "application/binary"}, jsonl(lines))]


def batch_requests(n: int = 3) -> list[dict]:
    return [{"custom_id": c, "params": {"model": "claude-haiku-4-5", "max_tokens": 64,
                                        "messages": [{"role": "user", "content": f"task {c}"}]}} for c in "abc"[:n]]


def usage_of(gw, iid: str) -> list[dict]:
    return gw.sql("SELECT input_tokens, output_tokens, cache_read_input_tokens, metadata FROM aibridge_token_usages "
                  f"WHERE interception_id = '{iid}'")


def results_interceptions(gw, api: str, n: int) -> list[dict]:
    return gw.wait_for(
        "SELECT i.*, u.name AS initiator FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
        f"WHERE i.api = '{api}' AND i.status <> 'in_progress' ORDER BY i.started_at", lambda rows: len(rows) >= n)


BATCH_BUDGETS = {"budgets": {"users": {"alice": {"tokens_per_day": 100}}}}


def test_anthropic_batch_results_are_metered_once_to_the_creator_even_when_an_admin_fetches_them(
        own_gateway, upstream):
    gw = own_gateway("anthropic-batch", extra=BATCH_BUDGETS)
    alice, admin = gw.new_user("alice"), gw.new_user("ops")
    upstream.script(Reply.json(anthropic_batch(upstream.url, "msgbatch_01A", False)))
    batch = anthropic_client(gw, alice).messages.batches.create(requests=batch_requests())
    (created,) = gw.interceptions("alice")
    assert created["api"] == "anthropic.message_batches"
    assert json.loads(created["metadata"])["requests"] == 3  # creation: recorded with its request count

    # The admin fetches alice's results, through the gateway (results_url points at it), twice.
    for _ in range(2):
        upstream.script(*anthropic_results_replies(upstream.url, batch.id))
        got = list(anthropic_client(gw, admin).messages.batches.results(batch.id))
        assert [r.custom_id for r in got] == ["a", "b", "c"]
        assert got[0].result.message.usage.output_tokens == 30
    assert upstream.seen[-1].path == f"/v1/messages/batches/{batch.id}/results"
    assert upstream.seen[-1].headers["x-api-key"] != admin  # the central key went upstream, never the token

    first, second = results_interceptions(gw, "anthropic.message_batches.results", 2)
    assert first["initiator"] == second["initiator"] == "alice"  # the creator, not whoever fetched
    meta = json.loads(first["metadata"])
    assert meta["fetched_by"] == "ops" and meta["object_id"] == batch.id
    assert meta["results"] == {"succeeded": 2, "errored": 1}
    (usage,) = usage_of(gw, first["id"])  # summed per model
    assert (usage["input_tokens"], usage["output_tokens"], usage["cache_read_input_tokens"]) == (90, 50, 8)
    assert json.loads(usage["metadata"]) == {"model": "claude-haiku-4-5-20251001", "results": 2}
    assert usage_of(gw, second["id"]) == []  # fetched again: recorded, not charged again
    assert json.loads(second["metadata"])["already_metered_by"] == first["id"]

    # Charged to alice's budget (148 tokens of 100), not to the admin's.
    import anthropic
    with pytest.raises(anthropic.RateLimitError):
        anthropic_client(gw, alice).messages.create(model="claude-haiku-4-5", max_tokens=5,
                                                    messages=[{"role": "user", "content": "hi"}])
    budgets = gw.op("report", kind="budgets", budgets=BATCH_BUDGETS["budgets"])["data"]
    assert {b["user"]: b["tokens_today"] for b in budgets} == {"alice": 148, "ops": 0}


def test_results_of_a_batch_created_elsewhere_are_charged_to_the_fetching_user_and_flagged(gateway, mock, user):
    name, token = user
    mock.script(*anthropic_results_replies(mock.url, "msgbatch_elsewhere"))
    assert len(list(anthropic_client(gateway, token).messages.batches.results("msgbatch_elsewhere"))) == 3
    (ic,) = gateway.interceptions(name)
    assert ic["api"] == "anthropic.message_batches.results"
    assert json.loads(ic["metadata"])["creator_unknown"] is True
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage_of(gateway, ic["id"])] == [(90, 50)]


def test_hostile_results_lines_are_survived_and_a_huge_line_is_still_metered(gateway, mock, user):
    """A results file with junk, deep nesting and one 3 MiB result: relayed byte for byte, the gateway keeps serving,
    and the huge result's usage is read from its tail."""
    name, token = user
    huge = anthropic_result("huge", (1000, 2000))
    huge["result"]["message"]["content"][0]["text"] = "x" * (3 << 20)
    body = (b"not json at all\n" + b"[" * 100_000 + b"\n" + b'{"custom_id": 1, "result": []}\n'
            + jsonl([anthropic_result("ok", (10, 5)), huge]))
    mock.script(Reply.json(anthropic_batch(mock.url, "msgbatch_hostile", True)),
                Reply(200, {"content-type": "application/binary"}, body))
    client = anthropic_client(gateway, token)
    raw = client.messages.batches.with_raw_response.retrieve("msgbatch_hostile")
    url = raw.parse().results_url
    assert url.startswith(gateway.url + "/anthropic/")  # pointed at the gateway (base-URL mode)
    import httpx
    got = httpx.get(url, headers={"x-api-key": token}, timeout=30)
    assert got.status_code == 200 and got.content == body
    (ic,) = gateway.interceptions(name)
    meta = json.loads(ic["metadata"])
    assert meta["unreadable_lines"] == 2 and meta["long_lines"] == 1
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage_of(gateway, ic["id"])] == [(1010, 2005)]
    mock.script(Reply.json(anthropic_batch(mock.url, "msgbatch_next", False)))
    assert client.messages.batches.retrieve("msgbatch_next").id == "msgbatch_next"  # still serving



def test_results_a_client_hangs_up_on_are_read_to_the_end_metered_whole_and_not_again(gateway, mock, user):
    """Hanging up before the last byte must not make results free: the gateway reads the results on to their end
    (timeouts.drain_after_disconnect_seconds) and meters them all, once; fetching them again is not charged."""
    import httpx

    name, token = user
    lines = [json.dumps(r).encode() + b"\n" for r in ANTHROPIC_RESULTS[:2]] + [
        json.dumps(anthropic_result("late", (1000, 1000))).encode() + b"\n"]
    mock.script(Reply(200, {"content-type": "application/binary"}, events=lines, delay=1.0))
    url = f"{gateway.url}/anthropic/v1/messages/batches/msgbatch_cut/results"
    with httpx.stream("GET", url, headers={"x-api-key": token}, timeout=10) as r:
        got = []
        for line in r.iter_lines():
            got.append(json.loads(line)["custom_id"])
            if len(got) == 2:
                break  # hang up with two results read; the third is still to come
    (cut,) = gateway.interceptions(name)
    assert cut["status"] == "completed" and json.loads(cut["metadata"])["client_disconnected"] is True
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage_of(gateway, cut["id"])] == [(1090, 1050)]
    mock.script(Reply(200, {"content-type": "application/binary"}, b"".join(lines)))
    assert httpx.get(url, headers={"x-api-key": token}, timeout=10).content == b"".join(lines)
    again = gateway.interceptions(name, 2)[1]
    assert usage_of(gateway, again["id"]) == [] and json.loads(again["metadata"])["already_metered_by"] == cut["id"]


def test_a_batch_status_in_an_encoding_nobody_knows_is_relayed_as_it_came(gateway, mock, user):
    """The batch-status watch decodes the body to point results_url at the gateway: a body mitmproxy cannot decode
    goes to the client unchanged, and nothing escapes the response hook."""
    import httpx

    name, token = user
    body = json.dumps(anthropic_batch(mock.url, "msgbatch_odd", True)).encode()
    before = gateway.log().count("Traceback")
    mock.script(Reply(200, {"content-type": "application/json", "content-encoding": "x-aibridge-unknown"}, body))
    r = httpx.get(f"{gateway.url}/anthropic/v1/messages/batches/msgbatch_odd", headers={"x-api-key": token},
                  timeout=10)
    assert r.status_code == 200 and r.headers["content-encoding"] == "x-aibridge-unknown"
    assert r.content == body
    assert gateway.log().count("Traceback") == before


def test_a_batch_status_sent_chunked_still_points_results_at_the_gateway(gateway, mock, user):
    name, token = user
    status = json.dumps(anthropic_batch(mock.url, "msgbatch_chunked", True)).encode()
    mock.script(Reply(200, {"content-type": "application/json"}, events=[status[:40], status[40:]]),
                Reply(200, {"content-type": "application/binary"}, jsonl(ANTHROPIC_RESULTS)))
    assert len(list(anthropic_client(gateway, token).messages.batches.results("msgbatch_chunked"))) == 3
    assert mock.seen[-1].path == "/v1/messages/batches/msgbatch_chunked/results"
    (ic,) = gateway.interceptions(name)
    assert ic["api"] == "anthropic.message_batches.results"


# --- OpenAI Batch API -------------------------------------------------------------------------------


def openai_batch(bid: str, status: str, output: str | None = None, errors: str | None = None) -> dict:
    return {"id": bid, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
            "input_file_id": "file-input", "completion_window": "24h", "status": status,
            "output_file_id": output, "error_file_id": errors, "created_at": 1764892800,
            "request_counts": {"total": 3, "completed": 2 if output else 0, "failed": 1 if errors else 0}}


def openai_output_line(custom_id: str, usage: tuple[int, int], cached: int = 0, model: str = "gpt-4.1-mini") -> dict:
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "error": None, "response": {
        "status_code": 200, "request_id": f"req_{custom_id}", "body": {
            "id": f"chatcmpl-{custom_id}", "object": "chat.completion", "created": 1764892900, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage),
                      "prompt_tokens_details": {"cached_tokens": cached}}}}}


OPENAI_OUTPUT = [openai_output_line("r1", (30, 10), cached=8), openai_output_line("r2", (25, 15)),
                 openai_output_line("r3", (5, 5), model="gpt-4.1")]
OPENAI_ERRORS = [{"id": "batch_req_r4", "custom_id": "r4", "response": {
    "status_code": 400, "request_id": "req_r4", "body": {"error": {"message": "bad", "type": "invalid_request_error"}}},
    "error": None}]


def test_openai_batch_output_file_is_metered_once_to_the_batch_creator(own_gateway, upstream):
    gw = own_gateway("openai-batch", extra=BATCH_BUDGETS)
    alice, admin = gw.new_user("alice"), gw.new_user("ops")
    client = openai_client(gw, alice)
    upstream.script(Reply.json({"id": "file-input", "object": "file", "bytes": 10, "created_at": 1764892800,
                                "filename": "in.jsonl", "purpose": "batch", "status": "processed"}),
                    Reply.json(openai_batch("batch_01", "validating")),
                    Reply.json(openai_batch("batch_01", "completed", "file-out", "file-err")))
    client.files.create(file=("in.jsonl", b'{"custom_id":"r1"}\n'), purpose="batch")
    batch = client.batches.create(input_file_id="file-input", endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert client.batches.retrieve(batch.id).output_file_id == "file-out"  # learned: file-out is batch_01's output
    (created,) = gw.interceptions("alice")
    assert created["api"] == "openai.batches"
    assert json.loads(created["metadata"])["input_file_id"] == "file-input"

    for _ in range(2):  # the admin downloads alice's output twice, and the error file
        upstream.script(Reply(200, {"content-type": "application/octet-stream"}, jsonl(OPENAI_OUTPUT)))
        assert openai_client(gw, admin).files.content("file-out").content == jsonl(OPENAI_OUTPUT)
    upstream.script(Reply(200, {"content-type": "application/octet-stream"}, jsonl(OPENAI_ERRORS)))
    openai_client(gw, admin).files.content("file-err")

    first, second, errors = results_interceptions(gw, "openai.batches.results", 3)
    assert first["initiator"] == second["initiator"] == errors["initiator"] == "alice"
    assert json.loads(first["metadata"])["fetched_by"] == "ops"
    by_model = {json.loads(u["metadata"])["model"]: (u["input_tokens"], u["cache_read_input_tokens"],
                                                     u["output_tokens"]) for u in usage_of(gw, first["id"])}
    assert by_model == {"gpt-4.1-mini": (47, 8, 25), "gpt-4.1": (5, 0, 5)}
    assert usage_of(gw, second["id"]) == [] and usage_of(gw, errors["id"]) == []
    assert json.loads(errors["metadata"])["results"] == {"errored": 1}
    budgets = gw.op("report", kind="budgets", budgets=BATCH_BUDGETS["budgets"])["data"]
    assert {b["user"]: b["tokens_today"] for b in budgets} == {"alice": 90, "ops": 0}
    # Each model at its own price (gpt-4.1-mini: 47 in, 8 cached, 25 out; gpt-4.1: 5 in, 5 out), also when rebuilt.
    assert {b["user"]: b["usd_month"] for b in budgets} == {"alice": 0.00011, "ops": 0}
    with pytest.raises(openai.RateLimitError):  # charged live too: 90 + one more call's worth goes over 100
        upstream.script(Reply.json({"object": "list", "model": "m",
                                    "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                                    "usage": {"prompt_tokens": 20, "total_tokens": 20}}))
        client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
        client.embeddings.create(model="text-embedding-3-small", input="b", encoding_format="float")


# --- background responses -------------------------------------------------------------------------------


def background_response(rid: str, status: str, usage: tuple[int, int] | None = None) -> dict:
    return {"id": rid, "object": "response", "created_at": 1764892800, "status": status, "background": True,
            "model": "gpt-5", "output": [] if usage is None else [
                {"id": "msg_bg", "type": "message", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "done", "annotations": []}]}],
            "usage": None if usage is None else {
                "input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0}, "output_tokens": usage[1],
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": sum(usage)}}


def test_background_response_usage_is_recorded_once_when_retrieved_finished(own_gateway, upstream):
    gw = own_gateway("background")
    alice, admin = gw.new_user("alice"), gw.new_user("ops")
    client = openai_client(gw, alice)
    upstream.script(Reply.json(background_response("resp_bg1", "queued")))
    assert client.responses.create(model="gpt-5", input="write a long report", background=True).status == "queued"
    (created,) = gw.interceptions("alice")
    assert created["api"] == "openai.responses" and json.loads(created["metadata"])["background"] is True
    assert usage_of(gw, created["id"]) == []

    upstream.script(Reply.json(background_response("resp_bg1", "in_progress")),
                    Reply.json(background_response("resp_bg1", "completed", (300, 120))),
                    Reply.json(background_response("resp_bg1", "completed", (300, 120))))
    assert client.responses.retrieve("resp_bg1").status == "in_progress"  # a poll: nothing to record yet
    assert openai_client(gw, admin).responses.retrieve("resp_bg1").status == "completed"
    assert client.responses.retrieve("resp_bg1").usage.output_tokens == 120  # read again: not charged again

    (done,) = results_interceptions(gw, "openai.responses.retrieve", 1)
    assert done["initiator"] == "alice" and json.loads(done["metadata"])["fetched_by"] == "ops"
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage_of(gw, done["id"])] == [(300, 120)]
    assert len(gw.sql("SELECT id FROM aibridge_interceptions WHERE api = 'openai.responses.retrieve'")) == 1


def test_background_response_streamed_on_retrieval_is_metered_from_its_final_event(own_gateway, upstream):
    from tests.support.wire import responses_stream

    gw = own_gateway("background-stream")
    alice = gw.new_user("alice")
    client = openai_client(gw, alice)
    upstream.script(Reply.json(background_response("resp_test", "queued")),
                    Reply.sse(responses_stream(usage=(12, 7))), Reply.sse(responses_stream(usage=(12, 7))))
    client.responses.create(model="gpt-5", input="hi", background=True)
    for _ in range(2):
        events = list(client.responses.retrieve("resp_test", stream=True))
        assert events[-1].type == "response.completed"
    assert upstream.seen[-1].path == "/v1/responses/resp_test?stream=true"
    (done,) = results_interceptions(gw, "openai.responses.retrieve", 1)
    assert done["initiator"] == "alice"
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage_of(gw, done["id"])] == [(12, 7)]
    assert len(gw.sql("SELECT id FROM aibridge_interceptions WHERE api = 'openai.responses.retrieve'")) == 1


def test_a_background_stream_its_client_left_is_still_metered_when_retrieved(own_gateway, upstream):
    """`background: true` with `stream: true`: the client hanging up (or the read being cut) does not stop the
    response, which runs on and is billed; the creating row ends failed without usage, and the finished response,
    retrieved later, is metered to its creator."""
    from tests.support.wire import api_request, responses_stream

    gw = own_gateway("background-gone", extra={"timeouts": {"drain_after_disconnect_seconds": 0}})
    alice = gw.new_user("alice")
    upstream.script(Reply.sse(responses_stream(usage=(12, 7)), delay=0.3))
    api_request(gw.port, "/openai/v1/responses", alice,
                {"model": "gpt-5", "input": "a long report", "stream": True, "background": True},
                read_until=b"response.output_text.delta")
    (created,) = results_interceptions(gw, "openai.responses", 1)
    assert created["status"] == "failed" and usage_of(gw, created["id"]) == []
    upstream.script(Reply.json(background_response("resp_test", "completed", (300, 120))))
    assert openai_client(gw, alice).responses.retrieve("resp_test").status == "completed"
    (done,) = results_interceptions(gw, "openai.responses.retrieve", 1)
    assert done["initiator"] == "alice"
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage_of(gw, done["id"])] == [(300, 120)]


def test_retrieving_a_response_created_in_the_foreground_is_not_charged_again(gateway, mock, user):
    name, token = user
    mock.script(Reply.json(background_response("resp_fg", "completed", (5, 5))))
    assert openai_client(gateway, token).responses.retrieve("resp_fg").status == "completed"
    assert gateway.sql("SELECT i.id FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
                       f"WHERE u.name = '{name}'") == []


# --- the endpoint table -------------------------------------------------------------------------------


def test_the_endpoint_table_lists_every_endpoint_the_providers_serve_and_the_readme_links_it():
    from aibridge_gw.admin import endpoints_doc
    from aibridge_gw.apis import PROVIDERS

    from tests.support.gateway import ROOT

    text = (ROOT / "docs" / "endpoints.md").read_text()
    assert endpoints_doc.rewritten(text) == text, "regenerate: python -m aibridge_gw.admin.endpoints_doc --write …"
    for ptype, provider in PROVIDERS.items():
        for ep in provider.endpoints:
            path = ("/v1" if provider.version_in_base_url else "") + ep.label
            for method in ep.methods:
                assert f"| {ptype} | {method} | `{path}` |" in text
    assert "| openai | POST | `/v1/realtime/client_secrets` | refused 403 |" in text
    assert "(docs/endpoints.md)" in (ROOT / "README.md").read_text()


# --- the claim, on the store itself (DuckDB here; PostgreSQL in test_postgres.py) ----------------------------


ALICE = "0a11ce00-0000-4000-8000-000000000001"


def claim_scenario(stores) -> None:
    """Creation rows, then claims from several stores (gateways) at once: each object is metered exactly once."""
    import concurrent.futures as cf
    import datetime as dt

    from aibridge_gw.flow.objects import object_key
    from aibridge_gw.store.rows import PROVIDER_OBJECTS

    now = dt.datetime.now(dt.UTC)
    batch, file = object_key("openai", "openai_batch", "batch_1"), object_key("openai", "openai_file", "file-out")
    stores[0].submit(PROVIDER_OBJECTS.row(id=batch, provider_name="openai", kind="openai_batch", object_id="batch_1",
                                          user_id=ALICE, user_name="alice", created_at=now))
    stores[0].submit(PROVIDER_OBJECTS.row(id=file, provider_name="openai", kind="openai_file", object_id="file-out",
                                          parent_id=batch, created_at=now))
    stores[0].flush().result(timeout=30)

    def claim(n: int, key: str, adopt=None, claim=True) -> dict:
        iid = f"11111111-2222-4333-8444-{n:012d}"
        return stores[n % len(stores)].run("claim_object", True, id=key, interception_id=iid, at=now.isoformat(),
                                           adopt=adopt, claim=claim).result(timeout=30)

    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda n: claim(n, file), range(8)))
    assert sum(g["claimed"] for g in got) == 1  # one wins, whichever gateway
    assert all(g["creator"] == [ALICE, "alice", None, None] and g["known"] for g in got)  # the batch's creator
    assert len({g["metered_by"] for g in got if not g["claimed"]}) == 1
    assert claim(20, file, claim=False)["creator"][1] == "alice"  # a look-up only
    unknown = object_key("openai", "openai_file", "file-elsewhere")
    assert claim(21, unknown) == {"known": False, "claimed": False, "creator": None}  # no adopt: left unknown
    adopt = {"provider_name": "openai", "kind": "openai_file", "object_id": "file-elsewhere", "user_id": ALICE,
             "user_name": "bob", "on_behalf_of_id": None, "on_behalf_of_name": None}
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda n: claim(n, unknown, adopt), range(30, 38)))
    assert sum(g["claimed"] for g in got) == 1


def test_an_object_is_claimed_once_however_many_fetch_it_at_once(tmp_path):
    from aibridge_gw.store.writer import Store

    store = Store(tmp_path / "claims.duckdb")
    store.open()
    try:
        claim_scenario([store])
    finally:
        store.close()


def test_the_results_tap_reads_the_same_whatever_the_chunking():
    """Lines split anywhere across chunks, a line past the bound spanning many chunks, no final newline."""
    import random

    from aibridge_gw.apis.anthropic import PROVIDER
    from aibridge_gw.apis.wire.results import MAX_LINE, ResultsTap

    huge = anthropic_result("huge", (7, 9))
    huge["result"]["message"]["content"][0]["text"] = "y" * (MAX_LINE + 12345)
    body = jsonl([anthropic_result(str(n), (n, 2 * n)) for n in range(1, 40)] + [huge])[:-1] + b"\n\n" + json.dumps(
        anthropic_result("last", (100, 1), model="claude-opus-4-1")).encode()
    codec = PROVIDER.apis["anthropic.message_batches.results"]
    rng = random.Random(7)
    for _ in range(5):
        tap, at, relayed = ResultsTap(codec), 0, b""
        while at < len(body):
            n = rng.choice((1, 7, 100, 4096, 65536, 300_000))
            relayed += tap(body[at:at + n])
            at += n
        tap(b"")
        assert relayed == body
        s = tap.summary
        assert s.complete and s.state == {"results": {"succeeded": 41}, "long_lines": 1}
        totals = {u.metadata["model"]: (u.input_tokens, u.output_tokens, u.metadata["results"]) for u in s.usages}
        assert totals == {"claude-haiku-4-5-20251001": (sum(range(1, 40)) + 7, 2 * sum(range(1, 40)) + 9, 40),
                          "claude-opus-4-1": (100, 1, 1)}


def test_prune_forgets_provider_objects_older_than_the_audit_it_keeps(tmp_path):
    import datetime as dt

    import duckdb
    from aibridge_gw.store import ops
    from aibridge_gw.store.schema import migrate

    conn = duckdb.connect(str(tmp_path / "prune.duckdb"))
    migrate(conn)
    now = dt.datetime.now(dt.UTC)
    for n, age in enumerate((90, 1)):
        conn.execute("INSERT INTO aibridge_provider_objects (id, provider_name, kind, object_id, created_at) "
                     "VALUES (uuid(), 'anthropic', 'anthropic_batch', ?, ?)", [f"msgbatch_{n}", now - dt.timedelta(days=age)])
    ops.prune(conn, 60)
    assert conn.execute("SELECT object_id FROM aibridge_provider_objects").fetchall() == [("msgbatch_1",)]


def test_a_long_line_full_of_usage_keys_costs_little():
    import time

    from aibridge_gw.apis.anthropic import PROVIDER
    from aibridge_gw.apis.wire.results import MAX_LINE, ResultsTap

    tap = ResultsTap(PROVIDER.apis["anthropic.message_batches.results"])
    line = b'{"custom_id":"x","result":' + b'{"usage":{"a":[' * (MAX_LINE // 15) + b"\n"
    started = time.monotonic()
    for at in range(0, len(line), 65536):
        tap(line[at:at + 65536])
    tap(b"")
    assert time.monotonic() - started < 1.0
    assert tap.summary.state == {"results": {}, "unreadable_lines": 1}


def test_results_usage_values_are_read_as_every_usage_is():
    """A result's counts as providers may send them: `1000.0` is 1000 (it counted 0), and a negative count is 0
    rather than taking tokens off the other results of the same model."""
    from aibridge_gw.apis.anthropic import PROVIDER
    from aibridge_gw.apis.wire.results import ResultsTap

    lines = [anthropic_result("a", (10, 20)), anthropic_result("b", (10, 20)), anthropic_result("c", (10, 20))]
    lines[1]["result"]["message"]["usage"].update(input_tokens=1000.0, output_tokens=5.0)
    lines[2]["result"]["message"]["usage"].update(input_tokens=-1_000_000)
    tap = ResultsTap(PROVIDER.apis["anthropic.message_batches.results"])
    tap(jsonl(lines))
    tap(b"")
    (u,) = tap.summary.usages
    assert (u.input_tokens, u.output_tokens) == (1010, 45)
