"""The Responses API over a WebSocket (issue #26): relayed to a provider's WebSocket (`websocket: true`) or
translated to HTTP streaming requests (`websocket: false`), each `response.create` one interception, governed and
recorded like an HTTP call. A real gateway, a real WebSocket client (`websockets`), a WebSocket stand-in and the
HTTP stand-in."""

from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support.gateway import UPSTREAM_OPENAI_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.wire import responses_stream
from tests.support.ws_upstream import WsUpstream

pytestmark = pytest.mark.timeout(120)
BETA = {"OpenAI-Beta": "responses_websockets=2026-02-06"}
WS_KEY = "sk-proj-ws-upstream-0123456789abcdefSECRET"


@pytest.fixture(scope="module")
def wsup():
    up = WsUpstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def wgw(tmp_path_factory, upstream, wsup):
    """`relay` (a WebSocket provider) and `translate` (the HTTP stand-in): both serve the Responses WebSocket."""
    gw = Gateway(tmp_path_factory.mktemp("ws-gw"), upstream.url, providers=[
        {"name": "relay", "type": "openai", "base_url": wsup.url + "/v1/", "key": WS_KEY, "websocket": True},
        {"name": "translate", "type": "openai", "base_url": upstream.url + "/v1/", "key": UPSTREAM_OPENAI_KEY},
        # A "WebSocket" provider that is an HTTP server: every upgrade to it is answered 404.
        {"name": "broken", "type": "openai", "base_url": upstream.url + "/v1/", "key": WS_KEY, "websocket": True},
    ], extra={
        "budgets": {"users": {"capped-relay": {"requests_per_minute": 1}, "capped-translate": {"requests_per_minute": 1}}},
        "policies": {"rules": [{"name": "no-forbidden", "hook": "request", "when": 'model == "forbidden-model"',
                                "action": "deny", "message": "that model is not allowed here"},
                               {"name": "no-topsecret", "hook": "request", "when": 'prompt.contains("TOPSECRET")',
                                "action": "deny", "message": "no secrets upstream"},
                               {"name": "no-secrets-out", "hook": "request", "when": "size(secrets(prompt)) > 0",
                                "action": "redact"},
                               {"name": "no-rm", "hook": "tool", "when": '"rm -rf /" in tool.input.command',
                                "action": "deny", "message": "not on this machine"}]},
    }).start()
    yield gw
    gw.stop()


@pytest.fixture
def env(wgw, upstream, wsup):
    upstream.reset()
    wsup.reset()
    yield wgw
    upstream.reset()
    wsup.reset()


_n = iter(range(1, 10_000))


def new_user(gw, name: str | None = None) -> tuple[str, str]:
    name = name or f"wsuser{next(_n)}-{int(time.time() * 1000) % 100000}"
    return name, gw.new_user(name)


def ws_url(gw, mode: str) -> str:
    return gw.url.replace("http://", "ws://") + f"/{mode}/v1/responses"


def open_ws(gw, mode: str, token: str):
    return connect(ws_url(gw, mode), additional_headers={"Authorization": f"Bearer {token}", **BETA,
                                                           "User-Agent": "codex_exec/0.171.0 (test)",
                                                           "session_id": "sess-ws-1"},
                   open_timeout=10, max_size=None)


def create(prompt: str, model: str = "gpt-5", **extra) -> str:
    return json.dumps({"type": "response.create", "model": model, "instructions": "be brief",
                       "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}],
                       "tools": [], "store": False, **extra})


def turn(ws, message: str, timeout: float = 15) -> list[dict]:
    """Send one message; the events up to the turn's final one."""
    ws.send(message)
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        ev = json.loads(ws.recv(timeout=deadline - time.time()))
        out.append(ev)
        if ev.get("type") in ("response.completed", "response.failed", "response.incomplete", "error"):
            return out
    raise AssertionError(f"no final event: {out}")


def rows(gw, user: str, n: int) -> list[dict]:
    got = gw.wait_for(
        "SELECT i.*, p.prompt FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
        "LEFT JOIN aibridge_user_prompts p ON p.interception_id = i.id "
        f"WHERE u.name = '{user}' AND i.status <> 'in_progress' ORDER BY i.started_at",
        lambda r: len(r) >= n)
    return got


def usage(gw, interception_id: str) -> list[tuple]:
    return [(u["input_tokens"], u["output_tokens"]) for u in gw.sql(
        f"SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = '{interception_id}'")]


