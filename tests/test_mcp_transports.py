"""Every kind of MCP server (issue #25), over pooled sessions, with change notices.

Real servers from the `mcp` package: a stdio one (tests/support/mcp_stdio_server.py, started by the gateway with
`command`), an SSE one at a path not ending in /sse (so `transport: auto` falls back to it), a stateful Streamable
HTTP one that counts its sessions and adds a tool at run time (telling its clients with list_changed), and one
that accepts connections and never answers. Reached through a real gateway's /aibridge/mcp and the injected-tool
loop, and through an `McpRegistry` in this process (its change API). Checked: aggregation over all kinds, one
pooled session for many calls, a stdio child killed with -9 and restarted (no call run twice), a restarted server's
session replaced, a silent server left out within 5 s, list_changed making the new tool appear without waiting for
`refresh_seconds`, the child's environment (none of the gateway's), and no child left once the gateway stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.gateway import Gateway
from tests.support.mcp_kinds import STDIO_SCRIPT, LiveTestServer, SseTestServer
from tests.support.mcp_server import HangingServer
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client
from tests.test_mcp_gateway import admin, calls, new_user, run, session, text

pytestmark = pytest.mark.timeout(120)
SECRET = "stdio-secret-value-8472"


@pytest.fixture(scope="module")
def servers():
    started = {"sse": SseTestServer().start(), "live": LiveTestServer().start(), "hang": HangingServer().start()}
    yield started
    for s in started.values():
        s.stop()


def stdio_server(tmp: Path, name: str = "local") -> dict:
    return {"name": name, "command": sys.executable, "args": [str(STDIO_SCRIPT)],
            "env": {"MCP_PID_FILE": str(tmp / f"{name}.pids"), "MCP_CALLS_FILE": str(tmp / f"{name}.calls"),
                    "MCP_SECRET": "${AIBRIDGE_TEST_STDIO_SECRET}"}}


def pids(tmp: Path, name: str = "local") -> list[int]:
    path = tmp / f"{name}.pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mcp-kinds")


@pytest.fixture(scope="module")
def gw(tmp, upstream, servers):
    g = Gateway(tmp / "gw", upstream.url, env={"AIBRIDGE_TEST_STDIO_SECRET": SECRET,
                                               "OPENAI_API_KEY": "sk-gateway-own-key-never-for-children"},
                extra={
                    "mcp_servers": [
                        stdio_server(tmp),
                        {"name": "olddocs", "url": servers["sse"].url},  # auto: Streamable HTTP refused, SSE then
                        {"name": "live", "url": servers["live"].url},
                        {"name": "hang", "url": servers["hang"].url},
                    ],
                    "mcp": {"tool_timeout_seconds": 5, "list_timeout_seconds": 2, "refresh_seconds": 3600},
                }).start()
    yield g
    g.stop()


def status(gw: Gateway) -> dict:
    data = httpx.get(gw.url + "/aibridge/api/v1/mcp/servers", headers={"authorization": f"Bearer {admin(gw)}"},
                     trust_env=False).json()["data"]
    return {s["server"]: s for s in data}


def test_every_kind_is_aggregated_and_called_and_a_silent_one_left_out_within_5s(gw, servers):
    name, token = new_user(gw, "kinds")

    async def go():
        async with session(gw.url, token) as s:
            started = time.monotonic()
            listed = {t.name for t in (await s.list_tools()).tools}
            took = time.monotonic() - started
            results = {
                "echo": await s.call_tool("local__echo", {"text": "hi"}),
                "env": [text(await s.call_tool("local__has_env", {"name": n}))
                        for n in ("MCP_SECRET", "OPENAI_API_KEY", "AIBRIDGE_TEST_STDIO_SECRET", "PATH")],
                "search": await s.call_tool("olddocs__search", {"query": "pools"}),
                "count": await s.call_tool("live__count", {}),
            }
            return listed, took, results

    listed, took, results = run(go())
    assert {"local__echo", "local__has_env", "olddocs__search", "live__count", "live__add_tool"} <= listed
    assert not any(n.startswith("hang__") for n in listed) and took < 5, took
    assert text(results["echo"]).startswith("hi (pid ") and not results["echo"].isError
    assert results["env"] == ["yes", "no", "no", "yes"]  # its env from the config; none of the gateway's own
    assert "about pools" in text(results["search"]) and servers["sse"].calls == [("search", {"query": "pools"})]
    assert text(results["count"])  # a session id: the stateful server's session
    rows = calls(gw, name, 6)
    assert {(r["server"], r["outcome"]) for r in rows} == {("local", "ok"), ("olddocs", "ok"), ("live", "ok")}
    by = status(gw)
    assert by["local"]["transport"] == "stdio" and by["local"]["command"].endswith("mcp_stdio_server.py")
    assert by["local"]["url"] is None and SECRET not in str(by)
    assert by["olddocs"]["transport"] == "sse" and by["live"]["transport"] == "streamable_http"
    assert all(by[n]["available"] for n in ("local", "olddocs", "live")) and by["hang"]["available"] is False
    assert SECRET not in gw.log()


def test_many_calls_share_one_pooled_session(gw, servers):
    live = servers["live"]
    _, token = new_user(gw, "pooled")

    async def go():
        async with session(gw.url, token) as s:
            await s.list_tools()
            before = live.initializes
            answers = await asyncio.gather(*(s.call_tool("live__count", {}) for _ in range(8)))
            await s.list_tools()
            return before, [text(a) for a in answers]

    before, sids = run(go())
    assert live.initializes == before and len(set(sids)) == 1 and sids[0], (before, live.initializes, sids)


def test_the_injected_tool_loop_runs_stdio_and_sse_tools(gw, mock, tmp):
    name, token = new_user(gw, "looped")
    mock.script(Reply.json(_tool_use("bmcp_local_echo", {"text": "from-the-loop"}, "msg_1")),
                Reply.json(_tool_use("bmcp_olddocs_search", {"query": "loops"}, "msg_2")),
                Reply.json(_text("done", "msg_3")))
    msg = anthropic_call(anthropic_client(gw, token), {"model": "claude-sonnet-4-0", "max_tokens": 50,
                                                       "messages": [{"role": "user", "content": "go"}]}, False)
    assert msg.content[-1].text == "done"
    assert "from-the-loop" in (tmp / "local.calls").read_text()
    (ic,) = gw.interceptions(name)
    tools = gw.wait_for(f"SELECT * FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}' AND injected",
                        lambda rows: len(rows) >= 2)
    assert sorted((t["tool"], t["invocation_error"]) for t in tools) == [
        ("bmcp_local_echo", None), ("bmcp_olddocs_search", None)]
    assert any(t["server_url"].startswith("stdio:") for t in tools)


def test_a_stdio_child_killed_with_9_is_restarted_and_no_call_runs_twice(gw, tmp):
    name, token = new_user(gw, "killer")

    async def go():
        answered = []
        async with session(gw.url, token) as s:
            for n in range(6):
                if n == 3:
                    os.kill(pids(tmp)[-1], signal.SIGKILL)
                    await asyncio.sleep(1)
                r = await s.call_tool("local__echo", {"text": f"{name}-{n}"})
                answered.append((r.isError, text(r)))
        return answered

    before = pids(tmp)
    answered = run(go())
    assert all(not err for err, _ in answered), answered
    after = pids(tmp)
    assert len(after) == len(before) + 1 and not alive(before[-1]) and alive(after[-1])
    assert f"(pid {after[-1]})" in answered[-1][1]
    ran = [line for line in (tmp / "local.calls").read_text().split() if line.startswith(f"{name}-")]
    rows = calls(gw, name, 6)
    assert len(ran) == len(rows) == sum(r["outcome"] == "ok" for r in rows) == 6


def test_a_call_that_may_have_run_when_its_server_died_is_failed_never_run_twice(gw, tmp):
    name, token = new_user(gw, "crash")

    async def go():
        async with session(gw.url, token) as s:
            crashed = await s.call_tool("local__crash", {"text": f"{name}-crash"})
            deadline = time.monotonic() + 8
            while True:  # a child that keeps dying soon after it starts is started again after a pause
                after = await s.call_tool("local__echo", {"text": f"{name}-after"})
                if not after.isError or time.monotonic() > deadline:
                    return crashed, after
                assert "next try in" in text(after), text(after)
                await asyncio.sleep(0.2)

    crashed, after = run(go())
    assert crashed.isError and "it may have run, so it was not run again" in text(crashed)
    assert not after.isError
    ran = [line for line in (tmp / "local.calls").read_text().split() if line.startswith(f"{name}-")]
    assert ran == [f"{name}-crash", f"{name}-after"]
    rows = calls(gw, name, 2)
    assert (rows[0]["tool"], rows[0]["outcome"]) == ("crash", "unavailable")
    assert (rows[-1]["tool"], rows[-1]["outcome"]) == ("echo", "ok")


def test_a_restarted_streamable_server_gets_a_new_pooled_session(gw, servers):
    _, token = new_user(gw, "restart")
    old = servers["live"]

    async def call(s):
        return await s.call_tool("live__count", {})

    async def go():
        async with session(gw.url, token) as s:
            first = await call(s)
            old.stop()
            servers["live"] = LiveTestServer(old.port).start()
            second = await call(s)
            return first, second

    first, second = run(go())
    assert not first.isError and not second.isError, text(second)
    assert text(first) != text(second) and servers["live"].initializes == 1  # one new session, the call retried


def test_a_servers_list_changed_shows_its_new_tool_without_waiting_for_the_refresh(gw, servers):
    """The live server adds a tool and says so (list_changed on its pooled session's stream): the new tool is listed
    at once (refresh_seconds is an hour), and an agent listening on /aibridge/mcp's notification stream is told its
    tool list changed."""
    _, token = new_user(gw, "changes")

    async def go():
        notices: list[str] = []
        async with session(gw.url, token, notices=notices) as s:
            before = {t.name for t in (await s.list_tools()).tools}
            await asyncio.sleep(1.5)  # the agent's GET stream is open and has seen the lists as they were
            added = await s.call_tool("live__add_tool", {"name": "fresh_tool"})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "notifications/tools/list_changed" not in notices:
                await asyncio.sleep(0.1)
            now = {t.name for t in (await s.list_tools()).tools}
            fresh = await s.call_tool("live__fresh_tool", {}) if "live__fresh_tool" in now else None
            return before, added, now, fresh, notices

    before, added, now, fresh, notices = run(go())
    assert "live__fresh_tool" not in before and not added.isError
    assert "live__fresh_tool" in now and text(fresh) == "fresh_tool here"
    assert "notifications/tools/list_changed" in notices


def test_the_registry_version_and_waiters_follow_changes(tmp_path, servers):
    """In this process: `version`, `wait_changed`, `subscribe`, pooled reuse and the fallback remembered; `aclose`
    ends the stdio child."""
    from aibridge_gw.config import McpServer, McpSettings
    from aibridge_gw.mcp.registry import McpRegistry

    stdio = stdio_server(tmp_path, "solo")
    env = {**stdio["env"], "MCP_SECRET": SECRET}
    registry = McpRegistry((
        McpServer("solo", command=stdio["command"], args=tuple(stdio["args"]), env=tuple(env.items()),
                  transport="stdio"),
        McpServer("olddocs", url=servers["sse"].url),
        McpServer("live", url=servers["live"].url)),
        McpSettings(tool_timeout_seconds=5, list_timeout_seconds=3, refresh_seconds=3600, watch_seconds=60),
        lambda u, s: None)

    async def go():
        listed = await asyncio.gather(*(registry.listing(s, "u", 5) for s in registry.servers))
        version = registry.version
        initialized = registry.initializes
        for _ in range(3):
            await registry.call_tool(registry.servers[0], "echo", {"text": "x"}, "u")
            await registry.call_tool(registry.servers[1], "search", {"query": "x"}, "u")
        reused = registry.initializes == initialized
        changes = registry.subscribe()
        next_change = asyncio.ensure_future(changes.__anext__())
        waited = asyncio.ensure_future(registry.wait_changed(version, timeout=5))
        await asyncio.sleep(0.1)
        assert not waited.done()
        await registry.call_tool(registry.servers[2], "add_tool", {"name": "late_tool"}, "u")
        new_version = await waited
        seen = await asyncio.wait_for(next_change, 5)
        await changes.aclose()
        live = await registry.listing(registry.servers[2], "u", 5)
        child = pids(tmp_path, "solo")
        await registry.aclose()
        return listed, version, reused, new_version, seen, live, child

    listed, version, reused, new_version, seen, live, child = run(go())
    assert all(lst.error is None and lst.tools for lst in listed) and version >= 3
    assert reused and new_version == seen == version + 1
    assert "late_tool" in {t.name for t in live.tools}
    assert registry._kinds["olddocs"] == "sse" and len(child) == 1
    deadline = time.monotonic() + 5
    while alive(child[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child[0])


def test_idle_sessions_close_the_pool_is_bounded_and_watching_relists(tmp_path, servers):
    """In this process: an idle stdio session ends its child; over `max_sessions` the least recently used session
    is closed; while someone waits for changes, a server that changed without a notice is found by re-listing."""
    from aibridge_gw.config import McpServer, McpSettings
    from aibridge_gw.mcp.registry import McpRegistry

    stdio = stdio_server(tmp_path, "idle")
    registry = McpRegistry((
        McpServer("idle", command=stdio["command"], args=tuple(stdio["args"]),
                  env=tuple(stdio["env"].items()), transport="stdio"),
        McpServer("live", url=servers["live"].url)),
        McpSettings(tool_timeout_seconds=10, list_timeout_seconds=3, refresh_seconds=3600, idle_seconds=1,
                    max_sessions=1, watch_seconds=0.5),
        lambda u, s: None)
    idle, live = registry.servers

    async def go():
        await registry.call_tool(idle, "echo", {"text": "x"}, "u")
        child = pids(tmp_path, "idle")[-1]
        await registry.call_tool(live, "count", {}, "u")  # the pool holds one: the stdio session is closed
        evicted = await until(lambda: not alive(child))
        await registry.call_tool(idle, "echo", {"text": "y"}, "u")
        child = pids(tmp_path, "idle")[-1]
        started = time.monotonic()
        idled = await until(lambda: not alive(child) and registry.status()[0]["sessions"] == 0)  # idle_seconds: 1
        assert time.monotonic() - started > 0.8
        await registry.listing(live, "u", 5)
        version = registry.version
        waiting = asyncio.ensure_future(registry.wait_changed(version, timeout=5))
        await registry.call_tool(live, "add_tool_quietly", {"name": "quiet_tool"}, "u")
        changed = await waiting
        listing = await registry.listing(live, "u", 5)
        await registry.aclose()
        return evicted, idled, version, changed, listing

    evicted, idled, version, changed, listing = run(go())
    assert evicted and idled and changed == version + 1
    assert "quiet_tool" in {t.name for t in listing.tools}


def test_a_reload_that_drops_a_server_ends_its_child_and_none_is_left_when_the_gateway_stops(tmp_path, upstream):
    g = Gateway(tmp_path / "gw", upstream.url, env={"AIBRIDGE_TEST_STDIO_SECRET": SECRET},
                extra={"mcp_servers": [stdio_server(tmp_path, "a"), stdio_server(tmp_path, "b")],
                       "mcp": {"tool_timeout_seconds": 1}})
    g.start()
    try:
        _, token = new_user(g, "stopper")

        async def tools():
            async with session(g.url, token) as s:
                return {t.name for t in (await s.list_tools()).tools}

        deadline = time.monotonic() + 15  # the first listing waits for a python child's start (slow on a busy box)
        while not {"a__echo", "b__echo"} <= run(tools()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (a,), (b,) = pids(tmp_path, "a"), pids(tmp_path, "b")
        assert alive(a) and alive(b)
        cfg = yaml.safe_load(g.config_path.read_text())
        cfg["mcp_servers"] = cfg["mcp_servers"][:1]
        g.config_path.write_text(yaml.safe_dump(cfg))
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while alive(b) and time.monotonic() < deadline:  # the old registry closes once its calls had their time
            time.sleep(0.1)
        assert not alive(b)
        assert {"a__echo"} <= run(tools()) and not any(n.startswith("b__") for n in run(tools()))
        children = pids(tmp_path, "a")
    finally:
        assert g.stop() == 0
    assert children and not any(alive(p) for p in children)


def test_behind_two_workers_each_runs_its_own_child_and_every_call_is_answered(tmp_path, upstream):
    g = Gateway(tmp_path / "workers", upstream.url, workers=2, env={"AIBRIDGE_TEST_STDIO_SECRET": SECRET},
                extra={"mcp_servers": [stdio_server(tmp_path)], "mcp": {"list_timeout_seconds": 5}})
    g.start()
    try:
        assert len(set(g.workers_answering().values())) == 2
        name, token = new_user(g, "workers")
        deadline = time.monotonic() + 10
        while 401 in {httpx.post(g.url + "/aibridge/mcp", json={}, headers={"authorization": f"Bearer {token}"},
                                 trust_env=False).status_code for _ in range(8)}:
            assert time.monotonic() < deadline  # a token made through one worker reaches the other within a second
            time.sleep(0.2)

        async def go():
            async with session(g.url, token) as s:
                sid = s.sid()
            answers = []
            for n in range(10):  # fresh connections: the kernel spreads them over the workers
                body = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
                        "params": {"name": "local__echo", "arguments": {"text": f"w{n}"}}}
                async with httpx.AsyncClient(trust_env=False, timeout=15) as http:
                    r = await http.post(g.url + "/aibridge/mcp", json=body, headers={
                        "authorization": f"Bearer {token}", "mcp-session-id": sid,
                        "mcp-protocol-version": "2025-06-18", "accept": "application/json, text/event-stream"})
                answers.append(r.json()["result"])
            return answers

        answers = run(go())
        assert not any(a["isError"] for a in answers), answers
        served = {a["content"][0]["text"].split("(pid ")[1].rstrip(")") for a in answers}
        children = pids(tmp_path)
        assert {str(p) for p in children} == served and 1 <= len(children) <= 2  # one per worker that was asked
        assert len(calls(g, name, 10)) == 10
    finally:
        assert g.stop() == 0
    assert not any(alive(p) for p in children)


@pytest.mark.parametrize("server, problem", [
    ({"url": "http://x/mcp", "command": "x"}, "set url (an HTTP server) or command (a stdio server), not both"),
    ({}, "set url (an HTTP server) or command (a stdio server)"),
    ({"command": "x", "headers": {"Authorization": "Bearer t"}}, "headers and per_user_token are for url servers"),
    ({"command": "x", "per_user_token": True}, "its one process serves every user"),
    ({"command": "x", "transport": "sse"}, "transport is for url servers"),
    ({"url": "http://x/mcp", "env": {"A": "b"}}, "args, env and cwd are for command (stdio) servers"),
    ({"url": "http://x/mcp", "transport": "websocket"}, "transport"),
])
def test_the_config_check_refuses_what_cannot_work(server, problem):
    from aibridge_gw import config_model

    with pytest.raises(config_model.ConfigProblems) as e:
        config_model.validate({"mcp_servers": [{"name": "s", **server}]})
    assert e.value.problems[0].startswith("mcp_servers[0]") and problem in e.value.problems[0], e.value.problems


def test_the_schema_and_the_runtime_config_know_every_kind(tmp_path, monkeypatch):
    from aibridge_gw import config, config_model

    props = config_model.schema()["$defs"]["McpServerFile"]["properties"]
    assert {"url", "transport", "command", "args", "env", "cwd"} <= set(props)
    assert props["transport"]["enum"] == ["auto", "streamable_http", "sse"]
    monkeypatch.setenv("AIBRIDGE_TEST_STDIO_SECRET", SECRET)
    path = tmp_path / "aibridge.yaml"
    path.write_text(yaml.safe_dump({"mcp_servers": [
        {"name": "files", "command": "npx", "args": ["-y", "server"], "env": {"TOKEN": "${AIBRIDGE_TEST_STDIO_SECRET}"},
         "cwd": "srv"},
        {"name": "old", "url": "http://x/sse"}]}))
    files, old = config.load_config(path).mcp_servers
    assert files.stdio and files.transport == "stdio" and files.env == (("TOKEN", SECRET),)
    assert files.cwd == str(tmp_path / "srv") and files.where == "npx -y server" and SECRET not in repr(files)
    assert not old.stdio and old.transport == "auto" and old.where == "http://x/sse"


async def until(predicate, timeout: float = 8) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _tool_use(tool: str, args: dict, msg_id: str) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
            "content": [{"type": "tool_use", "id": f"toolu_{msg_id}", "name": tool, "input": args}],
            "stop_reason": "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}}


def _text(text: str, msg_id: str) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}}
