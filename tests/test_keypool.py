"""A failover pool of upstream keys (`keys:`): a key that is rate limited cools down for the provider's
retry-after, a refused key is disabled until reset, the next key is tried before the client sees an error, and
only when every key is out does the client get a 429 (soonest retry-after) or a 502. The key that answered is the
one recorded."""

from __future__ import annotations

import email.utils
import json
import re
import time

import anthropic
import httpx
import openai
import pytest
from aibridge_gw.config import ConfigError, parse_config
from aibridge_gw.flow.keypool import KeyPool, cooldown_seconds

from tests.support.fixtures import capture, sse_events
from tests.support.mcp_server import McpTestServer
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call

K1 = "sk-ant-pool-key-one-0000000000AAAA"
K2 = "sk-ant-pool-key-two-0000000000BBBB"
K3 = "sk-ant-pool-key-three-00000000CCCC"
OK = {"id": "msg_pool", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
      "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
      "usage": {"input_tokens": 5, "output_tokens": 2}}


def rate_limited(retry_after: str | None = "30") -> Reply:
    headers = {"content-type": "application/json", **({"retry-after": retry_after} if retry_after else {})}
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded "
                                                                              "your per-minute rate limit"}}
    return Reply(429, headers, json.dumps(body).encode())


def refused(status: int = 401) -> Reply:
    body = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
    return Reply(status, {"content-type": "application/json"}, json.dumps(body).encode())


def by_key(answers: dict[str, Reply]):
    """MockUpstream.check: the provider answers per key (a fresh copy each time)."""
    def check(seen):
        reply = answers.get(seen.headers.get("x-api-key"))
        return None if reply is None else Reply(reply.status, dict(reply.headers), reply.body)
    return check


@pytest.fixture
def pgw(own_gateway, upstream, monkeypatch):
    gw = own_gateway("pool", providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/",
         "keys": [K1, {"key": K2}, {"key_env": "AIBRIDGE_TEST_POOL_KEY"}]},
    ], env={"AIBRIDGE_TEST_POOL_KEY": K3})
    gw.token = gw.new_user("pool")
    return gw


def client(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=gw.token, max_retries=0)


