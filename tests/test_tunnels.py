"""Tunnels in proxy mode (#22): an AI host is an AI endpoint only on its provider ports; inside a tunnel to one,
only HTTP is spoken (raw bytes close the connection, nothing reaches the upstream); every request in an open
tunnel is authorised on its own (revocation takes effect at once); a credential in the gateway's token format
that does not validate is refused, never sent upstream as the user's own key."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import socketserver
import ssl
import threading
import time

import anthropic
import httpx
import pytest
from aibridge_gw.config import parse_config
from aibridge_gw.flow.routing import Router
from aibridge_gw.policy.auth import TOKEN_PREFIX, Actor, AuthRefused, TokenDirectory, hash_token, identify

from tests.support.fixtures import capture
from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call
from tests.support.tls import client_context, tls_stand_in

RAW_HOST = "127.0.0.2"  # the openai instance's base_url host: an AI host, served on RAW_HOST:<recorder port>


class Recorder:
    """A TCP service that records every connection and byte it gets (and greets, like SSH or SMTP would)."""

    def __init__(self, host: str, banner: bytes = b"") -> None:
        self.connections = 0
        self.data = b""
        rec = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                rec.connections += 1
                if banner:
                    self.request.sendall(banner)
                self.request.settimeout(5)
                try:
                    while chunk := self.request.recv(65536):
                        rec.data += chunk
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder(RAW_HOST)
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def service():
    """Some other local service on an AI host's address (a database, sshd…)."""
    svc = Recorder(RAW_HOST, banner=b"SSH-2.0-OpenSSH_9.6 local service\r\n")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def tgw(tmp_path_factory, tls_upstream, recorder):
    providers = [
        {"name": "anthropic", "type": "anthropic", "base_url": tls_upstream.url + "/",
         "key": UPSTREAM_ANTHROPIC_KEY, "hosts": ["api.anthropic.com"]},
        {"name": "openai", "type": "openai", "base_url": f"http://{RAW_HOST}:{recorder.port}/v1/",
         "key": UPSTREAM_OPENAI_KEY, "hosts": ["api.openai.com"]},
    ]
    gw = Gateway(tmp_path_factory.mktemp("tunnels-gw"), tls_upstream.url, providers=providers,
                 extra={"proxy": {"allow_addresses": ["localhost"]}},
                 args=["--set", f"ssl_verify_upstream_trusted_ca={tls_upstream.ca}"]).start()
    yield gw
    gw.stop()


_n = iter(range(10_000))


@pytest.fixture
def tuser(tgw):
    name = f"tuser{next(_n)}"
    return name, tgw.new_user(name)


