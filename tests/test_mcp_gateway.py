"""The MCP gateway (issue #25): `/aibridge/mcp` aggregates every approved MCP server for agents, per user.

Real MCP servers from the `mcp` package (a `coder` server, a `docs` server with resources and prompts, a `vault` one
that takes each user's own token), one that accepts connections and never answers (`hang`) and one that is down;
the official `mcp` client as the agent, with a gateway token. Checked: naming and schemas, forwarding, resources and
prompts, allow and deny per user and group, per-user credentials, a silent server left out within 5 s, the 401 and
its metadata document, hostile requests, policy tool rules, rate limits, every call recorded, the CLI, the admin
API, metrics and `--workers 2`. The real clients (Claude Code, Codex CLI) are in test_mcp_gateway_clients.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time

import httpx
import pytest

from tests.support.gateway import Gateway
from tests.support.mcp_server import LONG_TOOL, DocsTestServer, HangingServer, McpTestServer
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client
from tests.support.wire import anthropic_message

pytestmark = pytest.mark.timeout(300)
AWS_KEY = "AKIA4HKQ2MZP7XW3RN5T"  # shaped like an AWS access key id: masked in what is stored
VAULT_TOKEN = "vault-user-secret-0123456789"
RULE = {"name": "no-prod-deletes", "hook": "tool", "action": "deny", "message": "deleting PROD issues is not allowed",
        "when": 'tool.name == "docs__delete_issue" && has(tool.input.project) && tool.input.project == "PROD"'}


@pytest.fixture(scope="module")
def servers():
    started = {"coder": McpTestServer().start(), "docs": DocsTestServer().start(),
               "vault": DocsTestServer("vault").start(), "hang": HangingServer().start()}
    yield started
    for s in started.values():
        s.stop()


def gateway_config(servers: dict) -> dict:
    return {
        "mcp_servers": [
            {"name": "coder", "url": servers["coder"].url, "tool_deny_regex": "^create_gist$"},
            {"name": "docs", "url": servers["docs"].url},
            {"name": "vault", "url": servers["vault"].url, "per_user_token": True},
            {"name": "hang", "url": servers["hang"].url},
            {"name": "down", "url": "http://127.0.0.1:9/mcp"},
        ],
        "mcp_access": [
            {"servers": ["coder"], "groups": ["staff"]},
            {"servers": ["coder"], "tools": ["coder_delete_*", "coder_create_*"], "deny": True},
            {"servers": ["docs", "vault", "hang", "down"]},
            {"servers": ["docs"], "tools": ["delete_*"], "users": ["intern"], "deny": True},
        ],
        "mcp": {"tool_timeout_seconds": 3, "list_timeout_seconds": 2},
        "budgets": {"users": {"limited": {"mcp_calls_per_minute": 2}}},
        "policies": {"rules": [RULE], "redact_stored": True},
    }


@pytest.fixture(scope="module")
def key():
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream, servers, key):
    g = Gateway(tmp_path_factory.mktemp("mcp-gateway"), upstream.url, env={"AIBRIDGE_SECRET_KEY": key},
                extra=gateway_config(servers)).start()
    yield g
    g.stop()


_n = iter(range(10_000))


def new_user(gw: Gateway, prefix: str, groups: str = "", name: str | None = None) -> tuple[str, str]:
    name = name or f"{prefix}{next(_n)}"
    token = gw.new_user(name)
    deadline = time.monotonic() + 10
    while httpx.get(gw.url + "/aibridge/api/v1/me", headers={"authorization": f"Bearer {token}"},
                    trust_env=False).status_code != 200:  # fleet mode: known within the directory's refresh
        assert time.monotonic() < deadline
        time.sleep(0.1)
    if groups:
        gw.op("users.groups_set", name=name, groups=groups)
        wait_for_groups(gw, token, groups)
    return name, token


def wait_for_groups(gw: Gateway, token: str, groups: str) -> None:
    """The gateway's directory knows the groups set through it at once (it reloads after a write); checked."""
    me = httpx.get(gw.url + "/aibridge/api/v1/me", headers={"authorization": f"Bearer {token}"}, trust_env=False)
    assert sorted(me.json()["groups"]) == sorted(groups.split(","))


