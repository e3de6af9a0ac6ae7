"""OAuth 2.1 sign-in to upstream MCP servers (issue #25): `aibridge mcp login --server X --user alice`.

A real MCP server that requires OAuth (the `mcp` package's FastMCP with its own authorization server: metadata,
dynamic client registration, PKCE; an in-memory provider that approves every sign-in at once, access tokens that
live 3 s, rotating refresh tokens), a real gateway, the CLI, and the test as the user's browser (it follows the
printed address, redirects included, to the gateway's callback). Checked: alice's calls carry her own token; bob,
not signed in, sees the tools and gets the sign-in-needed error at once; tokens are refreshed past their lifetime and
after a 401; a revoked refresh token means signing in again; a refused sign-in and a bad `state` get clean pages
and the waiting CLI is told; logout; no secret in the store's other tables, the log or the records; `--workers 2`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.support.gateway import BIN, Gateway
from tests.support.mcp_server import OAuthTestServer
from tests.test_mcp_gateway import new_user, session

pytestmark = pytest.mark.timeout(180)
LIFETIME = 3


@pytest.fixture(scope="module")
def secure():
    s = OAuthTestServer("secure", lifetime=LIFETIME).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key():
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def config(secure) -> dict:
    return {"mcp_servers": [{"name": "secure", "url": secure.url, "oauth": True}],
            "mcp": {"tool_timeout_seconds": 5, "list_timeout_seconds": 2}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream, secure, key):
    g = Gateway(tmp_path_factory.mktemp("mcp-oauth"), upstream.url, env={"AIBRIDGE_SECRET_KEY": key},
                extra=config(secure)).start()
    yield g
    g.stop()


def login(gw: Gateway, user: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`aibridge mcp login` started in the background: the process and the address it printed."""
    env = {**os.environ, "AIBRIDGE_CONFIG": str(gw.config_path), **gw.env}
    proc = subprocess.Popen([str(BIN / "aibridge"), "mcp", "login", "--server", "secure", "--user", user, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=gw.workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"login printed no address: {proc.stderr.read()}")
        if line.strip().startswith("http"):
            return proc, line.strip()
    raise AssertionError("login printed no address in time")


def browse(url: str) -> httpx.Response:
    """The user's browser: the authorization server approves at once and redirects to the gateway's callback."""
    return httpx.get(url, follow_redirects=True, trust_env=False, timeout=20)


def sign_in(gw: Gateway, secure, user: str, subject: str) -> str:
    secure.subject = subject
    proc, url = login(gw, user)
    page = browse(url)
    assert page.status_code == 200, page.text
    assert f"Signed in to secure as {user}" in page.text
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"signed in to secure as {user}" in out
    return url


async def call(gw: Gateway, token: str, name: str = "secure__whoami"):
    async with session(gw.url, token) as s:
        return await s.call_tool(name, {})


def text(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def test_sign_in_call_refresh_and_sign_in_needed(gw, secure):
    alice, alice_token = new_user(gw, "alice")
    bob, bob_token = new_user(gw, "bob")
    url = sign_in(gw, secure, alice, "alice-account")
    assert secure.provider.registrations == 1  # dynamic client registration
    q = parse_qs(urlparse(url).query)
    assert q["code_challenge_method"] == ["S256"] and q["resource"] == [secure.url]
    assert q["redirect_uri"] == [gw.url + "/aibridge/mcp/oauth/callback"]

    # alice's call carries her own token
    result = asyncio.run(call(gw, alice_token))
    assert not result.isError, text(result)
    assert text(result) == "subject=alice-account"

    # bob, not signed in: he sees the server's tools; calling one says sign in, at once, as a tool error
    async def bobs():
        async with session(gw.url, bob_token) as s:
            names = [t.name for t in (await s.list_tools()).tools]
            t0 = time.monotonic()
            r = await s.call_tool("secure__whoami", {})
            return names, r, time.monotonic() - t0

    names, result, took = asyncio.run(bobs())
    assert "secure__whoami" in names
    assert result.isError and took < 3
    assert "sign-in needed" in text(result) and f"aibridge mcp login --server secure --user {bob}" in text(result)

    # past the access token's lifetime: refreshed (the refresh token rotates), calls keep working
    refreshes = sum(1 for g, s in secure.provider.issued if g == "refresh_token")
    time.sleep(LIFETIME + 0.5)
    for _ in range(2):
        result = asyncio.run(call(gw, alice_token))
        assert not result.isError and text(result) == "subject=alice-account", text(result)
    assert sum(1 for g, s in secure.provider.issued if g == "refresh_token") == refreshes + 1

    # the server refuses an access token the gateway holds as good: one refresh, then the call goes through
    secure.provider.expire_access_tokens("alice-account")
    result = asyncio.run(call(gw, alice_token))
    assert not result.isError and text(result) == "subject=alice-account", text(result)
    assert sum(1 for g, s in secure.provider.issued if g == "refresh_token") == refreshes + 2

    # who is signed in (no secret)
    listed = gw.cli("mcp", "login", "--list", "--json", env=gw.env)
    assert listed.returncode == 0, listed.stderr
    signed = json.loads(listed.stdout)
    assert [(r["user"], r["server"]) for r in signed] == [(alice, "secure")]
    assert not [s for s in secure.provider.secrets if s in listed.stdout]
    servers = gw.cli("mcp", "servers", "--json")
    assert servers.returncode == 0, servers.stderr
    row = next(s for s in json.loads(servers.stdout) if s["server"] == "secure")
    assert row["oauth"] is True and row["signed_in"] == 1 and row["available"] is True

    # the refresh token revoked at the authorization server: sign-in needed (and the tokens are forgotten)
    secure.provider.revoke_refresh_tokens("alice-account")
    secure.provider.expire_access_tokens("alice-account")
    result = asyncio.run(call(gw, alice_token))
    assert result.isError and "sign-in needed" in text(result), text(result)
    listed = gw.cli("mcp", "login", "--list", "--user", alice)
    assert "secure" not in listed.stdout.split("MCP sign-ins", 1)[-1], listed.stdout

    # signing in again works; logout deletes the tokens
    sign_in(gw, secure, alice, "alice-account")
    assert text(asyncio.run(call(gw, alice_token))) == "subject=alice-account"
    assert secure.provider.registrations == 1  # the registration is reused
    out = gw.cli("mcp", "logout", "--server", "secure", "--user", alice)
    assert out.returncode == 0, out.stderr
    result = asyncio.run(call(gw, alice_token))
    assert result.isError and "sign-in needed" in text(result)

    rows = gw.wait_for("SELECT user_name, outcome, error FROM aibridge_mcp_calls WHERE server = 'secure' "
                       "ORDER BY created_at", lambda rows: len(rows) >= 8)
    assert {r["outcome"] for r in rows} == {"ok", "sign_in"}
    assert any(r["user_name"] == bob and r["outcome"] == "sign_in" for r in rows)

    # no secret anywhere but the encrypted column
    secrets = secure.provider.secrets
    assert secrets
    tables = [r["table_name"] for r in gw.sql("SELECT table_name FROM information_schema.tables "
                                              "WHERE table_name LIKE 'aibridge_%'")]
    for table in tables:
        dump = json.dumps(gw.sql(f"SELECT * FROM {table}"), default=str)
        leaked = [s for s in secrets if s in dump]
        assert not leaked, f"{table} holds a secret"
    log = gw.log()
    assert not [s for s in secrets if s in log]
    assert "signed in to secure" in log.lower() or "signed in" in log


def test_refused_sign_in_and_bad_state(gw, secure):
    carol, _ = new_user(gw, "carol")
    proc, url = login(gw, carol)
    state = parse_qs(urlparse(url).query)["state"][0]
    callback = gw.url + "/aibridge/mcp/oauth/callback"
    page = httpx.get(callback, params={"error": "access_denied", "state": state}, trust_env=False)
    assert page.status_code == 400 and "access_denied" in page.text and "text/html" in page.headers["content-type"]
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "access_denied" in err, (out, err)
    # the same state again: used
    again = httpx.get(callback, params={"code": "x", "state": state}, trust_env=False)
    assert again.status_code == 400 and "was used already" in again.text
    bad = httpx.get(callback, params={"code": "x", "state": "forged"}, trust_env=False)
    assert bad.status_code == 400 and "not one this gateway started" in bad.text
    assert "code=x" not in gw.log() and "forged" not in gw.log()
    # --no-wait prints and returns
    r = gw.cli("mcp", "login", "--server", "secure", "--user", carol, "--no-wait")
    assert r.returncode == 0 and "http" in r.stdout, r.stderr
    # nobody opens the address: the CLI gives up at its timeout, non-zero
    r = gw.cli("mcp", "login", "--server", "secure", "--user", carol, "--timeout", "1")
    assert r.returncode == 1 and "not completed in time" in r.stderr, (r.stdout, r.stderr)
    # a server that takes no sign-in, an unknown user
    assert gw.cli("mcp", "login", "--server", "nope", "--user", carol).returncode == 1
    r = gw.cli("mcp", "login", "--server", "secure", "--user", "nobody")
    assert r.returncode == 1 and "no user" in r.stderr


def test_two_workers_share_the_sign_in(tmp_path, upstream, secure, key):
    """The callback and the CLI's polls land on either worker. mitmproxy prints every flow here (`flow_detail=2`:
    request lines and headers): the callback's code and state never appear."""
    gw2 = Gateway(tmp_path / "workers", upstream.url, env={"AIBRIDGE_SECRET_KEY": key}, workers=2,
                  extra=config(secure), flow_detail=2).start()
    try:
        name, token = new_user(gw2, "dave")
        url = sign_in(gw2, secure, name, "dave-account")
        for _ in range(4):  # fresh connections land on either worker; each reads the tokens from the store
            assert text(asyncio.run(call(gw2, token))) == "subject=dave-account"
        state = parse_qs(urlparse(url).query)["state"][0]
        bad = httpx.get(gw2.url + "/aibridge/mcp/oauth/callback", params={"code": "code-guessed-0123", "state": state},
                        trust_env=False)
        assert bad.status_code == 400
    finally:
        gw2.stop()
    log = gw2.log()
    assert "/aibridge/mcp/oauth/callback" in log  # the flows were printed
    assert not [s for s in secure.provider.secrets + [state, "code-guessed-0123"] if s in log]


def test_admin_api_sign_in_for_oneself(gw, secure):
    erin, token = new_user(gw, "erin")
    api = gw.url + "/aibridge/api/v1/mcp/oauth/"
    auth = {"authorization": f"Bearer {token}"}
    r = httpx.post(api + "login", json={"server": "secure", "user": "someone-else"}, headers=auth, trust_env=False)
    assert r.status_code == 403
    def mine() -> dict:
        servers = httpx.get(gw.url + "/aibridge/api/v1/mcp/servers", headers=auth, trust_env=False).json()["data"]
        return next(s for s in servers if s["server"] == "secure")

    assert mine()["oauth"] and mine()["signed_in"] is False
    r = httpx.post(api + "login", json={"server": "secure"}, headers=auth, trust_env=False)
    assert r.status_code == 200, r.text
    login = r.json()
    assert login["user"] == erin and login["url"].startswith(secure.url.rsplit("/", 1)[0])
    secure.subject = "erin-account"
    assert browse(login["url"]).status_code == 200
    status = httpx.get(api + "login/" + login["id"], headers=auth, trust_env=False).json()
    assert status["status"] == "done"
    assert mine()["signed_in"] is True
    signed = httpx.get(api + "signins", headers=auth, trust_env=False).json()
    assert [(r[0], r[1]) for r in signed["rows"]] == [(erin, "secure")]
    assert text(asyncio.run(call(gw, token))) == "subject=erin-account"
    r = httpx.post(api + "logout", json={"server": "secure"}, headers=auth, trust_env=False)
    assert r.status_code == 200 and r.json()["signed_out"]
    result = asyncio.run(call(gw, token))
    assert result.isError and "sign-in needed" in text(result)
    r = httpx.post(api + "logout", json={"server": "secure"}, headers=auth, trust_env=False)
    assert r.status_code == 400 and "not signed in" in r.json()["error"]["message"]