def basic(name: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()


def connect(gw: Gateway, target: str, proxy_auth: str | None = None) -> tuple[socket.socket, bytes]:
    """A raw CONNECT: the socket and the proxy's answer (status line and headers)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    auth = f"Proxy-Authorization: {proxy_auth}\r\n" if proxy_auth else ""
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length:")), 0)
    while len(head.partition(b"\r\n\r\n")[2]) < length and (chunk := s.recv(4096)):
        head += chunk
    return s, head


def closed_without_answer(s: socket.socket) -> bool:
    """The gateway closed the connection and sent nothing back."""
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    except TimeoutError:
        return False  # still open: something is relaying
    return got == b""


def request(s, method: str, path: str, host: str, headers: dict | None = None) -> http.client.HTTPResponse:
    """One HTTP/1.1 request on an open (tunnelled) socket, keeping the connection."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Length: 0",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    r = http.client.HTTPResponse(s)
    r.begin()
    r.body = r.read()
    return r


# --- an AI host is an AI endpoint only on its provider ports -------------------------------------------------


def test_an_ai_endpoint_is_an_ai_host_on_a_provider_port():
    router = Router(parse_config({"providers": [
        {"name": "anthropic", "type": "anthropic", "base_url": "https://api.anthropic.com/", "key": "k",
         "hosts": ["claude.corp.example"]},
        {"name": "vllm", "type": "openai", "base_url": "http://vllm.internal:8000/v1/", "key": "k"}]}))
    for host in ("api.anthropic.com", "API.Anthropic.com.", "claude.corp.example"):
        assert router.is_ai_endpoint(host, 443) and router.is_ai_endpoint(host, 80)
        assert not router.is_ai_endpoint(host, 22) and not router.is_ai_endpoint(host, 8443)
    assert router.is_ai_endpoint("vllm.internal", 8000) and not router.is_ai_endpoint("vllm.internal", 5432)
    assert not router.is_ai_endpoint("api.anthropic.com", 8000)  # another host's base_url port
    assert not router.is_ai_endpoint("example.com", 443) and not router.is_ai_endpoint(None, 443)


def test_identify_refuses_a_gateway_format_credential_that_does_not_validate():
    alice = Actor("u1", "alice", "member", "t1", "aib_…")
    good = TOKEN_PREFIX + "g" * 43
    directory = TokenDirectory()
    directory.replace({hash_token(good): alice})
    bad = TOKEN_PREFIX + "b" * 43
    for headers, proxy_actor in [({"x-api-key": bad}, alice), ({"authorization": f"Bearer {bad}"}, alice),
                                 ({"x-aibridge-token": good, "x-api-key": bad}, None),
                                 ({"authorization": "Bearer sk-own", "x-api-key": bad}, alice),
                                 ({"x-aibridge-token": bad, "x-api-key": "sk-ant-own"}, alice)]:
        with pytest.raises(AuthRefused):
            identify(headers, proxy_actor, directory, byok=True)
    # A valid gateway token beside the user's own key: central, so the token is never relayed upstream.
    both = {"authorization": "Bearer sk-own", "x-api-key": good}
    assert identify(both, alice, directory, True).byok_credential is None
    assert identify({"authorization": "Bearer sk-own"}, alice, directory, True).byok_credential == "sk-own"
    assert directory.lookup_hash(hash_token(good)) == alice and directory.lookup_hash(hash_token(bad)) is None



def test_connect_to_an_ai_host_on_another_port_needs_proxy_credentials(tgw, service):
    for target in (f"{RAW_HOST}:{service.port}", "api.anthropic.com:22"):
        s, head = connect(tgw, target)
        with s:
            assert head.startswith(b"HTTP/1.1 407"), (target, head)
    assert service.connections == 0


def test_connect_to_an_ai_host_on_another_port_follows_the_egress_policy(tgw, service, tuser):
    name, token = tuser
    s, head = connect(tgw, f"{RAW_HOST}:{service.port}", basic(name, token))
    with s:
        assert head.startswith(b"HTTP/1.1 403") and b"loopback" in head  # like any other loopback target
    assert service.connections == 0


def test_connect_to_an_ai_host_on_its_provider_ports_needs_no_proxy_credentials(tgw, recorder, tls_upstream):
    for target in ("api.anthropic.com:443", f"{RAW_HOST}:{recorder.port}", f"127.0.0.1:{tls_upstream.port}"):
        s, head = connect(tgw, target)
        with s:
            assert head.startswith(b"HTTP/1.1 200"), (target, head)


# --- only HTTP inside a tunnel to an AI endpoint -------------------------------------------------------------

RAW_PAYLOADS = {
    "crlf-first": b"\r\nPOST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 2\r\n\r\n{}",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
}


@pytest.mark.parametrize("payload", RAW_PAYLOADS, ids=list(RAW_PAYLOADS))
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls-decrypted"])
def test_raw_bytes_in_a_tunnel_to_an_ai_endpoint_are_closed_and_never_relayed(tgw, recorder, payload, tls):
    recorder.connections, recorder.data = 0, b""
    s, head = connect(tgw, f"{RAW_HOST}:{recorder.port}")
    assert head.startswith(b"HTTP/1.1 200")
    if tls:
        s = client_context(tgw.ca).wrap_socket(s, server_hostname="api.openai.com")
    with s:
        s.sendall(RAW_PAYLOADS[payload])
        assert closed_without_answer(s)
    time.sleep(0.3)
    assert (recorder.connections, recorder.data) == (0, b"")
    assert "not HTTP" in tgw.log()


def test_tls_nested_in_a_decrypted_tunnel_to_an_ai_endpoint_is_closed(tgw, recorder):
    recorder.connections, recorder.data = 0, b""
    inner = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                  server_hostname="api.openai.com")
    with pytest.raises(ssl.SSLWantReadError):
        inner.do_handshake()
    s, head = connect(tgw, f"{RAW_HOST}:{recorder.port}")
    assert head.startswith(b"HTTP/1.1 200")
    with client_context(tgw.ca).wrap_socket(s, server_hostname="api.openai.com") as t:
        t.sendall(out.read())  # a second ClientHello, inside the decrypted TLS
        assert closed_without_answer(t)
    time.sleep(0.3)
    assert (recorder.connections, recorder.data) == (0, b"")


