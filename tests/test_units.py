"""Fast unit tests, no sockets: identity, circuit breakers and budgets as plain objects, and the addon chain
(runtime → proxy mode → control plane → pipeline → observation) driven hook by hook with mitmproxy's
`taddons`/`tflow`, over a real DuckDB file. The end-to-end suites check the same behaviour through real sockets
and SDKs; these pin each decision down where it is made."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
import yaml
from aibridge_gw.addons.control_plane import ControlPlane
from aibridge_gw.addons.housekeeping import Housekeeping
from aibridge_gw.addons.observation import Observation
from aibridge_gw.addons.patches import ORIGIN
from aibridge_gw.addons.pipeline import Pipeline
from aibridge_gw.addons.proxy_mode import ProxyMode
from aibridge_gw.addons.runtime import Runtime
from aibridge_gw.config import Limits
from aibridge_gw.flow.exchange import ResponseSummary, TokenUsage, summary_to_dict
from aibridge_gw.flow.recorder import META_KEY, conclude
from aibridge_gw.flow.state import state_of
from aibridge_gw.policy import breaker as breaker_module
from aibridge_gw.policy.auth import Actor, AuthRefused, TokenDirectory, hash_token, identify, proxy_token
from aibridge_gw.policy.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreakers, is_failure
from aibridge_gw.policy.budgets import Budgets
from aibridge_gw.pricing import PriceTable
from aibridge_gw.store.process import IN_THREAD_ENV
from mitmproxy import http
from mitmproxy.addons import proxyserver
from mitmproxy.test import taddons, tflow, tutils

ALICE = Actor("11111111-1111-4111-8111-111111111111", "alice", "member", "t1", "gw_a…")
TOKEN = "gw_alice-token"


# --- identity ---------------------------------------------------------------------------------------


@pytest.fixture
def directory():
    d = TokenDirectory()
    d.replace({hash_token(TOKEN): ALICE})
    return d


def test_gateway_token_sent_as_the_api_key_identifies_the_user_and_uses_the_central_key(directory):
    ident = identify({"x-api-key": TOKEN}, None, directory, byok=True)
    assert ident.actor == ALICE and ident.byok_credential is None
    assert identify({"authorization": f"Bearer {TOKEN}"}, None, directory, True).actor == ALICE


def test_gateway_token_header_beside_the_users_own_key_is_byok(directory):
    ident = identify({"x-aibridge-token": TOKEN, "x-api-key": "sk-ant-own"}, None, directory, byok=True)
    assert ident.actor == ALICE and ident.byok_credential == "sk-ant-own"


def test_byok_off_drops_the_users_own_key(directory):
    ident = identify({"x-aibridge-token": TOKEN, "x-api-key": "sk-ant-own"}, None, directory, byok=False)
    assert ident.byok_credential is None


def test_proxy_credentials_identify_and_the_api_key_travels_as_byok(directory):
    ident = identify({"authorization": "Bearer sk-own"}, ALICE, directory, byok=True)
    assert ident.actor == ALICE and ident.byok_credential == "sk-own"


@pytest.mark.parametrize("headers, message", [
    ({}, "missing gateway token"),
    ({"x-api-key": "gw_wrong"}, "invalid or revoked gateway token"),
    ({"x-aibridge-token": "gw_wrong", "x-api-key": TOKEN}, "X-AIBridge-Token"),
])
def test_no_valid_token_is_refused_with_a_reason(directory, headers, message):
    with pytest.raises(AuthRefused, match=message):
        identify(headers, None, directory, byok=True)


@pytest.mark.parametrize("value, token", [
    ("Basic dXNlcjpndy10b2tlbg==", "gw-token"),  # user:gw-token
    ("Basic Z3ctdG9rZW4=", "gw-token"),  # just the token as the user name
    ("Bearer gw-token", "gw-token"),
    ("Basic %%%", None),
    ("Digest abc", None),
    ("", None),
])
def test_proxy_authorization_forms(value, token):
    assert proxy_token(value) == token


# --- circuit breakers -------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(breaker_module.time, "monotonic", c)
    return c


def test_breaker_opens_after_consecutive_failures_and_reports_the_wait(clock):
    changes = []
    b = CircuitBreakers(failures=3, open_seconds=30, half_open_requests=2, on_change=lambda *a: changes.append(a))
    key = ("openai", "/chat/completions", "gpt")
    for _ in range(2):
        b.record(key, ok=False)
    b.record(key, ok=True)  # a success resets the count
    for _ in range(2):
        b.record(key, ok=False)
    assert b.allow(key) is None
    b.record(key, ok=False)
    assert changes == [(key, OPEN, True)]
    assert b.allow(key) == 30
    clock.now += 29.5
    assert b.allow(key) == 1
    assert b.allow(("openai", "/chat/completions", "other")) is None  # per model


def test_breaker_half_open_lets_trials_through_then_closes_or_reopens(clock):
    changes = []
    b = CircuitBreakers(failures=1, open_seconds=10, half_open_requests=2, on_change=lambda *a: changes.append(a[1]))
    key = ("anthropic", "/v1/messages", "claude")
    b.record(key, ok=False)
    clock.now += 10
    assert b.allow(key) is None and b.allow(key) is None  # two trials
    assert b.allow(key) == 1  # no third until the trials report
    b.record(key, ok=True)
    b.record(key, ok=True)
    assert changes == [OPEN, HALF_OPEN, CLOSED]
    b.record(key, ok=False)  # closed again: one failure (failures=1) opens it
    clock.now += 10
    assert b.allow(key) is None
    b.record(key, ok=False)  # a failed trial reopens at once
    assert changes[-1] == OPEN and b.allow(key) == 10


@pytest.mark.parametrize("status, conn_error, failure", [
    (200, False, False), (400, False, False), (404, False, False), (429, False, True), (500, False, True),
    (529, False, True), (None, True, True), (None, False, False),
])
def test_what_counts_as_a_provider_failure(status, conn_error, failure):
    assert is_failure(status, conn_error) is failure


# --- budgets ----------------------------------------------------------------------------------------


def test_requests_per_minute_admits_up_to_the_limit_then_refuses_with_retry_after():
    b = Budgets(Limits(requests_per_minute=2), {}, PriceTable.load(None))
    assert b.check("u", "alice") is None and b.check("u", "alice") is None
    refusal = b.check("u", "alice")
    assert refusal is not None and "2 requests per minute" in refusal.message and 1 <= refusal.retry_after <= 60
    assert b.check("other", "bob") is None  # per user


def test_daily_tokens_count_every_kind_of_token_and_per_user_limits_win():
    b = Budgets(Limits(), {"heavy": Limits(tokens_per_day=100)}, PriceTable.load(None))
    assert b.active and b.check("u", "light") is None
    now = dt.datetime.now(dt.UTC)
    b.record("h", now, "m", [TokenUsage(None, 40, 30, 20, 9)])  # 99
    assert b.check("h", "heavy") is None
    b.record("h", now, "m", [TokenUsage(None, 1)])
    refusal = b.check("h", "heavy")
    assert refusal is not None and "daily token budget of 100 used (100)" in refusal.message
    b.record("h", now - dt.timedelta(days=1), "m", [TokenUsage(None, 10**6)])  # yesterday's spend is not today's
    assert b.status("h", "heavy")["tokens_today"] == 100


def test_monthly_spend_is_priced_from_the_price_table():
    b = Budgets(Limits(usd_per_month=20), {}, PriceTable.load(None))
    now = dt.datetime.now(dt.UTC)
    b.record("u", now, "claude-opus-4-1-20250805", [TokenUsage(None, 1_000_000)])  # $15 at list price
    assert b.status("u", "x")["usd_month"] == 15.0 and b.check("u", "x") is None
    b.record("u", now, "unknown-model", [TokenUsage(None, 10**9)])  # unpriced: never counted as spend
    assert b.check("u", "x") is None
    b.record("u", now, "claude-opus-4-1", [TokenUsage(None, 0, 100_000)])  # + $7.50
    assert "monthly budget of $20.00 used ($22.50)" in b.check("u", "x").message


# --- the addon chain, hook by hook ------------------------------------------------------------------

UPSTREAM_KEY = "sk-ant-central-key-123456"


class Chain:
    """The addons of addons/aibridge.py (without capture), loaded into a taddons context."""

    def __init__(self, tctx, tmp_path, extra=None):
        self.tctx = tctx
        self.rt = Runtime()
        self.proxy = ProxyMode(self.rt)
        self.health = Housekeeping(self.rt)
        self.control = ControlPlane(self.rt, self.proxy, self.health)
        self.pipeline = Pipeline(self.rt, self.proxy)
        self.observation = Observation(self.rt)
        self.addons = [self.rt, self.proxy, self.control, self.pipeline, self.observation]
        tctx.master.addons.add(proxyserver.Proxyserver())  # declares connection_strategy; listens on nothing
        for a in self.addons:
            tctx.master.addons.add(a)
        config = tmp_path / "aibridge.yaml"
        config.write_text(yaml.safe_dump({
            "providers": [
                {"name": "anthropic", "type": "anthropic", "base_url": "https://127.0.0.9:8443/", "key": UPSTREAM_KEY},
                {"name": "openai", "type": "openai", "base_url": "http://127.0.0.9:8081/v1", "key": "sk-openai-x"},
            ],
            "storage": {"duckdb": str(tmp_path / "audit.duckdb")},
            "circuit_breaker": {"failures": 1, "open_seconds": 60},
            **(extra or {}),
        }))
        tctx.configure(self.rt, aibridge_config=str(config))
        for a in self.addons[1:]:
            if hasattr(a, "configure"):
                a.configure(set())
        self.rt.store.run("users.add", True, name="alice").result()
        self.token = self.rt.store.run("tokens.create", True, user="alice").result()["token"]
        self.rt._apply_directory(self.rt.store.run("directory").result(), [], self.rt.store.run("users").result())

    async def request(self, flow):
        for hook in ("requestheaders", "request"):
            for a in self.addons:
                fn = getattr(a, hook, None)
                if fn is not None:
                    r = fn(flow)
                    if asyncio.iscoroutine(r):
                        await r
        return flow

    def respond(self, flow, status=200, body=b"", headers=None):
        flow.response = tutils.tresp(status_code=status, content=body,
                                     headers=http.Headers(**(headers or {"content_type": "application/json"})))
        for a in self.addons:
            if hasattr(a, "responseheaders"):
                a.responseheaders(flow)
        for a in self.addons:
            if hasattr(a, "response"):
                a.response(flow)

    def rows(self, query):
        self.rt.store.flush().result()
        return [tuple(r) for r in self.rt.store.run("sql", query_text=query).result()["rows"]]

    async def close(self):
        if self.rt.store is not None:  # a test may have shut the runtime down itself
            await self.rt.done()


def chain_test(fn=None, *, extra=None):
    """Run an async test body with a loaded chain; the store closes whatever happens. `extra`: more config keys."""
    if fn is None:
        return lambda f: chain_test(f, extra=extra)

    def run(tmp_path, monkeypatch):
        # The writer's own code in a thread of this process: a writer process per test would cost more than it.
        monkeypatch.setenv(IN_THREAD_ENV, "1")

        async def main():
            with taddons.context() as tctx:
                chain = Chain(tctx, tmp_path, extra)
                try:
                    await fn(chain)
                finally:
                    await chain.close()

        asyncio.run(main())

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi there"}]}


def anthropic_flow(chain, path="/anthropic/v1/messages", body=None, headers=None, method="POST"):
    h = {"content_type": "application/json", "x_api_key": chain.token, "accept_encoding": "gzip"}
    h.update(headers or {})
    req = tutils.treq(method=method.encode(), host="127.0.0.1", port=8080, path=path.encode(),
                      headers=http.Headers(**h), content=json.dumps(body or MESSAGES).encode())
    req.aibridge_form = ORIGIN  # as the patched HTTP/1 reader marks a request sent to the listener
    return tflow.tflow(req=req)


def error_of(flow):
    return json.loads(flow.response.content)


@chain_test
async def test_a_model_call_is_routed_keys_swapped_and_its_interception_opened(chain):
    flow = await chain.request(anthropic_flow(chain))
    req = flow.request
    assert flow.response is None
    assert (req.scheme, req.host, req.port, req.path) == ("https", "127.0.0.9", 8443, "/v1/messages")
    assert req.headers["x-api-key"] == UPSTREAM_KEY  # the gateway token never goes upstream
    assert req.headers["host"] == "127.0.0.9:8443"
    assert req.headers["accept-encoding"] == "identity"  # the tap reads plain bytes
    state = state_of(flow)
    ic = state.interception
    assert ic.user_name == "alice" and ic.api == "anthropic.messages" and ic.info.prompt == "hi there"
    assert state in chain.rt.inflight and state.forwarded_at > 0 and state.inflight
    assert chain.rows("SELECT status, model FROM aibridge_interceptions") == [("in_progress", "claude-sonnet-4-5")]


@chain_test
async def test_the_response_is_recorded_once_with_its_usage_and_observed(chain):
    flow = await chain.request(anthropic_flow(chain))
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 5}}
    chain.respond(flow, body=json.dumps(body).encode())
    chain.pipeline.error(flow)  # a late error hook changes nothing
    assert chain.rows("SELECT status, http_status FROM aibridge_interceptions") == [("completed", 200)]
    assert chain.rows("SELECT input_tokens, output_tokens, cache_read_input_tokens FROM aibridge_token_usages") == [
        (12, 3, 5)]
    assert chain.rows("SELECT prompt FROM aibridge_user_prompts") == [("hi there",)]
    assert not chain.rt.inflight
    metrics = chain.rt.metrics.render().decode()
    tokens = {line.split('type="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("aibridge_tokens_total{")}
    assert tokens == {"input": 12.0, "output": 3.0, "cache_read": 5.0}
    assert any(line.startswith("aibridge_interceptions_total{") and 'status="completed"' in line
               and line.endswith(" 1.0") for line in metrics.splitlines())
    assert any(line.startswith("aibridge_interceptions_inflight{") and line.endswith(" 0.0")
               for line in metrics.splitlines())


@chain_test
async def test_the_loop_summary_and_the_key_hint_are_read_from_the_flows_state_and_copied_to_its_metadata_once(chain):
    """What the tool loop and a pool's relay learned lives on the FlowState: recorded from there (a stale copy in
    the flow's metadata is never read back live), and written into the metadata as plain values once, as the
    exchange is recorded, which is what a saved flow is concluded from."""
    flow = await chain.request(anthropic_flow(chain))
    state = state_of(flow)
    stale = ResponseSummary(usages=[TokenUsage("stale", 999, 999)], complete=True)
    flow.metadata[META_KEY]["loop"] = summary_to_dict(stale)
    flow.metadata[META_KEY]["key_hint"] = "sk-stale"
    state.via_loop = True
    state.loop_summary = ResponseSummary(response_id="msg_l", model="claude-sonnet-4-5", complete=True,
                                         usages=[TokenUsage("msg_l", 7, 2), TokenUsage("msg_l", 9, 4)])
    state.loop_rounds, state.key_hint = 2, "sk-a…BBBB"
    chain.respond(flow, body=b"{}")
    assert chain.rows("SELECT status, credential_hint FROM aibridge_interceptions") == [("completed", "sk-a…BBBB")]
    assert sorted(chain.rows("SELECT input_tokens, output_tokens FROM aibridge_token_usages")) == [(7, 2), (9, 4)]
    meta = flow.metadata[META_KEY]
    assert meta["loop"] == summary_to_dict(state.loop_summary) and meta["loop"]["usages"][1]["input_tokens"] == 9
    assert (meta["loop_rounds"], meta["key_hint"]) == (2, "sk-a…BBBB")
    json.dumps(meta)  # plain values: a saved flow carries them

    saved = flow.copy()  # as capture saves it: the FlowState stays with the live flow
    saved.live = False
    assert state_of(saved) is None
    summary, status, error, _ = conclude(state.interception, saved)
    assert [(u.input_tokens, u.output_tokens) for u in summary.usages] == [(7, 2), (9, 4)]
    assert (summary.response_id, status, error) == ("msg_l", 200, None)
    flow.metadata[META_KEY]["loop"] = summary_to_dict(stale)
    live_summary, *_ = conclude(state.interception, flow)  # a live flow's loop summary is its state's, never this
    assert live_summary.usages == []


@chain_test
async def test_a_bad_token_gets_a_401_in_the_providers_format(chain):
    flow = await chain.request(anthropic_flow(chain, headers={"x_api_key": "gw_nope"}))
    assert flow.response.status_code == 401
    assert error_of(flow)["error"]["type"] == "authentication_error"
    assert state_of(flow) is None and chain.rows("SELECT count(*) FROM aibridge_interceptions") == [(0,)]


@chain_test
async def test_an_unreviewed_endpoint_is_refused_without_the_users_own_key(chain):
    flow = await chain.request(anthropic_flow(chain, path="/anthropic/v1/organizations/usage"))
    assert flow.response.status_code == 404 and error_of(flow)["error"]["type"] == "not_found_error"
    assert flow.request.headers.get("x-api-key") == chain.token  # nothing was swapped in


@chain_test
async def test_a_read_only_endpoint_is_relayed_unrecorded_and_streamed(chain):
    flow = await chain.request(anthropic_flow(chain, path="/anthropic/v1/models", method="GET"))
    assert flow.response is None and flow.request.headers["x-api-key"] == UPSTREAM_KEY
    assert state_of(flow).interception is None
    chain.respond(flow, body=b'{"data": []}')
    assert flow.response.stream is True
    assert "aibridge_passthrough_total{" in chain.rt.metrics.render().decode()
    assert chain.rows("SELECT count(*) FROM aibridge_interceptions") == [(0,)]


@chain_test
async def test_websocket_upgrades_get_426(chain):
    flow = await chain.request(anthropic_flow(chain, headers={"upgrade": "websocket", "connection": "Upgrade"}))
    assert flow.response.status_code == 426


@chain_test
async def test_a_declared_oversized_body_is_refused_before_it_is_read(chain):
    flow = anthropic_flow(chain, headers={"content_length": str(64 * 1024 * 1024)})
    chain.pipeline.requestheaders(flow)
    assert flow.response.status_code == 413 and error_of(flow)["error"]["type"] == "request_too_large"


@chain_test
async def test_a_wrong_shaped_body_is_a_400_not_a_crash(chain):
    flow = await chain.request(anthropic_flow(chain, body={"model": 7, "messages": "no"}))
    assert flow.response.status_code == 400 and error_of(flow)["error"]["type"] == "invalid_request_error"


@chain_test
async def test_a_provider_failure_opens_the_breaker_and_the_next_call_gets_503(chain):
    flow = await chain.request(anthropic_flow(chain))
    chain.respond(flow, status=500, body=b'{"type":"error","error":{"type":"api_error","message":"boom"}}')
    assert chain.rows("SELECT status, http_status FROM aibridge_interceptions") == [("failed", 500)]
    flow = await chain.request(anthropic_flow(chain))
    assert flow.response.status_code == 503 and "circuit open" in error_of(flow)["error"]["message"]
    assert flow.response.headers["retry-after"].isdigit()


@chain_test
async def test_the_control_plane_answers_health_without_reaching_the_pipeline(chain):
    req = tutils.treq(method=b"GET", host="127.0.0.1", port=8080, path=b"/aibridge/healthz", content=b"")
    req.aibridge_form = ORIGIN
    flow = await chain.request(tflow.tflow(req=req))
    health = json.loads(flow.response.content)
    assert flow.response.status_code == 200 and health["status"] == "ok" and health["inflight"] == 0
    assert state_of(flow) is None


@chain_test
async def test_an_unknown_prefix_gets_a_404_naming_the_configured_ones(chain):
    flow = await chain.request(anthropic_flow(chain, path="/nope/v1/messages"))
    assert flow.response.status_code == 404 and "/anthropic, /openai" in error_of(flow)["error"]["message"]


@chain_test
async def test_shutdown_ends_what_is_in_flight(chain):
    await chain.request(anthropic_flow(chain))
    chain.rt.store.flush().result()
    store = chain.rt.store
    await chain.rt.done()
    import duckdb
    con = duckdb.connect(str(store.path), read_only=True)
    assert con.execute("SELECT status, error FROM aibridge_interceptions").fetchall() == [
        ("failed", "gateway shut down")]
    con.close()


@pytest.mark.parametrize("headers, client", [
    ({"user-agent": "GeminiCLI-tui/0.61.0/gemini-2.5-flash (linux; x64; terminal)"}, "Gemini CLI"),
    ({"user-agent": "claude-cli/2.1.197 (external, cli)"}, "Claude Code"),
    ({"originator": "codex_cli_rs", "user-agent": "codex_cli_rs/0.169.0"}, "Codex"),
    ({"user-agent": "python-httpx/0.28"}, "Unknown"),
])
def test_clients_are_named_from_their_headers(headers, client):
    from aibridge_gw.flow.clients import detect_client

    assert detect_client(headers) == client


def test_a_results_download_still_flowing_is_never_aborted_as_silent(monkeypatch):
    """The watch measures a stream's silence in epoch seconds: a results file being read past stream_idle_seconds
    (a large batch's results) is not cut while its chunks keep coming."""
    import time
    from types import SimpleNamespace

    from aibridge_gw.apis.anthropic import PROVIDER
    from aibridge_gw.apis.wire.results import ResultsTap
    from aibridge_gw.config import Timeouts
    from aibridge_gw.flow.tap import StreamTap
    from aibridge_gw.flow.upstream_faults import UpstreamWatch

    watch = UpstreamWatch(Timeouts())
    aborted = []
    monkeypatch.setattr(watch, "_abort", lambda state, transports, conn, reason: aborted.append(reason))
    began = time.time() - Timeouts().stream_idle - 60  # the download began long ago...
    taps = [ResultsTap(PROVIDER.apis["anthropic.message_batches.results"]),
            StreamTap(PROVIDER.apis["anthropic.messages"])]
    with taddons.context():
        for tap in taps:
            tap(b"{}\n" if isinstance(tap, ResultsTap) else b"data: {}\n\n")  # ...and a chunk came just now
            resp = SimpleNamespace(timestamp_start=began, stream=tap, timestamp_end=None)
            flow = SimpleNamespace(response=resp, server_conn=None, client_conn=SimpleNamespace(id="c"))
            state = SimpleNamespace(flow=flow, forwarded_at=began, tap=tap, abort_reason=None, client_gone=None,
                                    via_loop=False)
            watch.check([state])
    assert aborted == []


def test_a_reload_that_changes_capture_settings_does_not_wait_for_the_old_archive_on_the_event_loop(
        tmp_path, monkeypatch):
    """The old archive's writer may have many flows queued to serialize (it joins for up to 30 s): a SIGHUP reload
    runs on the event loop, which must not stop for it."""
    import threading
    import time
    from types import SimpleNamespace

    from aibridge_gw.addons import capture
    from aibridge_gw.config import CaptureSettings

    released = threading.Event()
    closed = threading.Event()

    def slow_close(self) -> None:
        released.wait(5)
        closed.set()

    monkeypatch.setattr(capture.FlowArchive, "close", slow_close)
    rt = SimpleNamespace(config=SimpleNamespace(capture=CaptureSettings(directory=tmp_path / "a")), store=object(),
                         on_reload=[])
    addon = capture.Capture(rt)

    async def reload() -> float:
        rt.config = SimpleNamespace(capture=CaptureSettings(directory=tmp_path / "a", max_bytes=1024))
        started = time.monotonic()
        for listener in rt.on_reload:
            listener()
        return time.monotonic() - started

    with taddons.context(proxyserver.Proxyserver(), addon) as tctx:
        tctx.configure(addon)
        first = addon.archive
        took = asyncio.run(reload())
        released.set()
        assert took < 0.5 and addon.archive is not first and addon.archive.max_bytes == 1024
        assert closed.wait(5)  # the old archive is still closed, off the loop


def test_reloads_do_not_pile_up_read_when_scraped_gauges_in_multiprocess_mode(monkeypatch):
    """`--workers N` (multiprocess metrics): each reload sets every pooled key's state gauge again; the newest
    function replaces the old one instead of adding to what each refresh (every second) runs."""
    from aibridge_gw import metrics as metrics_module

    monkeypatch.setenv(metrics_module.MULTIPROCESS_ENV, "/nonexistent")
    m = metrics_module.Metrics()
    assert m.multiprocess
    calls = []
    gauge = m.child(m.key_state, "openai", "sk-…abcd")
    for n in range(100):  # a hundred reloads
        m.gauge_function(gauge, lambda n=n: calls.append(n) or 0)
    monkeypatch.setattr(type(gauge), "set", lambda self, v: None)
    m.refresh()
    assert calls == [99]


@chain_test
async def test_a_reload_that_fails_unexpectedly_is_logged_and_leaves_no_task_behind(chain):
    """SIGHUP's task is awaited by nobody: an error past validation is logged, not left for the garbage collector,
    and the task is not kept in the set of reloads running."""
    import logging

    def broken(*args):
        raise RuntimeError("boom")

    chain.rt._apply_budgets = broken
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("aibridge").addHandler(handler)
    try:
        task = asyncio.ensure_future(chain.rt._reload_once("test"))
        chain.rt._reloads.add(task)
        await task
    finally:
        logging.getLogger("aibridge").removeHandler(handler)
    assert chain.rt._reloads == set()
    assert any("reload (test) failed" in r.getMessage() for r in records)


# --- policies in the chain --------------------------------------------------------------------------

TAG_ALL = {"policies": {"rules": [{"name": "label", "hook": "request", "when": "size(tools) >= 0",
                                   "action": "tag", "tags": {"seen": "yes"}}]}}


@chain_test(extra=TAG_ALL)
async def test_a_request_whose_tools_have_an_odd_shape_is_policed_not_a_500(chain):
    """The rules' `tools` are read from any API's shape; a value of the wrong type there is the provider's to refuse
    (the call goes on, recorded), never an internal error."""
    body = {**MESSAGES, "tools": [{"functionDeclarations": 5}, {"name": "Bash", "input_schema": {}}]}
    flow = await chain.request(anthropic_flow(chain, body=body))
    assert flow.response is None  # forwarded
    assert state_of(flow).police.facts.tools == ["Bash"]
    assert chain.rows("SELECT status FROM aibridge_interceptions") == [("in_progress",)]


AWS_KEY_ID = "AKIA" + "4HKQ2MZP7XW3RN5T"  # shaped like an AWS access key id, assembled: no literal credential here


async def respond_awaited(chain, flow, body: dict, status: int = 200):
    """`Chain.respond`, awaiting what a hook returns to await (mitmproxy does)."""
    flow.response = tutils.tresp(status_code=status, content=json.dumps(body).encode(),
                                 headers=http.Headers(content_type="application/json"))
    for a in chain.addons:
        if hasattr(a, "responseheaders"):
            a.responseheaders(flow)
    for a in chain.addons:
        if hasattr(a, "response"):
            r = a.response(flow)
            if asyncio.iscoroutine(r):
                await r


class ArchiveStub:
    def __init__(self):
        self.added = []

    def add(self, flow, masking=None):
        self.added.append((flow, masking))


REDACT_AT_RESPONSE = {"policies": {"rules": [{"name": "mask-late", "hook": "response", "action": "redact",
                                              "when": "size(secrets(prompt)) > 0"}]}}


@chain_test(extra=REDACT_AT_RESPONSE)
async def test_a_response_rules_redaction_masks_the_flow_capture_too(chain):
    """A redact decision of the response hook masks what the call stores: its rows and its captured flow."""
    from aibridge_gw.addons.capture import Capture

    capture = Capture(chain.rt)
    capture.archive = ArchiveStub()
    body = {**MESSAGES, "messages": [{"role": "user", "content": f"deploy with {AWS_KEY_ID}"}]}
    flow = await chain.request(anthropic_flow(chain, body=body))
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
              "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                           "input": {"command": f"aws configure set key {AWS_KEY_ID}"}}],
              "stop_reason": "tool_use", "usage": {"input_tokens": 12, "output_tokens": 3}}
    await respond_awaited(chain, flow, answer)
    capture.response(flow)
    assert chain.rows("SELECT input FROM aibridge_tool_usages") == [
        ('{"command":"aws configure set key [REDACTED:aws-key]"}',)]
    (_, masking), = capture.archive.added
    assert masking is not None and masking.text(f"key {AWS_KEY_ID}") == "key [REDACTED:aws-key]"


