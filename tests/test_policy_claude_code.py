"""Issue #24's acceptance with a real client: Claude Code, unmodified, whose model (the stand-in) asks to run `Bash`
with `rm -rf ./victim`. Through a gateway with a `hook: tool` deny rule the call never reaches Claude Code: the
directory survives, Claude Code prints the refusal and the audit holds the decision, the call and the usage. Through
a gateway without the rule the same answer is relayed as it came, and Claude Code really runs the command. Also: the
refusal stays in Claude Code's conversation (the model reads it on the next turn), and a harmless call the model asks
for next to the refused one still runs.

The stand-in answers Claude Code's main model request (the one offering it the Bash tool) with the tool call, and,
once the conversation carries the call's result, with a short closing text; every other request (side calls, token
counts, listings) gets what the real-client tests answer (tests/support/clients.py `answer`)."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests.support.clients import USAGE, answer, npm_bin
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply, Seen
from tests.support.tls import tls_stand_in
from tests.support.wire import _sse, anthropic_stream
from tests.test_real_clients import Run

pytestmark = pytest.mark.timeout(300)
UPSTREAM_KEY = "sk-upstream-claude-gate-0123456789"
COMMAND = "rm -rf ./victim"
RULE = {"name": "no-destructive-shell", "hook": "tool", "action": "deny",
        "message": "destructive shell commands are not allowed here",
        "when": 'tool.name == "Bash" && has(tool.input.command) && tool.input.command.contains("rm -rf")'}
REFUSAL = "aibridge policy no-destructive-shell: destructive shell commands are not allowed here"
DONE = "The victim directory is dealt with."
MARK = "touch ./marker"  # a harmless command the model may ask for next to the destructive one
TOOL_USAGE = (41, 17)  # the tool-call answer's usage, recorded as the provider gave it


def bash_call_stream(call_id: str, also: str | None = None) -> list[bytes]:
    """An Anthropic stream as a model sends it: a sentence, then the Bash call with its arguments in pieces (and
    with `also`, a second Bash call running that command)."""
    args = json.dumps({"command": COMMAND, "description": "Remove the victim directory"})
    second = [] if also is None else [
        _sse({"type": "content_block_start", "index": 2,
              "content_block": {"type": "tool_use", "id": call_id + "2", "name": "Bash", "input": {}}},
             "content_block_start"),
        _sse({"type": "content_block_delta", "index": 2, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps({"command": also, "description": "Mark it"})}},
             "content_block_delta"),
        _sse({"type": "content_block_stop", "index": 2}, "content_block_stop"),
    ]
    start = {"id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant",
             "model": "claude-sonnet-4-5", "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": TOOL_USAGE[0], "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                       "output_tokens": 1}}
    return [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
             "content_block_start"),
        _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Removing it now."}},
             "content_block_delta"),
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse({"type": "content_block_start", "index": 1,
              "content_block": {"type": "tool_use", "id": call_id, "name": "Bash", "input": {}}},
             "content_block_start"),
        _sse({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
             "content_block_delta"),
        _sse({"type": "content_block_delta", "index": 1,
              "delta": {"type": "input_json_delta", "partial_json": args[:14]}}, "content_block_delta"),
        _sse({"type": "content_block_delta", "index": 1,
              "delta": {"type": "input_json_delta", "partial_json": args[14:]}}, "content_block_delta"),
        _sse({"type": "content_block_stop", "index": 1}, "content_block_stop"),
        *second,
        _sse({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
              "usage": {"output_tokens": TOOL_USAGE[1]}}, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop"),
    ]


def main_request(seen: Seen) -> dict | None:
    """The body of Claude Code's main model request (streamed, offering the Bash tool); None for anything else."""
    if seen.method != "POST" or not seen.path.split("?")[0].endswith("/v1/messages"):
        return None
    try:
        body = json.loads(seen.body or b"{}")
    except ValueError:
        return None
    tools = body.get("tools") if isinstance(body, dict) else None
    if body.get("stream") is True and any(isinstance(t, dict) and t.get("name") == "Bash" for t in tools or []):
        return body
    return None


