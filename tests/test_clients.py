"""Client recognition and session ids from each client's real headers (from its source, or seen by running it
against the gateway), with the reference gateway's names; Coder Agents' context kept in the record."""

from __future__ import annotations

import json

import pytest
from aibridge_gw.flow.clients import UNKNOWN, client_metadata, detect_client, detect_session

SID = "0b6c7d1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e"

CASES = [
    # (what the client sends, client, session)
    ({"user-agent": "claude-cli/2.1.197 (external, sdk-cli)", "x-claude-code-session-id": SID}, "Claude Code", SID),
    ({"user-agent": "codex_exec/0.169.0 (Ubuntu 24.4.0; x86_64) dumb (codex-exec; 0.169.0)", "originator": "codex_exec",
      "session_id": SID}, "Codex", SID),
    ({"user-agent": "codex_cli_rs/0.87.0 (Mac OS 26.2.0; arm64) ghostty/1.3.0", "originator": "codex_cli_rs"}, "Codex", None),
    ({"user-agent": "opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14", "x-session-id": "ses_3f9a"},
     "OpenCode", "ses_3f9a"),
    ({"user-agent": "kilo/latest/7.7.7/cli ai-sdk/provider-utils/4.0.27 runtime/bun/1.3.14",
      "x-session-id": "ses_dd134dc4"}, "Kilo Code", "ses_dd134dc4"),
    ({"user-agent": "kilo-code/5.1.0 (darwin 25.2.0; arm64) node/22.21.1", "x-kilocode-taskid": "task-77"}, "Kilo Code",
     "task-77"),
    ({"originator": "kilo-code"}, "Kilo Code", None),
    ({"user-agent": "roo-code/3.45.0 (darwin 25.2.0; arm64) node/22.21.1", "session_id": SID}, "Roo Code", None),
    ({"user-agent": "Cline/3.0.58", "x-title": "Cline", "http-referer": "https://cline.bot", "x-task-id": "t-1"},
     "Cline", "t-1"),
    ({"user-agent": "GitHubCopilotChat/0.37.2026011603", "x-interaction-id": "int-9", "vscode-sessionid": "window-1"},
     "GitHub Copilot (VS Code)", "int-9"),
    ({"user-agent": "copilot/0.0.403 (client/cli linux v24.11.1)", "x-client-session-id": "cli-5"},
     "GitHub Copilot (CLI)", "cli-5"),
    ({"user-agent": "coder-agents/v2.24.0 (linux/amd64)", "x-coder-chat-id": "chat-1", "x-coder-owner-id": "u-1"},
     "Coder Agents", "chat-1"),
    ({"user-agent": "Charm Crush/0.1.11"}, "Charm Crush", None),
    ({"user-agent": "Charm-Crush/0.2.0 (https://charm.land/crush)"}, "Charm Crush", None),
    ({"user-agent": "connect-es/1.6.1", "x-cursor-client-version": "0.50.0"}, "Cursor", None),
    ({"user-agent": "mux/0.19.0 ai-sdk/openai/3.0.36 runtime/node.js/22", "x-mux-workspace-id": "ws-2"}, "Mux", "ws-2"),
    ({"user-agent": "Zed/0.219.4+stable.119.abc123 (macos; aarch64)", "session_id": SID}, "Zed", None),
    ({"user-agent": "GeminiCLI-tui/0.61.0/gemini-2.5-flash (linux; x64; terminal)"}, "Gemini CLI", None),
    ({"user-agent": "QwenCode/0.2.1 (linux; x64)"}, "Qwen Code", None),
    ({"user-agent": "QwenCode/0.15.10 (linux; x64)", "x-stainless-lang": "js"}, "Qwen Code", None),
    # Continue's `cn` (Anthropic: `node-fetch`; OpenAI: its SDK's `…/JS`) and the Cline CLI (the AI SDK's agent, as
    # any AI SDK program on bun sends it) say nothing of their own: named by the X-Title their guides configure.
    ({"user-agent": "node-fetch", "x-title": "Continue"}, "Continue", None),
    ({"user-agent": "ls/JS 5.23.2", "x-stainless-lang": "js", "x-title": "Continue"}, "Continue", None),
    ({"user-agent": "node-fetch"}, UNKNOWN, None),
    ({"user-agent": "ai-sdk/openai-compatible/3.0.37 ai-sdk/provider-utils/5.0.30 runtime/bun/1.3.13",
      "x-title": "Cline"}, "Cline", None),
    ({"user-agent": "ai-sdk/openai-compatible/3.0.37 ai-sdk/provider-utils/5.0.30 runtime/bun/1.3.13"}, UNKNOWN, None),
    ({"user-agent": "factory-cli/0.22.3"}, "Factory Droid", None),
    ({"user-agent": "Junie:SNAPSHOT"}, "Junie", None),
    ({"user-agent": "ccclaude-cli/calude-with-wrong-prefix"}, UNKNOWN, None),
    ({"user-agent": "python-httpx/0.28", "x-session-id": "generic-1"}, UNKNOWN, "generic-1"),
    ({}, UNKNOWN, None),
]


@pytest.mark.parametrize(("headers", "client", "session"), CASES,
                         ids=[f"{c}-{n}" for n, (_, c, _) in enumerate(CASES)])
def test_client_and_session_from_real_headers(headers, client, session):
    assert detect_client(headers) == client
    assert detect_session(client, headers, None) == session


def test_claude_code_session_falls_back_to_the_body_and_others_do_not():
    assert detect_session("Claude Code", {"user-agent": "claude-cli/2.0.67"}, SID) == SID
    assert detect_session("Zed", {"user-agent": "Zed/0.219.4"}, SID) is None


def test_coder_agents_context_is_kept():
    headers = {"x-coder-owner-id": "2f1c", "x-coder-chat-id": "chat-1", "x-coder-subchat-id": "sub-3",
               "x-coder-workspace-id": "ws-4", "user-agent": "coder-agents/v2.24.0"}
    assert client_metadata(headers) == {"coder_owner_id": "2f1c", "coder_chat_id": "chat-1",
                                        "coder_subchat_id": "sub-3", "coder_workspace_id": "ws-4"}


def test_the_record_names_the_client_its_session_and_coder_context(gateway, mock, user):
    from tests.support.mock_upstream import Reply
    from tests.support.wire import anthropic_message, api_request, status_of

    name, token = user
    mock.script(Reply.json(anthropic_message()))
    raw = api_request(gateway.port, "/anthropic/v1/messages", token,
                      {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                      extra=[(b"user-agent", b"coder-agents/v2.24.0 (linux/amd64)"), (b"x-coder-chat-id", b"chat-1"),
                             (b"x-coder-subchat-id", b"sub-3"), (b"x-coder-workspace-id", b"ws-4")])
    assert status_of(raw) == 200
    ic, = gateway.interceptions(name)
    assert (ic["client"], ic["client_session_id"], ic["user_agent"]) == (
        "Coder Agents", "chat-1", "coder-agents/v2.24.0 (linux/amd64)")
    assert json.loads(ic["metadata"])["client"] == {"coder_chat_id": "chat-1", "coder_subchat_id": "sub-3",
                                                    "coder_workspace_id": "ws-4"}
