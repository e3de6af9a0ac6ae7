"""Central MCP tools: injected into requests, run by the gateway in an inner loop, invisible to the client,
every round recorded. A real FastMCP server; the mock provider replays the injected-tool captures."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import pytest

from aibridge_gw.config import McpServer
from tests.support.fixtures import capture
from tests.support.gateway import Gateway
from tests.support.mcp_server import McpTestServer
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client, responses_call


@pytest.fixture(scope="module")
def mcp_server():
    s = McpTestServer().start()
    yield s
    s.stop()


def mcp_gateway(workdir, upstream, mcp_server, **mcp_settings):
    return Gateway(workdir, upstream.url, extra={
        "mcp_servers": [
            {"name": "coder", "url": mcp_server.url, "tool_deny_regex": "^create_gist$"},
            {"name": "down", "url": "http://127.0.0.1:9/mcp"},  # unreachable: its tools are left out
        ],
        "mcp": {"tool_timeout_seconds": 5, "list_timeout_seconds": 3, **mcp_settings},
    }).start()


@pytest.fixture(scope="module")
def mgw(tmp_path_factory, upstream, mcp_server):
    gw = mcp_gateway(tmp_path_factory.mktemp("mcp-gw"), upstream, mcp_server)
    yield gw
    gw.stop()


_n = iter(range(10_000))


@pytest.fixture
def muser(mgw, mcp_server):
    mcp_server.calls.clear()
    name = f"m{next(_n)}"
    return name, mgw.new_user(name)


def db_rows(gw, table, iid, order="created_at, id"):
    return gw.sql(f"SELECT * FROM {table} WHERE interception_id = '{iid}' ORDER BY {order}")


def usages(gw, iid):
    return sorted((u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"])
                  for u in db_rows(gw, "aibridge_token_usages", iid))


def assert_injected_tool_recorded(gw, iid, mcp_server, tool, args, error=None):
    (t,) = [r for r in db_rows(gw, "aibridge_tool_usages", iid) if r["injected"]]
    assert t["tool"] == tool and t["server_url"] == mcp_server.url
    assert json.loads(t["input"]) == args
    if error:
        assert error in (t["invocation_error"] or "")
    else:
        assert t["invocation_error"] is None


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_anthropic_injected_tool_loop(mgw, mock, muser, mcp_server, stream):
    name, token = muser
    cap = capture("anthropic/single_injected_tool.txtar")
    mock.script(Reply.from_capture(cap, stream), Reply.from_capture(cap, stream, "/tool-call"))
    result = anthropic_call(anthropic_client(mgw, token), cap.request, stream)

    assert mcp_server.calls == [("coder_list_workspaces", {"owner": "admin"})]
    first, second = (s.json() for s in mock.seen)
    injected = {t["name"]: t for t in first["tools"]}
    assert "bmcp_coder_coder_list_workspaces" in injected and "bmcp_coder_create_gist" not in injected
    assert injected["bmcp_coder_coder_list_workspaces"]["input_schema"]["required"] == ["owner"]
    tool_use = second["messages"][-2]["content"][-1]
    assert tool_use["type"] == "tool_use" and tool_use["name"] == "bmcp_coder_coder_list_workspaces"
    result_block = second["messages"][-1]["content"][0]
    assert result_block["type"] == "tool_result" and result_block["tool_use_id"] == tool_use["id"]
    assert "dd711d5c-83c6-4c08-a0af-b73055906e8c" in result_block["content"]

    if stream:
        assert all("bmcp_" not in e.model_dump_json() for e in result)
        starts = [e for e in result if e.type == "content_block_start"]
        assert [e.index for e in starts] == list(range(len(starts)))  # consistent indices across rounds
        text = "".join(e.delta.text for e in result if e.type == "content_block_delta" and e.delta.type == "text_delta")
        assert [e.type for e in result].count("message_start") == 1 and result[-1].type == "message_stop"
        final = [e for e in result if e.type == "message_delta"]
        assert len(final) == 1 and final[0].usage.output_tokens == 68 + 117
    else:
        assert "bmcp_" not in result.model_dump_json()
        text = "".join(b.text for b in result.content if b.type == "text")
        assert result.usage.output_tokens == 71 + 122 and result.stop_reason == "end_turn"
    assert text.startswith("I'll list the workspaces") and "Here are the" in text  # both rounds' text

    (ic,) = mgw.interceptions(name)
    assert ic["status"] == "completed"
    assert usages(mgw, ic["id"]) == ([(6120, 68, 0), (6352, 117, 0)] if stream else [(6120, 71, 0), (6352, 122, 0)])
    assert_injected_tool_recorded(mgw, ic["id"], mcp_server, "bmcp_coder_coder_list_workspaces", {"owner": "admin"})
    assert [p["prompt"] for p in db_rows(mgw, "aibridge_user_prompts", ic["id"])] == ["list coder workspace IDs for admin"]


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_openai_chat_injected_tool_loop(mgw, mock, muser, mcp_server, stream):
    name, token = muser
    cap = capture("openai/chatcompletions/single_injected_tool.txtar")
    mock.script(Reply.from_capture(cap, stream), Reply.from_capture(cap, stream, "/tool-call"))
    result = chat_call(openai_client(mgw, token), cap.request, stream)

    assert mcp_server.calls == [("coder_list_workspaces", {"owner": "admin"})]
    first, second = (s.json() for s in mock.seen)
    assert any(t["function"]["name"] == "bmcp_coder_coder_list_workspaces" for t in first["tools"])
    assistant, tool_msg = second["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "bmcp_coder_coder_list_workspaces"
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert "dd711d5c" in tool_msg["content"]

    if stream:
        assert all("bmcp_" not in c.model_dump_json() for c in result)
        assert len({c.id for c in result}) == 1  # one completion id across rounds
        text = "".join(c.choices[0].delta.content or "" for c in result if c.choices)
        finishes = [c.choices[0].finish_reason for c in result if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert all(c.usage is None for c in result)  # the client did not ask for usage
    else:
        assert "bmcp_" not in result.model_dump_json()
        text = result.choices[0].message.content
        assert result.choices[0].finish_reason == "stop" and result.usage.completion_tokens == 39 + 52
    assert "workspace" in text.lower()

    (ic,) = mgw.interceptions(name)
    assert ic["status"] == "completed"
    assert usages(mgw, ic["id"]) == [(275, 52, 4352), (4410, 39, 0)]
    assert_injected_tool_recorded(mgw, ic["id"], mcp_server, "bmcp_coder_coder_list_workspaces", {"owner": "admin"})


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_openai_responses_injected_tool_loop(mgw, mock, muser, mcp_server, stream):
    name, token = muser
    cap = capture(f"openai/responses/{'streaming' if stream else 'blocking'}/single_injected_tool.txtar")
    mock.script(Reply.from_capture(cap, stream), Reply.from_capture(cap, stream, "/tool-call"))
    result = responses_call(openai_client(mgw, token), cap.request, stream)

    tool, args = (("coder_list_templates", {}) if stream else
                  ("coder_template_version_parameters", {"template_version_id": "5c2f1e0a-7b3d-4e9a-9f1c-2d8b6a4e0c17"}))
    assert [c[0] for c in mcp_server.calls] == [tool]
    second = mock.seen[1].json()
    outputs = [i for i in second["input"] if i.get("type") == "function_call_output"]
    assert len(outputs) == 1 and outputs[0]["output"]
    if stream:
        assert all("bmcp_" not in e.model_dump_json() for e in result)
        assert [e.type for e in result].count("response.created") == 1 and result[-1].type == "response.completed"
        seqs = [e.sequence_number for e in result]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        final = result[-1].response
    else:
        final = result
    assert "bmcp_" not in final.model_dump_json() and final.output_text

    (ic,) = mgw.interceptions(name)
    assert ic["status"] == "completed"
    assert len(usages(mgw, ic["id"])) == 2
    (t,) = [r for r in db_rows(mgw, "aibridge_tool_usages", ic["id"]) if r["injected"]]
    assert t["tool"] == f"bmcp_coder_{tool}" and t["server_url"] == mcp_server.url
    if args:
        assert json.loads(t["input"]) == args


def test_failing_tool_is_an_error_result_and_recorded(mgw, mock, muser, mcp_server):
    name, token = muser
    cap = capture("openai/responses/streaming/single_injected_tool_error.txtar")
    mock.script(Reply.from_capture(cap, True), Reply.from_capture(cap, True, "/tool-call"))
    responses_call(openai_client(mgw, token), cap.request, True)
    assert [c[0] for c in mcp_server.calls] == ["coder_create_workspace_build"]
    output = [i for i in mock.seen[1].json()["input"] if i.get("type") == "function_call_output"][0]["output"]
    assert "not found" in output
    (ic,) = mgw.interceptions(name)
    assert ic["status"] == "completed"
    (t,) = [r for r in db_rows(mgw, "aibridge_tool_usages", ic["id"]) if r["injected"]]
    assert "not found" in t["invocation_error"]


def test_unreachable_server_is_left_out_and_clients_tools_untouched(mgw, mock, muser):
    _, token = muser
    cap = capture("openai/chatcompletions/single_builtin_tool.txtar")
    mock.script(Reply.from_capture(cap, False))
    result = chat_call(openai_client(mgw, token), cap.request, False)
    # A client-defined tool call goes back to the client, never run by the gateway.
    assert result.choices[0].message.tool_calls[0].function.name == "read_file"
    names = [t["function"]["name"] for t in mock.seen[0].json()["tools"]]
    assert names[0] == "read_file" and not any(n.startswith("bmcp_down_") for n in names)
    assert any(n.startswith("bmcp_coder_") for n in names)
    assert "MCP server down" in mgw.log()


def _anthropic_tool_use(tool: str, args: dict, msg_id: str) -> Reply:
    return Reply.json({
        "id": msg_id, "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
        "content": [{"type": "tool_use", "id": f"toolu_{msg_id}", "name": tool, "input": args}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
    })


def _anthropic_text(text: str, msg_id: str) -> Reply:
    return Reply.json({
        "id": msg_id, "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
    })


def test_round_limit_stops_the_loop(tmp_path, upstream, mcp_server):
    upstream.reset()
    mcp_server.calls.clear()
    gw = mcp_gateway(tmp_path / "limit", upstream, mcp_server, max_rounds=2)
    try:
        token = gw.new_user("looper")
        upstream.script(*[_anthropic_tool_use("bmcp_coder_coder_list_templates", {}, f"msg_{i}") for i in range(3)])
        msg = anthropic_call(anthropic_client(gw, token), {"model": "claude-sonnet-4-0", "max_tokens": 50,
                                                          "messages": [{"role": "user", "content": "loop"}]}, False)
        assert len(upstream.seen) == 2 and len(mcp_server.calls) == 1
        assert "stopped after 2 tool rounds" in msg.content[-1].text and "bmcp_" not in msg.model_dump_json()
        (ic,) = gw.interceptions("looper")
        assert len(usages(gw, ic["id"])) == 2
        tools = db_rows(gw, "aibridge_tool_usages", ic["id"])
        errors = sorted(t["invocation_error"] or "" for t in tools)
        assert errors[0] == "" and "limit" in errors[1]  # one ran, the last one was not run
    finally:
        gw.stop()
        upstream.reset()


def test_other_flows_keep_flowing_while_a_loop_waits_on_a_slow_tool(mgw, mock, muser, mcp_server):
    name, token = muser
    client = anthropic_client(mgw, token)
    mock.script(_anthropic_tool_use("bmcp_coder_slow_tool", {"seconds": 3}, "msg_slow"))
    with cf.ThreadPoolExecutor(6) as pool:
        slow = pool.submit(anthropic_call, client, {"model": "claude-sonnet-4-0", "max_tokens": 50,
                                                    "messages": [{"role": "user", "content": "slow"}]}, False)
        deadline = time.time() + 10
        while not mcp_server.calls and time.time() < deadline:
            time.sleep(0.02)
        assert mcp_server.calls == [("slow_tool", {"seconds": 3.0})]
        mock.script(*[_anthropic_text(f"fast {i}", f"msg_fast{i}") for i in range(5)],
                    _anthropic_text("slow done", "msg_slow2"))
        fast = [pool.submit(anthropic_call, client, {"model": "claude-sonnet-4-0", "max_tokens": 10,
                                                     "messages": [{"role": "user", "content": f"fast {i}"}]}, False)
                for i in range(5)]
        done, _ = cf.wait(fast, timeout=20)
        assert len(done) == 5 and not slow.done()  # all answered while the slow tool still ran
        assert slow.result(timeout=20).content[-1].text == "slow done"


@pytest.mark.parametrize(
    "allow,deny,expected",
    [
        (None, None, {"a_gist", "create_gist", "list"}),
        ("(.+_gist.*)", None, {"a_gist", "create_gist"}),
        ("(.+_gist.*)", "(create_gist)", {"a_gist"}),  # deny wins
        (None, "(create_gist)", {"a_gist", "list"}),  # only deny: all but denied
    ],
)
def test_allow_and_deny_regexes(allow, deny, expected):
    import re

    server = McpServer("s", "http://x", allow=re.compile(allow) if allow else None,
                       deny=re.compile(deny) if deny else None)
    assert {t for t in ("a_gist", "create_gist", "list") if server.permits(t)} == expected


def test_mixed_injected_and_client_calls_go_to_the_client(mgw, mock, muser, mcp_server):
    """A response calling both kinds of tool ends the turn: the client's call is answered by the client, the
    injected one is not run (recorded as such); the model can call it again in the next turn."""
    name, token = muser
    mock.script(Reply.json({
        "id": "msg_mixed", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
        "content": [
            {"type": "text", "text": "Doing both."},
            {"type": "tool_use", "id": "toolu_inj", "name": "bmcp_coder_coder_list_templates", "input": {}},
            {"type": "tool_use", "id": "toolu_cli", "name": "Read", "input": {"file_path": "/etc/hosts"}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 8, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
    }))
    msg = anthropic_call(anthropic_client(mgw, token), {
        "model": "claude-sonnet-4-0", "max_tokens": 50, "messages": [{"role": "user", "content": "both"}],
        "tools": [{"name": "Read", "description": "read", "input_schema": {"type": "object"}}]}, False)
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[1].name == "Read"
    assert msg.stop_reason == "tool_use" and len(mock.seen) == 1 and mcp_server.calls == []
    (ic,) = mgw.interceptions(name)
    tools = {t["tool"]: t for t in db_rows(mgw, "aibridge_tool_usages", ic["id"])}
    assert tools["Read"]["injected"] is False
    assert tools["bmcp_coder_coder_list_templates"]["injected"] is True
    assert "client tools" in tools["bmcp_coder_coder_list_templates"]["invocation_error"]


def test_per_user_token_servers_only_for_users_with_a_token(tmp_path, upstream, mcp_server):
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    upstream.reset()
    gw = Gateway(tmp_path / "peruser", upstream.url, env={"AIBRIDGE_SECRET_KEY": key}, extra={
        "mcp_servers": [{"name": "gh", "url": mcp_server.url, "per_user_token": True}]}).start()
    try:
        with_token, without = gw.new_user("has-token"), gw.new_user("no-token")
        r = gw.cli("mcp-token", "set", "--user", "has-token", "--server", "gh", input="ghp_secret_value_123\n",
                   env={"AIBRIDGE_SECRET_KEY": key})
        assert r.returncode == 0, r.stderr
        refused = gw.cli("mcp-token", "set", "--user", "no-token", "--server", "nope", input="x\n")
        assert refused.returncode == 1 and "unknown MCP server" in refused.stderr
        stored = gw.sql("SELECT ciphertext, hint FROM aibridge_mcp_tokens")
        assert len(stored) == 1 and "ghp_secret_value_123" not in stored[0]["ciphertext"]
        for token in (with_token, without):
            upstream.script(_anthropic_text("ok", "msg_t"))
            anthropic_call(anthropic_client(gw, token), {"model": "claude-sonnet-4-0", "max_tokens": 5,
                                                        "messages": [{"role": "user", "content": "hi"}]}, False)
        tools_seen = [[t["name"] for t in s.json().get("tools", [])] for s in upstream.seen]
        assert any(n.startswith("bmcp_gh_") for n in tools_seen[0]) and tools_seen[1] == []
    finally:
        gw.stop()
        upstream.reset()


def test_mcp_token_refused_without_an_encryption_key(tmp_path, upstream):
    gw = Gateway(tmp_path / "nokey", upstream.url, extra={"mcp_servers": [{"name": "gh", "url": "http://127.0.0.1:9/mcp"}]})
    import os
    import subprocess

    from tests.support.gateway import BIN

    env = {k: v for k, v in os.environ.items() if k != "AIBRIDGE_SECRET_KEY"}
    env["AIBRIDGE_CONFIG"] = str(gw.config_path)
    subprocess.run([str(BIN / "aibridge"), "users", "add", "zed"], env=env, check=True, capture_output=True)
    r = subprocess.run([str(BIN / "aibridge"), "mcp-token", "set", "--user", "zed", "--server", "gh"],
                       input="tok\n", env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "refusing to store" in r.stderr


def _anthropic_stream(msg_id: str, text: str, tool: tuple[str, dict] | None, out_tokens: int) -> Reply:
    from tests.support.mock_upstream import Reply as R

    def ev(name, obj):
        return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()

    events = [
        ev("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    if tool:
        events += [
            ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": f"toolu_{msg_id}", "name": tool[0], "input": {}}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(tool[1])}}),
            ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ]
    events += [
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use" if tool else "end_turn",
                                                               "stop_sequence": None}, "usage": {"output_tokens": out_tokens}}),
        ev("message_stop", {"type": "message_stop"}),
    ]
    return R.sse(events)


def test_loop_streams_first_round_text_before_the_tool_finishes(mgw, mock, muser, mcp_server):
    name, token = muser
    mock.script(_anthropic_stream("msg_r1", "Checking…", ("bmcp_coder_slow_tool", {"seconds": 2}), 7),
                _anthropic_stream("msg_r2", "Done.", None, 3))
    client = anthropic_client(mgw, token)
    arrivals = []
    t0 = time.monotonic()
    for e in client.messages.create(model="claude-sonnet-4-0", max_tokens=50, stream=True,
                                    messages=[{"role": "user", "content": "wait"}]):
        if e.type == "content_block_delta":
            arrivals.append((time.monotonic() - t0, e.delta.text))
    assert [t for _, t in arrivals] == ["Checking…", "Done."]
    assert arrivals[1][0] - arrivals[0][0] > 1.5  # round 1 text was not held back while the tool ran
    (ic,) = mgw.interceptions(name)
    assert usages(mgw, ic["id"]) == [(20, 3, 0), (20, 7, 0)]


@pytest.mark.parametrize("api", ["anthropic", "chat", "responses"])
def test_loop_stream_is_completed_when_the_client_hangs_up_after_the_final_event(mgw, mock, muser, api):
    """With central tools injected, the loop writes the stream: a client that reads the final event and hangs up
    at once (llm, aider) leaves a completed interception, not a failed one."""
    from tests.support.wire import FINAL_MARKERS, PATHS, api_request, request_body, stream_reply

    name, token = muser
    mock.script(stream_reply(api, tail_delay=0.5))
    got = api_request(mgw.port, PATHS[api], token, request_body(api), read_until=FINAL_MARKERS[api])
    assert FINAL_MARKERS[api] in got
    assert "bmcp_coder" in json.dumps(mock.seen[0].json())  # the loop ran this request
    (ic,) = mgw.interceptions(name)
    assert ic["status"] == "completed" and ic["error"] is None
    assert usages(mgw, ic["id"]) == [(12, 7, 0)]


def test_a_client_leaving_the_tool_loop_mid_stream_gets_its_round_recorded_and_no_new_round(mgw, mock, muser,
                                                                                              mcp_server):
    """The client leaves during round 1, whose model calls an injected tool: the round is read to its end and
    recorded with its usage, but the tool is not run and no round 2 is sent (nobody would read it)."""
    from tests.support.wire import api_request

    name, token = muser
    first = _anthropic_stream("msg_r1", "Checking…", ("bmcp_coder_slow_tool", {"seconds": 0}), 7)
    first.delay = 0.2
    mock.script(first, _anthropic_stream("msg_r2", "Done.", None, 3))
    body = {"model": "claude-sonnet-4-0", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "wait"}]}
    got = api_request(mgw.port, "/anthropic/v1/messages", token, body, read_until="Checking".encode())
    assert b"Checking" in got and b"message_stop" not in got
    (ic,) = mgw.interceptions(name)
    assert ic["status"] == "completed" and ic["error"] is None
    assert json.loads(ic["metadata"])["client_disconnected"] is True
    assert usages(mgw, ic["id"]) == [(20, 7, 0)]
    assert_injected_tool_recorded(mgw, ic["id"], mcp_server, "bmcp_coder_slow_tool", {"seconds": 0},
                                  error="the client went away")
    assert mcp_server.calls == [] and len(mock.seen) == 1


def test_a_tool_loop_still_running_when_the_shutdown_grace_runs_out_ends_with_the_api_error_event(
        tmp_path, upstream, mcp_server):
    import signal
    import threading

    import anthropic

    upstream.reset()
    gw = Gateway(tmp_path / "gw", upstream.url, extra={
        "mcp_servers": [{"name": "coder", "url": mcp_server.url}], "mcp": {"tool_timeout_seconds": 30},
        "timeouts": {"shutdown_grace_seconds": 2}}).start()
    try:
        token = gw.new_user("loopstop")
        upstream.script(_anthropic_stream("msg_r1", "Checking…", ("bmcp_coder_slow_tool", {"seconds": 8}), 7),
                        _anthropic_stream("msg_r2", "Done.", None, 3))
        events, errors = [], []

        def call():
            try:
                for e in anthropic_client(gw, token).messages.create(
                        model="claude-sonnet-4-0", max_tokens=50, stream=True,
                        messages=[{"role": "user", "content": "wait"}]):
                    events.append(e.type)
            except Exception as e:
                errors.append(e)

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 10
        while "content_block_delta" not in events:  # round 1 streamed; the loop waits on the 8 s tool
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.02)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(10) == 0
        thread.join(10)
    finally:
        gw.stop()
        upstream.reset()
    assert isinstance(errors[0], anthropic.APIStatusError) and "gateway shut down" in errors[0].message
    (row,) = gw.sql("SELECT status, error FROM aibridge_interceptions")
    assert row == {"status": "failed", "error": "gateway shut down"}
    assert "Traceback" not in gw.log()


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_a_tool_rule_refuses_an_injected_call_before_it_runs_and_gates_the_clients(tmp_path, upstream, mcp_server,
                                                                                  stream):
    """Injected MCP calls are put to the tool rules before the gateway runs them: a refused one is not run and the
    model reads the refusal as the tool's (error) result; the decision is recorded with `injected` facts."""
    rules = [{"name": "no-workspace-listing", "hook": "tool", "action": "deny", "message": "not today",
              "when": 'tool.injected && tool.name.endsWith("list_workspaces")'}]
    gw = Gateway(tmp_path / "mcp-policy", upstream.url, extra={
        "mcp_servers": [{"name": "coder", "url": mcp_server.url}], "mcp": {"tool_timeout_seconds": 5},
        "policies": {"rules": rules}}).start()
    try:
        upstream.reset()
        mcp_server.calls.clear()
        token = gw.new_user("pol")
        cap = capture("anthropic/single_injected_tool.txtar")
        upstream.script(Reply.from_capture(cap, stream), Reply.from_capture(cap, stream, "/tool-call"))
        anthropic_call(anthropic_client(gw, token), cap.request, stream)
        assert mcp_server.calls == []  # never run
        second = upstream.seen[1].json()
        result_block = second["messages"][-1]["content"][0]
        assert result_block["type"] == "tool_result" and result_block.get("is_error") is True
        assert "aibridge policy no-workspace-listing: not today" in json.dumps(result_block["content"])
        (ic,) = gw.interceptions("pol")
        d, = gw.wait_for(f"SELECT * FROM aibridge_policy_decisions WHERE interception_id = '{ic['id']}'")
        assert (d["hook"], d["action"], d["tool"]) == ("tool", "deny", "bmcp_coder_coder_list_workspaces")
    finally:
        gw.stop()
        upstream.reset()