def script_http(upstream, n: int, usage_=(12, 7)) -> None:
    upstream.script(*[Reply.sse(responses_stream(f"Answer {i}", usage_)) for i in range(n)])


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_turns_on_one_socket_are_each_recorded_exactly(env, upstream, wsup, mode):
    gw = env
    user, token = new_user(gw)
    script_http(upstream, 3)
    expected = wsup.usage if mode == "relay" else (12, 7)
    with open_ws(gw, mode, token) as ws:
        for i in range(3):
            events = turn(ws, create(f"question {i} from {user}"))
            assert [e["type"] for e in events][0] == "response.created"
            assert events[-1]["type"] == "response.completed", events
    got = rows(gw, user, 3)
    assert [r["prompt"] for r in got] == [f"question {i} from {user}" for i in range(3)]
    for r in got:
        assert (r["status"], r["model"], r["api"], r["provider_name"], r["stream"]) == \
            ("completed", "gpt-5", "openai.responses", mode, True), r
        assert r["client"] == "Codex" and r["credential_kind"] == "centralized", r
        assert usage(gw, r["id"]) == [expected]
    assert len({r["id"] for r in got}) == 3
    if mode == "relay":  # the central key went upstream, never the gateway token
        assert wsup.handshakes[-1]["authorization"] == f"Bearer {WS_KEY}"
        assert [m["type"] for m in wsup.messages] == ["response.create"] * 3
    else:
        sent = [s for s in upstream.seen if s.path.endswith("/responses")]
        assert len(sent) == 3 and all(s.headers.get("authorization") == f"Bearer {UPSTREAM_OPENAI_KEY}" for s in sent)
        body = sent[0].json()
        assert body["stream"] is True and "type" not in body and body["model"] == "gpt-5"


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_a_bad_token_is_refused_before_the_upgrade(env, mode):
    with pytest.raises(InvalidStatus) as e:
        open_ws(env, mode, "not-a-gateway-token").close()
    assert e.value.response.status_code == 401


AWS_KEY = "AKIA4HKQ2MZP7XW3RN5T"  # shaped like an AWS access key id (the secrets detector finds it)


def provider_saw(upstream, wsup, mode: str) -> str:
    """Everything the provider was sent (relay: the WebSocket messages; translate: the HTTP bodies)."""
    if mode == "relay":
        return json.dumps(wsup.messages)
    return "".join(s.body.decode() for s in upstream.seen if s.path.endswith("/responses"))


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_warm_ups_are_policed_and_recorded(env, upstream, wsup, mode):
    """A warm-up (`generate: false`) reaches the provider (relay: its socket; translate: as the next turn's input):
    it goes through the same request policies (deny, redact) and gets an audit row of its own (purpose `warmup`)."""
    gw = env
    user, token = new_user(gw)
    script_http(upstream, 1)
    with open_ws(gw, mode, token) as ws:
        denied = turn(ws, create("TOPSECRET launch codes", generate=False))
        assert [e["type"] for e in denied] == ["error"] and denied[0]["status"] == 403, denied
        warm = turn(ws, create(f"warm with {AWS_KEY}", generate=False))
        assert [e["type"] for e in warm] == ["response.created", "response.completed"]
        prev = warm[-1]["response"]["id"]
        events = turn(ws, create(f"real question {user}", previous_response_id=prev))
        assert events[-1]["type"] == "response.completed"
    got = rows(gw, user, 3)
    assert [r["status"] for r in got] == ["rejected", "completed", "completed"], got
    warm_row = got[1]
    assert warm_row["purpose"] == "warmup" and json.loads(warm_row["metadata"])["warmup"] is True, warm_row
    assert warm_row["prompt"] == "warm with [REDACTED:aws-key]" and usage(gw, warm_row["id"]) == []
    assert got[2]["prompt"] == f"real question {user}" and got[2]["purpose"] != "warmup"
    seen = provider_saw(upstream, wsup, mode)
    assert "TOPSECRET" not in seen and AWS_KEY not in seen and "[REDACTED:aws-key]" in seen
    if mode == "translate":  # the HTTP upstream got the whole conversation: the policed warm-up's input, then the turn
        sent = [s.json() for s in upstream.seen if s.path.endswith("/responses")]
        assert len(sent) == 1 and "previous_response_id" not in sent[0]
        assert [i["content"][0]["text"] for i in sent[0]["input"]] == ["warm with [REDACTED:aws-key]",
                                                                        f"real question {user}"]
    else:
        assert [m.get("generate") for m in wsup.messages] == [False, None]


def test_a_relayed_message_is_the_gateways_reading_never_the_raw_frame(env, wsup):
    """A frame with a duplicated key: the provider gets the message as the gateway parsed (and policed) it."""
    gw = env
    user, token = new_user(gw)
    raw = create("placeholder")[:-1] + ', "input": "TOPSECRET wins at the provider", "input": "harmless"}'
    with open_ws(gw, "relay", token) as ws:
        assert turn(ws, raw)[-1]["type"] == "response.completed"
    assert wsup.messages[-1]["input"] == "harmless" and "TOPSECRET" not in wsup.raw[-1]
    assert rows(gw, user, 1)[0]["prompt"] == "harmless"


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_policy_and_budget_refusals_keep_the_socket_usable(env, upstream, wsup, mode):
    gw = env
    user, token = new_user(gw, f"capped-{mode}")
    script_http(upstream, 2)
    with open_ws(gw, mode, token) as ws:
        denied = turn(ws, create("hello", model="forbidden-model"))
        assert [e["type"] for e in denied] == ["error"]
        assert denied[0]["status"] == 403 and "no-forbidden" in denied[0]["error"]["message"]
        ok = turn(ws, create("first"))
        assert ok[-1]["type"] == "response.completed"
        over = turn(ws, create("second"))
        assert [e["type"] for e in over] == ["error"] and over[0]["status"] == 429, over
    got = rows(gw, user, 3)
    assert sorted(r["status"] for r in got) == ["completed", "rejected", "rejected"]
    if mode == "relay":  # refused turns never reached the provider
        assert [m["model"] for m in wsup.messages] == ["gpt-5"]
    else:
        assert len([s for s in upstream.seen if s.path.endswith("/responses")]) == 1


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_a_revoked_token_stops_the_next_turn(env, upstream, wsup, mode):
    gw = env
    user, token = new_user(gw)
    script_http(upstream, 2)
    with open_ws(gw, mode, token) as ws:
        assert turn(ws, create("before"))[-1]["type"] == "response.completed"
        tid = next(row[0] for row in gw.op("tokens.list", user=user)["rows"])
        gw.op("tokens.revoke", id=tid)
        deadline = time.time() + 5
        while True:  # the gateway learns of the revocation within about a second
            events = turn(ws, create("after"))
            if events[-1]["type"] == "error" or time.time() > deadline:
                break
            time.sleep(0.3)
        assert [e["type"] for e in events] == ["error"] and events[0]["status"] == 401, events
    if mode == "relay":
        assert [m["input"][0]["content"][0]["text"] for m in wsup.messages].count("after") <= 1


