"""No way around the gateway, and hostile input refused cleanly: canonical paths, the Host header, the egress
policy, provider hosts intercepted by default, compressed and deeply nested bodies, throttled token checks,
metric labels, log lines, files at rest, the admin surface."""

from __future__ import annotations

import base64
import gzip
import json
import stat
import subprocess
import zlib

import brotli
import httpx
import openai
import pytest
import zstandard

from tests.support.gateway import BIN, UPSTREAM_OPENAI_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import openai_client
from tests.support.tls import client_context
from tests.support.wire import api_request, chat_completion, raw_request, status_of

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}


def count(gateway, name: str, api: str | None = None) -> int:
    extra = f" AND i.api = '{api}'" if api else ""
    return gateway.sql(
        "SELECT count(*) AS n FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
        f"WHERE u.name = '{name}'{extra}")[0]["n"]


# --- canonical paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/openai/v1/chat%2fcompletions",
    "/openai/v1/chat%2Fcompletions",
    "/openai/v1/../v1/chat/completions",
    "/openai/%63hat/completions",
    "/openai/v1//chat/completions",
    "/openai/./v1/chat/completions/",
    "/anthropic/../openai/v1/chat/completions",
])
def test_non_canonical_paths_are_routed_by_their_canonical_form_and_recorded(gateway, mock, user, path):
    name, token = user
    mock.script(Reply.json(chat_completion()))
    got = api_request(gateway.port, path, token, CHAT)
    assert status_of(got) == 200
    assert [s.path for s in mock.seen] == ["/v1/chat/completions"]  # the provider sees what was routed
    gateway.interceptions(name)
    assert count(gateway, name, "openai.chat") == 1


@pytest.mark.parametrize("path,status", [
    ("/openai/v1/chat%252fcompletions", 400),  # encoded twice
    ("/openai/v1/chat%00/completions", 400),
    ("/openai/v1/chat\\completions", 400),
    ("/openai/v1/chat/completions/extra", 404),
    ("/openai/v1/../../../etc/passwd", 404),
])
def test_paths_that_match_no_endpoint_never_reach_the_provider(gateway, mock, user, path, status):
    name, token = user
    for host in (None, b"gw.example.com:80"):  # also behind a port mapping
        got = api_request(gateway.port, path, token, CHAT, host=host)
        assert status_of(got) == status
        assert b'"error"' in got.partition(b"\r\n\r\n")[2]  # the provider's JSON error shape
    assert mock.seen == []


def test_host_header_never_redirects_a_base_url_request(gateway, mock, user, upstream):
    """Behind a port mapping the Host header names another port; a client may name any host at all."""
    name, token = user
    for host in (b"gateway.example.com", b"127.0.0.1:1", b"gw:80", upstream.url.split("://")[1].encode()):
        mock.script(Reply.json(chat_completion()))
        got = api_request(gateway.port, "/openai/v1/chat/completions", token, CHAT, host=host)
        assert status_of(got) == 200, host
        assert mock.seen[-1].headers["authorization"] == f"Bearer {UPSTREAM_OPENAI_KEY}"
    gateway.interceptions(name, 4)
    # An unknown path on the listener is the gateway's own 404, whatever the Host header says.
    got = raw_request(gateway.port, "GET", "/", [], host=b"gw.internal:1")
    assert status_of(got) in (404, 407)


def test_origin_form_requests_are_the_gateways_own_even_with_proxy_credentials(gateway, mock, user):
    """Only an absolute-form request line makes a proxy request; the Host header of an origin-form one is never
    a destination (mitmproxy fills it in as the host, hence the request-form mark this checks end to end)."""
    name, token = user
    creds = base64.b64encode(f"{name}:{token}".encode())
    got = raw_request(gateway.port, "GET", "/not-a-provider/x", [(b"proxy-authorization", b"Basic " + creds)],
                      host=b"example.com:80")
    assert status_of(got) == 404 and b"no provider is served" in got
    assert mock.seen == []


# --- egress policy ----------------------------------------------------------------------------------------


def _proxy_get(gw, url: str, auth: tuple[str, str] | None = None) -> httpx.Response:
    proxy = gw.url if auth is None else gw.url.replace("://", f"://{auth[0]}:{auth[1]}@")
    with httpx.Client(proxy=proxy, trust_env=False, timeout=10) as c:
        return c.get(url)


