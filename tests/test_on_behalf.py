"""Attribution on behalf of a person: a service account (Coder Agents, a bot) names the user it acts for
(X-Coder-Owner-Id, or X-AIBridge-On-Behalf-Of, by user id or name). The record keeps both the caller and the
person, reports group by either, and budgets charge the person. From anyone else the claim is ignored."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.mock_upstream import Reply
from tests.support.wire import anthropic_message, api_request, body_of, status_of

BODY = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
AGENTS = [(b"user-agent", b"coder-agents/v2.24.0 (linux/amd64)"), (b"x-coder-chat-id", b"chat-7")]


@pytest.fixture
def ogw(own_gateway):
    gw = own_gateway("obo", extra={"budgets": {"users": {"alice": {"requests_per_minute": 2}}}})
    r = gw.cli("users", "add", "agents", "--service-account")
    assert r.returncode == 0 and "service account" in r.stdout, r.stderr
    gw.agents = gw.op("tokens.create", user="agents", name="coder")["token"]
    gw.alice = gw.new_user("alice")
    gw.alice_id = next(u["id"] for u in gw.sql("SELECT CAST(id AS VARCHAR) AS id, name FROM aibridge_users")
                       if u["name"] == "alice")
    gw.bob = gw.new_user("bob")
    return gw


def call(gw, token, extra=()):
    return api_request(gw.port, "/anthropic/v1/messages", token, BODY, extra=[*AGENTS, *extra])


def rows(gw, n):
    return gw.wait_for("SELECT i.*, u.name AS caller FROM aibridge_interceptions i JOIN aibridge_users u "
                       "ON u.id = i.initiator_id WHERE status <> 'in_progress' ORDER BY started_at",
                       lambda r: len(r) >= n)


def test_a_service_account_acts_for_the_owner_by_id_or_name(ogw, upstream):
    upstream.default = Reply.json(anthropic_message())
    assert status_of(call(ogw, ogw.agents, [(b"x-coder-owner-id", ogw.alice_id.encode())])) == 200
    assert status_of(call(ogw, ogw.agents, [(b"x-aibridge-on-behalf-of", b"alice")])) == 200
    assert status_of(call(ogw, ogw.agents)) == 200  # on its own account
    first, second, own = rows(ogw, 3)
    for r in (first, second):
        assert (r["caller"], r["on_behalf_of_name"], str(r["on_behalf_of_id"])) == ("agents", "alice", ogw.alice_id)
        assert r["client"] == "Coder Agents" and r["client_session_id"] == "chat-7"
    assert own["on_behalf_of_name"] is None
    assert json.loads(first["metadata"])["client"]["coder_owner_id"] == ogw.alice_id
    assert all("x-aibridge-on-behalf-of" not in s.headers for s in upstream.seen)

    usage = ogw.cli("usage", "--by", "person", "--json")
    assert usage.returncode == 0, usage.stderr
    assert {r["person"]: r["interceptions"] for r in json.loads(usage.stdout)} == {"alice": 2, "agents": 1}
    # Alice (a member) sees the calls made for her; an API filter selects by the person acted for.
    mine = httpx.get(f"{ogw.url}/aibridge/api/v1/interceptions", trust_env=False,
                     headers={"authorization": f"Bearer {ogw.alice}"}).json()["data"]
    assert sorted(r["on_behalf_of"] for r in mine) == ["alice", "alice"]
    for_alice = httpx.get(f"{ogw.url}/aibridge/api/v1/usage", params={"group_by": "on_behalf_of"}, trust_env=False,
                          headers={"authorization": f"Bearer {ogw.alice}"}).json()["data"]
    assert [(r["on_behalf_of"], r["interceptions"]) for r in for_alice] == [("alice", 2)]


def test_the_person_acted_for_is_charged_by_budgets(ogw, upstream):
    upstream.default = Reply.json(anthropic_message())
    owner = [(b"x-coder-owner-id", ogw.alice_id.encode())]
    assert [status_of(call(ogw, ogw.agents, owner)) for _ in range(2)] == [200, 200]
    refused = call(ogw, ogw.agents, owner)
    assert status_of(refused) == 429 and b"alice" in body_of(refused)
    assert status_of(call(ogw, ogw.agents)) == 200  # the service account's own budget is untouched


def test_other_users_cannot_claim_to_act_for_someone(ogw, upstream):
    upstream.default = Reply.json(anthropic_message())
    assert status_of(call(ogw, ogw.bob, [(b"x-aibridge-on-behalf-of", b"alice")])) == 200
    assert status_of(call(ogw, ogw.agents, [(b"x-aibridge-on-behalf-of", b"nobody-here")])) == 200
    bob_row, unknown_row = rows(ogw, 2)
    assert (bob_row["caller"], bob_row["on_behalf_of_name"]) == ("bob", None)
    assert (unknown_row["caller"], unknown_row["on_behalf_of_name"]) == ("agents", None)
    log = ogw.log()
    assert "x-aibridge-on-behalf-of from user bob ignored: not a service account" in log
    assert "acts for unknown user nobody-here" in log