def openai_flow(chain, path: str, body: dict | None = None, method: str = "POST"):
    h = {"content_type": "application/json", "authorization": f"Bearer {chain.token}"}
    req = tutils.treq(method=method.encode(), host="127.0.0.1", port=8080, path=path.encode(),
                      headers=http.Headers(**h), content=json.dumps(body).encode() if body is not None else b"")
    req.aibridge_form = ORIGIN
    return tflow.tflow(req=req)


@chain_test(extra={"policies": {"redact_stored": True}})
async def test_a_retrieved_background_response_stores_its_tool_inputs_masked(chain):
    """`redact_stored` masks everything stored, a retrieval's rows (a background response fetched by id) too."""
    rid = "resp_bg1"
    create = await chain.request(openai_flow(chain, "/openai/v1/responses",
                                             {"model": "gpt-5", "input": "set it up", "background": True}))
    await respond_awaited(chain, create, {"id": rid, "object": "response", "status": "queued", "background": True,
                                          "model": "gpt-5", "output": [], "usage": None})
    fetch = await chain.request(openai_flow(chain, f"/openai/v1/responses/{rid}", method="GET"))
    assert fetch.response is None
    done = {"id": rid, "object": "response", "status": "completed", "background": True, "model": "gpt-5",
            "output": [{"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "shell",
                        "arguments": json.dumps({"cmd": f"export AWS_ACCESS_KEY_ID={AWS_KEY_ID}"}),
                        "status": "completed"}],
            "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 12,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 42}}
    await respond_awaited(chain, fetch, done)
    assert chain.rows("SELECT count(*) FROM aibridge_token_usages") == [(1,)]  # the retrieval was recorded
    assert chain.rows("SELECT input FROM aibridge_tool_usages") == [
        ('{"cmd": "export AWS_ACCESS_KEY_ID=[REDACTED:aws-key]"}',)]


@chain_test(extra={"policies": {"redact_stored": True}})
async def test_a_tool_call_whose_arguments_are_not_text_is_still_recorded_masked(chain):
    """A provider that sends a tool call's arguments as an object (not the JSON text the API specifies): the call
    happened, so it is recorded, and masked like any other."""
    flow = await chain.request(openai_flow(chain, "/openai/v1/chat/completions",
                                           {"model": "gpt-4.1", "messages": [{"role": "user", "content": "go"}]}))
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4.1",
              "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                  "role": "assistant", "content": None, "tool_calls": [{
                      "id": "call_1", "type": "function",
                      "function": {"name": "shell", "arguments": {"cmd": f"use {AWS_KEY_ID}"}}}, {
                      "id": "call_2", "type": "function", "function": {"name": "count", "arguments": 5}}]}}],
              "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}
    await respond_awaited(chain, flow, answer)
    assert chain.rows("SELECT status FROM aibridge_interceptions") == [("completed",)]
    assert chain.rows("SELECT input_tokens, output_tokens FROM aibridge_token_usages") == [(9, 4)]
    assert chain.rows("SELECT input FROM aibridge_tool_usages ORDER BY tool DESC") == [
        ('{"cmd":"use [REDACTED:aws-key]"}',), ("5",)]
    assert not chain.pipeline.draining and not chain.rt.inflight


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@chain_test(extra={"policies": {"redact_stored": True}})
async def test_a_stream_still_in_flight_at_shutdown_is_recorded_masked(chain):
    """Shutdown records every call still in flight with what its stream gave: masked like any record of it."""
    flow = await chain.request(anthropic_flow(chain, body={**MESSAGES, "stream": True}))
    flow.response = tutils.tresp(status_code=200, content=b"", headers=http.Headers(content_type="text/event-stream"))
    chain.pipeline.responseheaders(flow)
    tap = state_of(flow).tap
    tap(sse("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-5",
                                                                   "usage": {"input_tokens": 5}}}))
    tap(sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}}))
    tap(sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "input_json_delta", "partial_json": json.dumps({"command": f"export KEY={AWS_KEY_ID}"})}}))
    tap(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    ended = []
    record = chain.rt.recorder.ended

    def spy(ic, summary, *rest):
        ended.append([c.input for c in summary.tool_calls])
        return record(ic, summary, *rest)

    chain.rt.recorder.ended = spy
    await chain.rt.done()
    assert ended == [['{"command": "export KEY=[REDACTED:aws-key]"}']]


@chain_test(extra={"policies": {"redact_stored": True}})
async def test_masking_a_large_prompt_or_tool_input_runs_off_the_event_loop(chain):
    """Detectors cost about 1 ms per 10 KB of prose, more on code: over 32 KB of text, the masking of what a call
    stores runs on a thread, as the detectors over a large request do (docs/policies.md, Bounds)."""
    import threading

    from aibridge_gw.policy.redact import Redactor

    where = []
    text = Redactor.text

    def spy(self, value):
        where.append(threading.current_thread() is threading.main_thread())
        return text(self, value)

    Redactor.text = spy
    try:
        big = "def handler(event):\n    return event['body']\n" * 2500  # about 110 KB
        flow = await chain.request(anthropic_flow(chain, body={**MESSAGES, "messages": [
            {"role": "user", "content": big}]}))
        answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                  "content": [{"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {"content": big}}],
                  "stop_reason": "tool_use", "usage": {"input_tokens": 12, "output_tokens": 3}}
        await respond_awaited(chain, flow, answer)
    finally:
        Redactor.text = text
    assert where and not any(where)
    assert chain.rows("SELECT status FROM aibridge_interceptions") == [("completed",)]


@chain_test(extra={"policies": {"rules": [{"name": "no-bash", "hook": "tool", "when": 'tool.name == "Bash"',
                                           "action": "deny", "message": "no shell"}]}})
async def test_each_tool_call_without_a_call_id_gets_its_own_decision_row(chain):
    """Gemini's function calls (and some providers' tool calls) carry no id: two refused calls of one tool in one
    answer are two decisions, two rows."""
    flow = await chain.request(anthropic_flow(chain))
    calls = [{"type": "tool_use", "name": "Bash", "input": {"command": c}} for c in ("ls", "rm -rf /")]
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
              "content": calls, "stop_reason": "tool_use", "usage": {"input_tokens": 12, "output_tokens": 3}}
    await respond_awaited(chain, flow, answer)
    assert [b["type"] for b in json.loads(flow.response.content)["content"]] == ["text", "text"]
    assert chain.rows("SELECT rule, action, tool, tool_call_id FROM aibridge_policy_decisions") == [
        ("no-bash", "deny", "Bash", None), ("no-bash", "deny", "Bash", None)]


def test_what_a_call_stores_of_an_injected_tools_failure_is_masked_too():
    """An injected MCP tool's error result is stored (invocation_error): masked like its input."""
    from aibridge_gw.flow.exchange import ToolCall
    from aibridge_gw.policy.policing import mask_stored
    from aibridge_gw.policy.redact import Redactor

    summary = ResponseSummary(tool_calls=[ToolCall("r", "c1", "db.query", '{"q": "select 1"}', injected=True,
                                                   error=f"connection refused for key {AWS_KEY_ID}")])
    mask_stored(Redactor(), summary)
    assert summary.tool_calls[0].error == "connection refused for key [REDACTED:aws-key]"


def test_price_book_layers_database_over_file_over_package_and_applies_tiers(tmp_path):
    from aibridge_gw.pricing import Price

    f = tmp_path / "p.yaml"
    f.write_text("models:\n  claude-sonnet-4: {input: 9, output: 9}\n  acme: {input: 1, output: 1}\n")
    book = PriceTable.load(f)
    assert book.resolve("claude-sonnet-4-20250514").source == "file"  # the file's family over the package
    assert book.resolve("gpt-4o-mini").source.startswith("genai-prices ")
    book.set_overrides({"acme": Price(5, 5, 5, 5, "database")})
    assert book.resolve("acme").source == "database"  # the database over the file, the cache renewed
    # Gemini 2.5 Pro: past 200k input tokens every token of the call pays the higher rate (the package's rule).
    pro = PriceTable.load().resolve("gemini-2.5-pro", "gemini")
    assert pro.cost(200_000, 1000, 0, 0) == pytest.approx((200_000 * 1.25 + 1000 * 10) / 1e6)
    assert pro.cost(200_001, 1000, 0, 0) == pytest.approx((200_001 * 2.5 + 1000 * 15) / 1e6)
    assert PriceTable.load().resolve("anthropic.claude-3-5-sonnet-20241022-v2:0", "bedrock").input == 3.0
    assert PriceTable.load().cost("no-such-model-anywhere", 10, 10, 0, 0) is None


def test_budgets_price_each_call_at_its_own_tier():
    """Two Gemini 2.5 Pro rounds of 150k input each cost what each costs (under the 200k tier), not what one
    300k call would; a fleet's totals take the costs stored per usage row."""
    b = Budgets(Limits(usd_per_day=100), {}, PriceTable.load(None))
    now = dt.datetime.now(dt.UTC)
    b.record("u", now, "gemini-2.5-pro", [TokenUsage(None, 150_000, 0), TokenUsage(None, 150_000, 0)])
    assert b.used("u")["usd_per_day"] == pytest.approx(2 * 150_000 * 1.25 / 1e6)
    stored = [["u", now.isoformat(), None, 300_000, 0, 0, 0, 0.375]]  # a fleet row: the stored cost summed
    b.replace_totals(stored)
    assert b.used("u")["usd_per_day"] == pytest.approx(0.375) and b.used("u")["tokens_per_day"] == 300_000


def test_budget_days_and_report_buckets_are_utc_whatever_the_sessions_time_zone(tmp_path):
    import duckdb

    from aibridge_gw.policy.budgets import usage_totals
    from aibridge_gw.store import reports, schema

    conn = duckdb.connect(str(tmp_path / "tz.duckdb"))
    schema.migrate(conn)
    conn.execute("SET TimeZone = 'Asia/Tokyo'")  # a session east of UTC: its day starts 9 hours earlier
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=30, second=0, microsecond=0)
    uid = "00000000-0000-4000-8000-000000000009"
    conn.execute("INSERT INTO aibridge_interceptions (id, initiator_id, provider, provider_name, model, "
                 "credential_kind, status, started_at) VALUES ('00000000-0000-4000-8000-000000000001', ?, "
                 "'anthropic', 'anthropic', 'claude-sonnet-4-0', 'centralized', 'completed', ?)", [uid, today])
    conn.execute("INSERT INTO aibridge_token_usages (id, interception_id, input_tokens, output_tokens, "
                 "cache_read_input_tokens, cache_write_input_tokens, created_at, cost_usd) VALUES "
                 "('00000000-0000-4000-8000-000000000002', '00000000-0000-4000-8000-000000000001', 10, 5, 0, 0, ?, "
                 "0.5)", [today])
    (row,) = usage_totals(conn)
    assert dt.datetime.fromisoformat(row[1]).date() == today.date() and row[7] == 0.5
    (day,) = reports.usage(conn, reports.Viewer.everyone(), "day", PriceTable({}))["data"]
    assert str(day["day"]) == today.date().isoformat()
    conn.close()
