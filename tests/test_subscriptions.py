"""Subscription logins in proxy mode: Claude Code signed in with a Claude account (an OAuth bearer to
api.anthropic.com) and Codex signed in with ChatGPT (chatgpt.com/backend-api/codex/responses). With identity from
proxy credentials both are relayed with the user's own login and recorded like API-key traffic, as
credential_kind `subscription`; an admin can refuse them."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call
from tests.support.tls import client_context
from tests.test_proxy_mode import proxied_anthropic

CLAUDE_OAUTH = "sk-ant-oat01-usersOwnClaudeLogin0123456789abcdefXYZ"
CHATGPT_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.chatgpt-login-signature-0123456789"


def sub_gateway(workdir, tls_upstream, **proxy):
    providers = [
        {"name": "anthropic", "type": "anthropic", "base_url": tls_upstream.url + "/", "key": UPSTREAM_ANTHROPIC_KEY,
         "hosts": ["api.anthropic.com"]},
        {"name": "chatgpt", "type": "chatgpt", "base_url": tls_upstream.url, "hosts": ["chatgpt.com"]},
    ]
    return Gateway(workdir, tls_upstream.url, providers=providers, extra={"proxy": proxy} if proxy else None,
                   args=["--set", f"ssl_verify_upstream_trusted_ca={tls_upstream.ca}"]).start()


@pytest.fixture
def sgw(tmp_path, tls_upstream):
    tls_upstream.reset()
    gw = sub_gateway(tmp_path / "sub", tls_upstream)
    gw.token = gw.new_user("sub")
    yield gw
    gw.stop()
    tls_upstream.reset()


def codex_request(gw, bearer: str, proxy_auth: bool = True):
    host = gw.url.split("://")[1]
    proxy = f"http://sub:{gw.token}@{host}" if proxy_auth else gw.url
    cap = capture("openai/responses/streaming/simple.txtar")
    with httpx.Client(proxy=proxy, verify=client_context(gw.ca), trust_env=False) as c:
        return c.post("https://chatgpt.com/backend-api/codex/responses", json={**cap.request, "store": False},
                      headers={"authorization": f"Bearer {bearer}", "chatgpt-account-id": "acct-1",
                               "originator": "codex_cli_rs", "user-agent": "codex_cli_rs/0.169.0",
                               "session_id": "0198c0de-5e55-7000-8000-000000000001"})


def test_claude_subscription_login_is_relayed_and_recorded_as_subscription(sgw, tls_upstream):
    cap = capture("anthropic/simple.txtar")
    tls_upstream.script(Reply.from_capture(cap, True))
    client = proxied_anthropic(sgw, None, proxy_auth=("sub", sgw.token), auth_token=CLAUDE_OAUTH,
                               default_headers={"anthropic-beta": "oauth-2025-04-20"})
    events = anthropic_call(client, cap.request, True)
    assert events[-1].type == "message_stop"
    seen = tls_upstream.seen[-1]
    assert seen.headers["authorization"] == f"Bearer {CLAUDE_OAUTH}" and "x-api-key" not in seen.headers
    assert sgw.token not in json.dumps(seen.headers)
    ic, = sgw.interceptions("sub")
    assert (ic["credential_kind"], ic["credential_hint"], ic["status"]) == ("subscription", "sk-a…fXYZ", "completed")


def test_codex_chatgpt_login_is_intercepted_and_recorded_with_the_responses_codec(sgw, tls_upstream):
    cap = capture("openai/responses/streaming/simple.txtar")
    tls_upstream.script(Reply.from_capture(cap, True))
    r = codex_request(sgw, CHATGPT_TOKEN)
    assert r.status_code == 200 and "response.completed" in r.text
    seen = tls_upstream.seen[-1]
    assert seen.path == "/backend-api/codex/responses"
    assert seen.headers["authorization"] == f"Bearer {CHATGPT_TOKEN}" and seen.headers["chatgpt-account-id"] == "acct-1"
    ic, = sgw.interceptions("sub")
    assert (ic["provider"], ic["api"], ic["credential_kind"], ic["client"], ic["status"]) == (
        "chatgpt", "openai.responses", "subscription", "Codex", "completed")
    assert ic["client_session_id"] == "0198c0de-5e55-7000-8000-000000000001"
    usage = sgw.sql(f"SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert usage and usage[0]["output_tokens"] > 0


def test_chatgpt_without_a_login_or_without_proxy_credentials_is_refused(sgw, tls_upstream):
    assert codex_request(sgw, sgw.token).status_code == 401  # the gateway token alone: nothing to send upstream
    r = codex_request(sgw, CHATGPT_TOKEN, proxy_auth=False)
    assert r.status_code in (401, 407)
    assert tls_upstream.seen == []


def test_an_admin_can_refuse_subscription_logins(tmp_path, tls_upstream):
    tls_upstream.reset()
    gw = sub_gateway(tmp_path / "refuse", tls_upstream, subscriptions="refuse")
    try:
        gw.token = gw.new_user("sub")
        r = codex_request(gw, CHATGPT_TOKEN)
        assert r.status_code == 403 and "subscription logins are not allowed" in r.json()["error"]["message"]
        client = proxied_anthropic(gw, None, proxy_auth=("sub", gw.token), auth_token=CLAUDE_OAUTH)
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.create(model="claude-sonnet-4-0", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        # API-key traffic (the gateway token as the key) still works.
        tls_upstream.script(Reply.from_capture(capture("anthropic/simple.txtar"), False))
        proxied_anthropic(gw, gw.token).messages.create(model="claude-sonnet-4-0", max_tokens=5,
                                                        messages=[{"role": "user", "content": "hi"}])
        assert len(tls_upstream.seen) == 1
    finally:
        gw.stop()
        tls_upstream.reset()
