"""OAuth sign-in to MCP servers, fast: the store's operations on DuckDB and PostgreSQL (one-time state, versioned
refreshes, logout), the config keys, log redaction of the callback's query. The end-to-end flow against a real
OAuth-requiring MCP server is tests/test_mcp_oauth.py."""

from __future__ import annotations

import datetime as dt
import uuid

import duckdb
import pytest
from aibridge_gw.config import ConfigError, load_config
from aibridge_gw.logsafe import redact
from aibridge_gw.store import mcp_oauth, ops
from aibridge_gw.store.schema import migrate, migrate_postgres, transaction


@pytest.fixture(params=["duckdb", "postgres"])
def conn(request, tmp_path):
    if request.param == "duckdb":
        c = duckdb.connect(str(tmp_path / "oauth.duckdb"))
        migrate(c)
        yield c
        c.close()
        return
    import psycopg
    from aibridge_gw.store.pg import PgConnection

    from tests.support.postgres import Cluster

    cluster = Cluster().start()
    try:
        raw = psycopg.connect(cluster.create_database("oauth"), autocommit=True)
        migrate_postgres(raw)
        yield PgConnection(raw)
        raw.close()
    finally:
        cluster.stop()


def later(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


def test_store_operations(conn):
    def run(fn, **kw):
        with transaction(conn) as c:
            return fn(c, **kw)

    alice = run(ops.users_add, name="alice")
    uid = alice["id"]
    # registrations: the first kept, a second one for the same key returns it
    assert run(mcp_oauth.client_put, server="s", issuer="https://as", redirect_uri="https://gw/cb", client_id="c1",
               ciphertext="ct1") == "ct1"
    assert run(mcp_oauth.client_put, server="s", issuer="https://as", redirect_uri="https://gw/cb", client_id="c2",
               ciphertext="ct2") == "ct1"
    # a login: taken once; a second take finds it used; an unknown state is unknown
    run(mcp_oauth.login_put, id="L1", state_hash="h1", user_id=uid, server="s", ciphertext="blob",
        expires_at=later(600))
    assert run(mcp_oauth.login_pending, user_id=uid, server="s")[0] == "L1"
    taken = run(mcp_oauth.login_take, state_hash="h1")
    assert taken["found"] and taken["user_id"] == uid and taken["server"] == "s" and taken["ciphertext"] == "blob"
    assert run(mcp_oauth.login_take, state_hash="h1") == {"found": False, "why": "used"}
    assert run(mcp_oauth.login_take, state_hash="nope") == {"found": False, "why": "unknown"}
    assert run(mcp_oauth.login_pending, user_id=uid, server="s") is None
    run(mcp_oauth.login_finish, id="L1", status="done")
    assert run(mcp_oauth.login_status, id="L1")["status"] == "done"
    run(mcp_oauth.login_put, id="L2", state_hash="h2", user_id=uid, server="s", ciphertext="blob",
        expires_at=later(-1))
    assert run(mcp_oauth.login_status, id="L2")["status"] == "expired"
    # tokens: a sign-in replaces, a refresh writes only over the version it read
    assert run(mcp_oauth.token_put, user_id=uid, server="s", ciphertext="t1", expires_at=later(3), scope="a") == \
        {"written": True, "version": 1}
    assert run(mcp_oauth.token_get, user_id=uid, server="s") == ["t1", 1]
    assert run(mcp_oauth.token_put, user_id=uid, server="s", ciphertext="t2", expires_at=later(3), scope=None,
               version=1) == {"written": True, "version": 2}
    assert run(mcp_oauth.token_put, user_id=uid, server="s", ciphertext="t3", expires_at=later(3), scope=None,
               version=1) == {"written": False, "version": None}  # another process refreshed first
    assert run(mcp_oauth.token_get, user_id=uid, server="s") == ["t2", 2]
    assert run(mcp_oauth.token_put, user_id=uid, server="s", ciphertext="t4", expires_at=None, scope="b") == \
        {"written": True, "version": 3}  # signing in again
    listed = run(ops.mcp_oauth_list)
    assert [r[:3] for r in listed["rows"]] == [["alice", "s", "b"]]
    assert not run(mcp_oauth.token_drop, user_id=uid, server="s", version=2)  # a refused old version: kept
    assert run(ops.mcp_oauth_logout, user="alice", server="s")["signed_out"]
    with pytest.raises(ops.OpError, match="not signed in"):
        run(ops.mcp_oauth_logout, user="alice", server="s")
    assert run(mcp_oauth.token_get, user_id=str(uuid.uuid4()), server="s") is None


def test_config_keys(tmp_path):
    def load(server: dict, mcp: dict | None = None):
        path = tmp_path / "c.yaml"
        import yaml

        path.write_text(yaml.safe_dump({"providers": [{"name": "a", "type": "anthropic", "key": "k", "base_url": "https://api.anthropic.com/"}],
                                        "mcp_servers": [{"name": "s", "url": "https://s/mcp", **server}],
                                        "mcp": mcp or {}}))
        return load_config(path)

    c = load({"oauth": True, "oauth_scopes": ["read"]}, {"oauth_callback_url": "https://gw.example/cb"})
    s = c.mcp_servers[0]
    assert s.oauth and s.per_user and s.oauth_scopes == ("read",) and c.mcp.oauth_callback_url == "https://gw.example/cb"
    with pytest.raises(ConfigError, match="exclude each other"):
        load({"oauth": True, "per_user_token": True})
    with pytest.raises(ConfigError, match="need oauth: true"):
        load({"oauth_client_id": "x"})
    with pytest.raises(ConfigError) as e:
        load({"oauth": True, "oauth_client_secret": 5})
    assert "5" not in str(e.value).split("oauth_client_secret", 1)[-1]
    assert "hunter2" not in repr(load({"oauth": True, "oauth_client_id": "id", "oauth_client_secret": "hunter2"}))


def test_the_callbacks_query_is_redacted_in_log_lines():
    line = "127.0.0.1:5000: GET /aibridge/mcp/oauth/callback?code=abc&state=def HTTP/1.1"
    assert redact(line) == "127.0.0.1:5000: GET /aibridge/mcp/oauth/callback?code=<redacted>&state=<redacted> HTTP/1.1"


class _Store:
    """The writer's interface (`run(op, writes, **args)` -> a future) over one DuckDB connection, run at once."""

    def __init__(self, path) -> None:
        import threading

        self.conn = duckdb.connect(str(path))
        migrate(self.conn)
        self.lock = threading.Lock()

    def run(self, _op: str, writes: bool = False, **args):
        import concurrent.futures as cf

        fut: cf.Future = cf.Future()
        try:
            with self.lock, transaction(self.conn) as c:
                fut.set_result(ops.ALL_OPS[_op][0](c, **args))
        except Exception as e:
            fut.set_exception(e)
        return fut


def test_processes_refreshing_together_keep_the_rotated_token(tmp_path, monkeypatch):
    """Two processes (two McpOAuth over one store) refresh the same user's expired token at once, against a server
    that rotates refresh tokens (each works once): one wins, the other reads its token; nothing is lost."""
    import asyncio
    from urllib.parse import parse_qs, urlparse

    import httpx
    from aibridge_gw.config import McpServer
    from aibridge_gw.mcp.oauth import McpOAuth
    from cryptography.fernet import Fernet

    from tests.support.mcp_server import OAuthTestServer

    monkeypatch.setenv("AIBRIDGE_SECRET_KEY", Fernet.generate_key().decode())
    server = OAuthTestServer("rotating", lifetime=1).start()
    try:
        store = _Store(tmp_path / "shared.duckdb")
        uid = store.run("users.add", True, name="alice").result()["id"]
        mcp = McpServer(name="rotating", url=server.url, oauth=True)
        callback = "http://127.0.0.1:9/aibridge/mcp/oauth/callback"  # never reached: the test reads the redirect
        a, b = (McpOAuth(lambda: store, lambda: callback) for _ in range(2))

        async def scenario():
            login = await a.start(mcp, uid)
            async with httpx.AsyncClient(trust_env=False) as http:
                back = (await http.get(login["url"])).headers["location"]
            query = {k: v[0] for k, v in parse_qs(urlparse(back).query).items()}
            status, page = await b.callback(query, {"rotating": mcp})  # the callback lands on the other process
            assert status == 200, page
            first = await a.token(mcp, uid)
            assert first and first == await b.token(mcp, uid)
            await asyncio.sleep(1.2)  # expired for both
            got = await asyncio.gather(a.token(mcp, uid), b.token(mcp, uid))
            assert all(got) and first not in got and got[0] == got[1]
            return got

        got = asyncio.run(scenario())
        refreshes = [g for g, _ in server.provider.issued if g == "refresh_token"]
        assert len(refreshes) == 1  # one refresh reached the server, or the loser re-read the winner's token
        stored = store.run("mcp_oauth.token_get", user_id=uid, server="rotating").result()
        assert stored[1] == 2
        live = set(server.provider.refresh)  # the one refresh token that still works is the stored one
        c = McpOAuth(lambda: store, lambda: callback)

        async def again():
            await asyncio.sleep(1.2)
            return await c.token(mcp, uid)

        assert asyncio.run(again()) not in got
        assert len(live) == 1
    finally:
        server.stop()