def test_tls_to_an_ai_endpoint_under_another_server_name_is_decrypted_never_passed_through(tgw, recorder):
    """The tunnel's target decides: a foreign server name cannot make the gateway relay TLS to an AI endpoint
    untouched (unauthenticated, unrecorded)."""
    recorder.connections, recorder.data = 0, b""
    s, head = connect(tgw, f"{RAW_HOST}:{recorder.port}")
    assert head.startswith(b"HTTP/1.1 200")
    with client_context(tgw.ca).wrap_socket(s, server_hostname="example.com") as t:  # the gateway's certificate
        r = request(t, "GET", "/v1/models", "example.com")
    assert r.status == 401 and json.loads(r.body)["error"]["code"] == "invalid_api_key"
    assert (recorder.connections, recorder.data) == (0, b"")


def test_http_in_a_tunnel_to_an_ai_endpoint_still_works(tgw, up, tuser):
    name, token = tuser
    s, head = connect(tgw, "api.anthropic.com:443")
    assert head.startswith(b"HTTP/1.1 200")
    with client_context(tgw.ca).wrap_socket(s, server_hostname="api.anthropic.com") as t:
        r = request(t, "GET", "/v1/models", "api.anthropic.com", {"x-api-key": token})
    assert r.status == 200 and json.loads(r.body)["data"][0]["id"] == "mock-model"
    assert up.seen[0].headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY


def test_non_ai_tls_through_a_tunnel_still_passes_untouched(tgw, tuser, tmp_path):
    """The egress path is unchanged: TLS to another host is relayed as it is, never decrypted."""
    origin = tls_stand_in(tmp_path / "origin", ["localhost"])
    try:
        name, token = tuser
        with httpx.Client(proxy=tgw.url.replace("://", f"://{name}:{token}@"), verify=client_context(origin.ca),
                          trust_env=False) as c:
            r = c.get(f"https://localhost:{origin.port}/v1/models")
        assert r.status_code == 200 and origin.seen[0].path == "/v1/models"
    finally:
        origin.stop()


# --- every request in a tunnel is authorised on its own --------------------------------------------------------


def test_revoking_a_token_stops_an_open_tunnel_within_a_second(tgw, up, tuser):
    name, token = tuser
    s, head = connect(tgw, "api.anthropic.com:443", basic(name, token))
    assert head.startswith(b"HTTP/1.1 200")
    with client_context(tgw.ca).wrap_socket(s, server_hostname="api.anthropic.com") as t:
        assert request(t, "GET", "/v1/models", "api.anthropic.com").status == 200  # identity: the tunnel's
        tid = tgw.op("tokens.list", user=name)["rows"][0][0]
        r = tgw.cli("tokens", "revoke", tid)
        assert r.returncode == 0, r.stderr
        revoked_at = time.monotonic()
        while True:
            sent = time.monotonic() - revoked_at  # judged by when the request was sent (the test may be slow)
            if (r := request(t, "GET", "/v1/models", "api.anthropic.com")).status != 200:
                break
            assert sent < 1.0, "the revoked token still works in the open tunnel"
            time.sleep(0.05)
        assert r.status == 407 and r.getheader("connection") == "close"
        assert "no longer valid" in json.loads(r.body)["error"]["message"]
    assert len(up.seen) == len([x for x in up.seen if x.headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY])
    assert token not in tgw.log()


# --- a credential in the gateway's format that does not validate is refused, never BYOK ----------------------


def test_an_unknown_or_revoked_gateway_token_as_api_key_with_valid_proxy_credentials_is_refused(tgw, up, tuser):
    name, token = tuser
    revoked = tgw.op("tokens.create", user=name, name="old")["token"]
    tgw.op("tokens.revoke", id=next(row[0] for row in tgw.op("tokens.list", user=name)["rows"] if row[2] == "old"))
    body = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for key in ("aib_" + "x" * 43, revoked):
        client = anthropic.Anthropic(
            base_url="https://api.anthropic.com", api_key=key, max_retries=0,
            http_client=anthropic.DefaultHttpxClient(proxy=tgw.url.replace("://", f"://{name}:{token}@"),
                                                     verify=client_context(tgw.ca)))
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic_call(client, body, False)
        assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    assert up.seen == []