@contextlib.asynccontextmanager
async def session(url: str, token: str | None, client=("gateway-test", "1.2.3"), notices: list | None = None):
    """The official MCP client, initialized, as an agent would be (`sid()`: the session id the gateway gave).
    `notices`: the notifications the gateway sends on the stream the client opens, collected by method."""
    from mcp import ClientSession, types
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async def on_message(message) -> None:
        if notices is not None and isinstance(message, types.ServerNotification):
            notices.append(message.root.method)

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with create_mcp_http_client(headers=headers) as http:
        async with streamable_http_client(url + "/aibridge/mcp", http_client=http) as (r, w, sid):
            async with ClientSession(r, w, client_info=types.Implementation(name=client[0], version=client[1]),
                                     message_handler=on_message) as s:
                s.init = await s.initialize()
                s.sid = sid
                yield s


def run(coro):
    return asyncio.run(coro)


def calls(gw: Gateway, user: str, n: int = 1) -> list[dict]:
    return gw.wait_for(f"SELECT * FROM aibridge_mcp_calls WHERE user_name = '{user}' ORDER BY created_at",
                       lambda rows: len(rows) >= n)


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def direct_tools(server_url: str) -> dict:
    """A server's own tools, listed directly (what the gateway must pass on unchanged)."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(server_url) as (r, w, _):
        async with ClientSession(r, w) as s:
            await s.initialize()
            return {t.name: t for t in (await s.list_tools()).tools}


# --- aggregation, naming, forwarding --------------------------------------------------------------------


def test_tools_are_listed_as_server__tool_with_their_own_schemas_and_annotations(gw, servers):
    name, token = new_user(gw, "staff", "staff")

    async def go():
        async with session(gw.url, token) as s:
            assert s.init.serverInfo.name == "aibridge" and s.init.capabilities.tools is not None
            assert s.sid().startswith("aib1.")
            started = time.monotonic()
            tools = {t.name: t for t in (await s.list_tools()).tools}
            return tools, time.monotonic() - started

    tools, took = run(go())
    assert took < 5, took  # the hanging server is left out, never waited for longer
    coder, docs = run(direct_tools(servers["coder"].url)), run(direct_tools(servers["docs"].url))
    expected = {f"coder__{n}" for n in coder if n not in ("create_gist", "coder_delete_template",
                                                           "coder_create_workspace_build")}
    expected |= {f"docs__{n}" for n in docs if n != LONG_TOOL}
    long_name = "docs__pages_read_page_by_title_and_revis_" + hashlib.sha256(
        f"docs__{LONG_TOOL}".encode()).hexdigest()[:8]  # fits mcp.tool_name_max_length (49) and model APIs
    assert set(tools) == expected | {long_name}  # no vault (no token), hang (silent) or down tools; regexes, denies
    assert all(len(n) <= 49 for n in tools)
    for n, t in tools.items():
        server, own = ("docs", LONG_TOOL) if n == long_name else n.split("__", 1)
        original = (coder if server == "coder" else docs)[own]
        assert t.model_dump(exclude={"name"}) == original.model_dump(exclude={"name"})
    search = tools["docs__search_issues"]
    assert search.annotations.readOnlyHint is True and search.annotations.title == "Search issues"
    assert search.inputSchema["required"] == ["project", "query"]


def test_a_call_is_forwarded_and_recorded_with_every_column(gw, servers):
    name, token = new_user(gw, "caller", "staff")
    servers["coder"].calls.clear()

    async def go():
        async with session(gw.url, token, ("my-agent", "9.8.7")) as s:
            return await s.call_tool("coder__coder_list_workspaces", {"owner": "alice"}), s.sid()

    result, sid = run(go())
    assert not result.isError and "dd711d5c-83c6-4c08-a0af-b73055906e8c" in text(result)
    assert servers["coder"].calls == [("coder_list_workspaces", {"owner": "alice"})]
    (row,) = calls(gw, name)
    assert (row["method"], row["server"], row["tool"], row["is_error"], row["outcome"]) == (
        "tools/call", "coder", "coder_list_workspaces", False, "ok")
    assert (row["client"], row["client_version"]) == ("my-agent", "9.8.7")
    assert row["session_id"] and row["session_id"] in _decoded(sid)
    assert json.loads(row["arguments"]) == {"owner": "alice"}
    assert row["result_bytes"] > 50 and row["error"] is None and 0 <= row["duration_ms"] < 3000
    assert row["user_id"] and row["on_behalf_of_id"] is None


def _decoded(sid: str) -> str:
    import base64

    data = sid.split(".", 1)[1]
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()


def test_a_tool_whose_name_model_apis_refuse_is_listed_shortened_and_called_by_that_name(gw, servers):
    """`docs__pages.read_page_by_title_and_revision_from_the_archive` has a dot and is longer than
    `mcp.tool_name_max_length`: it is listed as a name model APIs take, and a call by that name reaches the tool."""
    name, token = new_user(gw, "longnames")

    async def go():
        async with session(gw.url, token) as s:
            listed = [t.name for t in (await s.list_tools()).tools if t.name.startswith("docs__pages")]
            return listed, await s.call_tool(listed[0], {"title": "Q3 plan"})

    listed, result = run(go())
    assert len(listed) == 1 and len(listed[0]) <= 49 and re.fullmatch(r"[A-Za-z0-9_-]+", listed[0]), listed
    assert not result.isError and text(result) == "the archived page Q3 plan"
    assert (LONG_TOOL, {"title": "Q3 plan"}) in servers["docs"].calls
    (row,) = calls(gw, name)
    assert (row["server"], row["tool"], row["outcome"]) == ("docs", LONG_TOOL, "ok")


def test_a_tool_error_is_passed_on_as_the_server_said_it(gw, servers):
    name, token = new_user(gw, "errs", "staff")

    async def go():
        async with session(gw.url, token) as s:
            return await s.call_tool("coder__coder_list_templates", {}), await s.call_tool("coder__nope", {})

    ok, unknown_upstream = run(go())
    assert not ok.isError
    assert unknown_upstream.isError and "nope" in text(unknown_upstream)
    rows = calls(gw, name, 2)
    assert [(r["tool"], r["outcome"], r["is_error"]) for r in rows] == [
        ("coder_list_templates", "ok", False), ("nope", "error", True)]
    assert "nope" in rows[1]["error"]


def test_resources_and_prompts_are_aggregated_and_read_back_from_their_server(gw, servers):
    name, token = new_user(gw, "reader")
    servers["docs"].calls.clear()

    async def go():
        from pydantic import AnyUrl

        async with session(gw.url, token) as s:
            resources = (await s.list_resources()).resources
            templates = (await s.list_resource_templates()).resourceTemplates
            guide = await s.read_resource(AnyUrl("docs://guide"))
            page = await s.read_resource(AnyUrl("docs://pages/intro"))
            prompts = (await s.list_prompts()).prompts
            prompt = await s.get_prompt("docs__summarize", {"text": "the gateway"})
            return resources, templates, guide, page, prompts, prompt

    resources, templates, guide, page, prompts, prompt = run(go())
    assert [str(r.uri) for r in resources] == ["docs://guide"] and resources[0].mimeType == "text/markdown"
    assert [t.uriTemplate for t in templates] == ["docs://pages/{page}"]
    assert guide.contents[0].text == "# Guide\nBe kind." and page.contents[0].text == "page intro"
    assert [p.name for p in prompts] == ["docs__summarize"] and prompts[0].arguments[0].name == "text"
    assert prompt.messages[0].content.text == "Summarize this: the gateway"
    rows = calls(gw, name, 3)
    assert [(r["method"], r["server"], r["tool"], r["outcome"]) for r in rows] == [
        ("resources/read", "docs", "docs://guide", "ok"), ("resources/read", "docs", "docs://pages/intro", "ok"),
        ("prompts/get", "docs", "summarize", "ok")]


# --- access: users, groups, regexes ------------------------------------------------------------------------


def test_who_sees_and_may_call_what_follows_the_rules_deny_wins(gw, servers):
    outsider, out_token = new_user(gw, "outsider")
    intern, intern_token = new_user(gw, "intern", "staff", name="intern")
    servers["coder"].calls.clear()
    servers["docs"].calls.clear()

    async def tools_and_calls(token: str, *tries):
        async with session(gw.url, token) as s:
            listed = {t.name for t in (await s.list_tools()).tools}
            return listed, [await s.call_tool(n, a) for n, a in tries]

    listed, (denied,) = run(tools_and_calls(out_token, ("coder__coder_list_templates", {})))
    assert not any(n.startswith("coder__") for n in listed) and "docs__delete_issue" in listed
    assert denied.isError and "not allowed for" in text(denied) and "no mcp_access rule allows it" in text(denied)

    listed, (gone, regex, mine, theirs) = run(tools_and_calls(
        intern_token, ("coder__coder_delete_template", {"template_id": "t1"}), ("coder__create_gist", {"content": "x"}),
        ("coder__coder_list_templates", {}), ("docs__delete_issue", {"project": "DEV", "key": "DEV-1"})))
    assert "coder__coder_list_templates" in listed and "docs__search_issues" in listed
    assert not {"coder__coder_delete_template", "coder__create_gist", "docs__delete_issue"} & listed
    assert gone.isError and "denied by mcp_access[1]" in text(gone)
    assert regex.isError and "tool_deny_regex of server coder" in text(regex)
    assert not mine.isError
    assert theirs.isError and "denied by mcp_access[3]" in text(theirs)
    assert servers["coder"].calls == [("coder_list_templates", {})] and servers["docs"].calls == []
    rows = calls(gw, "intern", 4)
    assert [r["outcome"] for r in rows] == ["denied", "denied", "ok", "denied"]
    assert calls(gw, outsider)[0]["outcome"] == "denied"


def test_injected_tools_in_model_calls_follow_the_same_rules(gw, mock):
    """The tools the gateway injects into model calls are the ones the caller may use at /aibridge/mcp."""
    _, outsider = new_user(gw, "model-out")
    _, staff = new_user(gw, "model-staff", "staff")
    for token in (outsider, staff):
        mock.script(Reply.json(anthropic_message("hi", (3, 1))))
        anthropic_client(gw, token).messages.create(model="claude-sonnet-4-0", max_tokens=5,
                                                    messages=[{"role": "user", "content": "hi"}])
    seen = [{t["name"] for t in s.json().get("tools", [])} for s in mock.seen]
    assert not any(n.startswith("bmcp_coder_") for n in seen[0]) and "bmcp_docs_search_issues" in seen[0]
    assert "bmcp_coder_coder_list_templates" in seen[1] and "bmcp_coder_coder_delete_template" not in seen[1]


def test_per_user_token_servers_use_each_users_own_token_which_never_leaves(gw, servers, key):
    with_token, token = new_user(gw, "vaulted")
    r = gw.cli("mcp-token", "set", "--user", with_token, "--server", "vault", input=VAULT_TOKEN + "\n",
               env={"AIBRIDGE_SECRET_KEY": key})
    assert r.returncode == 0, r.stderr
    _, other = new_user(gw, "unvaulted")
    servers["vault"].auth.clear()

    async def go(token: str):
        async with session(gw.url, token) as s:
            listed = {t.name for t in (await s.list_tools()).tools}
            return listed, await s.call_tool("vault__search_issues", {"project": "SEC", "query": "keys"})

    listed, result = run(go(token))
    assert "vault__search_issues" in listed and not result.isError
    assert servers["vault"].auth == [f"Bearer {VAULT_TOKEN}"]
    assert VAULT_TOKEN not in result.model_dump_json()
    listed, refused = run(go(other))
    assert not any(n.startswith("vault__") for n in listed)
    assert refused.isError and "has none" in text(refused) and servers["vault"].auth == [f"Bearer {VAULT_TOKEN}"]
    stored = json.dumps(gw.sql("SELECT * FROM aibridge_mcp_calls"), default=str)
    assert VAULT_TOKEN not in stored and VAULT_TOKEN not in gw.log()


# --- servers that hang or are down ------------------------------------------------------------------------


def test_a_silent_server_never_holds_a_listing_and_a_call_to_it_ends_within_the_timeout(gw):
    name, token = new_user(gw, "patient")

    async def go():
        async with session(gw.url, token) as s:
            took = []
            for _ in range(3):
                started = time.monotonic()
                listed = {t.name for t in (await s.list_tools()).tools}
                took.append(time.monotonic() - started)
            started = time.monotonic()
            hung = await s.call_tool("hang__anything", {})
            hung_took = time.monotonic() - started
            started = time.monotonic()
            down = await s.call_tool("down__anything", {})
            return listed, took, hung, hung_took, down, time.monotonic() - started

    listed, took, hung, hung_took, down, down_took = run(go())
    assert max(took) < 5 and not any(n.startswith(("hang__", "down__")) for n in listed), took
    assert hung.isError and "did not answer within 3s" in text(hung) and hung_took < 5
    assert down.isError and "failed" in text(down) and down_took < 3
    rows = calls(gw, name, 2)
    assert [(r["server"], r["outcome"]) for r in rows] == [("hang", "timeout"), ("down", "unavailable")]
    status = httpx.get(gw.url + "/aibridge/api/v1/mcp/servers", headers={"authorization": f"Bearer {admin(gw)}"},
                       trust_env=False).json()["data"]
    by_name = {s["server"]: s for s in status}
    assert by_name["coder"]["available"] is True and by_name["coder"]["tools"] == 7
    assert by_name["down"]["available"] is False and "ConnectError" in by_name["down"]["error"]


_admin: dict = {}


def admin(gw: Gateway) -> str:
    if gw not in _admin:
        gw.op("users.add", name=f"root{id(gw)}", role="admin")
        _admin[gw] = gw.op("tokens.create", user=f"root{id(gw)}", name="admin")["token"]
    return _admin[gw]


def test_a_reload_applies_new_access_rules_to_the_next_request_and_notifies_listening_clients(
        tmp_path, upstream, servers):
    """SIGHUP with other mcp_access rules: the next tools/list and tools/call follow them (stateless: nothing to
    end or re-open); a client listening on the notification stream is told its tool list changed (and not the
    resources or prompts it sees, which did not); a config whose rule names an unknown server is refused whole;
    revoking the token ends the stream within seconds."""
    import yaml

    from tests.test_reload import reload

    config = {**gateway_config(servers), "policies": {}}
    g = Gateway(tmp_path / "reloaded", upstream.url, extra=config).start()
    try:
        name, token = new_user(g, "reloaded")

        async def docs_tools():
            async with session(g.url, token) as s:
                listed = {t.name for t in (await s.list_tools()).tools
                          if t.name.startswith("docs__") and "pages" not in t.name}
                return listed, await s.call_tool("docs__search_issues", {"project": "R", "query": "q"})

        listed, result = run(docs_tools())
        assert "docs__search_issues" in listed and not result.isError
        raw = yaml.safe_load(g.config_path.read_text())

        async def listen_across_reload() -> list[str]:
            notices: list[str] = []
            async with session(g.url, token, notices=notices) as s:
                assert s.init.capabilities.tools.listChanged is True
                await s.list_tools()
                await asyncio.sleep(1.5)  # the client's GET stream is open and has seen the lists as they were
                raw["mcp_access"].append({"servers": ["docs"], "tools": ["search_*"], "deny": True})
                g.config_path.write_text(yaml.safe_dump(raw))
                await asyncio.to_thread(reload, g, "configuration reloaded")
                deadline = time.monotonic() + 8
                while "notifications/tools/list_changed" not in notices and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
            return notices

        notices = run(listen_across_reload())
        assert notices == ["notifications/tools/list_changed"]
        listed, result = run(docs_tools())
        assert listed == {"docs__delete_issue"} and result.isError and "denied by mcp_access[4]" in text(result)
        raw["mcp_access"].append({"servers": ["nowhere"]})
        g.config_path.write_text(yaml.safe_dump(raw))
        reload(g, "configuration reload (SIGHUP) refused")
        assert "`nowhere` is not an MCP server here" in g.log()
        assert run(docs_tools())[0] == {"docs__delete_issue"}  # it kept serving with the rules it had

        with httpx.stream("GET", g.url + "/aibridge/mcp", trust_env=False, timeout=10,
                          headers={"authorization": f"Bearer {token}", "accept": "text/event-stream"}) as stream:
            assert stream.status_code == 200
            tokens = g.op("tokens.list", user=name)
            (tid,) = [r[tokens["columns"].index("id")] for r in tokens["rows"]]
            g.op("tokens.revoke", id=tid)
            started = time.monotonic()
            for _ in stream.iter_lines():
                pass  # ends when the gateway ends the stream
            assert time.monotonic() - started < 6
    finally:
        g.stop()


# --- authentication, the metadata document, hostile requests ----------------------------------------------


def test_a_missing_or_bad_token_gets_401_pointing_at_the_metadata_document(gw):
    url = gw.url + "/aibridge/mcp"
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}}
    headers = {"accept": "application/json, text/event-stream"}
    missing = httpx.post(url, json=init, headers=headers, trust_env=False)
    bad = httpx.post(url, json=init, headers={**headers, "authorization": "Bearer aib_not-a-real-token"},
                     trust_env=False)
    for r in (missing, bad):
        assert r.status_code == 401
        assert r.json()["jsonrpc"] == "2.0" and r.json()["error"]["code"] == -32001
        assert r.headers["www-authenticate"].startswith(
            f'Bearer resource_metadata="{gw.url}/.well-known/oauth-protected-resource/aibridge/mcp"')
    assert "token is required" in missing.json()["error"]["message"]
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    meta = httpx.get(gw.url + "/.well-known/oauth-protected-resource/aibridge/mcp", trust_env=False)
    assert meta.status_code == 200 and meta.json()["resource"] == url
    assert meta.json()["bearer_methods_supported"] == ["header"]

    async def refused():
        async with session(gw.url, "aib_not-a-real-token"):
            pass

    with pytest.raises(BaseException) as e:
        run(refused())
    assert "401" in repr(e.value) or "Unauthorized" in repr(e.value)


def test_through_the_proxy_with_proxy_credentials(gw, servers):
    """Proxy mode: a client whose HTTP goes through the gateway as its proxy reaches /aibridge/mcp with the token as
    proxy credentials (and no Authorization header); the credentials go no further."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    name, token = new_user(gw, "proxied", "staff")
    host = gw.url.split("://")[1]

    async def go():
        async with httpx.AsyncClient(proxy=f"http://{name}:{token}@{host}", trust_env=False, timeout=30) as http:
            async with streamable_http_client(gw.url + "/aibridge/mcp", http_client=http) as (r, w, _):
                async with ClientSession(r, w) as s:
                    await s.initialize()
                    listed = {t.name for t in (await s.list_tools()).tools}
                    return listed, await s.call_tool("coder__coder_list_templates", {})

    listed, result = run(go())
    assert "coder__coder_list_templates" in listed and not result.isError
    assert calls(gw, name)[0]["outcome"] == "ok"


