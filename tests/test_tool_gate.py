"""The tool gate through a real gateway: a `hook: tool` rule refuses a model's tool call before the client sees it,
in each wire API, streamed and blocking; the client's SDK reads the refusal and a clean end of turn; the audit keeps
what the provider said (the call, the usage) and the decision."""

from __future__ import annotations

import json

import pytest
from google import genai
from google.genai import types

from tests.support.gateway import wire_api_providers as providers
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client, openai_client
from tests.test_toolgate import chat_parallel, gemini_stream, responses_parallel, sse

RULE = {"name": "no-destructive-shell", "hook": "tool", "action": "deny",
        "message": "destructive shell commands are not allowed here",
        "when": 'tool.name in ["Bash", "run_shell"] && ((has(tool.input.command) && '
                'tool.input.command.contains("rm -rf")) || (has(tool.input.cmd) && tool.input.cmd.contains("rm -rf")))'}
REFUSAL = "aibridge policy no-destructive-shell: destructive shell commands are not allowed here"


@pytest.fixture
def tgw(own_gateway, upstream):
    gw = own_gateway("toolgate", providers=providers(upstream.url), extra={"policies": {"rules": [RULE]}})
    gw.token = gw.new_user("agent")
    return gw


def anthropic_tool_stream(command: str) -> list[bytes]:
    msg = {"id": "msg_gate", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
           "stop_reason": None, "usage": {"input_tokens": 30, "output_tokens": 1}}
    args = json.dumps({"command": command})
    return [
        sse({"type": "message_start", "message": msg}, "message_start"),
        sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start"),
        sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Cleaning up."}},
            "content_block_delta"),
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": "toolu_gate1", "name": "Bash", "input": {}}},
            "content_block_start"),
        sse({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": args[:9]}},
            "content_block_delta"),
        sse({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": args[9:]}},
            "content_block_delta"),
        sse({"type": "content_block_stop", "index": 1}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
             "usage": {"output_tokens": 25}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]


def anthropic_tool_message(command: str) -> dict:
    return {"id": "msg_gate", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 30, "output_tokens": 25},
            "content": [{"type": "text", "text": "Cleaning up."},
                        {"type": "tool_use", "id": "toolu_gate1", "name": "Bash", "input": {"command": command}}]}


def audit(gw, user: str = "agent") -> tuple[dict, list[dict], list[dict], list[dict]]:
    ic, = gw.interceptions(user)
    tools = gw.sql(f"SELECT * FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}'")
    usage = gw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    decided = gw.wait_for(f"SELECT * FROM aibridge_policy_decisions WHERE interception_id = '{ic['id']}'")
    return ic, tools, usage, decided


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_a_destructive_call_is_replaced_by_the_refusal_and_the_turn_ends(tgw, upstream, stream):
    upstream.script(Reply.sse(anthropic_tool_stream("rm -rf ./victim")) if stream
                    else Reply.json(anthropic_tool_message("rm -rf ./victim")))
    client = anthropic_client(tgw, tgw.token)
    ask = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "clean up"}],
           "tools": [{"name": "Bash", "input_schema": {"type": "object"}}]}
    if stream:
        with client.messages.stream(**ask) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**ask)
    assert [b.type for b in message.content] == ["text", "text"]
    assert message.content[1].text == REFUSAL and message.stop_reason == "end_turn"
    ic, tools, usage, decided = audit(tgw)
    assert ic["status"] == "completed"
    assert [(t["tool"], json.loads(t["input"])) for t in tools] == [("Bash", {"command": "rm -rf ./victim"})]
    assert (usage[0]["input_tokens"], usage[0]["output_tokens"]) == (30, 25)  # the provider's usage stays
    d, = decided
    assert (d["rule"], d["hook"], d["action"], d["enforced"], d["tool"], d["tool_call_id"]) == (
        "no-destructive-shell", "tool", "deny", True, "Bash", "toolu_gate1")


