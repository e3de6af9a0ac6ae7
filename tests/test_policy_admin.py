"""Groups and policy decisions on the operator's side, with real parts: a running gateway (its control endpoint, its
directory, the admin API), the `aibridge` CLI with and without a gateway, and a throw-away PostgreSQL cluster for
fleet mode (decisions written by its writer, groups picked up by a running gateway within its refresh,
migrate-store, export, retention, migrations on a database of the previous version)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import ClassVar

import duckdb
import httpx
import psycopg
import pytest
from aibridge_gw.flow.recorder import Recorder
from aibridge_gw.store import schema
from aibridge_gw.store.codec import encode_batch
from aibridge_gw.store.rows import INTERCEPTIONS

from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.postgres import Cluster
from tests.support.wire import anthropic_message

NOW = dt.datetime.now(dt.UTC)


class ViaGateway:
    """A Recorder's store that hands each record to a running gateway's writer through its control endpoint (the
    path `aibridge store replay-deadletters` takes): rows built by the recorder itself, written by the gateway that
    owns the database."""

    state: ClassVar[dict] = {}  # the store is up (what Recorder asks before a lookup)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def submit(self, record) -> None:
        self.gw.op("store.apply_record", record=json.loads(encode_batch([record]))[0])


def api(gw, path: str, token: str, **params) -> httpx.Response:
    return httpx.get(f"{gw.url}/aibridge/api/v1/{path}", params=params, trust_env=False,
                     headers={"authorization": f"Bearer {token}"})


def call(gw, token: str, prompt: str = "hello") -> None:
    body = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": prompt}]}
    r = httpx.post(gw.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": token}, trust_env=False,
                   timeout=30)
    assert r.status_code == 200, r.text


def record_decisions(recorder: Recorder, calls: dict[str, str], users: dict[str, str]) -> None:
    """ann: a denied request (enforced, aws-key) and a tag; ben: a tool call denied in monitor mode."""
    recorder.policy_decision(calls["ann"], rule="no-cloud-keys", policy_version="9c1e", hook="request", action="deny",
                             enforced=True, detectors=["aws-key"], message="AWS keys may not leave the laptop",
                             user_id=users["ann"], at=NOW - dt.timedelta(minutes=2))
    recorder.policy_decision(calls["ann"], rule="cost-centre", policy_version="9c1e", hook="request", action="tag",
                             enforced=True, detectors=[], message=None, user_id=users["ann"],
                             at=NOW - dt.timedelta(minutes=1))
    recorder.policy_decision(calls["ben"], rule="no-shell", policy_version="9c1e", hook="tool", action="deny",
                             enforced=False, detectors=[], message="shell tools are watched", user_id=users["ben"],
                             tool="bash", tool_call_id="toolu_01", at=NOW)


@pytest.fixture(scope="module")
def pgw(tmp_path_factory, upstream):
    """A gateway with root (admin), ann and ben, one call each, and decisions on both calls."""
    gw = Gateway(tmp_path_factory.mktemp("policy-gw"), upstream.url).start()
    try:
        upstream.reset()
        upstream.default = Reply.json(anthropic_message("ok", (10, 5)))
        gw.tokens = {name: gw.new_user(name) for name in ("root", "ann", "ben")}
        assert gw.cli("users", "set-role", "root", "admin").returncode == 0
        for name in ("ann", "ben"):
            call(gw, gw.tokens[name], f"{name} asks")
        gw.calls = {name: gw.interceptions(name)[0]["id"] for name in ("ann", "ben")}
        gw.users = {u["name"]: u["id"] for u in gw.sql("SELECT CAST(id AS VARCHAR) AS id, name FROM aibridge_users")}
        record_decisions(Recorder(ViaGateway(gw)), gw.calls, gw.users)
        upstream.reset()
        yield gw
    finally:
        gw.stop()
        upstream.reset()


# --- groups ------------------------------------------------------------------------------------------------


def test_groups_set_and_cleared_through_the_running_gateway_take_effect_at_once(pgw, tmp_path):
    ann, root = pgw.tokens["ann"], pgw.tokens["root"]
    assert api(pgw, "me", ann).json()["groups"] == []
    r = pgw.cli("users", "groups", "set", "ann", "Staff,ml,staff")
    assert r.returncode == 0 and r.stdout.strip() == "ann is in ml, staff", r.stderr
    assert api(pgw, "me", ann).json()["groups"] == ["ml", "staff"]  # the directory reloaded with the operation
    assert pgw.cli("users", "groups", "set", "ben", "ml").returncode == 0

    users = {u["name"]: u for u in api(pgw, "users", root).json()["data"]}
    assert (users["ann"]["groups"], users["ben"]["groups"], users["root"]["groups"]) == (["ml", "staff"], ["ml"], [])
    assert users["root"]["role"] == "admin" and users["ann"]["active_tokens"] == 1
    assert [(u["name"], u["groups"]) for u in api(pgw, "users", ann).json()["data"]] == [("ann", ["ml", "staff"])]
    assert api(pgw, "groups", root).json()["data"] == [{"group": "ml", "members": ["ann", "ben"], "users": 2},
                                                      {"group": "staff", "members": ["ann"], "users": 1}]
    assert [g["members"] for g in api(pgw, "groups", pgw.tokens["ben"]).json()["data"]] == [["ben"]]
    assert api(pgw, "users", root, colour="red").json()["error"]["parameter"] == "colour"

    listed = json.loads(pgw.cli("groups", "list", "--json").stdout)
    assert listed == [{"group": "ml", "members": ["ann", "ben"], "users": 2},
                      {"group": "staff", "members": ["ann"], "users": 1}]
    assert "ann, ben" in pgw.cli("groups", "list").stdout
    users = {u["name"]: u for u in json.loads(pgw.cli("users", "list", "--json").stdout)}
    assert users["ann"]["groups"] == ["ml", "staff"]
    table = pgw.cli("users", "list").stdout
    assert "groups" in table and "ml, staff" in table

    for args, message in ((("ann", "ok,not ok"), "aibridge: bad group name 'not ok'"),
                          (("ann", ",".join(f"g{n}" for n in range(65))), "64 groups at most"),
                          (("nobody", "ml"), "aibridge: unknown user 'nobody'")):
        r = pgw.cli("users", "groups", "set", *args)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert api(pgw, "me", ann).json()["groups"] == ["ml", "staff"]  # unchanged by the refusals

    out = tmp_path / "export"
    assert pgw.cli("export", "--format", "csv", "--out", str(out)).returncode == 0
    exported = duckdb.sql(f"SELECT group_name, count(*) FROM read_csv_auto('{out}/aibridge_user_groups.csv') "
                          "GROUP BY 1 ORDER BY 1").fetchall()
    assert exported == [("ml", 2), ("staff", 1)]
    decisions = duckdb.sql(f"SELECT rule FROM read_csv_auto('{out}/aibridge_policy_decisions.csv') ORDER BY 1").fetchall()
    assert [d[0] for d in decisions] == ["cost-centre", "no-cloud-keys", "no-shell"]

    r = pgw.cli("users", "groups", "set", "ann", "")
    assert r.returncode == 0 and r.stdout.strip() == "ann is in no group"
    assert api(pgw, "me", ann).json()["groups"] == []
    assert pgw.cli("users", "groups", "set", "ben", "").returncode == 0


def test_groups_set_without_a_gateway_are_the_gateways_groups_when_it_starts(tmp_path, upstream):
    """Offline, the CLI writes the file; a gateway started on it knows the groups. Decisions recorded into the file
    while no gateway runs are listed by `aibridge policy decisions` read-only on it."""
    gw = Gateway(tmp_path / "offline", upstream.url)
    assert gw.cli("users", "add", "carol").returncode == 0
    token = gw.cli("tokens", "create", "--user", "carol").stdout.strip().splitlines()[-1]
    r = gw.cli("users", "groups", "set", "carol", "ops,ML")
    assert r.returncode == 0 and r.stdout.strip() == "carol is in ml, ops", r.stderr
    assert json.loads(gw.cli("groups", "list", "--json").stdout) == [
        {"group": "ml", "members": ["carol"], "users": 1}, {"group": "ops", "members": ["carol"], "users": 1}]
    assert gw.cli("users", "groups", "set", "carol", "Not Valid").returncode == 1
    gw.start()
    try:
        assert api(gw, "me", token).json()["groups"] == ["ml", "ops"]
    finally:
        gw.stop()
    assert not gw.db.with_name(gw.db.name + ".gateway.json").exists()

    from aibridge_gw.store.writer import Store

    store = Store(gw.db)
    store.open()
    try:
        uid = store.run("users.list").result()["rows"][0][3]
        iid = str(uuid.uuid4())
        store.submit(INTERCEPTIONS.row(id=iid, initiator_id=uid, provider="openai", provider_name="openai",
                                       model="gpt-4.1", credential_kind="centralized", status="rejected",
                                       started_at=NOW, ended_at=NOW, http_status=403))
        Recorder(store).policy_decision(iid, rule="ml-models-only", policy_version="1a", hook="request",
                                        action="deny", enforced=True, detectors=[], message="not for ops",
                                        user_id=uid, at=NOW)
        store.flush().result(timeout=30)
    finally:
        store.close()
    r = gw.cli("policy", "decisions", "--json")
    assert r.returncode == 0, r.stderr
    (d,) = json.loads(r.stdout)
    assert (d["rule"], d["action"], d["user"], d["interception_id"]) == ("ml-models-only", "deny", "carol", iid)


# --- decisions: admin API and CLI -----------------------------------------------------------------------------


def test_the_api_lists_and_counts_decisions_for_admins_and_members_see_their_own(pgw):
    root, ann, ben = pgw.tokens["root"], pgw.tokens["ann"], pgw.tokens["ben"]
    every = api(pgw, "policy/decisions", root).json()["data"]
    assert [(d["rule"], d["user"], d["action"], d["enforced"]) for d in every] == [
        ("no-shell", "ben", "deny", False), ("cost-centre", "ann", "tag", True), ("no-cloud-keys", "ann", "deny", True)]
    shell = every[0]
    assert (shell["hook"], shell["tool"], shell["tool_call_id"], shell["interception_id"]) == (
        "tool", "bash", "toolu_01", pgw.calls["ben"])
    assert every[2]["detectors"] == ["aws-key"] and every[2]["policy_version"] == "9c1e"

    rules = lambda token, **f: [d["rule"] for d in api(pgw, "policy/decisions", token, **f).json()["data"]]
    assert rules(root, action="deny") == ["no-shell", "no-cloud-keys"]
    assert rules(root, rule="cost-centre") == ["cost-centre"]
    assert rules(root, user="ben") == ["no-shell"]
    assert rules(root, interception=pgw.calls["ann"]) == ["cost-centre", "no-cloud-keys"]
    assert rules(root, since="1h", enforced="false") == ["no-shell"]
    assert rules(root, since="2999-01-01") == []
    assert rules(root, limit=1) == ["no-shell"]
    assert rules(ann) == ["cost-centre", "no-cloud-keys"]
    assert rules(ann, user="ben") == [] and rules(ann, interception=pgw.calls["ben"]) == []
    for params, name in (({"since": "whenever"}, "since"), ({"limit": "0"}, "limit"), ({"colour": "red"}, "colour"),
                         ({"enforced": "perhaps"}, "enforced")):
        r = api(pgw, "policy/decisions", root, **params)
        assert r.status_code == 400 and r.json()["error"]["parameter"] == name, r.text

    summary = api(pgw, "policy/decisions/summary", root).json()
    assert summary["since"] == "7d"
    assert [(r["rule"], r["action"], r["decisions"], r["enforced"], r["monitored"]) for r in summary["data"]] == [
        ("cost-centre", "tag", 1, 1, 0), ("no-cloud-keys", "deny", 1, 1, 0), ("no-shell", "deny", 1, 0, 1)]
    assert {u["user"]: u["actions"] for u in summary["by_user"]} == {"ann": {"deny": 1, "tag": 1},
                                                                     "ben": {"deny": 1}}
    assert [u["user"] for u in api(pgw, "policy/decisions/summary", ben).json()["by_user"]] == ["ben"]
    assert api(pgw, "policy/decisions/summary", root, limit="5").json()["error"]["parameter"] == "limit"

    detail = api(pgw, f"interceptions/{pgw.calls['ann']}", ann).json()
    assert [(d["rule"], d["detectors"]) for d in detail["policy_decisions"]] == [("no-cloud-keys", ["aws-key"]),
                                                                                ("cost-centre", [])]
    assert api(pgw, f"interceptions/{pgw.calls['ben']}", ann).status_code == 404
    assert api(pgw, f"interceptions/{pgw.calls['ben']}", root).json()["policy_decisions"][0]["tool"] == "bash"


def test_aibridge_policy_decisions_lists_filters_and_counts(pgw):
    r = pgw.cli("policy", "decisions", "--since", "7d", "--json")
    assert r.returncode == 0, r.stderr
    assert [d["rule"] for d in json.loads(r.stdout)] == ["no-shell", "cost-centre", "no-cloud-keys"]
    only = lambda *args: [d["rule"] for d in json.loads(pgw.cli("policy", "decisions", "--json", *args).stdout)]
    assert only("--rule", "no-cloud-keys") == ["no-cloud-keys"]
    assert only("--action", "deny", "--user", "ann") == ["no-cloud-keys"]
    assert only("--monitored") == ["no-shell"] and only("--enforced") == ["cost-centre", "no-cloud-keys"]
    assert only("--hook", "tool") == ["no-shell"] and only("--interception", pgw.calls["ann"]) == [
        "cost-centre", "no-cloud-keys"]
    assert only("--since", "2999-01-01") == [] and only("--limit", "1") == ["no-shell"]

    table = pgw.cli("policy", "decisions").stdout
    for text in ("no-cloud-keys", "aws-key", "AWS keys may not leave the laptop", "no-shell", "bash", "(3 rows)"):
        assert text in table, text

    summary = json.loads(pgw.cli("policy", "decisions", "--summary", "--json").stdout)
    assert [(r["rule"], r["action"], r["decisions"]) for r in summary["data"]] == [
        ("cost-centre", "tag", 1), ("no-cloud-keys", "deny", 1), ("no-shell", "deny", 1)]
    assert [(u["user"], u["decisions"], u["enforced"]) for u in summary["by_user"]] == [("ann", 2, 2), ("ben", 1, 0)]
    text = pgw.cli("policy", "decisions", "--summary").stdout
    assert "per rule and action since 7d" in text and "per user" in text and "cost-centre" in text

    for args, message in ((("--since", "soonish"), "since"), (("--limit", "0"), "limit"),
                          (("--enforced", "--monitored"), "not allowed")):
        r = pgw.cli("policy", "decisions", *args)
        assert r.returncode != 0 and message in r.stderr, r.stderr
    assert pgw.cli("policy").returncode != 0  # a subcommand is required


# --- fleet mode: PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    c = Cluster().start()
    yield c
    c.stop()


def _pg_rows(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def test_decisions_and_groups_in_fleet_mode(cluster, tmp_path, mock):
    """PostgreSQL's writer records decisions once (a replay adds nothing); a running gateway picks group changes the
    CLI made in PostgreSQL up within its refresh; reports, the CLI, export and retention work there as on DuckDB."""
    from aibridge_gw.store.pg import PgStore

    dsn = cluster.create_database("policy_fleet")
    gw = Gateway(tmp_path / "gw", mock.url,
                 extra={"storage": {"duckdb": str(tmp_path / "local" / "spools.duckdb"), "postgres": dsn}}).start()
    try:
        gw.op("users.add", name="dana", role="admin")
        token = gw.op("tokens.create", user="dana")["token"]
        uid = gw.sql("SELECT CAST(id AS VARCHAR) AS id FROM aibridge_users")[0]["id"]

        def groups_seen(expected: list[str]) -> float:
            started = time.monotonic()
            while True:
                r = api(gw, "me", token)
                if r.status_code == 200 and r.json()["groups"] == expected:
                    return time.monotonic() - started
                assert time.monotonic() - started < 5, r.text
                time.sleep(0.05)

        groups_seen([])
        assert gw.cli("users", "groups", "set", "dana", "ML,research").returncode == 0  # straight into PostgreSQL
        assert groups_seen(["ml", "research"]) < 3
        assert gw.cli("users", "groups", "set", "dana", "research").returncode == 0
        groups_seen(["research"])
        assert _pg_rows(dsn, "SELECT group_name FROM aibridge_user_groups") == [("research",)]

        store = PgStore(dsn, tmp_path / "seed")
        store.open()
        try:
            old, recent = str(uuid.uuid4()), str(uuid.uuid4())
            for iid, started in ((old, NOW - dt.timedelta(days=100)), (recent, NOW)):
                store.submit(INTERCEPTIONS.row(id=iid, initiator_id=uid, provider="anthropic",
                                               provider_name="anthropic", model="claude-sonnet-4-0",
                                               credential_kind="centralized", status="completed", started_at=started,
                                               ended_at=started))
            rec = Recorder(store)
            for _ in range(2):  # the second time adds nothing (ids are derived)
                rec.policy_decision(recent, rule="no-cloud-keys", policy_version="v7", hook="request", action="deny",
                                    enforced=True, detectors=["aws-key", "github-token"], message="refused",
                                    user_id=uid, at=NOW)
                rec.policy_decision(recent, rule="pii", policy_version="v7", hook="tool", action="redact",
                                    enforced=False, detectors=["email"], message=None, user_id=uid, tool="send_mail",
                                    tool_call_id="call_9", at=NOW)
                rec.policy_decision(old, rule="old-rule", policy_version="v6", hook="request", action="tag",
                                    enforced=True, detectors=[], message=None, user_id=uid,
                                    at=NOW - dt.timedelta(days=100))
                store.flush().result(timeout=30)
        finally:
            store.close()
        rows = _pg_rows(dsn, "SELECT rule, detectors, enforced, tool FROM aibridge_policy_decisions ORDER BY rule")
        assert rows == [("no-cloud-keys", ["aws-key", "github-token"], True, None), ("old-rule", [], True, None),
                        ("pii", ["email"], False, "send_mail")]

        listed = json.loads(gw.cli("policy", "decisions", "--since", "7d", "--json").stdout)
        assert sorted((d["rule"], d["detectors"], d["user"]) for d in listed) == [
            ("no-cloud-keys", ["aws-key", "github-token"], "dana"), ("pii", ["email"], "dana")]
        assert [d["rule"] for d in api(gw, "policy/decisions", token, action="redact").json()["data"]] == ["pii"]
        summary = api(gw, "policy/decisions/summary", token, since="365d").json()
        assert sorted((r["rule"], r["decisions"]) for r in summary["data"]) == [
            ("no-cloud-keys", 1), ("old-rule", 1), ("pii", 1)]
        detail = api(gw, f"interceptions/{recent}", token).json()
        assert sorted((d["rule"], d["detectors"]) for d in detail["policy_decisions"]) == [
            ("no-cloud-keys", ["aws-key", "github-token"]), ("pii", ["email"])]
        assert api(gw, "users", token).json()["data"][0]["groups"] == ["research"]

        out = tmp_path / "export"
        assert gw.cli("export", "--format", "parquet", "--out", str(out)).returncode == 0
        exported = duckdb.sql(f"SELECT rule, detectors FROM '{out}/aibridge_policy_decisions.parquet' ORDER BY 1"
                              ).fetchall()
        assert [(r, json.loads(d)) for r, d in exported] == [("no-cloud-keys", ["aws-key", "github-token"]),
                                                            ("old-rule", []), ("pii", ["email"])]
        assert duckdb.sql(f"SELECT group_name FROM '{out}/aibridge_user_groups.parquet'").fetchall() == [("research",)]

        r = gw.cli("prune", "--days", "30")
        assert r.returncode == 0 and "deleted 1" in r.stdout, r.stdout + r.stderr
        assert sorted(_pg_rows(dsn, "SELECT rule FROM aibridge_policy_decisions")) == [("no-cloud-keys",), ("pii",)]
    finally:
        gw.stop()


def test_migrate_store_copies_groups_and_decisions_once(cluster, tmp_path):
    from aibridge_gw.store.writer import Store

    gw = Gateway(tmp_path / "duck", "http://127.0.0.1:9")
    assert gw.cli("users", "add", "erin").returncode == 0
    assert gw.cli("users", "groups", "set", "erin", "ml,staff").returncode == 0
    store = Store(gw.db)
    store.open()
    try:
        uid = store.run("users.list").result()["rows"][0][3]
        iid = str(uuid.uuid4())
        store.submit(INTERCEPTIONS.row(id=iid, initiator_id=uid, provider="anthropic", provider_name="anthropic",
                                       credential_kind="centralized", status="completed", started_at=NOW))
        Recorder(store).policy_decision(iid, rule="no-cloud-keys", policy_version="v1", hook="request",
                                        action="deny", enforced=True, detectors=["aws-key"], message=None,
                                        user_id=uid, at=NOW)
        store.flush().result(timeout=30)
    finally:
        store.close()
    dsn = cluster.create_database("policy_migrated")
    first = gw.cli("migrate-store", "--to", dsn, "--json")
    assert first.returncode == 0, first.stderr
    copied = {r["table"]: (r["rows"], r["copied"]) for r in json.loads(first.stdout.split("\n", 1)[1].rsplit("\n", 2)[0])}
    assert copied["aibridge_user_groups"] == (2, 2) and copied["aibridge_policy_decisions"] == (1, 1)
    again = gw.cli("migrate-store", "--to", dsn, "--json")
    assert all(r["copied"] == 0 for r in json.loads(again.stdout.split("\n", 1)[1].rsplit("\n", 2)[0]))
    assert _pg_rows(dsn, "SELECT u.name, g.group_name FROM aibridge_user_groups g JOIN aibridge_users u "
                         "ON u.id = g.user_id ORDER BY 2") == [("erin", "ml"), ("erin", "staff")]
    assert _pg_rows(dsn, "SELECT CAST(interception_id AS VARCHAR), rule, detectors FROM aibridge_policy_decisions") == [
        (iid, "no-cloud-keys", ["aws-key"])]


def test_postgresql_of_the_previous_version_gains_groups_and_decisions(cluster, monkeypatch):
    dsn = cluster.create_database("policy_v6")
    with psycopg.connect(dsn) as conn:
        with monkeypatch.context() as m:
            m.setattr(schema, "MIGRATIONS", [x for x in schema.MIGRATIONS if x[0] <= 6])
            assert schema.migrate_postgres(conn) == [1, 2, 3, 4, 5, 6]
        conn.execute("INSERT INTO aibridge_users (id, name, role, created_at) VALUES (gen_random_uuid(), 'old', "
                     "'member', now())")
        conn.commit()
        assert schema.migrate_postgres(conn) == [v for v, *_ in schema.MIGRATIONS if v >= 7]
        assert schema.migrate_postgres(conn) == []
        assert conn.execute("SELECT name FROM aibridge_users").fetchall() == [("old",)]
        indexes = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'aibridge_policy_decisions'").fetchall()}
        assert {"aibridge_policy_decisions_created_at", "aibridge_policy_decisions_interception"} <= indexes
        pk = conn.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                          "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'aibridge_user_groups'::regclass "
                          "AND i.indisprimary ORDER BY 1").fetchall()
        assert [r[0] for r in pk] == ["group_name", "user_id"]
