"""Groups and policy decisions on the audit side, in-process over real DuckDB files: group names, the token
directory's groups, the migrations on a database of the previous version, decisions recorded through
`Recorder.policy_decision` (once, detector types only), retention and export, the read-side reports and who sees
what, and the decisions counter on /aibridge/metrics through the addon chain. The gateway, the CLI, PostgreSQL and
the dashboard are exercised in tests/test_policy_admin.py."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import duckdb
import pytest
from aibridge_gw.addons.patches import ORIGIN
from aibridge_gw.admin import gateway_client
from aibridge_gw.flow.recorder import Recorder, decision_id
from aibridge_gw.metrics import MAX_LABELS, Metrics
from aibridge_gw.policy.auth import Actor, TokenDirectory, hash_token
from aibridge_gw.store import ops, reports, schema
from aibridge_gw.store.rows import INTERCEPTIONS
from aibridge_gw.store.writer import Store
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from tests.test_units import chain_test

NOW = dt.datetime.now(dt.UTC)


def _flow(method: str, path: str, headers: dict | None = None, body: bytes = b""):
    req = tutils.treq(method=method.encode(), host="127.0.0.1", port=8080, path=path.encode(),
                      headers=http.Headers(**(headers or {})), content=body)
    req.aibridge_form = ORIGIN  # addressed to the listener itself
    return tflow.tflow(req=req)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "audit.duckdb")
    s.open()
    yield s
    s.close()


def run(store, op, writes=False, **args):
    return store.run(op, writes, **args).result(timeout=30)


def interception(store, user_id: str | None, started_at=NOW, model="claude-sonnet-4-0") -> str:
    iid = str(uuid.uuid4())
    store.submit(INTERCEPTIONS.row(id=iid, initiator_id=user_id, provider="anthropic", provider_name="anthropic",
                                   model=model, client="Claude Code", credential_kind="centralized",
                                   status="completed", started_at=started_at, ended_at=started_at))
    return iid


def decisions(store) -> list[dict]:
    store.flush().result(timeout=30)
    r = run(store, "sql", query_text="SELECT * FROM aibridge_policy_decisions ORDER BY created_at, rule")
    return [dict(zip(r["columns"], row)) for row in r["rows"]]


# --- groups --------------------------------------------------------------------------------------------------


def test_group_names_are_lower_cased_deduplicated_and_validated():
    assert ops.group_names("Staff, ml,ML,, staff ") == ["ml", "staff"]
    assert ops.group_names(["team.a", "team_b", "9-lives"]) == ["9-lives", "team.a", "team_b"]
    assert ops.group_names("") == [] and ops.group_names([]) == [] and ops.group_names(None) == []
    for bad in ("has space", "-leading", "_leading", "semi;colon", "x" * 65, "ünïcode", "a/b", "quote'"):
        with pytest.raises(ops.OpError, match="bad group name"):
            ops.group_names([bad])
    with pytest.raises(ops.OpError, match="64 groups at most"):
        ops.group_names([f"g{n}" for n in range(65)])
    with pytest.raises(ops.OpError, match="list of names"):
        ops.group_names([1, 2])
    assert ops.group_names(["x" * 64]) == ["x" * 64]


def test_groups_are_set_replaced_and_cleared_and_the_directory_carries_them(store):
    run(store, "users.add", True, name="alice")
    run(store, "users.add", True, name="bob")
    token = run(store, "tokens.create", True, user="alice")["token"]
    r = run(store, "users.groups_set", True, name="alice", groups="staff,ML")
    assert r == {"name": "alice", "groups": ["ml", "staff"], "added": ["ml", "staff"], "removed": []}
    run(store, "users.groups_set", True, name="bob", groups=["ml"])
    r = run(store, "users.groups_set", True, name="alice", groups="ml,research")
    assert (r["groups"], r["added"], r["removed"]) == (["ml", "research"], ["research"], ["staff"])
    assert run(store, "groups.list") == {"columns": ["group", "members", "users"],
                                         "rows": [["ml", ["alice", "bob"], 2], ["research", ["alice"], 1]]}
    users = run(store, "users.list")
    by_name = {row[0]: dict(zip(users["columns"], row)) for row in users["rows"]}
    assert by_name["alice"]["groups"] == ["ml", "research"] and by_name["bob"]["groups"] == ["ml"]
    # The directory as the gateway loads it (plain values across the writer's pipe, then Actor(*row[1:])).
    rows = run(store, "directory")
    d = TokenDirectory()
    d.replace({row[0]: Actor(*row[1:]) for row in rows})
    assert d.lookup(token).groups == ("ml", "research")
    for refused, match in (({"name": "alice", "groups": "ok,Not Ok"}, "bad group name"),
                           ({"name": "nobody", "groups": "ml"}, "unknown user")):
        with pytest.raises(ops.OpError, match=match):
            run(store, "users.groups_set", True, **refused)
    assert run(store, "users.groups_set", True, name="alice", groups="")["groups"] == []  # cleared
    assert Actor(*next(r for r in run(store, "directory"))[1:]).groups == ()
    assert run(store, "groups.list")["rows"] == [["ml", ["bob"], 1]]


def test_an_actor_holds_its_groups_as_a_sorted_tuple():
    a = Actor("u1", "alice", "member", "t1", "aib_…", False, ["staff", "ml", "staff"])
    assert a.groups == ("ml", "staff") and hash(a) == hash(Actor("u1", "alice", "member", "t1", "aib_…", False,
                                                                  ("ml", "staff")))
    assert Actor("u1", "alice", "member", "t1", "aib_…").groups == ()


# --- migrations -------------------------------------------------------------------------------------------


def test_the_new_migrations_apply_to_a_database_of_the_previous_version(tmp_path, monkeypatch):
    """A store last opened by the version before groups and decisions (migration 6): the CLI's reads on it, read-only,
    still work (nothing to show); opening it for writing applies 7 and 8 and keeps every row."""
    db = tmp_path / "v6.duckdb"
    conn = duckdb.connect(str(db))
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", [x for x in schema.MIGRATIONS if x[0] <= 6])
        assert schema.migrate(conn) == [1, 2, 3, 4, 5, 6]
    ops.users_add(conn, "veteran")
    conn.execute("INSERT INTO aibridge_interceptions (id, provider, provider_name, credential_kind, status, started_at) "
                 "VALUES ('00000000-0000-4000-8000-000000000001', 'openai', 'openai', 'centralized', 'completed', now())")
    conn.close()

    assert gateway_client._local(db, "users.list", {})["rows"][0][0] == "veteran"
    assert gateway_client._local(db, "groups.list", {})["rows"] == []
    assert gateway_client._local(db, "report", {"kind": "policy_decisions", "filters": {}})["data"] == []
    assert gateway_client._local(db, "report", {"kind": "policy_summary", "filters": {}})["data"] == []

    # The first write migrates (as the gateway's start-up does).
    assert gateway_client._local(db, "users.groups_set", {"name": "veteran", "groups": "old-timers"})["groups"] == [
        "old-timers"]
    conn = duckdb.connect(str(db))
    assert [r[0] for r in conn.execute("SELECT version FROM aibridge_schema_migrations ORDER BY 1").fetchall()] == [
        v for v, *_ in schema.MIGRATIONS]
    assert conn.execute("SELECT count(*) FROM aibridge_interceptions").fetchone()[0] == 1
    assert schema.migrate(conn) == []
    cols = [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = "
                                       "'aibridge_policy_decisions' ORDER BY ordinal_position").fetchall()]
    assert {"id", "created_at", "interception_id", "rule", "policy_version", "hook", "action", "enforced",
            "detectors", "message", "tool", "tool_call_id", "user_id"} == set(cols)
    conn.close()


# --- decisions recorded -------------------------------------------------------------------------------------


def test_a_decision_is_recorded_once_with_detector_types_never_found_text(store):
    run(store, "users.add", True, name="alice")
    uid = run(store, "users.list")["rows"][0][3]
    iid = interception(store, uid)
    rec = Recorder(store)
    at = NOW - dt.timedelta(seconds=5)
    leaked = "AKIA" + "IOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    for _ in range(2):  # recorded again (a replayed flow, a retried hook): the same row, not another
        rec.policy_decision(iid, rule="no-cloud-keys", policy_version="3f2a9c", hook="request", action="deny",
                            enforced=True, detectors=["aws-key", leaked, "aws-key"],
                            message="blocked: sk-ant-api03-" + "a" * 40, user_id=uid, at=at)
    rec.policy_decision(iid, rule="shell-tools", policy_version="3f2a9c", hook="tool", action="deny", enforced=False,
                        detectors=[], message=None, user_id=uid, tool="bash", tool_call_id="toolu_01", at=at)
    rec.policy_decision(iid, rule="shell-tools", policy_version="3f2a9c", hook="tool", action="deny", enforced=False,
                        detectors=[], message=None, user_id=uid, tool="bash", tool_call_id="toolu_02", at=NOW)
    store.flush().result(timeout=30)
    rec.policy_decision(iid, rule="no-cloud-keys", policy_version="3f2a9c", hook="request", action="deny",
                        enforced=True, detectors=["aws-key"], message="again", user_id=uid, at=at)  # a later batch
    rows = decisions(store)
    assert [(r["rule"], r["hook"], r["action"], r["enforced"], r["tool"], r["tool_call_id"]) for r in rows] == [
        ("no-cloud-keys", "request", "deny", True, None, None),
        ("shell-tools", "tool", "deny", False, "bash", "toolu_01"),
        ("shell-tools", "tool", "deny", False, "bash", "toolu_02")]
    first = rows[0]
    assert json.loads(first["detectors"]) == ["aws-key"]  # the found text never reaches the store
    assert "AKIA" not in json.dumps(rows) and "a" * 40 not in first["message"]  # the message is redacted as logs are
    assert first["id"] == decision_id(iid, "no-cloud-keys", "request")
    assert (first["interception_id"], first["user_id"], first["policy_version"]) == (iid, uid, "3f2a9c")
    assert dt.datetime.fromisoformat(first["created_at"]) == at
    assert decision_id(iid, "r", "tool", "c1", "bash") != decision_id(iid, "r", "tool", "c2", "bash")
    assert decision_id(iid, "r", "request") != decision_id(iid, "r", "response")
    assert uuid.UUID(decision_id(iid, "r", "request")).version == 5


def test_retention_prunes_decisions_with_their_interception_and_export_writes_them(store, tmp_path):
    run(store, "users.add", True, name="alice")
    run(store, "users.groups_set", True, name="alice", groups="staff")
    uid = run(store, "users.list")["rows"][0][3]
    old, recent = interception(store, uid, NOW - dt.timedelta(days=90)), interception(store, uid)
    rec = Recorder(store)
    kw = dict(policy_version="v1", hook="request", action="tag", enforced=True, detectors=[], message=None,
              user_id=uid)
    rec.policy_decision(old, rule="old-call", at=NOW - dt.timedelta(days=90), **kw)
    rec.policy_decision(old, rule="old-call-recent-decision", at=NOW, **kw)  # goes with its interception
    rec.policy_decision(str(uuid.uuid4()), rule="orphan-old", at=NOW - dt.timedelta(days=61), **kw)
    rec.policy_decision(str(uuid.uuid4()), rule="orphan-recent", at=NOW, **kw)
    rec.policy_decision(recent, rule="recent-call", at=NOW, **kw)
    assert len(decisions(store)) == 5
    assert run(store, "prune", True, days=60)["deleted"] == 1
    assert sorted(r["rule"] for r in decisions(store)) == ["orphan-recent", "recent-call"]

    out = tmp_path / "export"
    files = run(store, "export", fmt="parquet", out=str(out))["files"]
    assert str(out / "aibridge_policy_decisions.parquet") in files and str(out / "aibridge_user_groups.parquet") in files
    check = duckdb.connect()
    exported = check.execute(f"SELECT rule, detectors FROM '{out / 'aibridge_policy_decisions.parquet'}' ORDER BY 1"
                             ).fetchall()
    assert [r[0] for r in exported] == ["orphan-recent", "recent-call"] and json.loads(exported[0][1]) == []
    assert check.execute(f"SELECT group_name FROM '{out / 'aibridge_user_groups.parquet'}'").fetchall() == [("staff",)]


# --- reports ----------------------------------------------------------------------------------------------


@pytest.fixture
def seeded(store):
    """alice and bob, one call each, and decisions on both: alice's denied (enforced) and tagged, a tool call of
    bob's denied in monitor mode, and a redaction two days ago."""
    ids = {}
    for name in ("alice", "bob"):
        ids[name] = run(store, "users.add", True, name=name)["id"]
    calls = {name: interception(store, ids[name]) for name in ids}
    rec = Recorder(store)
    common = dict(policy_version="v1", message=None)
    rec.policy_decision(calls["alice"], rule="no-secrets", hook="request", action="deny", enforced=True,
                        detectors=["aws-key"], user_id=ids["alice"], at=NOW - dt.timedelta(minutes=3), **common)
    rec.policy_decision(calls["alice"], rule="cost-tags", hook="request", action="tag", enforced=True, detectors=[],
                        user_id=ids["alice"], at=NOW - dt.timedelta(minutes=2), **common)
    rec.policy_decision(calls["bob"], rule="no-shell", hook="tool", action="deny", enforced=False, detectors=[],
                        user_id=ids["bob"], tool="bash", tool_call_id="call_1", at=NOW - dt.timedelta(minutes=1),
                        **common)
    rec.policy_decision(calls["bob"], rule="no-secrets", hook="response", action="redact", enforced=True,
                        detectors=["email"], user_id=ids["bob"], at=NOW - dt.timedelta(days=2), **common)
    store.flush().result(timeout=30)
    return store, ids, calls