def test_get_opens_the_notification_stream_and_delete_ends_nothing(gw):
    _, token = new_user(gw, "methods")
    auth = {"authorization": f"Bearer {token}"}
    assert httpx.get(gw.url + "/aibridge/mcp", headers=auth, trust_env=False).status_code == 406
    with contextlib.ExitStack() as streams:
        for n in range(8):  # a user may hold eight open (an agent opens one a session)
            get = streams.enter_context(httpx.stream(
                "GET", gw.url + "/aibridge/mcp", headers={**auth, "accept": "text/event-stream"}, trust_env=False,
                timeout=5))
            assert get.status_code == 200 and get.headers["content-type"].startswith("text/event-stream")
            assert next(get.iter_lines()).startswith(":")  # its opening comment arrives at once (not buffered)
        ninth = httpx.get(gw.url + "/aibridge/mcp", headers={**auth, "accept": "text/event-stream"},
                          trust_env=False, timeout=5)
        assert ninth.status_code == 429 and "at most 8 notification streams" in ninth.text
    delete = httpx.delete(gw.url + "/aibridge/mcp", headers={**auth, "mcp-session-id": "aib1.x"}, trust_env=False)
    assert delete.status_code == 200


def test_hostile_requests_get_a_clean_4xx(gw):
    _, token = new_user(gw, "hostile")
    base = {"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream",
            "content-type": "application/json"}
    url = gw.url + "/aibridge/mcp"

    def post(body: bytes, **headers) -> httpx.Response:
        return httpx.post(url, content=body, headers={**base, **headers}, trust_env=False, timeout=30)

    assert post(b"{not json").status_code == 400
    assert post(b"[" * 100_000 + b"]" * 100_000).status_code == 400
    assert post(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}', origin="http://evil.example").status_code == 403
    assert post(b'{"jsonrpc": "2.0", "id": 1}').status_code == 400  # not a JSON-RPC message
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "docs__search_issues", "arguments": {"q": "x" * (5 * 1024 * 1024)}}})
    assert post(big.encode()).status_code == 413
    weird = post(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 5}}')
    assert 200 <= weird.status_code < 500 and "error" in weird.text
    assert post(b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}', **{"mcp-session-id": "aib1.!!!"}).status_code == 200
    assert httpx.get(gw.url + "/aibridge/healthz", trust_env=False).status_code == 200


