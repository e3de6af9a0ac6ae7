"""Issue #25's real-client acceptance: Claude Code and Codex CLI, unmodified and configured the way `aibridge env`
prints it, list the central tools through the MCP gateway and call one.

The stand-in model (the provider behind the gateway) answers each client's main model request that offers the
central tool `coder__coder_list_workspaces` (under whatever name the client gives it) with a call of it; once the
conversation carries the tool's result, it answers with a closing text. The MCP server the gateway aggregates is a
real one (the `mcp` package's FastMCP); the audit holds the call with the client's name and version."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support.clients import USAGE, answer, npm_bin
from tests.support.gateway import Gateway
from tests.support.mcp_server import McpTestServer
from tests.support.mock_upstream import Reply, Seen
from tests.support.tls import tls_stand_in
from tests.support.wire import _sse, anthropic_stream
from tests.test_real_clients import Run

pytestmark = pytest.mark.timeout(400)
UPSTREAM_KEY = "sk-upstream-mcp-clients-0123456789"
TOOL = "coder__coder_list_workspaces"  # as the gateway names it; each client adds its own prefix
WORKSPACE = "dd711d5c-83c6-4c08-a0af-b73055906e8c"  # what the tool answers
DONE = "The workspaces are listed."


def offered(body: dict) -> tuple[str, str | None] | None:
    """The name (and Responses namespace) under which a model request offers the central tool, if it does."""
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "namespace":  # Codex: each MCP server's tools in a namespace of their own
            for sub in t.get("tools") or []:
                if isinstance(sub, dict) and str(sub.get("name", "")).endswith(TOOL):
                    return sub["name"], t.get("name")
        name = t.get("name") or (t.get("function") or {}).get("name")
        if isinstance(name, str) and name.endswith(TOOL):
            return name, None
    return None


def owner_of(body: dict) -> str:
    """The user named in the prompt (`List the workspaces of <user>`)."""
    text = json.dumps(body)
    return text.split("List the workspaces of ", 1)[1].split('"', 1)[0].split("\\", 1)[0].strip(". ")


def answered(body: dict) -> bool:
    """The conversation already carries a tool's result (Anthropic tool_result, Responses function_call_output)."""
    return '"tool_result"' in json.dumps(body.get("messages") or []) or \
        '"function_call_output"' in json.dumps(body.get("input") or [])


def anthropic_tool_use(name: str, owner: str) -> list[bytes]:
    start = {"id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": USAGE[0], "output_tokens": 1}}
    call = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": {}}
    return [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": call}, "content_block_start"),
        _sse({"type": "content_block_delta", "index": 0, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps({"owner": owner})}}, "content_block_delta"),
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
              "usage": {"output_tokens": USAGE[1]}}, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop"),
    ]