def test_anthropic_an_allowed_call_reaches_the_client_unchanged(tgw, upstream):
    upstream.script(Reply.sse(anthropic_tool_stream("ls -la")))
    client = anthropic_client(tgw, tgw.token)
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                messages=[{"role": "user", "content": "look"}]) as s:
        message = s.get_final_message()
    assert message.stop_reason == "tool_use" and message.content[1].input == {"command": "ls -la"}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_the_refused_call_becomes_text_and_the_other_call_goes_through(tgw, upstream, stream):
    if stream:
        upstream.script(Reply.sse(chat_parallel()))
    else:
        upstream.script(Reply.json({
            "id": "chatcmpl-g", "object": "chat.completion", "created": 1, "model": "gpt-4.1",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Checking both.", "tool_calls": [
                    {"id": "call_Shell1", "type": "function",
                     "function": {"name": "run_shell", "arguments": "{\"cmd\": \"rm -rf /\"}"}},
                    {"id": "call_Read2", "type": "function",
                     "function": {"name": "read_file", "arguments": "{\"path\": \"a.txt\"}"}}]}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}}))
    oc = openai_client(tgw, tgw.token)
    ask = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "go"}]}
    if stream:
        with oc.chat.completions.stream(**ask) as s:
            done = s.get_final_completion()
    else:
        done = oc.chat.completions.create(**ask)
    msg = done.choices[0].message
    assert [c.function.name for c in msg.tool_calls] == ["read_file"]
    assert REFUSAL in msg.content
    ic, tools, usage, decided = audit(tgw)
    assert sorted(t["tool"] for t in tools) == ["read_file", "run_shell"]  # the provider's calls, recorded
    assert usage[0]["input_tokens"] == 50
    assert {(d["tool"], d["action"]) for d in decided} == {("run_shell", "deny")}


def test_responses_stream_the_refused_call_is_a_message_in_its_place(tgw, upstream):
    upstream.script(Reply.sse(responses_parallel()))
    oc = openai_client(tgw, tgw.token)
    with oc.responses.stream(model="gpt-5", input="go") as s:
        final = s.get_final_response()
    kinds = [(o.type, getattr(o, "name", None)) for o in final.output]
    assert kinds == [("message", None), ("message", None), ("function_call", "read_file")]
    assert final.output[1].content[0].text == REFUSAL
    _, tools, usage, decided = audit(tgw)
    assert len(tools) == 2 and usage[0]["output_tokens"] == 30 and decided[0]["tool"] == "run_shell"


def test_gemini_stream_the_refused_call_is_a_text_part(tgw, upstream):
    upstream.script(Reply.sse(gemini_stream()))
    gc = genai.Client(api_key=tgw.token, http_options=types.HttpOptions(
        base_url=tgw.url + "/gemini", retry_options=types.HttpRetryOptions(attempts=1)))
    parts = [p for c in gc.models.generate_content_stream(model="gemini-2.5-flash", contents="go")
             for p in c.candidates[0].content.parts]
    assert [p.function_call.name for p in parts if p.function_call] == ["read_file"]
    assert any((p.text or "").strip() == REFUSAL for p in parts)
    _, tools, _, decided = audit(tgw)
    assert len(tools) == 2 and decided[0]["tool"] == "run_shell"


def test_a_monitored_tool_rule_records_and_refuses_nothing(own_gateway, upstream):
    gw = own_gateway("toolmon", providers=providers(upstream.url),
                     extra={"policies": {"mode": "monitor", "rules": [RULE]}})
    gw.new_user("watched")
    token = gw.new_user("w2")
    upstream.script(Reply.sse(anthropic_tool_stream("rm -rf ./victim")))
    with anthropic_client(gw, token).messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                                    messages=[{"role": "user", "content": "x"}]) as s:
        message = s.get_final_message()
    assert message.stop_reason == "tool_use" and message.content[1].name == "Bash"
    _, _, _, decided = audit(gw, "w2")
    assert [(d["action"], d["enforced"]) for d in decided] == [("deny", False)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_captured_gated_flow_replays_to_what_the_provider_said(own_gateway, upstream, tmp_path, stream):
    """The flow archive holds what the client got (the refusal); the provider's answer as recorded goes with it,
    so `aibridge replay` rebuilds the same tool call and usage rows as the live run."""
    flows = tmp_path / "flows"
    gw = own_gateway("gate-replay", providers=providers(upstream.url),
                     extra={"policies": {"rules": [RULE]}, "capture": {"directory": str(flows)}})
    token = gw.new_user("agent")
    upstream.script(Reply.sse(anthropic_tool_stream("rm -rf ./victim")) if stream
                    else Reply.json(anthropic_tool_message("rm -rf ./victim")))
    client = anthropic_client(gw, token)
    ask = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "clean up"}]}
    if stream:
        with client.messages.stream(**ask) as s:
            s.get_final_message()
    else:
        client.messages.create(**ask)
    ic, tools, usage, _ = audit(gw)
    gw.stop()
    rebuilt = tmp_path / "rebuilt.duckdb"
    r = gw.cli("replay", *map(str, sorted(flows.glob("*.flows"))), "--db", str(rebuilt))
    assert r.returncode == 0, r.stderr
    import duckdb

    with duckdb.connect(str(rebuilt), read_only=True) as db:
        again = db.execute("SELECT tool, input FROM aibridge_tool_usages WHERE interception_id = ?", [ic["id"]]).fetchall()
        tokens = db.execute("SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = ?",
                            [ic["id"]]).fetchall()
    assert again == [(t["tool"], t["input"]) for t in tools] and tokens == [(30, 25)]