def test_relay_passes_frames_as_they_come_and_a_client_closing_mid_turn_gets_the_providers_final_usage(env, wsup):
    """Frames one by one as the provider sends them; a client that closes mid-turn has its close answered at once,
    while the provider's answer is read to its end and recorded with its final usage, then the provider gets the
    client's close."""
    gw = env
    user, token = new_user(gw)
    wsup.delay = 0.3
    with open_ws(gw, "relay", token) as ws:
        ws.send(create("slow"))
        first = json.loads(ws.recv(timeout=5))
        t0 = time.time()
        second = json.loads(ws.recv(timeout=5))
        assert (first["type"], second["type"]) == ("response.created", "response.output_text.delta")
        assert 0.15 < time.time() - t0 < 1.5  # one frame per event, as the provider sent it
        closed_at = time.time()
    assert time.time() - closed_at < 1.0  # the client's close is answered at once
    got = rows(gw, user, 1)
    assert got[0]["status"] == "completed", got[0]
    assert usage(gw, got[0]["id"]) == [wsup.usage]
    assert json.loads(got[0]["metadata"]).get("client_disconnected") is True
    deadline = time.time() + 15
    while not wsup.closes and time.time() < deadline:
        time.sleep(0.05)
    assert wsup.closes == [1000]  # the provider got the client's close once the turn was read


def test_translate_client_closing_mid_turn_gets_the_providers_final_usage(env, upstream):
    gw = env
    user, token = new_user(gw)
    upstream.script(Reply.sse(responses_stream("late answer", (40, 4)), delay=0.4))
    with open_ws(gw, "translate", token) as ws:
        ws.send(create("close early"))
        assert json.loads(ws.recv(timeout=5))["type"] == "response.created"
    got = rows(gw, user, 1)
    assert got[0]["status"] == "completed", got[0]
    assert usage(gw, got[0]["id"]) == [(40, 4)]
    assert json.loads(got[0]["metadata"])["client_disconnected"] is True


def rss_mb(gw) -> float:
    for line in open(f"/proc/{gw.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_many_turns_on_one_socket_hold_no_memory(env, upstream, wsup, mode):
    """A long socket compressed: 250 turns of a few KB each on one socket, each recorded; the gateway's memory stays
    flat (no per-turn state outlives its turn: mitmproxy's message list is trimmed, the turn's flow dropped)."""
    gw = env
    user, token = new_user(gw)
    n, warm = 250, 50
    upstream.default = Reply.sse(responses_stream("again", (3, 2)))
    with open_ws(gw, mode, token) as ws:
        for i in range(n):
            if i == warm:
                before = rss_mb(gw)
            assert turn(ws, create(f"turn {i} " + "x" * 4000))[-1]["type"] == "response.completed"
        grown = rss_mb(gw) - before
        health = json.loads(__import__("httpx").get(gw.url + "/aibridge/healthz", trust_env=False).text)
        assert health["inflight"] == 0
    assert grown < 6, f"{grown:.1f} MB more after {n - warm} turns"  # measured: flat over 1500 turns
    got = rows(gw, user, n)
    assert len(got) == n and {r["status"] for r in got} == {"completed"}


def test_proxy_mode_websocket_to_api_openai_com(tmp_path, upstream, wsup):
    """Proxy mode: `wss://api.openai.com/v1/responses` through the gateway as an HTTPS proxy (CONNECT), relayed."""
    pytest.importorskip("websockets")
    gw = Gateway(tmp_path / "proxy", upstream.url, providers=[
        {"name": "openai", "type": "openai", "base_url": wsup.url + "/v1/", "key": WS_KEY, "websocket": True,
         "hosts": ["api.openai.com"]}]).start()
    try:
        wsup.reset()
        user, token = new_user(gw)
        import socket
        import ssl

        from websockets.sync.client import ClientConnection  # noqa: F401
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        sock.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(gw.ca))
        with connect("wss://api.openai.com/v1/responses", sock=sock, ssl=ctx, server_hostname="api.openai.com",
                     additional_headers={"Authorization": f"Bearer {token}", **BETA}, open_timeout=10) as ws:
            events = turn(ws, create(f"proxied {user}"))
            assert events[-1]["type"] == "response.completed"
        got = rows(gw, user, 1)
        assert got[0]["prompt"] == f"proxied {user}" and usage(gw, got[0]["id"]) == [wsup.usage]
        assert wsup.handshakes[-1]["authorization"] == f"Bearer {WS_KEY}"
    finally:
        gw.stop()