def ask(gw):
    return client(gw).messages.create(model="claude-sonnet-4-0", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def keys_used(upstream) -> list[str]:
    return [s.headers.get("x-api-key") for s in upstream.seen]


def test_a_rate_limited_key_is_skipped_and_the_client_never_sees_the_429(pgw, upstream):
    upstream.check = by_key({K1: rate_limited("30")})
    upstream.default = Reply.json(OK)
    assert ask(pgw).content[0].text == "ok"
    assert keys_used(upstream) == [K1, K2]
    assert ask(pgw).content[0].text == "ok"  # K1 is cooling down: not tried again
    assert keys_used(upstream) == [K1, K2, K2]
    first, second = sorted(pgw.interceptions("pool", 2), key=lambda r: r["started_at"])
    assert first["status"] == second["status"] == "completed"
    assert first["credential_hint"] == second["credential_hint"] == "sk-a…BBBB"  # the key that answered
    assert all(pgw.token not in json.dumps(s.headers) for s in upstream.seen)
    metrics = httpx.get(pgw.url + "/aibridge/metrics", trust_env=False).text
    assert 'aibridge_upstream_key_state{key="sk-a…AAAA",provider="anthropic"} 1.0' in metrics
    assert 'aibridge_upstream_key_failovers_total{provider="anthropic",reason="rate_limited"} 1.0' in metrics


def test_a_refused_key_is_disabled_until_reset(pgw, upstream):
    upstream.check = by_key({K1: refused(401), K2: refused(403)})
    upstream.default = Reply.json(OK)
    assert ask(pgw).content[0].text == "ok"
    assert keys_used(upstream) == [K1, K2, K3]
    ask(pgw)
    assert keys_used(upstream)[3:] == [K3]
    listed = pgw.cli("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    states = {r["key"]: (r["state"], r["reason"]) for r in json.loads(listed.stdout)}
    assert states == {"sk-a…AAAA": ("disabled", "HTTP 401"), "sk-a…BBBB": ("disabled", "HTTP 403"),
                      "sk-a…CCCC": ("ready", None)}
    assert K1 not in listed.stdout and K2 not in listed.stdout
    upstream.check = None
    reset = pgw.cli("keys", "reset")
    assert reset.returncode == 0 and "2 key(s)" in reset.stdout
    ask(pgw)
    assert keys_used(upstream)[-1] == K1


def test_every_key_rate_limited_gives_429_with_the_soonest_retry_after(pgw, upstream):
    upstream.check = by_key({K1: rate_limited("120"), K2: rate_limited("7"), K3: rate_limited("60")})
    with pytest.raises(anthropic.RateLimitError) as info:
        ask(pgw)
    assert 6 <= int(info.value.response.headers["retry-after"]) <= 7
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert keys_used(upstream) == [K1, K2, K3]
    with pytest.raises(anthropic.RateLimitError):
        ask(pgw)
    assert len(upstream.seen) == 3  # no key is usable: answered without calling the provider
    ic = sorted(pgw.interceptions("pool", 2), key=lambda r: r["started_at"])
    assert [r["status"] for r in ic] == ["failed", "failed"] and ic[0]["http_status"] == 429


def test_every_key_refused_gives_502(pgw, upstream):
    upstream.check = by_key({K1: refused(), K2: refused(), K3: refused(403)})
    with pytest.raises(anthropic.APIStatusError) as info:
        ask(pgw)
    assert info.value.status_code == 502 and "aibridge keys reset" in info.value.message


def test_streams_through_the_pool_arrive_chunk_by_chunk_and_are_recorded_exactly(pgw, upstream):
    cap = capture("anthropic/simple.txtar")
    upstream.check = by_key({K1: rate_limited()})
    events = sse_events(cap.sections["streaming"])
    upstream.script(Reply.sse(events, delay=0.08))
    arrivals, t0 = [], time.monotonic()
    for _ in client(pgw).messages.create(model="claude-sonnet-4-0", max_tokens=100, stream=True,
                                         messages=cap.request["messages"]):
        arrivals.append(time.monotonic() - t0)
    spread = 0.08 * (len(events) - 1)
    assert arrivals[1] < arrivals[-1] - spread * 0.5
    ic, = pgw.interceptions("pool")
    assert ic["status"] == "completed" and ic["credential_hint"] == "sk-a…BBBB"
    usage, = pgw.sql(f"SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert (usage["input_tokens"], usage["output_tokens"]) == (21, 187)


def test_passthrough_endpoints_use_the_pool_too(pgw, upstream):
    upstream.check = by_key({K1: refused()})
    r = httpx.get(pgw.url + "/anthropic/v1/models", headers={"x-api-key": pgw.token})
    assert r.status_code == 200 and keys_used(upstream) == [K1, K2]


def test_injected_tool_rounds_fail_over_too(own_gateway, upstream):
    cap = capture("anthropic/single_injected_tool.txtar")
    server = McpTestServer().start()
    try:
        gw = own_gateway("pool-mcp", providers=[
            {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/", "keys": [K1, K2]}],
            extra={"mcp_servers": [{"name": "coder", "url": server.url}], "mcp": {"tool_timeout_seconds": 5}})
        upstream.check = by_key({K1: rate_limited()})
        upstream.script(Reply.from_capture(cap, True), Reply.from_capture(cap, True, "/tool-call"))
        gw.token = gw.new_user("pmcp")
        result = anthropic_call(anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=gw.token, max_retries=0),
                                cap.request, True)
    finally:
        server.stop()
    assert result[-1].type == "message_stop"
    assert keys_used(upstream) == [K1, K2, K2]
    ic, = gw.interceptions("pmcp")
    assert ic["status"] == "completed" and ic["credential_hint"] == "sk-a…BBBB"


def test_openai_keys_fail_over_with_the_bearer_header(own_gateway, upstream):
    gw = own_gateway("pool-openai", providers=[
        {"name": "openai", "type": "openai", "base_url": upstream.url + "/v1/", "keys": ["sk-proj-first-key-1111",
                                                                                        "sk-proj-second-key-2222"]}])
    upstream.check = lambda seen: rate_limited("5") if seen.headers["authorization"].endswith("1111") else None
    upstream.default = Reply.json({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4.1",
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    token = gw.new_user("po")
    out = openai.OpenAI(base_url=f"{gw.url}/openai/v1", api_key=token, max_retries=0).chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "ok"
    assert [s.headers["authorization"] for s in upstream.seen] == ["Bearer sk-proj-first-key-1111",
                                                                   "Bearer sk-proj-second-key-2222"]


# --- the pool itself -------------------------------------------------------------------------------


def test_pool_cools_disables_and_resets():
    changes = []
    pool = KeyPool("p", [("a", "a…"), ("b", "b…")], lambda pool, key, why: changes.append((key.hint, why)))
    a, b = pool.keys
    assert pool.failed(a, 429, "10") and pool.usable() == [b]
    assert pool.failed(b, 403, None) and pool.usable() == []
    assert pool.exhausted().status == 429 and pool.exhausted().retry_after in (9, 10)
    assert not pool.failed(a, 500, None) and not pool.failed(a, 200, None)
    assert pool.reset() == 2 and pool.usable() == [a, b]
    assert changes == [("a…", "rate_limited"), ("b…", "refused"), ("a…", "reset"), ("b…", "reset")]
    pool.failed(a, 401, None)
    pool.failed(b, 401, None)
    assert pool.exhausted().status == 502 and pool.exhausted().retry_after is None


@pytest.mark.parametrize(("value", "expected"), [
    ("12", 12), ("0.5", 1), (None, 30), ("soon", 30), ("99999", 3600), ("nan", 30),
    ("in 90 s as an HTTP date", 90),
])
def test_retry_after_in_seconds_or_as_a_date(value, expected):
    if value == "in 90 s as an HTTP date":
        value = email.utils.formatdate(time.time() + 90, usegmt=True)
    assert abs(cooldown_seconds(value) - expected) <= 1.5


@pytest.mark.parametrize(("provider", "message"), [
    ({"type": "anthropic", "keys": []}, "must be a non-empty list"),
    ({"type": "anthropic", "keys": [{"secret": "x"}]}, "must be a key, {key: …} or {key_env: NAME}"),
    ({"type": "anthropic", "keys": [f"sk-{n}" for n in range(9)]}, "at most 8 keys"),
    ({"type": "copilot", "keys": ["a", "b"]}, "takes no upstream keys"),
])
def test_bad_keys_config_is_a_clear_error(provider, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"providers": [{"name": "x", "base_url": "https://example.com/", **provider}]})


def test_key_and_keys_make_one_pool_in_order_and_an_unset_key_env_is_left_out(caplog):
    prov, = parse_config({"providers": [{"name": "a", "type": "anthropic", "base_url": "https://x.test/", "key": "k0", "keys": [
        "k1", "k0", {"key_env": "AIBRIDGE_TEST_UNSET_VAR"}, {"key": "k2"}]}]}).providers
    assert prov.keys == ("k0", "k1", "k2") and prov.key == "k0"
    assert "keys[2].key_env: $AIBRIDGE_TEST_UNSET_VAR is not set; that key is left out" in caplog.text


def test_injected_tool_loop_with_every_key_rate_limited_gives_429_with_retry_after(own_gateway, upstream):
    server = McpTestServer().start()
    try:
        gw = own_gateway("pool-mcp-out", providers=[
            {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/", "keys": [K1, K2]}],
            extra={"mcp_servers": [{"name": "coder", "url": server.url}], "mcp": {"tool_timeout_seconds": 5}})
        upstream.check = by_key({K1: rate_limited("40"), K2: rate_limited("12")})
        gw.token = gw.new_user("pmcp2")
        with pytest.raises(anthropic.RateLimitError) as info:
            ask(gw)
    finally:
        server.stop()
    assert 11 <= int(info.value.response.headers["retry-after"]) <= 12
    assert keys_used(upstream) == [K1, K2]


def test_pooled_stream_is_complete_when_the_client_hangs_up_after_the_final_event(pgw, upstream):
    """Through the relay too: a client that reads message_stop and hangs up at once (llm, aider) leaves a completed
    interception; a gzip request body is forwarded decoded; a foreign Host header changes nothing."""
    import gzip

    from tests.support.wire import api_request, request_body, stream_reply

    upstream.check = by_key({K1: rate_limited()})
    upstream.script(stream_reply("anthropic", tail_delay=0.5))
    body = gzip.compress(json.dumps(request_body("anthropic")).encode())
    got = api_request(pgw.port, "/anthropic/v1/messages", pgw.token, body, read_until=b"message_stop",
                      extra=[(b"content-encoding", b"gzip")], host=b"evil.example:443")
    assert b"message_stop" in got
    assert keys_used(upstream) == [K1, K2] and upstream.seen[-1].json()["messages"][0]["content"] == "hi"
    ic, = pgw.interceptions("pool")
    assert (ic["status"], ic["error"], ic["credential_hint"]) == ("completed", None, "sk-a…BBBB")


AUDIT_TABLES = ("aibridge_interceptions", "aibridge_token_usages", "aibridge_user_prompts", "aibridge_tool_usages",
                "aibridge_model_thoughts")


def dump_audit(db) -> dict[str, list]:
    import duckdb

    conn = duckdb.connect(str(db), read_only=True)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in AUDIT_TABLES}
    finally:
        conn.close()


def test_a_saved_pooled_tool_loop_flow_carries_the_loop_and_the_key_and_replays_to_the_live_rows(
        own_gateway, upstream, tmp_path):
    """Live, the loop's summary and the key that answered are read from the flow's state; a saved flow carries
    their plain-value copy (written once, as the exchange is recorded), so `aibridge replay` rebuilds exactly the
    rows the live run wrote: every round's usage, the injected call, the key that answered."""
    import os
    import subprocess

    from mitmproxy import io

    from tests.support.gateway import BIN

    cap = capture("anthropic/single_injected_tool.txtar")
    flows_dir = tmp_path / "flows"
    server = McpTestServer().start()
    try:
        gw = own_gateway("pool-replay", providers=[
            {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/", "keys": [K1, K2]}],
            extra={"mcp_servers": [{"name": "coder", "url": server.url}], "mcp": {"tool_timeout_seconds": 5}},
            args=["--set", f"aibridge_flows={flows_dir}"])
        upstream.check = by_key({K1: rate_limited()})
        upstream.script(Reply.from_capture(cap, True), Reply.from_capture(cap, True, "/tool-call"))
        gw.token = gw.new_user("preplay")
        result = anthropic_call(anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=gw.token, max_retries=0),
                                cap.request, True)
        assert result[-1].type == "message_stop"
        looped, = gw.interceptions("preplay")
        assert len(gw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{looped['id']}'")) == 2
    finally:
        server.stop()
    gw.stop()
    assert keys_used(upstream) == [K1, K2, K2]
    assert looped["status"] == "completed" and looped["credential_hint"] == "sk-a…BBBB"

    files = sorted(flows_dir.glob("*.flows"))
    saved = {}
    for name in files:
        with open(name, "rb") as f:
            saved.update({m["id"]: m for m in (flow.metadata["aibridge"] for flow in io.FlowReader(f).stream())})
    meta = saved[looped["id"]]
    assert meta["key_hint"] == "sk-a…BBBB" and meta["credential_hint"] != meta["key_hint"]  # the first chosen
    assert meta["loop_rounds"] == 2 and len(meta["loop"]["usages"]) == 2
    assert meta["loop"]["complete"] is True and any(t["injected"] for t in meta["loop"]["tool_calls"])

    live = dump_audit(gw.db)
    rebuilt = tmp_path / "rebuilt.duckdb"
    r = subprocess.run([str(BIN / "aibridge"), "replay", *map(str, files), "--db", str(rebuilt)], capture_output=True,
                       text=True, env={**os.environ, "AIBRIDGE_CONFIG": str(gw.config_path)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 interception(s)" in r.stdout
    assert dump_audit(rebuilt) == live