def responses_function_call(name: str, namespace: str | None, owner: str) -> list[bytes]:
    resp = {"id": f"resp_{uuid.uuid4().hex[:12]}", "object": "response", "created_at": 1763900000,
            "status": "in_progress", "model": "gpt-5", "output": [], "usage": None}
    item = {"id": f"fc_{uuid.uuid4().hex[:12]}", "type": "function_call", "status": "completed",
            "call_id": f"call_{uuid.uuid4().hex[:12]}", "name": name, "arguments": json.dumps({"owner": owner}),
            **({"namespace": namespace} if namespace else {})}
    done = {**resp, "status": "completed", "output": [item], "usage": {
        "input_tokens": USAGE[0], "input_tokens_details": {"cached_tokens": 0}, "output_tokens": USAGE[1],
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": sum(USAGE)}}
    return [
        _sse({"type": "response.created", "sequence_number": 0, "response": resp}, "response.created"),
        _sse({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
              "item": {**item, "status": "in_progress", "arguments": ""}}, "response.output_item.added"),
        _sse({"type": "response.function_call_arguments.delta", "sequence_number": 2, "item_id": item["id"],
              "output_index": 0, "delta": item["arguments"]}, "response.function_call_arguments.delta"),
        _sse({"type": "response.function_call_arguments.done", "sequence_number": 3, "item_id": item["id"],
              "output_index": 0, "arguments": item["arguments"]}, "response.function_call_arguments.done"),
        _sse({"type": "response.output_item.done", "sequence_number": 4, "output_index": 0, "item": item},
             "response.output_item.done"),
        _sse({"type": "response.completed", "sequence_number": 5, "response": done}, "response.completed"),
    ]


def model(seen: Seen) -> Reply | None:
    """The stand-in model: a request offering the central tool gets a call of it (or, once its result is in the
    conversation, the closing text); anything else the real-client tests' answer."""
    path = seen.path.split("?")[0]
    try:
        body = json.loads(seen.body or b"{}")
    except ValueError:
        body = {}
    found = offered(body) if seen.method == "POST" and isinstance(body, dict) else None
    if found is None or "List the workspaces of" not in json.dumps(body):
        return answer(seen)
    if path.endswith("/v1/messages"):
        if answered(body):
            return Reply.sse(anthropic_stream(DONE, USAGE))
        return Reply.sse(anthropic_tool_use(found[0], owner_of(body)))
    if path.endswith("/responses"):
        if answered(body):
            from tests.support.wire import responses_stream

            return Reply.sse(responses_stream(DONE, USAGE))
        return Reply.sse(responses_function_call(*found, owner_of(body)))
    return answer(seen)


@pytest.fixture(scope="module")
def coder():
    s = McpTestServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    mock = tls_stand_in(tmp_path_factory.mktemp("mcp-clients-tls"), ["127.0.0.1"])
    mock.check = model
    mock.default = Reply.json({"object": "list", "data": []})
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def cgw(tmp_path_factory, stand_in, coder):
    url = stand_in.url
    gw = Gateway(tmp_path_factory.mktemp("mcp-clients-gw"), url, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": url + "/", "key": UPSTREAM_KEY},
        {"name": "openai", "type": "openai", "base_url": url + "/v1/", "key": UPSTREAM_KEY},
    ], extra={"mcp_servers": [{"name": "coder", "url": coder.url, "tool_deny_regex": "^create_gist$"}]},
        args=["--set", f"ssl_verify_upstream_trusted_ca={stand_in.ca}"]).start()
    yield gw
    gw.stop()


def tool_results(stand_in, run: Run) -> list[str]:
    """The tool results the client sent back to the model in this run's conversation."""
    out = []
    for s in list(stand_in.seen):
        if run.user not in (s.body or b"").decode(errors="replace"):
            continue
        body = json.loads(s.body)
        for m in body.get("messages") or []:
            for b in m.get("content") if isinstance(m.get("content"), list) else []:
                if b.get("type") == "tool_result":
                    out.append(json.dumps(b.get("content")))
        for item in body.get("input") or []:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                out.append(json.dumps(item.get("output")))
    return out


def recorded(gw: Gateway, user: str) -> dict:
    (row,) = gw.wait_for(f"SELECT * FROM aibridge_mcp_calls WHERE user_name = '{user}'")
    return row


def test_claude_code_lists_and_calls_a_central_tool(cgw, stand_in, coder, tmp_path):
    exe = npm_bin("@anthropic-ai/claude-code", "claude", postinstall="install.cjs")
    run = Run(cgw, tmp_path, "claude-mcp", "base-url")
    env = run.env(ANTHROPIC_API_KEY=run.token, ANTHROPIC_BASE_URL=cgw.url + "/anthropic")
    # Exactly what `aibridge env claude-code` prints for the MCP gateway.
    added = run.run([exe, "mcp", "add", "--transport", "http", "--scope", "user", "aibridge",
                     cgw.url + "/aibridge/mcp", "--header", f"Authorization: Bearer {run.token}"], env)
    assert added.returncode == 0, added.stdout + added.stderr
    listed = run.run([exe, "mcp", "list"], env, timeout=120)
    assert "aibridge" in listed.stdout and "Connected" in listed.stdout, listed.stdout + listed.stderr
    coder.calls.clear()
    run.prompt = f"List the workspaces of {run.user}"
    r = run.run([exe, "-p", run.prompt, "--allowedTools", "mcp__aibridge"], env, timeout=240)
    assert r.returncode == 0 and DONE in r.stdout, r.stdout + r.stderr
    assert coder.calls == [("coder_list_workspaces", {"owner": run.user})]
    assert any(WORKSPACE in t for t in tool_results(stand_in, run))
    row = recorded(cgw, run.user)
    assert (row["server"], row["tool"], row["outcome"], row["is_error"]) == (
        "coder", "coder_list_workspaces", "ok", False)
    assert row["client"] == "claude-code" and row["client_version"], row
    assert json.loads(row["arguments"]) == {"owner": run.user}


def test_codex_cli_lists_and_calls_a_central_tool(cgw, stand_in, coder, tmp_path):
    exe = npm_bin("@openai/codex", "codex")
    run = Run(cgw, tmp_path, "codex-mcp", "base-url")
    codex_home = run.home / ".codex"
    codex_home.mkdir(parents=True)
    # What `aibridge env codex` prints (the model through the gateway and the MCP gateway, one token for both),
    # with its commented line taken: `codex exec` runs without asking, so the central tools are pre-approved.
    (codex_home / "config.toml").write_text(
        'model_provider = "aibridge"\nmodel = "gpt-5"\n\n[model_providers.aibridge]\nname = "aibridge"\n'
        f'base_url = "{cgw.url}/openai/v1"\nenv_key = "AIBRIDGE_TOKEN"\nwire_api = "responses"\n\n'
        f'[mcp_servers.aibridge]\nurl = "{cgw.url}/aibridge/mcp"\nbearer_token_env_var = "AIBRIDGE_TOKEN"\n'
        'default_tools_approval_mode = "approve"\n')
    env = run.env(AIBRIDGE_TOKEN=run.token, CODEX_HOME=str(codex_home))
    coder.calls.clear()
    run.prompt = f"List the workspaces of {run.user}"
    r = run.run([exe, "exec", "--skip-git-repo-check", run.prompt], env, timeout=240)
    assert DONE in r.stdout, r.stdout + r.stderr
    assert coder.calls == [("coder_list_workspaces", {"owner": run.user})]
    assert any(WORKSPACE in t for t in tool_results(stand_in, run))
    row = recorded(cgw, run.user)
    assert (row["server"], row["tool"], row["outcome"]) == ("coder", "coder_list_workspaces", "ok")
    assert row["client"] and "codex" in row["client"].lower(), row