# --- Codex CLI, unmodified ------------------------------------------------------------------------------------

def _codex(tmp_path, gw, token: str, base: str, proxy: str | None = None):
    import subprocess

    from aibridge_gw.certs import bundle

    from tests.support.clients import clean_env, npm_bin
    exe = npm_bin("@openai/codex", "codex")
    home = tmp_path / "home"
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    # A custom provider uses the Responses WebSocket when its config says it supports one.
    (codex_home / "config.toml").write_text(
        'model_provider = "aibridge"\nmodel = "gpt-5"\n\n[model_providers.aibridge]\nname = "aibridge"\n'
        f'base_url = "{base}"\nenv_key = "AIBRIDGE_TOKEN"\nwire_api = "responses"\nsupports_websockets = true\n')
    env = clean_env(home, AIBRIDGE_TOKEN=token, CODEX_HOME=str(codex_home), RUST_LOG="warn", PWD=str(work))
    if proxy:
        env.update(HTTPS_PROXY=proxy, https_proxy=proxy, SSL_CERT_FILE=str(bundle(gw.workdir / "certs")))
    return subprocess.run([str(exe), "exec", "--skip-git-repo-check", f"Say hello over a socket to {token[-6:]}"],
                          env=env, cwd=work, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["translate", "relay"])
def test_codex_cli_uses_the_websocket_in_base_url_mode(env, tmp_path, upstream, wsup, mode):
    from tests.support.clients import ANSWER, USAGE, answer
    gw = env
    user, token = new_user(gw)
    upstream.check = answer
    upstream.default = Reply.json({"object": "list", "data": []})
    wsup.deltas, wsup.usage = [ANSWER], USAGE
    try:
        r = _codex(tmp_path, gw, token, f"{gw.url}/{mode}/v1")
    finally:
        wsup.deltas, wsup.usage = ["Hello ", "over ", "a socket."], (21, 5)
    out = r.stdout + r.stderr
    assert ANSWER in r.stdout, out
    assert "failed to connect to Responses WebSocket" not in out and "falling back to HTTP" not in out, out
    recorded = rows(gw, user, 1)
    time.sleep(0.5)
    recorded = rows(gw, user, 1)
    # Codex's warm-up (generate: false), if it sent one, has its own row (purpose `warmup`, no usage)
    warm = [r for r in recorded if r["purpose"] == "warmup"]
    assert all(usage(gw, r["id"]) == [] and r["status"] == "completed" for r in warm), warm
    turns = [r for r in recorded if r["purpose"] != "warmup"]
    assert len(turns) == 1, [(r["purpose"], r["prompt"]) for r in recorded]
    got = turns[0]
    assert token[-6:] in got["prompt"]
    assert (got["status"], got["client"], got["api"], got["stream"]) == ("completed", "Codex", "openai.responses", True)
    assert got["client_session_id"] and json.loads(got["metadata"])["transport"] == "websocket"
    assert usage(gw, got["id"]) == [USAGE]
    if mode == "translate":  # the turn went upstream as an HTTP streaming request
        assert any(s.path.endswith("/v1/responses") and s.method == "POST" for s in upstream.seen)
    else:
        assert any(m.get("type") == "response.create" for m in wsup.messages)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_codex_cli_uses_the_websocket_in_proxy_mode(tmp_path, upstream, wsup, mode):
    """HTTPS_PROXY: Codex opens wss://api.openai.com/v1/responses through the gateway's CONNECT tunnel."""
    from tests.support.clients import ANSWER, USAGE, answer
    base = wsup.url if mode == "relay" else upstream.url
    gw = Gateway(tmp_path / "gw", upstream.url, providers=[
        {"name": "openai", "type": "openai", "base_url": base + "/v1/", "key": WS_KEY, "hosts": ["api.openai.com"],
         "websocket": mode == "relay"}]).start()
    upstream.reset()
    wsup.reset()
    upstream.check = answer
    upstream.default = Reply.json({"object": "list", "data": []})
    wsup.deltas, wsup.usage = [ANSWER], USAGE
    try:
        user, token = new_user(gw)
        r = _codex(tmp_path, gw, token, "https://api.openai.com/v1", proxy=f"http://{user}:{token}@127.0.0.1:{gw.port}")
        out = r.stdout + r.stderr
        assert ANSWER in r.stdout, out
        assert "failed to connect to Responses WebSocket" not in out and "falling back to HTTP" not in out, out
        got = next(r for r in rows(gw, user, 1) if r["purpose"] != "warmup")
        assert token[-6:] in got["prompt"] and got["status"] == "completed" and got["client"] == "Codex"
        assert json.loads(got["metadata"])["transport"] == "websocket" and usage(gw, got["id"]) == [USAGE]
    finally:
        wsup.deltas, wsup.usage = ["Hello ", "over ", "a socket."], (21, 5)
        upstream.reset()
        gw.stop()