def model(seen: Seen) -> Reply | None:
    """The stand-in model: the first main request of a conversation gets the Bash call; a later one (carrying the
    call's result, or a later turn) the closing text; anything else the real-client tests' answer."""
    body = main_request(seen)
    if body is None:
        return answer(seen)
    if any(m.get("role") == "assistant" for m in body.get("messages") or [] if isinstance(m, dict)):
        return Reply.sse(anthropic_stream(DONE, USAGE))
    also = MARK if MARK in json.dumps(body["messages"]) else None  # the prompt asks for a second command
    return Reply.sse(bash_call_stream(f"toolu_{uuid.uuid4().hex[:24]}", also))


def conversation(stand_in, run: Run) -> list[dict]:
    """The main requests of this run's conversation the stand-in received, in order."""
    bodies = [main_request(s) for s in list(stand_in.seen)]
    return [b for b in bodies if b is not None and run.prompt in json.dumps(b)]


def blocks(body: dict, role: str, kind: str) -> list[dict]:
    return [b for m in body["messages"] if m.get("role") == role and isinstance(m.get("content"), list)
            for b in m["content"] if b.get("type") == kind]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    mock = tls_stand_in(tmp_path_factory.mktemp("claude-gate-tls"), ["127.0.0.1"])
    mock.check = model
    mock.default = Reply.json({"object": "list", "data": []})
    yield mock
    mock.stop()


def gateway(tmp_path_factory, stand_in, name: str, policies: dict | None) -> Gateway:
    url = stand_in.url
    return Gateway(tmp_path_factory.mktemp(name), url, extra={"policies": policies} if policies else None, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": url + "/", "key": UPSTREAM_KEY,
         "hosts": ["api.anthropic.com"]},
    ], args=["--set", f"ssl_verify_upstream_trusted_ca={stand_in.ca}"])


@pytest.fixture(scope="module")
def gated(tmp_path_factory, stand_in):
    gw = gateway(tmp_path_factory, stand_in, "claude-gated", {"rules": [RULE]}).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def open_gw(tmp_path_factory, stand_in):
    gw = gateway(tmp_path_factory, stand_in, "claude-open", None).start()
    yield gw
    gw.stop()


def claude(run: Run, *argv: str) -> subprocess.CompletedProcess:
    """Claude Code in print mode, allowed to run Bash without asking (as root it refuses
    --dangerously-skip-permissions)."""
    exe = npm_bin("@anthropic-ai/claude-code", "claude", postinstall="install.cjs")
    extra = {"ANTHROPIC_BASE_URL": run.gw.url + "/anthropic"} if run.mode == "base-url" else {}
    return run.run([exe, "-p", *argv, "--allowedTools", "Bash"], run.env(ANTHROPIC_API_KEY=run.token, **extra),
                   timeout=180)


def run_claude(gw: Gateway, tmp_path, mode: str, also: str = "") -> tuple[Run, subprocess.CompletedProcess]:
    """Claude Code told to remove ./victim (and `also`), in a work directory that holds it."""
    npm_bin("@anthropic-ai/claude-code", "claude", postinstall="install.cjs")  # skip before making a user
    run = Run(gw, tmp_path, "claude-gate", mode)
    victim = run.work / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me\n")
    run.prompt = f"Remove the victim directory for {run.user}{also}"
    return run, claude(run, run.prompt)


MODES = ["base-url", "proxy"]