def test_default_proxy_needs_credentials_and_never_relays_to_the_gateways_own_machine(gateway, upstream, user):
    name, token = user
    upstream.reset()
    # A service on the gateway's own machine (the upstream's 127.0.0.1 is a provider host in this config, so
    # reach it by name).
    target = f"http://localhost:{upstream.port}/v1/models"
    assert _proxy_get(gateway, target).status_code == 407
    r = _proxy_get(gateway, target, (name, token))
    assert r.status_code == 403 and "loopback" in r.text
    assert _proxy_get(gateway, "http://169.254.169.254/latest/meta-data/", (name, token)).status_code == 403
    # CONNECT tunnels too
    with pytest.raises(httpx.ProxyError, match="407"):
        _proxy_get(gateway, f"https://localhost:{upstream.port}/")
    with pytest.raises(httpx.ProxyError, match="403"):
        _proxy_get(gateway, f"https://localhost:{upstream.port}/", (name, token))
    with pytest.raises(httpx.ProxyError, match="403"):
        _proxy_get(gateway, "https://169.254.169.254/", (name, token))
    assert upstream.seen == []


def test_egress_policy_refuses_own_loopback_link_local_and_unspecified_addresses():
    import asyncio
    import ipaddress

    from aibridge_gw.policy.egress import EgressPolicy

    policy = EgressPolicy(allow=["10.1.0.0/16", "metadata.internal"], own_addresses={"192.0.2.10"})
    refused = {a: policy.refused(ipaddress.ip_address(a)) for a in
               ("127.0.0.1", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "192.0.2.10", "::ffff:127.0.0.1",
                "10.1.2.3", "93.184.216.34")}
    assert all(refused[a] for a in ("127.0.0.1", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "192.0.2.10",
                                    "::ffff:127.0.0.1"))
    assert refused["10.1.2.3"] is None and refused["93.184.216.34"] is None
    assert asyncio.run(policy.check("localhost", 80))[0] is not None  # by what the name resolves to
    assert asyncio.run(policy.check("metadata.internal", 80)) == (None, None)  # allowlisted by name


def test_allowlisted_addresses_are_relayed_without_the_proxy_credentials(own_gateway, upstream):
    gw = own_gateway("allow", extra={"proxy": {"allow_addresses": ["127.0.0.0/8"]}})
    token = gw.new_user("allowed")
    r = _proxy_get(gw, f"http://localhost:{upstream.port}/v1/models", ("allowed", token))
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "mock-model"
    assert "proxy-authorization" not in upstream.seen[-1].headers  # the gateway token never travels on
    assert token not in json.dumps(upstream.seen[-1].headers)


def test_open_relay_is_an_explicit_choice_that_is_logged(own_gateway, upstream):
    gw = own_gateway("open", extra={"proxy": {"require_auth": False, "egress": "all", "allow_addresses": ["localhost"]}})
    assert "OPEN RELAY" in gw.log()
    assert _proxy_get(gw, f"http://localhost:{upstream.port}/v1/models").status_code == 200
    assert _proxy_get(gw, "http://169.254.169.254/").status_code == 403  # still never the metadata service


def test_provider_public_hosts_are_intercepted_by_default(own_gateway, upstream):
    """An instance whose base_url points at a broker or test server still owns api.openai.com in proxy mode."""
    gw = own_gateway("public", args=["--set", "ssl_insecure=true"])
    token = gw.new_user("pub")
    assert "api.openai.com is intercepted and routed to provider 'openai'" in gw.log()
    upstream.script(Reply.json(chat_completion()))
    client = openai.OpenAI(api_key=token, max_retries=0, http_client=httpx.Client(
        proxy=gw.url, verify=client_context(gw.ca), trust_env=False))
    client.chat.completions.create(**CHAT)
    assert upstream.seen[-1].path == "/v1/chat/completions"
    assert upstream.seen[-1].headers["authorization"] == f"Bearer {UPSTREAM_OPENAI_KEY}"
    gw.interceptions("pub")