@pytest.mark.parametrize("mode,leave", [("translate", False), ("relay", False), ("relay", True)])
def test_central_mcp_tools_are_injected_and_their_loop_runs_on_a_socket(tmp_path, upstream, wsup, mode, leave):
    """An injected tool's loop runs as on HTTP: the gateway calls the tool and continues; the client sees one
    response over its socket, without the injected tool; every round recorded in one interception. A relayed
    socket's turn with injected tools is answered by the gateway (its rounds over HTTP), never by the provider's
    WebSocket. `leave`: the client closes mid-round: the round is read to its end and its usage recorded."""
    from tests.support.fixtures import capture
    from tests.support.mcp_server import McpTestServer
    from tests.support.ws_upstream import Split

    mcp = McpTestServer().start()
    split = Split(wsup.port, int(upstream.url.rsplit(":", 1)[1])).start()
    gw = Gateway(tmp_path / "mcp", upstream.url, providers=[
        {"name": mode, "type": "openai", "base_url": (split.url if mode == "relay" else upstream.url) + "/v1/",
         "key": WS_KEY, "websocket": mode == "relay"}], extra={
        "mcp_servers": [{"name": "coder", "url": mcp.url, "tool_deny_regex": "^create_gist$"}],
        "mcp": {"tool_timeout_seconds": 5, "list_timeout_seconds": 3}}).start()
    try:
        upstream.reset()
        wsup.reset()
        user, token = new_user(gw)
        cap = capture("openai/responses/streaming/single_injected_tool.txtar")
        upstream.script(Reply.from_capture(cap, True, delay=0.1 if leave else 0.0),
                        Reply.from_capture(cap, True, "/tool-call"))
        body = dict(cap.request)
        body.pop("stream", None)
        if leave:
            with open_ws(gw, mode, token) as ws:
                ws.send(json.dumps({"type": "response.create", **body}))
                assert json.loads(ws.recv(timeout=10))["type"] == "response.created"
            (ic,) = rows(gw, user, 1)
            rounds = len([s for s in upstream.seen if s.path.endswith("/responses")])
            assert rounds >= 1 and len(usage(gw, ic["id"])) == rounds, (ic["status"], ic["error"], rounds)
            assert json.loads(ic["metadata"]).get("client_disconnected") is True
            return
        with open_ws(gw, mode, token) as ws:
            events = turn(ws, json.dumps({"type": "response.create", **body}), timeout=30)
        assert events[-1]["type"] == "response.completed", events[-3:]
        assert [e["type"] for e in events].count("response.created") == 1
        assert all("bmcp_" not in json.dumps(e) for e in events)
        assert [c[0] for c in mcp.calls] == ["coder_list_templates"]
        second = upstream.seen[1].json()
        assert [i for i in second["input"] if i.get("type") == "function_call_output"]
        (ic,) = gw.interceptions(user)
        assert ic["status"] == "completed" and json.loads(ic["metadata"])["transport"] == "websocket"
        assert len(usage(gw, ic["id"])) == 2
        tools = gw.sql(f"SELECT tool, injected FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}'")
        assert [t["tool"] for t in tools if t["injected"]] == ["bmcp_coder_coder_list_templates"]
        assert wsup.messages == []  # the provider's WebSocket never saw the turn
        assert all(s.headers.get("authorization") == f"Bearer {WS_KEY}" for s in upstream.seen)
    finally:
        gw.stop()
        split.stop()
        mcp.stop()
        upstream.reset()


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_pings_are_answered_and_the_close_code_passes_through(env, upstream, wsup, mode):
    gw = env
    user, token = new_user(gw)
    script_http(upstream, 1)
    ws = open_ws(gw, mode, token)
    assert ws.ping(b"are you there").wait(5)  # answered by the provider (relay) or the translator
    assert turn(ws, create("after a ping"))[-1]["type"] == "response.completed"
    ws.close(code=4001, reason="done here")
    assert ws.close_code == 4001
    if mode == "relay":  # the provider saw the client's own close code
        deadline = time.time() + 5
        while not wsup.closes and time.time() < deadline:
            time.sleep(0.05)
        assert wsup.closes == [4001]


