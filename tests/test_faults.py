"""Faults: unreachable or failing providers, streams that die, bad input. The client always gets an error it
can parse, the interception ends failed with what was seen, and the gateway keeps serving others."""

from __future__ import annotations

import gzip
import json
import time

import anthropic
import httpx
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY, Gateway, free_port
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client


@pytest.fixture(scope="module")
def fgw(tmp_path_factory, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = Gateway(tmp_path_factory.mktemp("faults"), upstream.url, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/", "key": UPSTREAM_ANTHROPIC_KEY},
        {"name": "openai", "type": "openai", "base_url": upstream.url + "/v1/", "key": UPSTREAM_OPENAI_KEY},
        {"name": "deadant", "type": "anthropic", "base_url": dead + "/", "key": UPSTREAM_ANTHROPIC_KEY},
        {"name": "deadoai", "type": "openai", "base_url": dead + "/v1/", "key": UPSTREAM_OPENAI_KEY},
    ], extra={"circuit_breaker": {"failures": 2, "open_seconds": 1, "half_open_requests": 1},
              "limits": {"max_request_body_mb": 1}}).start()
    gw.token = gw.new_user("faulty")
    yield gw
    gw.stop()


def hi(model="claude-sonnet-4-0"):
    return {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


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


def test_overloaded_529_reaches_the_client_unchanged(fgw, mock):
    mock.script(Reply.json({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 529))
    with pytest.raises(anthropic.APIStatusError) as e:
        anthropic_client(fgw, fgw.token).messages.create(**hi(model="claude-busy"))
    assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
    assert latest(fgw)[0]["http_status"] == 529


def test_stream_that_dies_midway_ends_failed_with_usage_seen(fgw, mock):
    reply = Reply.from_capture(capture("anthropic/simple.txtar"), True)
    reply.cut_after = 5
    mock.script(reply)
    # mitmproxy closes the client's connection when the provider's dies: the SDK sees a truncated stream.
    with pytest.raises(Exception, match="incomplete|closed|Connection"):
        anthropic_call(anthropic_client(fgw, fgw.token), {**hi(model="claude-dies")}, True)
    row = latest(fgw)[0]
    assert row["model"] == "claude-dies" and row["status"] == "failed"
    usage = fgw.sql(f"SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = '{row['id']}'")
    assert usage == [{"input_tokens": 18, "output_tokens": 1}]
    # The gateway keeps serving.
    mock.script(Reply.from_capture(capture("openai/chatcompletions/simple.txtar"), True))
    assert chat_call(openai_client(fgw, fgw.token), capture("openai/chatcompletions/simple.txtar").request, True)


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
    row = latest(fgw)[0]
    assert row["model"] == "gpt-gzip" and row["status"] == "completed"


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
    assert latest(fgw)[0]["model"] == "claude-many"