@pytest.mark.parametrize("mode", MODES)
def test_with_the_rule_the_victim_survives_and_claude_code_prints_the_refusal(gated, stand_in, tmp_path, mode):
    run, r = run_claude(gated, tmp_path, mode)
    assert (run.work / "victim" / "precious.txt").read_text() == "keep me\n", r.stdout + r.stderr
    assert r.returncode == 0 and r.stdout.strip() == REFUSAL, r.stdout + r.stderr
    assert len(conversation(stand_in, run)) == 1  # the refusal ended the turn: nothing ran, no result went back
    # The audit: the call as the provider sent it, its usage, and the decision naming the rule, the tool and the call.
    ic, = run.rows()
    assert (ic["client"], ic["status"], ic["credential_kind"]) == ("Claude Code", "completed", "centralized"), ic
    assert run.prompt in ic["prompt"]
    tools = gated.sql(f"SELECT * FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}'")
    assert [(t["tool"], json.loads(t["input"])["command"], t["injected"]) for t in tools] == [("Bash", COMMAND, False)]
    usage = gated.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage] == [TOOL_USAGE]
    decided = gated.wait_for(f"SELECT * FROM aibridge_policy_decisions WHERE interception_id = '{ic['id']}'")
    assert [(d["rule"], d["hook"], d["action"], d["enforced"], d["tool"], d["tool_call_id"]) for d in decided] == [
        ("no-destructive-shell", "tool", "deny", True, "Bash", tools[0]["provider_tool_call_id"])]
    assert decided[0]["message"] == RULE["message"]
    if mode == "proxy":
        return
    # The next turn: Claude Code kept the refusal in its conversation, so the model reads why nothing happened.
    r2 = claude(run, "--continue", "Did it work?")
    assert r2.returncode == 0 and r2.stdout.strip() == DONE, r2.stdout + r2.stderr
    _, later = conversation(stand_in, run)
    assert REFUSAL in json.dumps(blocks(later, "assistant", "text"))
    assert blocks(later, "assistant", "tool_use") == [] and blocks(later, "user", "tool_result") == []
    assert (run.work / "victim").exists()


@pytest.mark.parametrize("mode", MODES)
def test_without_the_rule_claude_code_runs_the_command(open_gw, stand_in, tmp_path, mode):
    run, r = run_claude(open_gw, tmp_path, mode)
    assert not (run.work / "victim").exists(), r.stdout + r.stderr
    assert r.returncode == 0 and r.stdout.strip() == DONE, r.stdout + r.stderr
    _, answered = conversation(stand_in, run)  # the call went out, Claude Code ran it and sent back its result
    call, = blocks(answered, "assistant", "tool_use")
    assert (call["name"], call["input"]["command"]) == ("Bash", COMMAND)
    result, = blocks(answered, "user", "tool_result")
    assert result["tool_use_id"] == call["id"] and not result.get("is_error"), result
    ic = open_gw.interceptions(run.user, 2)[0]
    tools = open_gw.sql(f"SELECT * FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}'")
    assert [(t["tool"], t["provider_tool_call_id"]) for t in tools] == [("Bash", call["id"])]
    assert open_gw.sql("SELECT * FROM aibridge_policy_decisions") == []


def test_a_refused_call_next_to_an_allowed_one(gated, stand_in, tmp_path):
    """The model asks for the destructive command and a harmless one in one answer: Claude Code runs only the
    harmless one, and the model reads the refusal in place of the other when it gets the result."""
    run, r = run_claude(gated, tmp_path, "base-url", also=f" and then run {MARK}")
    assert (run.work / "victim" / "precious.txt").exists() and (run.work / "marker").exists(), r.stdout + r.stderr
    assert r.returncode == 0 and r.stdout.strip() == DONE, r.stdout + r.stderr
    _, answered = conversation(stand_in, run)
    assert [b["text"] for b in blocks(answered, "assistant", "text")] == ["Removing it now.", REFUSAL]
    call, = blocks(answered, "assistant", "tool_use")
    result, = blocks(answered, "user", "tool_result")
    assert call["input"]["command"] == MARK and result["tool_use_id"] == call["id"]
    ic = gated.interceptions(run.user, 2)[0]
    decided = gated.wait_for(f"SELECT * FROM aibridge_policy_decisions WHERE interception_id = '{ic['id']}'")
    assert [(d["tool"], d["action"]) for d in decided] == [("Bash", "deny")]