def _q(store, route, viewer=None, filters=None, **params):
    return run(store, "admin_query", route=route, viewer=viewer, filters=filters or {}, **params)


def test_decisions_are_listed_newest_first_and_filtered(seeded):
    store, _, calls = seeded
    listed = _q(store, "policy/decisions", limit=50)["data"]
    assert [(d["rule"], d["user"]) for d in listed] == [("no-shell", "bob"), ("cost-tags", "alice"),
                                                        ("no-secrets", "alice"), ("no-secrets", "bob")]
    assert listed[2]["detectors"] == ["aws-key"] and listed[2]["model"] == "claude-sonnet-4-0"
    rules = lambda **f: [d["rule"] for d in _q(store, "policy/decisions", filters=f, limit=50)["data"]]
    assert rules(rule="no-secrets") == ["no-secrets", "no-secrets"]
    assert rules(action="deny") == ["no-shell", "no-secrets"]
    assert rules(user="alice") == ["cost-tags", "no-secrets"]
    assert rules(interception=calls["bob"]) == ["no-shell", "no-secrets"]
    assert rules(since="1d") == ["no-shell", "cost-tags", "no-secrets"]
    assert rules(hook="tool") == ["no-shell"]
    assert rules(enforced="false") == ["no-shell"]
    assert rules(enforced="true", action="deny") == ["no-secrets"]
    assert [d["rule"] for d in _q(store, "policy/decisions", limit=1)["data"]] == ["no-shell"]
    for bad in ({"since": "last tuesday"}, {"enforced": "maybe"}):
        with pytest.raises(reports.BadParameter) as e:
            _q(store, "policy/decisions", filters=bad, limit=5)
        assert e.value.name == next(iter(bad))