def test_chatgpt_subscription_login_over_the_websocket(tmp_path, upstream, wsup):
    """The `chatgpt` provider (Codex signed in with a ChatGPT account): the user's own login goes upstream, the
    gateway token names the user, the turn is recorded as a subscription call."""
    gw = Gateway(tmp_path / "chatgpt", upstream.url, providers=[
        {"name": "chatgpt", "type": "chatgpt", "base_url": wsup.url, "websocket": True}]).start()
    try:
        wsup.reset()
        user, token = new_user(gw)
        login = "eyJhbGciOiJSUzI1NiJ9.users-own-chatgpt-login.sig0123456789"
        with connect(gw.url.replace("http://", "ws://") + "/chatgpt/backend-api/codex/responses",
                     additional_headers={"Authorization": f"Bearer {login}", "X-AIBridge-Token": token, **BETA},
                     open_timeout=10) as ws:
            assert turn(ws, create(f"subscribed {user}"))[-1]["type"] == "response.completed"
        got = rows(gw, user, 1)[0]
        assert (got["credential_kind"], got["provider"], got["status"]) == ("subscription", "chatgpt", "completed")
        assert wsup.handshakes[-1]["authorization"] == f"Bearer {login}"
        assert "x-aibridge-token" not in wsup.handshakes[-1]
        assert usage(gw, got["id"]) == [wsup.usage]
    finally:
        gw.stop()


