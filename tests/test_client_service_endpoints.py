"""Claude Code's non-model endpoints on the Anthropic API host (telemetry, bootstrap, feature flags, MCP directory
listings, connectivity checks), decided one by one (docs/clients-endpoints.md): on the central key the gateway answers
them itself and nothing goes upstream; with the user's own credential they are relayed with it, unrecorded; a
connectivity check is answered to anyone; an endpoint nobody reviewed stays refused on the central key."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.tls import client_context

LOGIN = "sk-ant-oat01-usersOwnClaudeLogin0123456789abcdefXYZ"  # a Claude subscription login (Claude Code's OAuth)

# (method, path, what the gateway answers on the central key)
ANSWERED = [
    ("GET", "/api/claude_cli/bootstrap?feature=x", {}),
    ("GET", "/api/claude_code_penguin_mode", {"enabled": False, "disabled_reason": "org_level_disabled"}),
    ("GET", "/api/claude_code/organizations/metrics_enabled", {"metrics_logging_enabled": False}),
    ("POST", "/api/event_logging/v2/batch", {}),
    ("POST", "/api/eval/sdk-zAZezfDKGoZuXXKe", {"features": {}}),
    ("GET", "/mcp-registry/v0/servers?version=latest&limit=100", {"servers": [], "metadata": {}}),
    ("GET", "/api/directory/servers?limit=500", {"servers": []}),
    ("GET", "/api/directory/server-urls", {}),
]


@pytest.fixture(scope="module")
def sgw(tmp_path_factory, tls_upstream):
    gw = Gateway(tmp_path_factory.mktemp("service-gw"), tls_upstream.url, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": tls_upstream.url + "/", "key": UPSTREAM_ANTHROPIC_KEY,
         "hosts": ["api.anthropic.com"]}], args=["--set", f"ssl_verify_upstream_trusted_ca={tls_upstream.ca}"]).start()
    yield gw
    gw.stop()


@pytest.fixture
def up(up):
    """The module's stand-in (conftest), answering every request it gets as the provider would."""
    up.default = Reply.json({"from": "anthropic"})
    return up


def proxied(gw: Gateway, user: str, token: str) -> httpx.Client:
    """Claude Code in proxy mode: the gateway token as proxy credentials."""
    host = gw.url.split("://")[1]
    return httpx.Client(proxy=f"http://{user}:{token}@{host}", verify=client_context(gw.ca), trust_env=False,
                        base_url="https://api.anthropic.com", timeout=20)


def send(client: httpx.Client, method: str, path: str, headers: dict) -> httpx.Response:
    body = {"events": [{"event_type": "tengu_started"}]} if method == "POST" else None
    return client.request(method, path, json=body, headers={"user-agent": "claude-cli/2.1.197 (external, cli)",
                                                             **headers})


@pytest.mark.parametrize(("method", "path", "answer"), ANSWERED, ids=[p.split("?")[0] for _, p, _ in ANSWERED])
def test_on_the_central_key_the_gateway_answers_and_nothing_goes_upstream(sgw, up, method, path, answer):
    token = sgw.new_user(user := f"svc-{abs(hash(path)) % 10**8}")
    with proxied(sgw, user, token) as c:
        r = send(c, method, path, {"x-api-key": token})
    assert (r.status_code, r.json()) == (200, answer), r.text
    assert up.seen == []  # neither the central key nor the user's telemetry left the gateway


@pytest.mark.parametrize(("method", "path", "answer"), ANSWERED, ids=[p.split("?")[0] for _, p, _ in ANSWERED])
def test_with_the_users_own_login_they_are_relayed_with_it(sgw, up, method, path, answer):
    token = sgw.new_user(user := f"own-{abs(hash(path)) % 10**8}")
    with proxied(sgw, user, token) as c:
        r = send(c, method, path, {"authorization": f"Bearer {LOGIN}", "anthropic-beta": "oauth-2025-04-20"})
    assert (r.status_code, r.json()) == (200, {"from": "anthropic"}), r.text
    (seen,) = up.seen
    assert (seen.method, seen.path) == (method, path)
    assert seen.headers["authorization"] == f"Bearer {LOGIN}"
    assert UPSTREAM_ANTHROPIC_KEY not in json.dumps(seen.headers) and token not in json.dumps(seen.headers)
    assert sgw.sql(f"SELECT i.id FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
                   f"WHERE u.name = '{user}'") == []  # relayed unrecorded, like the read-only endpoints


@pytest.mark.parametrize("path", ["/anthropic", "/anthropic/", "/anthropic/api/hello"])
def test_connectivity_check_in_base_url_mode_is_answered_without_a_key(sgw, up, path):
    r = httpx.head(sgw.url + path, trust_env=False, headers={"user-agent": "claude-cli/2.1.197 (external, cli)"})
    assert r.status_code == 200
    assert up.seen == []


def test_an_endpoint_nobody_reviewed_stays_refused_on_the_central_key(sgw, up):
    token = sgw.new_user("svc-unreviewed")
    with proxied(sgw, "svc-unreviewed", token) as c:
        r = send(c, "POST", "/api/claude_code_shared_session_transcripts", {"x-api-key": token})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert up.seen == []