def test_decision_counts_per_rule_action_and_user(seeded):
    store, _, _ = seeded
    s = _q(store, "policy/decisions/summary", filters={"since": "7d"})
    assert [(r["rule"], r["action"], r["decisions"], r["enforced"], r["monitored"], r["users"]) for r in s["data"]] == [
        ("cost-tags", "tag", 1, 1, 0, 1), ("no-secrets", "deny", 1, 1, 0, 1), ("no-secrets", "redact", 1, 1, 0, 1),
        ("no-shell", "deny", 1, 0, 1, 1)]
    assert s["by_user"] == [{"user": "alice", "decisions": 2, "enforced": 2, "actions": {"deny": 1, "tag": 1}},
                            {"user": "bob", "decisions": 2, "enforced": 1, "actions": {"deny": 1, "redact": 1}}]
    recent = _q(store, "policy/decisions/summary", filters={"since": "1d", "rule": "no-secrets"})
    assert [(r["rule"], r["action"]) for r in recent["data"]] == [("no-secrets", "deny")]


def test_members_see_only_decisions_on_their_own_calls(seeded):
    store, ids, calls = seeded
    alice = ids["alice"]
    assert {d["user"] for d in _q(store, "policy/decisions", alice, limit=50)["data"]} == {"alice"}
    assert _q(store, "policy/decisions", alice, {"user": "bob"}, limit=50)["data"] == []
    assert _q(store, "policy/decisions", alice, {"interception": calls["bob"]}, limit=50)["data"] == []
    s = _q(store, "policy/decisions/summary", alice, {"since": "7d"})
    assert [u["user"] for u in s["by_user"]] == ["alice"] and sum(r["decisions"] for r in s["data"]) == 2
    # An interception's detail lists its decisions, to whoever may see the interception.
    from aibridge_gw.pricing import PriceTable

    detail = store.read(lambda c: reports.interception_detail(c, reports.Viewer(alice), calls["alice"],
                                                              PriceTable.load())).result()
    assert [(d["rule"], d["detectors"]) for d in detail["policy_decisions"]] == [("no-secrets", ["aws-key"]),
                                                                                 ("cost-tags", [])]
    assert store.read(lambda c: reports.interception_detail(c, reports.Viewer(alice), calls["bob"],
                                                            PriceTable.load())).result() is None