def test_tool_rules_gate_the_tool_calls_of_a_relayed_turn(env, wsup):
    """A tool rule refuses a tool call before the client sees it: the call becomes the API's text, the turn still
    ends cleanly; an allowed call passes untouched, frame for frame."""
    gw = env
    user, token = new_user(gw)
    with open_ws(gw, "relay", token) as ws:
        wsup.tool_call = ("shell", json.dumps({"command": ["ls", "-la"]}))
        allowed = turn(ws, create("list files"))
        wsup.tool_call = ("shell", json.dumps({"command": ["bash", "-lc", "rm -rf /"]}))
        refused = turn(ws, create("wipe it"))
    calls = [e for e in allowed if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"]
    assert len(calls) == 1, json.dumps([e.get("delta") for e in allowed])
    assert [e["sequence_number"] for e in allowed] == list(range(len(allowed)))
    assert not any(e.get("item", {}).get("type") == "function_call" for e in refused), refused
    text = "".join(e["delta"] for e in refused if e["type"] == "response.output_text.delta")
    assert "no-rm" in text and "not on this machine" in text
    final = refused[-1]
    assert final["type"] == "response.completed"
    assert all(i["type"] != "function_call" for i in final["response"]["output"])
    got = rows(gw, user, 2)
    assert [r["status"] for r in got] == ["completed", "completed"]
    decisions = gw.sql(f"SELECT rule, tool FROM aibridge_policy_decisions WHERE interception_id = '{got[1]['id']}'")
    assert decisions == [{"rule": "no-rm", "tool": "shell"}]


def test_one_response_at_a_time_a_warm_up_included(env, wsup):
    """A response.create while a warm-up (or another response) is in progress is refused (409), never forwarded:
    the provider's events are never taken for another turn's."""
    gw = env
    user, token = new_user(gw)
    wsup.delay = 0.3
    with open_ws(gw, "relay", token) as ws:
        ws.send(create("warm", generate=False))
        ws.send(create("too early"))
        seen = [json.loads(ws.recv(timeout=5)) for _ in range(3)]
        assert sorted(e["type"] for e in seen) == ["error", "response.completed", "response.created"], seen
        assert next(e for e in seen if e["type"] == "error")["status"] == 409
        assert turn(ws, create("in turn"))[-1]["type"] == "response.completed"
    assert [m.get("generate") for m in wsup.messages] == [False, None]
    assert [(r["prompt"], r["purpose"]) for r in rows(gw, user, 2)] == [("warm", "warmup"), ("in turn", "chat")]


def test_a_provider_silent_past_the_stream_idle_timeout_ends_the_turn_not_the_socket(tmp_path, upstream, wsup):
    """timeouts.stream_idle_seconds per turn: the client gets the API's error events, the turn is recorded failed.
    Translated: the HTTP stream is dropped and the socket takes the next turn; relayed: the provider's socket could
    still be sending that response, so the socket refuses further turns (the client opens a new one)."""
    gw = Gateway(tmp_path / "idle", upstream.url, providers=[
        {"name": "relay", "type": "openai", "base_url": wsup.url + "/v1/", "key": WS_KEY, "websocket": True},
        {"name": "translate", "type": "openai", "base_url": upstream.url + "/v1/", "key": UPSTREAM_OPENAI_KEY}],
        extra={"timeouts": {"stream_idle_seconds": 1}}).start()
    try:
        upstream.reset()
        wsup.reset()
        user, token = new_user(gw)
        upstream.script(Reply(200, {"content-type": "text/event-stream"}, events=responses_stream("x", (5, 1)),
                              stall_after=1), Reply.sse(responses_stream("after", (6, 2))))
        with open_ws(gw, "translate", token) as ws:
            stalled = turn(ws, create("stall"), timeout=10)
            assert stalled[-1]["type"] == "error" and "silent" in stalled[-1]["message"], stalled
            assert json.loads(ws.recv(timeout=5))["type"] == "response.failed"  # the turn's end, as on HTTP
            assert turn(ws, create("next"))[-1]["type"] == "response.completed"
        wsup.delay = 2.5
        with open_ws(gw, "relay", token) as ws:
            stalled = turn(ws, create("stall relayed"), timeout=10)
            assert stalled[-1]["type"] == "error" and "silent" in stalled[-1]["message"], stalled
            assert json.loads(ws.recv(timeout=5))["type"] == "response.failed"
            refused = turn(ws, create("next relayed"))
            assert refused[-1]["type"] == "error" and refused[-1]["status"] == 503
        with open_ws(gw, "relay", token) as ws:  # a warm-up the provider never ends does not wedge the socket
            stalled = turn(ws, create("warm stall", generate=False), timeout=10)
            assert stalled[-1]["type"] == "error" and "silent" in stalled[-1]["message"], stalled
        got = {r["prompt"]: r for r in rows(gw, user, 4)}
        assert got["warm stall"]["status"] == "failed" and got["warm stall"]["purpose"] == "warmup"
        assert got["warm stall"]["http_status"] == 502 and got["stall relayed"]["http_status"] == 502
        assert got["stall"]["status"] == "failed" and "silent" in got["stall"]["error"]
        assert got["next"]["status"] == "completed"
        assert got["stall relayed"]["status"] == "failed"
    finally:
        wsup.delay = 0.0
        gw.stop()
        upstream.reset()


def test_a_translated_turn_fails_over_across_the_instances_key_pool(tmp_path, upstream):
    """keys: a key the provider rate-limits is skipped for the next, as for HTTP calls; the record names the key
    that answered."""
    k1, k2 = "sk-proj-pool-one-0123456789abcdefONE1", "sk-proj-pool-two-0123456789abcdefTWO2"
    gw = Gateway(tmp_path / "pool", upstream.url, providers=[
        {"name": "openai", "type": "openai", "base_url": upstream.url + "/v1/", "keys": [k1, k2]}]).start()
    try:
        upstream.reset()
        upstream.check = lambda seen: Reply.json({"error": {"message": "slow down", "type": "rate_limit_error"}},
                                                 429) if seen.headers.get("authorization") == f"Bearer {k1}" else None
        upstream.default = Reply.sse(responses_stream("pooled", (8, 3)))
        user, token = new_user(gw)
        with open_ws(gw, "openai", token) as ws:
            assert turn(ws, create("pooled turn"))[-1]["type"] == "response.completed"
        (r,) = rows(gw, user, 1)
        assert r["status"] == "completed" and usage(gw, r["id"]) == [(8, 3)]
        assert r["credential_hint"].endswith("TWO2")
        assert [s.headers.get("authorization") for s in upstream.seen] == [f"Bearer {k1}", f"Bearer {k2}"]
    finally:
        gw.stop()
        upstream.reset()


# --- review findings: every call that reaches the provider has its exact row ---------------------------------------

def health(gw) -> dict:
    import httpx
    return httpx.get(gw.url + "/aibridge/healthz", trust_env=False, timeout=5).json()


@pytest.mark.parametrize("mode", ["relay", "translate"])
def test_a_turn_whose_client_closes_at_once_is_recorded_exactly(env, upstream, wsup, mode):
    """The client sends a turn and closes at once: whichever the gateway handles first (the close, the provider's
    events), every turn the provider got is recorded with its final usage; one the client left before it was sent
    upstream is recorded failed, with none. Nothing stays in flight."""
    gw = env
    user, token = new_user(gw)
    n = 6
    for i in range(n):
        upstream.default = Reply.sse(responses_stream("late answer", (40, 4)), delay=0.2 if i % 2 else 0)
        wsup.delay = 0.05 if i % 2 else 0
        ws = open_ws(gw, mode, token)
        ws.send(create(f"q{i}"))
        ws.close()
    got = rows(gw, user, n)
    sent = (len([m for m in wsup.messages if m.get("type") == "response.create"]) if mode == "relay"
            else len([s for s in upstream.seen if s.path.endswith("/responses")]))
    expected = wsup.usage if mode == "relay" else (40, 4)
    billed = []
    for r in got:
        u = usage(gw, r["id"])
        if u:
            assert u == [expected] and r["status"] == "completed", (r, u)
            billed.append(r)
        else:
            assert r["status"] == "failed" and "client disconnected" in r["error"], r
    assert len(got) == n and len(billed) == sent, (len(billed), sent, [(r["status"], r["error"]) for r in got])
    deadline = time.time() + 5
    while health(gw)["inflight"] and time.time() < deadline:
        time.sleep(0.1)
    assert health(gw)["inflight"] == 0


def test_a_refused_upgrade_keeps_nothing(env, upstream):
    """An upgrade the provider answers other than 101 opens no socket: nothing of it is kept."""
    import httpx
    gw = env
    _, token = new_user(gw)
    upstream.default = Reply.json({"error": {"message": "no websockets here"}}, status=404)
    before = health(gw)
    hdr = {"Authorization": f"Bearer {token}", "Upgrade": "websocket", "Connection": "Upgrade",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13", **BETA}
    with httpx.Client(trust_env=False) as c:
        codes = {c.get(gw.url + "/broken/v1/responses", headers=hdr).status_code for _ in range(20)}
    assert codes == {404}
    after = health(gw)
    assert after["websockets"] == before["websockets"] == 0 and after["loopback_jobs"] == 0, (before, after)


def test_provider_failures_on_a_socket_open_the_circuit_and_a_message_too_big_closes_it(tmp_path, upstream, wsup):
    """A turn the provider fails is recorded with its status and counts for the circuit breaker as an HTTP call does;
    a client message past `limits.max_request_body_mb` closes the socket 1009 before it is buffered whole; a reload
    that changes the socket's provider refuses its next turn (503, open a new WebSocket)."""
    from websockets.exceptions import ConnectionClosed
    gw = Gateway(tmp_path / "brk", upstream.url, providers=[
        {"name": "relay", "type": "openai", "base_url": wsup.url + "/v1/", "key": WS_KEY, "websocket": True},
        {"name": "translate", "type": "openai", "base_url": upstream.url + "/v1/", "key": UPSTREAM_OPENAI_KEY}],
        extra={"circuit_breaker": {"failures": 2, "open_seconds": 60}, "limits": {"max_request_body_mb": 1}}).start()
    try:
        upstream.reset()
        wsup.reset()
        upstream.default = Reply.json({"error": {"type": "server_error", "message": "boom"}}, status=500)
        user, token = new_user(gw)
        with open_ws(gw, "translate", token) as ws:
            statuses = [turn(ws, create(f"q{i}"))[-1]["status"] for i in range(3)]
        assert statuses == [500, 500, 503], statuses
        assert len([s for s in upstream.seen if s.path.endswith("/responses")]) == 2
        got = rows(gw, user, 2)
        assert [(r["status"], r["http_status"]) for r in got] == [("failed", 500), ("failed", 500)]
        # Compressed (the client's default): the message arrives whole in one read; uncompressed: cut while buffered.
        for mode, compression in (("relay", "deflate"), ("translate", "deflate"), ("relay", None)):
            with connect(ws_url(gw, mode), additional_headers={"Authorization": f"Bearer {token}", **BETA},
                         open_timeout=10, max_size=None, compression=compression) as ws:
                ws.send(create("x" * int(1.05 * 1024 * 1024)))
                with pytest.raises(ConnectionClosed) as e:
                    ws.recv(timeout=10)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1009, (mode, e.value)
        assert wsup.messages == []
        # A configuration reload that changes the socket's provider instance: an open socket refuses its next turn
        # (it would go by the old key), a new one follows the new configuration.
        import signal

        import yaml
        with open_ws(gw, "relay", token) as ws:
            assert turn(ws, create("before the reload"))[-1]["type"] == "response.completed"
            cfg = yaml.safe_load(gw.config_path.read_text())
            next(p for p in cfg["providers"] if p["name"] == "relay")["key"] = WS_KEY + "NEW"
            gw.config_path.write_text(yaml.safe_dump(cfg))
            before = gw.log().count("configuration reloaded")
            gw.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while gw.log().count("configuration reloaded") <= before and time.time() < deadline:
                time.sleep(0.05)
            refused = turn(ws, create("after the reload"))
            assert [e["type"] for e in refused] == ["error"] and refused[0]["status"] == 503, refused
            assert "open a new WebSocket" in refused[0]["error"]["message"]
        with open_ws(gw, "relay", token) as ws:
            assert turn(ws, create("on a new socket"))[-1]["type"] == "response.completed"
        assert wsup.handshakes[-1]["authorization"] == f"Bearer {WS_KEY}NEW"
        assert [m["input"][0]["content"][0]["text"] for m in wsup.messages] == ["before the reload", "on a new socket"]
    finally:
        gw.stop()
        upstream.reset()


def test_sigterm_lets_a_quiet_socket_turn_finish_then_closes_1001(tmp_path, upstream, wsup):
    """A turn whose provider is quiet for longer than the drain's idle wait (a reasoning model) is in flight like an
    HTTP call: it finishes within the grace, is recorded, and then the socket is closed 1001 (going away)."""
    from websockets.exceptions import ConnectionClosed
    gw = Gateway(tmp_path / "drain", upstream.url, providers=[
        {"name": "relay", "type": "openai", "base_url": wsup.url + "/v1/", "key": WS_KEY, "websocket": True}],
        extra={"timeouts": {"shutdown_grace_seconds": 30}}).start()
    try:
        wsup.reset()
        wsup.deltas = ["slow"]
        wsup.delay = 2.4  # longer than drain.QUIET between events
        user, token = new_user(gw)
        ws = open_ws(gw, "relay", token)
        ws.send(create("think hard"))
        got = [json.loads(ws.recv(timeout=10))["type"]]
        gw.proc.send_signal(__import__("signal").SIGTERM)
        code = None
        try:
            while True:
                got.append(json.loads(ws.recv(timeout=20))["type"])
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
        assert got[-1] == "response.completed" and code == 1001, (got, code)
        gw.proc.wait(30)
        (r,) = gw.sql("SELECT i.id, i.status FROM aibridge_interceptions i JOIN aibridge_users u "
                      f"ON u.id = i.initiator_id WHERE u.name = '{user}'")
        assert r["status"] == "completed" and usage(gw, r["id"]) == [wsup.usage]
    finally:
        wsup.delay = 0.0
        wsup.deltas = ["Hello ", "over ", "a socket."]
        gw.stop()
