"""Gateway tokens: required, checked, revocable at once; never sent upstream."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client, chat_call, openai_client


def _anthropic(gateway, token):
    return anthropic_client(gateway, token).messages.create(
        model="claude-sonnet-4-0", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )


@pytest.mark.parametrize("token", ["", "aib_not-a-real-token"], ids=["missing", "unknown"])
def test_anthropic_without_valid_token_gets_401_in_anthropic_format(gateway, mock, token):
    if token:
        with pytest.raises(anthropic.AuthenticationError) as e:
            _anthropic(gateway, token)
        assert e.value.body["error"]["type"] == "authentication_error"
    else:
        r = httpx.post(gateway.url + "/anthropic/v1/messages", json={"model": "m", "messages": []}, trust_env=False)
        assert r.status_code == 401 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "authentication_error"
    assert mock.seen == []


def test_openai_with_unknown_token_gets_401_in_openai_format(gateway, mock):
    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(gateway, "aib_unknown").chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.code == "invalid_api_key"
    assert mock.seen == []


def test_passthrough_paths_also_require_a_token(gateway, mock):
    with pytest.raises(openai.AuthenticationError):
        openai_client(gateway, "aib_unknown").models.list()
    assert mock.seen == []


def test_token_accepted_in_each_credential_header(gateway, mock, user):
    _, token = user
    cap = capture("openai/chatcompletions/simple.txtar")
    for headers in ({"authorization": f"Bearer {token}"}, {"x-api-key": token}, {"api-key": token}):
        mock.script(Reply.from_capture(cap, False))
        r = httpx.post(gateway.url + "/openai/v1/chat/completions", json=cap.request, headers=headers,
                       trust_env=False)
        assert r.status_code == 200, headers
        seen = mock.seen[-1].headers
        assert "x-api-key" not in seen and "api-key" not in seen
        assert token not in seen["authorization"]


def test_revoked_token_is_refused_within_a_second(gateway, mock, user):
    name, token = user
    cap = capture("anthropic/simple.txtar")
    mock.script(Reply.from_capture(cap, False))
    _anthropic(gateway, token)
    tid = gateway.op("tokens.list", user=name)["rows"][0][0]
    r = gateway.cli("tokens", "revoke", tid)
    assert r.returncode == 0, r.stderr
    revoked_at = time.monotonic()
    while True:
        try:
            mock.script(Reply.from_capture(cap, False))
            _anthropic(gateway, token)
        except anthropic.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 1.0, "revoked token still accepted after 1 s"
        time.sleep(0.05)


def test_token_created_while_running_works_immediately(gateway, mock):
    assert gateway.cli("users", "add", "late-joiner").returncode == 0
    r = gateway.cli("tokens", "create", "--user", "late-joiner")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    mock.script(Reply.from_capture(capture("openai/chatcompletions/simple.txtar"), True))
    chunks = chat_call(openai_client(gateway, token), capture("openai/chatcompletions/simple.txtar").request, True)
    assert chunks