def test_users_and_groups_as_the_api_shows_them(seeded):
    store, ids, _ = seeded
    run(store, "users.groups_set", True, name="alice", groups="ml,staff")
    run(store, "users.groups_set", True, name="bob", groups="ml")
    every = _q(store, "users")["data"]
    assert [(u["name"], u["groups"]) for u in every] == [("alice", ["ml", "staff"]), ("bob", ["ml"])]
    assert [(u["name"], u["groups"]) for u in _q(store, "users", ids["bob"])["data"]] == [("bob", ["ml"])]
    assert _q(store, "groups")["data"] == [{"group": "ml", "members": ["alice", "bob"], "users": 2},
                                           {"group": "staff", "members": ["alice"], "users": 1}]
    # A member sees the groups they are in, and no other member's name.
    assert _q(store, "groups", ids["bob"])["data"] == [{"group": "ml", "members": ["bob"], "users": 1}]


# --- the metric and the running directory, through the addon chain ------------------------------------------


def test_the_decisions_counter_is_bounded_and_takes_the_prefix():
    m = Metrics("gw_")
    m.policy_decision("no-secrets", "deny")
    text = m.render().decode()
    assert 'gw_policy_decisions_total{action="deny",rule="no-secrets"} 1.0' in text
    for n in range(MAX_LABELS + 5):
        m.policy_decision(f"rule-{n}", "tag")
    m.policy_decision("bad rule name!", "deny")
    text = m.render().decode()
    assert f'rule="rule-{MAX_LABELS - 2}"' in text and f'rule="rule-{MAX_LABELS + 1}"' not in text
    assert 'gw_policy_decisions_total{action="tag",rule="other"} 6.0' in text
    assert 'gw_policy_decisions_total{action="deny",rule="other"} 1.0' in text