def test_a_tool_rule_gates_the_clients_calls_in_an_injected_tool_loop(tmp_path, upstream, mcp_server):
    rules = [{"name": "no-hosts", "hook": "tool", "action": "deny", "message": "not that file",
              "when": 'tool.name == "Read" && has(tool.input.file_path) && tool.input.file_path == "/etc/hosts"'}]
    gw = Gateway(tmp_path / "mcp-gate", upstream.url, extra={
        "mcp_servers": [{"name": "coder", "url": mcp_server.url}], "policies": {"rules": rules}}).start()
    try:
        upstream.reset()
        token = gw.new_user("gate")
        upstream.script(Reply.json({
            "id": "msg_c", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
            "content": [{"type": "text", "text": "Reading."},
                        {"type": "tool_use", "id": "toolu_cli", "name": "Read", "input": {"file_path": "/etc/hosts"}}],
            "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 8}}))
        msg = anthropic_call(anthropic_client(gw, token), {
            "model": "claude-sonnet-4-0", "max_tokens": 50, "messages": [{"role": "user", "content": "read"}],
            "tools": [{"name": "Read", "description": "read", "input_schema": {"type": "object"}}]}, False)
        assert [b.type for b in msg.content] == ["text", "text"] and msg.stop_reason == "end_turn"
        assert msg.content[1].text == "aibridge policy no-hosts: not that file"
        (ic,) = gw.interceptions("gate")
        assert [t["tool"] for t in db_rows(gw, "aibridge_tool_usages", ic["id"])] == ["Read"]  # as the model said
    finally:
        gw.stop()
        upstream.reset()
