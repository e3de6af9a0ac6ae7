"""HTTPS_PROXY mode on the same listener: AI hosts intercepted and recorded like base-URL traffic, other hosts
tunnelled untouched, identity from proxy credentials or the provider credential, BYOK."""

from __future__ import annotations

import base64
import json

import anthropic
import httpx
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, chat_call, responses_call
from tests.support.tls import client_context, tls_stand_in

USER_OWN_KEY = "sk-ant-users-own-key-0123456789XYZ"


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A non-AI HTTPS site with its own certificate."""
    mock = tls_stand_in(tmp_path_factory.mktemp("origin-tls"), ["localhost"])
    yield mock
    mock.stop()


def proxy_gateway(workdir, tls_upstream, extra=None, args=()):
    providers = [
        {"name": "anthropic", "type": "anthropic", "base_url": tls_upstream.url + "/",
         "key": UPSTREAM_ANTHROPIC_KEY, "hosts": ["api.anthropic.com"]},
        {"name": "openai", "type": "openai", "base_url": tls_upstream.url + "/v1/",
         "key": UPSTREAM_OPENAI_KEY, "hosts": ["api.openai.com"]},
    ]
    return Gateway(workdir, tls_upstream.url, extra=extra, providers=providers,
                   args=["--set", f"ssl_verify_upstream_trusted_ca={tls_upstream.ca}", *args]).start()


@pytest.fixture(scope="module")
def pgw(tmp_path_factory, tls_upstream):
    # The test "internet" lives on loopback, which the egress policy refuses unless allowlisted.
    gw = proxy_gateway(tmp_path_factory.mktemp("proxy-gw"), tls_upstream,
                       extra={"proxy": {"allow_addresses": ["localhost"]}})
    yield gw
    gw.stop()


_n = iter(range(10_000))


@pytest.fixture
def puser(pgw):
    name = f"puser{next(_n)}"
    return name, pgw.new_user(name)


def proxied_anthropic(gw, api_key, proxy_auth=None, **kw):
    host = gw.url.split("://")[1]
    proxy = f"http://{proxy_auth[0]}:{proxy_auth[1]}@{host}" if proxy_auth else gw.url
    return anthropic.Anthropic(
        base_url="https://api.anthropic.com", api_key=api_key, max_retries=0,
        http_client=anthropic.DefaultHttpxClient(proxy=proxy, verify=client_context(gw.ca)), **kw,
    )


def proxied_openai(gw, api_key, proxy_auth=None):
    host = gw.url.split("://")[1]
    proxy = f"http://{proxy_auth[0]}:{proxy_auth[1]}@{host}" if proxy_auth else gw.url
    return openai.OpenAI(
        base_url="https://api.openai.com/v1", api_key=api_key, max_retries=0,
        http_client=openai.DefaultHttpxClient(proxy=proxy, verify=client_context(gw.ca)),
    )


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_proxied_anthropic_is_recorded_like_base_url_traffic(pgw, up, puser, stream):
    name, token = puser
    cap = capture("anthropic/single_builtin_tool.txtar")
    up.script(Reply.from_capture(cap, stream))
    anthropic_call(proxied_anthropic(pgw, token), cap.request, stream)
    (ic,) = pgw.interceptions(name)
    assert (ic["provider_name"], ic["status"], ic["credential_kind"]) == ("anthropic", "completed", "centralized")
    usage = pgw.sql(f"SELECT input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens "
                    f"FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert list(usage[0].values()) == ([4, 58, 12873, 31] if stream else [6, 77, 21907, 0])
    assert up.seen[0].path == "/v1/messages"
    assert up.seen[0].headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY
    assert token not in json.dumps(up.seen[0].headers)


def test_proxied_openai_both_apis_with_proxy_credentials(pgw, up, puser):
    name, token = puser
    chat = capture("openai/chatcompletions/simple.txtar")
    resp = capture("openai/responses/streaming/cached_input_tokens.txtar")
    up.script(Reply.from_capture(chat, True), Reply.from_capture(resp, True))
    # Identity from the proxy URL; the API key is the same gateway token (centralized).
    client = proxied_openai(pgw, token, proxy_auth=(name, token))
    chat_call(client, chat.request, True)
    responses_call(client, resp.request, True)
    rows = pgw.interceptions(name, 2)
    assert [(r["api"], r["credential_kind"]) for r in rows] == [("openai.chat", "centralized"),
                                                                ("openai.responses", "centralized")]
    assert [s.headers["authorization"] for s in up.seen] == [f"Bearer {UPSTREAM_OPENAI_KEY}"] * 2


def test_proxied_non_canonical_path_is_routed_canonically_and_recorded(pgw, up, puser):
    name, token = puser
    up.script(Reply.json({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4.1",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}))
    with httpx.Client(proxy=pgw.url.replace("://", f"://{name}:{token}@"), verify=client_context(pgw.ca),
                      trust_env=False) as c:
        r = c.post("https://api.openai.com/v1/chat%2fcompletions",
                   json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        r = c.post("https://api.openai.com/v1/organization/costs", json={})
        assert r.status_code == 404  # not an endpoint the gateway relays: never with the central key
    assert [s.path for s in up.seen] == ["/v1/chat/completions"]
    (ic,) = pgw.interceptions(name)
    assert ic["api"] == "openai.chat" and ic["status"] == "completed"


def test_byok_with_proxy_credentials_keeps_the_users_key(pgw, up, puser):
    name, token = puser
    cap = capture("anthropic/simple.txtar")
    up.script(Reply.from_capture(cap, True))
    anthropic_call(proxied_anthropic(pgw, USER_OWN_KEY, proxy_auth=(name, token)), cap.request, True)
    (ic,) = pgw.interceptions(name)
    assert ic["credential_kind"] == "byok" and ic["credential_hint"] == "sk-a…9XYZ"
    seen = up.seen[0].headers
    # The user's credential goes upstream exactly as the client sent it (this SDK sends it as a bearer).
    assert USER_OWN_KEY in (seen.get("x-api-key"), seen.get("authorization", "").removeprefix("Bearer "))
    assert UPSTREAM_ANTHROPIC_KEY not in json.dumps(seen)
    assert "proxy-authorization" not in up.seen[0].headers


def test_byok_in_base_url_mode_with_gateway_token_header(pgw, up, puser):
    name, token = puser
    cap = capture("anthropic/simple.txtar")
    up.script(Reply.from_capture(cap, False))
    client = anthropic.Anthropic(base_url=pgw.url + "/anthropic", max_retries=0, auth_token=USER_OWN_KEY,
                                 api_key=None, default_headers={"X-Coder-AI-Governance-Token": token})
    anthropic_call(client, cap.request, False)
    (ic,) = pgw.interceptions(name)
    assert ic["credential_kind"] == "byok"
    seen = up.seen[0].headers
    assert seen["authorization"] == f"Bearer {USER_OWN_KEY}" and "x-api-key" not in seen
    assert "x-coder-ai-governance-token" not in seen and token not in json.dumps(seen)


def test_no_identity_is_refused_before_the_upstream(pgw, up):
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic_call(proxied_anthropic(pgw, USER_OWN_KEY), capture("anthropic/simple.txtar").request, False)
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.APIConnectionError) as e:  # wrong proxy password: refused at CONNECT
        proxied_anthropic(pgw, "x", proxy_auth=("mallory", "aib_wrong")).models.list()
    assert "407" in str(e.value.__cause__)
    assert up.seen == []


@pytest.mark.parametrize("mode", ["base-url", "proxy"])
def test_responses_over_websocket_is_served_and_recorded(pgw, up, puser, mode):
    """Codex CLI opens Responses over a WebSocket first: served in both modes (this instance serves no WebSocket, so
    the turn goes upstream as an HTTP stream), each response.create recorded (tests/test_responses_websocket.py)."""
    from websockets.sync.client import connect

    from tests.support.wire import responses_stream

    name, token = puser
    host = pgw.url.split("://")[1]
    headers = {"Authorization": f"Bearer {token}"}
    if mode == "base-url":
        kw = dict(uri=f"ws://{host}/openai/v1/responses", proxy=None)
    else:
        kw = dict(uri="wss://api.openai.com/v1/responses", proxy=f"http://{name}:{token}@{host}",
                  ssl=client_context(pgw.ca))
    up.script(Reply.sse(responses_stream("over a socket", (12, 7))))
    with connect(additional_headers=headers, open_timeout=10, **kw) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "gpt-5", "input": "hi over a socket"}))
        events = []
        while not events or events[-1]["type"] not in ("response.completed", "error"):
            events.append(json.loads(ws.recv(timeout=10)))
    assert events[-1]["type"] == "response.completed", events
    (ic,) = pgw.interceptions(name)
    assert (ic["api"], ic["status"], ic["model"]) == ("openai.responses", "completed", "gpt-5")
    assert up.seen[-1].headers["authorization"] == f"Bearer {UPSTREAM_OPENAI_KEY}"


def test_non_ai_host_is_tunnelled_without_interception(pgw, origin, puser):
    origin.reset()
    name, token = puser
    proxy = pgw.url.replace("://", f"://{name}:{token}@")  # non-AI egress needs proxy credentials by default
    # Trusting only the origin's own CA: this succeeds only if the gateway did not present its certificate.
    with httpx.Client(proxy=proxy, verify=client_context(origin.ca), trust_env=False) as c:
        r = c.get(f"https://localhost:{origin.port}/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "mock-model"
    assert origin.seen[0].path == "/v1/models"
    # And the gateway CA does not validate it: nothing was re-signed.
    with httpx.Client(proxy=proxy, verify=client_context(pgw.ca), trust_env=False) as c:
        with pytest.raises(httpx.ConnectError):
            c.get(f"https://localhost:{origin.port}/v1/models")


def test_required_proxy_auth_and_ai_only_egress(tmp_path, tls_upstream, origin):
    gw = proxy_gateway(tmp_path / "strict", tls_upstream, extra={"proxy": {"require_auth": True, "egress": "ai-only"}})
    try:
        token = gw.new_user("strict-user")
        tls_upstream.reset()
        with pytest.raises(anthropic.APIConnectionError) as e:
            proxied_anthropic(gw, token).models.list()
        assert "407" in str(e.value.__cause__)
        assert [m.id for m in proxied_anthropic(gw, token, proxy_auth=("strict-user", token)).models.list().data] == ["mock-model"]
        with httpx.Client(proxy=gw.url, verify=client_context(origin.ca), trust_env=False) as c:
            with pytest.raises(httpx.ProxyError, match="403"):
                c.get(f"https://localhost:{origin.port}/")
    finally:
        gw.stop()
        tls_upstream.reset()


AUDIT_TABLES = ("aibridge_interceptions", "aibridge_token_usages", "aibridge_user_prompts",
                "aibridge_tool_usages", "aibridge_model_thoughts")


def dump_audit(db) -> dict[str, list]:
    import duckdb

    conn = duckdb.connect(str(db), read_only=True)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in AUDIT_TABLES}
    finally:
        conn.close()


def test_capture_is_redacted_and_replay_rebuilds_the_same_rows(tmp_path, tls_upstream):
    import os
    import subprocess

    from tests.support.gateway import BIN, ROOT
    from tests.support.sdk import anthropic_client, openai_client

    flows_dir = tmp_path / "flows"
    gw = proxy_gateway(tmp_path / "cap", tls_upstream, args=["--set", f"aibridge_flows={flows_dir}"])
    tls_upstream.reset()
    try:
        token = gw.new_user("alice")
        a_tool = capture("anthropic/single_builtin_tool.txtar")
        tls_upstream.script(
            Reply.from_capture(a_tool, True),
            Reply.from_capture(capture("anthropic/simple.txtar"), False),
            Reply.from_capture(capture("anthropic/simple.txtar"), False),
            Reply.from_capture(capture("openai/chatcompletions/single_builtin_tool.txtar"), True),
            Reply.from_capture(capture("openai/responses/blocking/summary_and_commentary_builtin_tool.txtar"), False),
            Reply.from_capture(capture("anthropic/non_stream_error.txtar"), False),
        )
        events = anthropic_call(proxied_anthropic(gw, token), a_tool.request, True)  # proxy mode, centralized
        tool_id = next(e.content_block.id for e in events if e.type == "content_block_start"
                       and e.content_block.type == "tool_use")
        follow = {"model": "claude-sonnet-4-0", "max_tokens": 50, "messages": a_tool.request["messages"] + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "Read", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "x"}]}]}
        anthropic_call(anthropic_client(gw, token), follow, False)  # base-URL mode, threaded
        anthropic_call(proxied_anthropic(gw, USER_OWN_KEY, proxy_auth=("alice", token)),  # BYOK
                       {"model": "claude-sonnet-4-0", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
                       False)
        chat_call(openai_client(gw, token), capture("openai/chatcompletions/single_builtin_tool.txtar").request, True)
        responses_call(openai_client(gw, token),
                       capture("openai/responses/blocking/summary_and_commentary_builtin_tool.txtar").request, False)
        with pytest.raises(anthropic.BadRequestError):
            anthropic_call(anthropic_client(gw, token), capture("anthropic/non_stream_error.txtar").request, False)
        gw.interceptions("alice", 6)
    finally:
        gw.stop()
        tls_upstream.reset()

    files = sorted(flows_dir.glob("*.flows"))
    assert files
    raw = b"".join(f.read_bytes() for f in files)
    basic = base64.b64encode(f"alice:{token}".encode())
    for secret in (token.encode(), UPSTREAM_ANTHROPIC_KEY.encode(), UPSTREAM_OPENAI_KEY.encode(),
                   USER_OWN_KEY.encode(), basic):
        assert secret not in raw
    assert b"message_stop" in raw  # streamed bodies are kept for later analysis

    live = dump_audit(gw.db)
    assert len(live["aibridge_interceptions"]) == 6
    assert {r[10] for r in live["aibridge_interceptions"]} == {"centralized", "byok"}
    assert any(r[8] is not None for r in live["aibridge_interceptions"])  # the threaded follow-up

    rebuilt = tmp_path / "rebuilt.duckdb"
    env = {**os.environ, "AIBRIDGE_CONFIG": str(gw.config_path)}
    for _ in range(2):  # idempotent: a second replay changes nothing
        r = subprocess.run([str(BIN / "aibridge"), "replay", *map(str, files), "--db", str(rebuilt)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "6 interception(s)" in r.stdout
        assert dump_audit(rebuilt) == live

    # mitmdump itself can replay saved flows through the addon into the configured database.
    cfg = tmp_path / "replay.yaml"
    cfg.write_text(f"providers: []\nstorage: {{duckdb: {tmp_path / 'mitm.duckdb'}}}\n")
    r = subprocess.run([str(BIN / "mitmdump"), "-n", "-r", str(files[0]), "-s", str(ROOT / "addons" / "aibridge.py"),
                        "--set", f"aibridge_config={cfg}", "--set", f"confdir={tmp_path / 'certs'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    if len(files) == 1:
        assert dump_audit(tmp_path / "mitm.duckdb") == live


def test_http2_client_gets_the_error_event_when_the_provider_dies_mid_stream(pgw, up, puser):
    """Clients that negotiate HTTP/2 with the proxy (reqwest-based CLIs do) get the same clean ending as HTTP/1."""
    name, token = puser
    reply = Reply.from_capture(capture("anthropic/simple.txtar"), True)
    reply.cut_after = 5
    up.script(reply)
    client = anthropic.Anthropic(
        base_url="https://api.anthropic.com", api_key=token, max_retries=0,
        http_client=anthropic.DefaultHttpxClient(proxy=pgw.url, verify=client_context(pgw.ca), http2=True),
    )
    raw = client.messages.with_raw_response.create(
        model="claude-h2", max_tokens=10, messages=[{"role": "user", "content": "hi"}], stream=True)
    assert raw.http_response.http_version == "HTTP/2"
    seen = []
    with pytest.raises(anthropic.APIStatusError) as e:
        for ev in raw.parse():
            seen.append(ev.type)
    assert seen[0] == "message_start" and "message_stop" not in seen
    assert "aibridge" in e.value.message and e.value.body["error"]["type"] == "api_error"
    (ic,) = pgw.interceptions(name)
    assert ic["status"] == "failed"


def _h2_call_reset_after_first_event(gw, token: str, model: str) -> None:
    """A raw HTTP/2 client through the proxy: sends one streamed call, resets its stream (RST_STREAM CANCEL) at the
    first event and keeps the connection open until the call is recorded."""
    import socket

    import h2.connection
    import h2.errors
    import h2.events

    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sock.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    ctx = client_context(gw.ca)
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname="api.anthropic.com")
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    body = json.dumps({"model": model, "max_tokens": 10, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", "api.anthropic.com"),
                          (":path", "/v1/messages"), ("x-api-key", token), ("anthropic-version", "2023-06-01"),
                          ("content-type", "application/json"), ("content-length", str(len(body)))])
    conn.send_data(1, body, end_stream=True)
    tls.sendall(conn.data_to_send())
    try:
        got = b""
        while b"message_start" not in got:
            data = tls.recv(65536)
            assert data, "connection closed before the first event"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    got += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            tls.sendall(conn.data_to_send())
        conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        tls.sendall(conn.data_to_send())
        assert b"message_stop" not in got
        gw.wait_for(f"SELECT id FROM aibridge_interceptions WHERE model = '{model}' AND status <> 'in_progress'")
    finally:
        tls.close()


@pytest.mark.parametrize("how", ["stream_reset", "connection_closed"])
def test_http2_client_leaving_mid_stream_is_recorded_with_the_providers_final_usage(pgw, up, puser, how):
    """An HTTP/2 client that cancels its stream (RST_STREAM, the connection kept open) or closes its connection
    after the first event: the provider's answer is read to its end and recorded complete with its final usage."""
    name, token = puser
    model = f"claude-h2-{how}"
    up.script(Reply.from_capture(capture("anthropic/simple.txtar"), True, delay=0.1))
    if how == "stream_reset":
        _h2_call_reset_after_first_event(pgw, token, model)
    else:
        with anthropic.DefaultHttpxClient(proxy=pgw.url, verify=client_context(pgw.ca), http2=True, timeout=10) as c:
            with c.stream("POST", "https://api.anthropic.com/v1/messages",
                          headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
                          json={"model": model, "max_tokens": 10, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.http_version == "HTTP/2"
                assert b"message_start" in next(r.iter_raw())
    (ic,) = pgw.interceptions(name)
    assert ic["status"] == "completed" and ic["error"] is None
    assert json.loads(ic["metadata"])["client_disconnected"] is True
    usage = pgw.sql(f"SELECT input_tokens, output_tokens, usage_estimated FROM aibridge_token_usages "
                    f"WHERE interception_id = '{ic['id']}'")
    assert usage == [{"input_tokens": 21, "output_tokens": 187, "usage_estimated": False}]


def test_tunnel_to_a_bare_ip_with_an_ai_server_name_is_intercepted_and_recorded(tmp_path, tls_upstream):
    """A client that CONNECTs to an IP address but asks TLS for api.openai.com is talking to the AI API: the
    gateway decrypts it for that name, so it routes and records it by that name too, never relays it blind."""
    import socket
    import ssl

    gw = proxy_gateway(tmp_path / "sni", tls_upstream, extra={"proxy": {"allow_addresses": ["127.0.0.0/8"]}})
    try:
        token = gw.new_user("sni")
        tls_upstream.reset()
        tls_upstream.script(Reply.json({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                                        "model": "gpt-4.1", "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "hi"}}],
                                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}))
        creds = base64.b64encode(f"sni:{token}".encode()).decode()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
            raw.sendall(f"CONNECT 127.0.0.3:443 HTTP/1.1\r\nHost: 127.0.0.3:443\r\n"
                        f"Proxy-Authorization: Basic {creds}\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            ctx = ssl.create_default_context(cafile=str(gw.ca))
            with ctx.wrap_socket(raw, server_hostname="api.openai.com") as tls:
                body = json.dumps({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}).encode()
                tls.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
                            b"Content-Type: application/json\r\nConnection: close\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                got = b""
                while chunk := tls.recv(65536):
                    got += chunk
        assert got.startswith(b"HTTP/1.1 200")
        assert tls_upstream.seen[-1].headers["authorization"] == f"Bearer {UPSTREAM_OPENAI_KEY}"
        (ic,) = gw.interceptions("sni")
        assert ic["api"] == "openai.chat" and ic["status"] == "completed"
    finally:
        gw.stop()
        tls_upstream.reset()


def test_any_websocket_upgrade_to_an_ai_api_is_refused(pgw, up, puser):
    """The Realtime API speaks only WebSocket: relayed, its model calls would have no audit row."""
    name, token = puser
    with httpx.Client(proxy=pgw.url.replace("://", f"://{name}:{token}@"), verify=client_context(pgw.ca),
                      trust_env=False) as c:
        r = c.get("https://api.openai.com/v1/realtime?model=gpt-realtime",
                  headers={"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
                           "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "authorization": "Bearer sk-users-own"})
    assert r.status_code == 426 and up.seen == []


def test_gemini_and_copilot_hosts_are_intercepted_and_recorded(tmp_path, tls_upstream):
    """Their public API hosts are intercepted by default, like api.anthropic.com and api.openai.com."""
    tls_upstream.reset()
    gw = Gateway(tmp_path / "gc", tls_upstream.url, providers=[
        {"name": "gemini", "type": "gemini", "base_url": tls_upstream.url + "/", "key": "AIza-upstream-gemini-key"},
        {"name": "copilot", "type": "copilot", "base_url": tls_upstream.url},
    ], args=["--set", f"ssl_verify_upstream_trusted_ca={tls_upstream.ca}"]).start()
    try:
        token = gw.new_user("gc")
        host = gw.url.split("://")[1]
        client = httpx.Client(proxy=f"http://gc:{token}@{host}", verify=client_context(gw.ca), trust_env=False)
        gem = capture("gemini/simple.txtar")
        tls_upstream.script(Reply.from_capture(gem, False))
        r = client.post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
                        headers={"x-goog-api-key": token}, json=gem.request)
        assert r.status_code == 200 and r.json()["responseId"] == "aibrGemSimple02"
        assert tls_upstream.seen[-1].headers["x-goog-api-key"] == "AIza-upstream-gemini-key"
        chat = capture("openai/chatcompletions/simple.txtar")
        tls_upstream.script(Reply.from_capture(chat, False))
        r = client.post("https://api.individual.githubcopilot.com/chat/completions",
                        headers={"authorization": "Bearer ghu_users0wnGitHubT0ken0123456789",
                                 "copilot-integration-id": "vscode-chat"}, json=chat.request)
        assert r.status_code == 200
        assert tls_upstream.seen[-1].headers["authorization"] == "Bearer ghu_users0wnGitHubT0ken0123456789"
        rows = gw.interceptions("gc", 2)
        assert sorted((i["provider"], i["api"], i["credential_kind"], i["status"]) for i in rows) == [
            ("copilot", "openai.chat", "byok", "completed"),
            ("gemini", "gemini.generate_content", "centralized", "completed")]
    finally:
        gw.stop()
        tls_upstream.reset()