@chain_test
async def test_policy_decisions_are_counted_on_the_metrics_endpoint(chain):
    m = chain.rt.metrics
    m.policy_decision("no-secrets", "deny")
    m.policy_decision("no-secrets", "deny")
    m.policy_decision("no-shell", "deny")  # a monitored deny is counted as a deny too
    m.policy_decision("cost-tags", "tag")
    flow = await chain.request(_flow("GET", "/aibridge/metrics"))
    assert flow.response.status_code == 200
    text = flow.response.text
    assert "# TYPE aibridge_policy_decisions_total counter" in text
    assert 'aibridge_policy_decisions_total{action="deny",rule="no-secrets"} 2.0' in text
    assert 'aibridge_policy_decisions_total{action="deny",rule="no-shell"} 1.0' in text
    assert 'aibridge_policy_decisions_total{action="tag",rule="cost-tags"} 1.0' in text
    assert "enforced" not in text.split("aibridge_policy_decisions_total", 1)[1].split("\n# ", 1)[0]


@chain_test
async def test_groups_set_through_the_control_endpoint_reach_the_directory_at_once(chain):
    """What `aibridge users groups set` does against a running gateway: the operation, then the directory reload
    (as for a role): the very next request's identity carries the groups."""
    chain.rt.control_secret = "control-secret"
    body = json.dumps({"op": "users.groups_set", "args": {"name": "alice", "groups": "Staff,ml"}}).encode()
    flow = await chain.request(_flow("POST", gateway_client.CONTROL_PATH, {"authorization": "Bearer control-secret",
                                                                           "content_type": "application/json"}, body))
    assert flow.response.status_code == 200, flow.response.text
    assert json.loads(flow.response.content)["result"]["groups"] == ["ml", "staff"]
    assert chain.rt.tokens.lookup_hash(hash_token(chain.token)).groups == ("ml", "staff")
    me = await chain.request(_flow("GET", "/aibridge/api/v1/me", {"authorization": f"Bearer {chain.token}"}))
    assert json.loads(me.response.content)["groups"] == ["ml", "staff"]
    bad = json.dumps({"op": "users.groups_set", "args": {"name": "alice", "groups": "no spaces"}}).encode()
    flow = await chain.request(_flow("POST", gateway_client.CONTROL_PATH, {"authorization": "Bearer control-secret"},
                                     bad))
    assert flow.response.status_code == 400 and "bad group name" in flow.response.text
    assert chain.rt.tokens.lookup(chain.token).groups == ("ml", "staff")  # unchanged by the refusal
