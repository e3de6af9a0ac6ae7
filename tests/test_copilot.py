"""GitHub Copilot through /copilot: each user's own GitHub token goes upstream, the gateway token only names the
user, and the calls are recorded (byok) with the existing wire APIs — Chat Completions, Responses, Messages."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, chat_call

GITHUB_TOKEN = "ghu_user0wnC0pilotT0ken0123456789abcdef"
COPILOT_HEADERS = {"Editor-Version": "vscode/1.99.0", "Copilot-Integration-Id": "vscode-chat"}


@pytest.fixture
def cgw(own_gateway, upstream):
    gw = own_gateway("copilot", providers=[{"name": "copilot", "type": "copilot", "base_url": upstream.url}])
    gw.token = gw.new_user("cop")
    return gw


def test_chat_goes_upstream_with_the_users_github_token_and_is_attributed(cgw, upstream):
    cap = capture("openai/chatcompletions/simple.txtar")
    upstream.script(Reply.from_capture(cap, True))
    client = openai.OpenAI(base_url=cgw.url + "/copilot", api_key=GITHUB_TOKEN, max_retries=0,
                           default_headers={"X-AIBridge-Token": cgw.token, **COPILOT_HEADERS})
    chat_call(client, cap.request, True)
    seen = upstream.seen[-1]
    assert seen.path == "/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
    assert seen.headers["editor-version"] == "vscode/1.99.0" and seen.headers["copilot-integration-id"] == "vscode-chat"
    assert "x-aibridge-token" not in seen.headers
    ic, = cgw.interceptions("cop")
    assert (ic["provider"], ic["api"], ic["credential_kind"], ic["client"], ic["status"]) == (
        "copilot", "openai.chat", "byok", "GitHub Copilot (VS Code)", "completed")
    assert ic["credential_hint"] == "ghu_…cdef"


def test_messages_through_copilot_use_the_anthropic_wire_api(cgw, upstream):
    cap = capture("anthropic/simple.txtar")
    upstream.script(Reply.from_capture(cap, False))
    client = anthropic.Anthropic(base_url=cgw.url + "/copilot", auth_token=GITHUB_TOKEN, max_retries=0,
                                 default_headers={"X-AIBridge-Token": cgw.token, **COPILOT_HEADERS})
    anthropic_call(client, cap.request, False)
    assert upstream.seen[-1].path == "/v1/messages"
    assert upstream.seen[-1].headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
    ic, = cgw.interceptions("cop")
    assert (ic["api"], ic["credential_kind"]) == ("anthropic.messages", "byok")


def test_without_the_users_own_token_copilot_calls_are_refused(cgw, upstream):
    cap = capture("openai/chatcompletions/simple.txtar")
    client = openai.OpenAI(base_url=cgw.url + "/copilot", api_key=cgw.token, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        chat_call(client, cap.request, False)
    assert "own credential" in e.value.message
    assert upstream.seen == []