def test_a_revoked_gateway_token_beside_a_valid_x_aibridge_token_is_refused(tgw, up, tuser):
    name, token = tuser
    old = tgw.op("tokens.create", user=name, name="old")["token"]
    tgw.op("tokens.revoke", id=next(row[0] for row in tgw.op("tokens.list", user=name)["rows"] if row[2] == "old"))
    r = httpx.post(tgw.url + "/anthropic/v1/messages", trust_env=False,
                   headers={"x-aibridge-token": token, "x-api-key": old},
                   json={"model": "claude-sonnet-4-0", "max_tokens": 5,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert up.seen == []


def test_a_valid_gateway_token_never_goes_upstream_beside_the_users_own_key(tgw, up, tuser):
    """A gateway token in any credential header makes the call central: it is not the user's key to pass on."""
    name, token = tuser
    cap = capture("anthropic/simple.txtar")
    up.script(Reply.from_capture(cap, False))
    with httpx.Client(proxy=tgw.url.replace("://", f"://{name}:{token}@"), verify=client_context(tgw.ca),
                      trust_env=False) as c:
        r = c.post("https://api.anthropic.com/v1/messages", json=cap.request,
                   headers={"authorization": "Bearer sk-ant-users-own-key-0123456789XYZ", "x-api-key": token,
                            "anthropic-version": "2023-06-01"})
    assert r.status_code == 200
    seen = json.dumps(up.seen[0].headers)
    assert token not in seen and "users-own-key" not in seen
    assert up.seen[0].headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY


@pytest.mark.parametrize("mode", ["proxy", "base-url"])
def test_a_switch_to_another_protocol_from_an_ai_api_is_never_relayed(tgw, up, tuser, mode):
    """After a 101 (other than a WebSocket), mitmproxy would relay raw bytes both ways: the gateway sends no
    Upgrade upstream, and answers an upstream that switches anyway with 502 and a closed connection."""
    name, token = tuser
    up.script(Reply(101, {"upgrade": "raw-relay", "connection": "upgrade"}))
    if mode == "proxy":
        s, head = connect(tgw, "api.anthropic.com:443")
        assert head.startswith(b"HTTP/1.1 200")
        t, path = client_context(tgw.ca).wrap_socket(s, server_hostname="api.anthropic.com"), "/v1/models"
    else:
        t, path = socket.create_connection(("127.0.0.1", tgw.port), timeout=5), "/anthropic/v1/models"
    with t:
        r = request(t, "GET", path, "api.anthropic.com",
                    {"x-api-key": token, "upgrade": "raw-relay", "connection": "upgrade"})
        assert r.status == 502 and "switched protocols" in json.loads(r.body)["error"]["message"]
        try:  # what would have been relayed raw: an unauthenticated request
            t.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
        except OSError:
            pass
        assert closed_without_answer(t)
    assert len(up.seen) == 1 and "upgrade" not in up.seen[0].headers
    assert up.seen[0].headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY


def test_revoking_a_token_stops_open_tunnels_in_every_worker(tmp_path):
    """`--workers 2`: the worker that ran the revocation drops the token at once, the other at its next
    directory reload (every half second); every open tunnel refuses its next request within a second."""
    upstream = tls_stand_in(tmp_path / "upstream", ["127.0.0.1"])
    gw = Gateway(tmp_path / "gw", upstream.url, workers=2, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/", "key": UPSTREAM_ANTHROPIC_KEY,
         "hosts": ["api.anthropic.com"]}], args=["--set", f"ssl_verify_upstream_trusted_ca={upstream.ca}"])
    tunnels = []
    try:
        gw.start()
        token = gw.new_user("everywhere")
        time.sleep(1.5)  # every worker knows the new token
        for _ in range(12):  # the kernel spreads new connections over both workers
            s, head = connect(gw, "api.anthropic.com:443", basic("everywhere", token))
            assert head.startswith(b"HTTP/1.1 200")
            t = client_context(gw.ca).wrap_socket(s, server_hostname="api.anthropic.com")
            tunnels.append(t)
            assert request(t, "GET", "/v1/models", "api.anthropic.com").status == 200
        gw.op("tokens.revoke", id=gw.op("tokens.list", user="everywhere")["rows"][0][0])
        revoked_at = time.monotonic()
        pending = list(tunnels)
        while pending:
            # Judged by when each request was sent, not by how long the test's own requests take under load: a
            # request sent a second or more after the revocation must be refused.
            still = []
            for t in pending:
                sent = time.monotonic() - revoked_at
                if request(t, "GET", "/v1/models", "api.anthropic.com").status == 200:
                    assert sent < 1.0, f"an open tunnel still took the revoked token {sent:.2f} s after"
                    still.append(t)
            pending = still
            time.sleep(0.05)
    finally:
        for t in tunnels:
            t.close()
        gw.stop()
        upstream.stop()
