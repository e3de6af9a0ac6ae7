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
        own_gateway("bad", providers=openai_providers(upstream.url, allow_realtime="yes"))


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