# --- policies, rate limits, what is stored ---------------------------------------------------------------


def test_a_policy_tool_rule_refuses_a_call_which_is_recorded_with_its_decision(gw, servers):
    name, token = new_user(gw, "policed")
    servers["docs"].calls.clear()

    async def go():
        async with session(gw.url, token) as s:
            return (await s.call_tool("docs__delete_issue", {"project": "PROD", "key": "PROD-7"}),
                    await s.call_tool("docs__delete_issue", {"project": "DEV", "key": "DEV-7"}))

    refused, allowed = run(go())
    assert refused.isError and text(refused) == \
        "aibridge policy no-prod-deletes: deleting PROD issues is not allowed"
    assert not allowed.isError and servers["docs"].calls == [("delete_issue", {"project": "DEV", "key": "DEV-7"})]
    rows = calls(gw, name, 2)
    assert [r["outcome"] for r in rows] == ["refused", "ok"]
    (decision,) = gw.wait_for(f"SELECT * FROM aibridge_policy_decisions WHERE interception_id = '{rows[0]['id']}'")
    assert (decision["rule"], decision["hook"], decision["action"], decision["tool"], decision["enforced"]) == (
        "no-prod-deletes", "tool", "deny", "docs__delete_issue", True)


def test_arguments_are_stored_masked_and_errors_without_credentials(gw):
    name, token = new_user(gw, "masked")

    async def go():
        async with session(gw.url, token) as s:
            return await s.call_tool("docs__search_issues", {"project": "OPS", "query": f"key {AWS_KEY} leaked"})

    assert not run(go()).isError
    (row,) = calls(gw, name)
    assert AWS_KEY not in row["arguments"] and "[REDACTED:" in json.loads(row["arguments"])["query"]