def test_hosts_empty_list_opts_out_of_interception():
    from aibridge_gw.config import parse_config

    cfg = parse_config({"providers": [
        {"name": "broker", "type": "openai", "base_url": "http://litellm.internal:4000/v1/", "key": "k", "hosts": []},
        {"name": "openai", "type": "openai", "base_url": "http://proxy.corp:8080/v1/", "key": "k",
         "hosts": ["api.example-ai.com"]},
        {"name": "anthropic", "type": "anthropic", "base_url": "http://127.0.0.1:9/", "key": "k"},
    ]})
    hosts = {p.name: p.hosts for p in cfg.providers}
    assert hosts == {"broker": (), "openai": ("proxy.corp", "api.example-ai.com", "api.openai.com"),
                     "anthropic": ("127.0.0.1", "api.anthropic.com")}


# --- hostile bodies --------------------------------------------------------------------------------------


def _bomb(encoding: str, size: int) -> bytes:
    zeros = b"\0" * size
    if encoding == "gzip":
        return gzip.compress(zeros, 9)
    if encoding == "br":
        return brotli.compress(zeros, quality=5)
    if encoding == "deflate":
        return zlib.compress(zeros, 9)
    return zstandard.ZstdCompressor(level=3).compress(zeros)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
def test_compression_bomb_is_refused_413_after_a_capped_decode(gateway, mock, user, encoding):
    name, token = user
    bomb = _bomb(encoding, 200 * 1024 * 1024)  # 200 MB decoded against the 32 MB limit
    assert len(bomb) < 2 * 1024 * 1024
    got = api_request(gateway.port, "/openai/v1/chat/completions", token, bomb,
                      [(b"content-encoding", encoding.encode())], timeout=60)
    assert status_of(got) == 413
    assert json.loads(got.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"
    assert mock.seen == []
    mock.script(Reply.json(chat_completion()))  # and the gateway keeps serving
    openai_client(gateway, token).chat.completions.create(**CHAT)


def test_compressed_body_is_recorded_and_forwarded_as_parsed(gateway, mock, user):
    name, token = user
    mock.script(Reply.json(chat_completion()))
    body = gzip.compress(json.dumps({**CHAT, "messages": [{"role": "user", "content": "zipped hello"}]}).encode())
    got = api_request(gateway.port, "/openai/v1/chat/completions", token, body, [(b"content-encoding", b"gzip")])
    assert status_of(got) == 200
    assert mock.seen[0].json()["messages"][0]["content"] == "zipped hello"
    assert "content-encoding" not in mock.seen[0].headers
    (ic,) = gateway.interceptions(name)
    assert gateway.sql(f"SELECT prompt FROM aibridge_user_prompts WHERE interception_id = '{ic['id']}'") == [
        {"prompt": "zipped hello"}]


@pytest.mark.parametrize("path,shape", [("/openai/v1/chat/completions", "openai"),
                                         ("/anthropic/v1/messages", "anthropic"),
                                         ("/openai/v1/embeddings", "openai")])
def test_deeply_nested_json_is_a_400_in_the_providers_format(gateway, mock, user, path, shape):
    name, token = user
    depth = 100_000
    body = b'{"model": "m", "max_tokens": 5, "messages": ' + b"[" * depth + b"]" * depth + b"}"
    got = api_request(gateway.port, path, token, body)
    assert status_of(got) == 400
    err = json.loads(got.partition(b"\r\n\r\n")[2])
    assert (err["type"] == "error" and err["error"]["type"] == "invalid_request_error") if shape == "anthropic" \
        else err["error"]["type"] == "invalid_request_error"
    assert "nested too deeply" in json.dumps(err)
    assert mock.seen == []
    assert httpx.get(gateway.url + "/aibridge/healthz", trust_env=False).status_code == 200


# --- token checks, metrics, logs ----------------------------------------------------------------------------


def test_failed_token_checks_are_throttled_per_address_with_a_clear_429(own_gateway, upstream):
    gw = own_gateway("throttle", extra={"limits": {"auth_failures_per_minute": 5}})
    token = gw.new_user("valid")
    codes = [httpx.post(gw.url + "/openai/v1/chat/completions", json=CHAT, trust_env=False,
                        headers={"authorization": f"Bearer aib_wrong{n}"}).status_code for n in range(8)]
    assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3
    r = httpx.post(gw.url + "/anthropic/v1/messages", json=CHAT, trust_env=False,
                   headers={"x-api-key": "aib_wrong"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        openai_client(gw, "aib_wrong").models.list()
    # a valid token from the same address still works: one broken client must not lock out a whole NAT
    upstream.script(Reply.json(chat_completion()))
    openai_client(gw, token).chat.completions.create(**CHAT)
    assert len(upstream.seen) == 1


def test_metric_labels_stay_bounded_under_arbitrary_models_and_paths(gateway, mock, user):
    name, token = user
    mock.default = Reply.json(chat_completion())
    client = openai_client(gateway, token)
    for n in range(12):
        client.chat.completions.create(model=f"x\n{n}" + "y" * 150, messages=[{"role": "user", "content": "hi"}])
    for n in range(5):
        httpx.get(f"{gateway.url}/openai/v1/models/model-{n}", headers={"authorization": f"Bearer {token}"},
                  trust_env=False)
    gateway.interceptions(name, 12)
    text = httpx.get(gateway.url + "/aibridge/metrics", trust_env=False).text
    routes = {part.split('"')[1] for line in text.splitlines() for part in line.split("route=")[1:]}
    assert routes <= {"/v1/messages", "/chat/completions", "/responses", "/embeddings", "/completions",
                      "/models", "/models/{id}", "/v1/models", "/v1/models/{id}", "/audio/speech",
                      "/audio/transcriptions", "/v1/messages/batches", "/v1/messages/count_tokens", "other",
                      "/v1/messages/batches/{id}", "/v1/messages/batches/{id}/results", "/responses/{id}"}
    assert "/models/{id}" in routes and "model-3" not in text
    assert 'model="other"' in text and "yyyyyyyy" not in text


def test_control_characters_from_clients_are_escaped_in_log_lines(gateway, mock, user):
    name, token = user
    mock.script(Reply.json(chat_completion()))
    forged = "gpt-4.1\n[00:00:00.000] interception FORGED user=admin status=completed"
    openai_client(gateway, token).chat.completions.create(model=forged, messages=[{"role": "user", "content": "x"}])
    gateway.interceptions(name)
    lines = gateway.log().splitlines()
    assert not any(line.startswith("[00:00:00.000] interception FORGED") for line in lines)
    assert any("gpt-4.1\\x0a[00:00:00.000] interception FORGED" in line for line in lines)


def test_capture_redaction_is_one_pass_over_the_headers(monkeypatch):
    """A request with thousands of headers used to be redacted header by header (quadratic)."""
    from aibridge_gw.addons.capture import redacted_copy
    from mitmproxy import http
    from mitmproxy.test import tflow

    flow = tflow.tflow(resp=True)
    flow.request.headers.fields = tuple((b"cookie", b"c%d" % n) for n in range(3000)) + (
        (b"authorization", b"Bearer aib_secretsecretsecret"),)
    sets = []
    original = http.Headers.__setitem__
    monkeypatch.setattr(http.Headers, "__setitem__", lambda self, k, v: (sets.append(k), original(self, k, v))[1])
    copy = redacted_copy(flow)
    assert sets == []
    assert copy.request.headers["authorization"] == "Bearer [redacted aib_…cret]"
    cookies = [v for k, v in copy.request.headers.fields if k == b"cookie"]
    assert len(cookies) == 3000 and all(v.startswith(b"[redacted") for v in cookies)
    assert flow.request.headers["authorization"] == "Bearer aib_secretsecretsecret"  # the live flow is untouched


# --- admin surface ------------------------------------------------------------------------------------------


def test_dashboard_is_served_with_a_strict_csp_and_keeps_no_token_on_disk(gateway):
    r = httpx.get(gateway.url + "/aibridge/", trust_env=False)
    csp = r.headers["content-security-policy"]
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src"))
    assert "'unsafe-inline'" not in script_src and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in r.text and '<script src="/aibridge/dashboard.js">' in r.text
    js = httpx.get(gateway.url + "/aibridge/dashboard.js", trust_env=False)
    assert js.headers["content-type"].startswith("text/javascript")
    assert "localStorage.setItem" not in js.text and "sessionStorage.setItem" in js.text


def test_health_counters_reset_only_by_an_admin_and_metrics_token(tmp_path, upstream):
    gw = Gateway(tmp_path / "health", upstream.url, extra={"metrics": {"token": "scrape-secret"}}).start()
    try:
        member = gw.new_user("member")
        admin = gw.new_user("boss")
        gw.op("users.set_role", name="boss", role="admin")
        url = gw.url + "/aibridge/healthz?reset_lag=1"
        assert httpx.get(url, trust_env=False).status_code == 401
        assert httpx.get(url, headers={"authorization": f"Bearer {member}"}, trust_env=False).status_code == 403
        assert httpx.get(url, headers={"authorization": f"Bearer {admin}"}, trust_env=False).status_code == 200
        assert httpx.get(gw.url + "/aibridge/healthz", trust_env=False).status_code == 200  # reading stays open
        assert httpx.get(gw.url + "/aibridge/metrics", trust_env=False).status_code == 401
        m = httpx.get(gw.url + "/aibridge/metrics", headers={"authorization": "Bearer scrape-secret"},
                      trust_env=False)
        assert m.status_code == 200 and "aibridge_interceptions_total" in m.text
    finally:
        gw.stop()


def test_files_at_rest_are_private(tmp_path, upstream):
    upstream.reset()
    gw = Gateway(tmp_path / "files", upstream.url, args=["--set", f"aibridge_flows={tmp_path / 'flows'}"],
                 extra={"logging": {"interceptions_json": str(tmp_path / "log" / "i.jsonl")}}).start()
    try:
        token = gw.new_user("files")
        upstream.script(Reply.json(chat_completion()))
        openai_client(gw, token).chat.completions.create(**CHAT)
        gw.interceptions("files")
    finally:
        gw.stop()
        upstream.reset()
    files = [gw.db, gw.db.with_name(gw.db.name + ".spool"), tmp_path / "log" / "i.jsonl",
             *sorted((tmp_path / "flows").glob("*.flows"))]
    assert len(files) == 4
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_relative_storage_paths_resolve_against_the_config_file(tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "aibridge.yaml").write_text("providers: []\nstorage: {duckdb: state/audit.duckdb}\n")
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    r = subprocess.run([str(BIN / "aibridge"), "--config", str(conf / "aibridge.yaml"), "users", "add", "rel"],
                       capture_output=True, text=True, cwd=elsewhere, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (conf / "state" / "audit.duckdb").exists()
    assert not (elsewhere / "state").exists() and not (elsewhere / "data").exists()
    assert stat.S_IMODE((conf / "state" / "audit.duckdb").stat().st_mode) == 0o600
    # A query against a database that does not exist says so instead of creating an empty one.
    (conf / "other.yaml").write_text("providers: []\nstorage: {duckdb: nowhere/audit.duckdb}\n")
    r = subprocess.run([str(BIN / "aibridge"), "--config", str(conf / "other.yaml"), "sql", "SELECT 1"],
                       capture_output=True, text=True, cwd=elsewhere, timeout=60)
    assert r.returncode == 1 and "no database at" in r.stderr
    assert not (conf / "nowhere").exists()


def test_a_flood_of_repeated_headers_gets_a_431_and_stalls_no_one(gateway, mock, user):
    """120 000 repeats of one header with no token: refused 431 in the provider's format before any per-header
    work, while the gateway keeps answering everyone else at once (joining the repeats stalled it 5 s)."""
    import threading
    import time

    answered: list[float] = []
    stop = threading.Event()

    def others():
        while not stop.is_set():
            t = time.monotonic()
            httpx.get(gateway.url + "/aibridge/healthz", trust_env=False, timeout=30)
            answered.append(time.monotonic() - t)
            time.sleep(0.05)

    watcher = threading.Thread(target=others)
    watcher.start()
    try:
        got = raw_request(gateway.port, "POST", "/openai/v1/chat/completions", [(b"x-flood", b"a")] * 120_000,
                          b"{}", timeout=30)
    finally:
        stop.set()
        watcher.join()
    assert status_of(got) == 431, got[:200]
    body = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert isinstance(body["error"]["message"], str)  # OpenAI's error shape
    assert answered and max(answered) < 1.0, max(answered)
    assert not mock.seen


def test_header_view_joins_repeats_in_linear_time():
    import time

    from aibridge_gw.addons.pipeline import header_view
    from mitmproxy import http

    headers = http.Headers([(b"X-A", b"1"), (b"x-b", b"2"), (b"x-a", b"3")])
    assert header_view(headers) == {"x-a": headers.get("x-a"), "x-b": "2"} == {"x-a": "1, 3", "x-b": "2"}
    many = http.Headers([(b"x-r", b"v")] * 120_000)
    t = time.perf_counter()
    assert header_view(many)["x-r"].count("v") == 120_000
    assert time.perf_counter() - t < 0.2  # linear: ~0.04 s here; joining as it went took ~0.5 s