def test_mcp_calls_per_minute_limits_a_user(gw):
    _, token = new_user(gw, "limited", name="limited")

    async def go():
        async with session(gw.url, token) as s:
            return [await s.call_tool("docs__search_issues", {"project": "A", "query": str(n)}) for n in range(3)]

    results = run(go())
    assert [r.isError for r in results] == [False, False, True]
    assert "rate limit of 2 MCP calls per minute" in text(results[2])
    assert [r["outcome"] for r in calls(gw, "limited", 3)] == ["ok", "ok", "rate_limited"]


# --- operators: CLI, API, metrics, guides --------------------------------------------------------------------


def test_aibridge_mcp_access_says_what_a_user_may_call_and_why(gw):
    name, _ = new_user(gw, "asked", "staff")
    r = gw.cli("mcp", "access", "--user", name, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["groups"] == ["staff"] and got["rules"] == 4
    why = {(t["server"], t["tool"]): (t["allowed"], t["why"]) for t in got["tools"]}
    assert why[("coder", "coder_list_templates")] == (True, "allowed by mcp_access[0] (allow; servers coder; "
                                                            "groups staff)")
    assert why[("coder", "coder_delete_template")][0] is False
    assert "mcp_access[1]" in why[("coder", "coder_delete_template")][1]
    assert why[("coder", "create_gist")] == (False, "excluded by tool_deny_regex of server coder")
    assert why[("vault", "*")][0] is False and "has no token" in why[("vault", "*")][1]
    assert why[("down", "*")][0] is None and "unavailable" in why[("down", "*")][1]
    table = gw.cli("mcp", "access", "--user", name)
    assert table.returncode == 0 and "coder__coder_list_templates" in table.stdout


def test_calls_in_the_cli_the_admin_api_and_metrics(gw):
    name, token = new_user(gw, "audited", "staff")

    async def go():
        async with session(gw.url, token) as s:
            await s.call_tool("coder__coder_list_templates", {})
            await s.call_tool("coder__coder_create_workspace_build", {"workspace_id": "w", "transition": "start"})

    run(go())
    calls(gw, name, 2)
    r = gw.cli("mcp", "calls", "--user", name, "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [(c["tool"], c["outcome"]) for c in listed] == [("coder_create_workspace_build", "denied"),
                                                            ("coder_list_templates", "ok")]
    summary = json.loads(gw.cli("mcp", "calls", "--summary", "--user", name, "--json").stdout)
    assert {(d["server"], d["tool"], d["calls"], d["errors"]) for d in summary["data"]} == {
        ("coder", "coder_list_templates", 1, 0), ("coder", "coder_create_workspace_build", 1, 1)}
    assert "coder_list_templates" in gw.cli("mcp", "calls", "--user", name).stdout
    own = httpx.get(gw.url + "/aibridge/api/v1/mcp/calls", headers={"authorization": f"Bearer {token}"},
                    trust_env=False).json()["data"]
    assert {c["user"] for c in own} == {name} and len(own) == 2  # a member sees their own calls only
    everyone = httpx.get(gw.url + "/aibridge/api/v1/mcp/calls/summary?since=1h",
                         headers={"authorization": f"Bearer {admin(gw)}"}, trust_env=False).json()
    assert name in {u["user"] for u in everyone["by_user"]} and everyone["slowest"]
    bad = httpx.get(gw.url + "/aibridge/api/v1/mcp/calls?colour=red", headers={"authorization": f"Bearer {token}"},
                    trust_env=False)
    assert bad.status_code == 400 and bad.json()["error"]["parameter"] == "colour"
    metrics = httpx.get(gw.url + "/aibridge/metrics", trust_env=False).text
    assert 'aibridge_mcp_calls_total{outcome="ok",server="coder",tool="coder_list_templates"}' in metrics
    assert 'aibridge_mcp_calls_total{outcome="denied",server="coder",tool="coder_create_workspace_build"}' in metrics
    assert 'aibridge_mcp_call_duration_seconds_count{server="coder"}' in metrics
    assert "coder" in gw.cli("mcp", "servers").stdout


def test_calls_are_exported(gw):
    name, token = new_user(gw, "exported")

    async def go():
        async with session(gw.url, token) as s:
            await s.call_tool("docs__search_issues", {"project": "X", "query": "y"})

    run(go())
    calls(gw, name)
    out = gw.workdir / "export"
    r = gw.cli("export", "--format", "csv", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert name in (out / "aibridge_mcp_calls.csv").read_text()


# --- several workers ---------------------------------------------------------------------------------------


def test_two_workers_serve_one_stateless_endpoint(tmp_path, upstream, servers, key):
    """Every request may reach either worker: initialize on one, calls on fresh connections anywhere, and every
    call recorded once with the client the session id names."""
    gw2 = Gateway(tmp_path / "workers", upstream.url, env={"AIBRIDGE_SECRET_KEY": key}, workers=2,
                  extra=gateway_config(servers)).start()
    try:
        assert len(set(gw2.workers_answering().values())) == 2
        name, token = new_user(gw2, "both")
        deadline = time.monotonic() + 10
        while True:  # a token made through one worker reaches the other within a second
            codes = {httpx.post(gw2.url + "/aibridge/mcp", json={}, headers={"authorization": f"Bearer {token}"},
                                trust_env=False).status_code for _ in range(8)}
            if 401 not in codes:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)

        async def go():
            async with session(gw2.url, token, ("two-workers", "2.0")) as s:
                sid = s.sid()
            results = []
            for n in range(12):  # fresh connections: the kernel spreads them over the workers
                body = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
                        "params": {"name": "docs__search_issues", "arguments": {"project": "W", "query": str(n)}}}
                async with httpx.AsyncClient(trust_env=False) as http:
                    r = await http.post(gw2.url + "/aibridge/mcp", json=body, headers={
                        "authorization": f"Bearer {token}", "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18",
                        "accept": "application/json, text/event-stream"})
                results.append(r)
            return results

        results = run(go())
        assert [r.status_code for r in results] == [200] * 12
        assert all(not r.json()["result"]["isError"] for r in results)
        rows = calls(gw2, name, 12)
        assert sorted(json.loads(r["arguments"])["query"] for r in rows) == sorted(str(n) for n in range(12))
        assert {(r["client"], r["client_version"]) for r in rows} == {("two-workers", "2.0")}
    finally:
        gw2.stop()


# --- fleet mode: PostgreSQL ----------------------------------------------------------------------------------


def test_fleet_mode_records_calls_in_postgresql_and_counts_the_rate_limit_there(tmp_path, upstream, servers, key):
    """On PostgreSQL the calls are rows there (arguments as JSON), the CLI reads them straight from it, and
    mcp_calls_per_minute is counted in the shared per-minute counter; migrate-store copies DuckDB's calls."""
    import psycopg

    from tests.support.postgres import Cluster

    cluster = Cluster().start()
    try:
        dsn = cluster.create_database("mcp_fleet")
        pg = Gateway(tmp_path / "fleet", upstream.url, env={"AIBRIDGE_SECRET_KEY": key}, extra={
            **gateway_config(servers), "storage": {"duckdb": str(tmp_path / "local" / "spools.duckdb"),
                                                   "postgres": dsn}}).start()
        try:
            name, token = new_user(pg, "fleet", name="limited")

            async def go():
                async with session(pg.url, token) as s:
                    return [await s.call_tool("docs__search_issues", {"project": "F", "query": str(n)})
                            for n in range(3)]

            assert [r.isError for r in run(go())] == [False, False, True]
            rows = calls(pg, name, 3)
            assert [r["outcome"] for r in rows] == ["ok", "ok", "rate_limited"]
            with psycopg.connect(dsn) as conn:
                args = conn.execute("SELECT arguments FROM aibridge_mcp_calls ORDER BY created_at").fetchall()
                counted = conn.execute("SELECT sum(requests) FROM aibridge_request_counts").fetchone()[0]
            assert args[0][0] == {"project": "F", "query": "0"} and counted >= 3
            listed = json.loads(pg.cli("mcp", "calls", "--user", name, "--json").stdout)
            assert [c["arguments"]["query"] for c in listed] == ["2", "1", "0"]
        finally:
            pg.stop()

        from aibridge_gw.flow.recorder import Recorder
        from aibridge_gw.store.writer import Store

        duck = Gateway(tmp_path / "duck", "http://127.0.0.1:9")
        store = Store(duck.db)
        store.open()
        try:
            Recorder(store).mcp_call("6f9619ff-8b86-4d11-b42d-00c04fc964ff", created_at=dt_now(), user_id=None,
                                     user_name="migrated", method="tools/call", server="docs", tool="t",
                                     arguments={"a": 1}, is_error=False, outcome="ok")
            store.flush().result(timeout=30)
        finally:
            store.close()
        moved = duck.cli("migrate-store", "--to", dsn, "--json")
        assert moved.returncode == 0, moved.stderr
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT arguments FROM aibridge_mcp_calls WHERE user_name = 'migrated'").fetchall() \
                == [({"a": 1},)]
    finally:
        cluster.stop()


def dt_now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)
