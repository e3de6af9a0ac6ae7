"""Fleet mode's store, first part: the numbered migrations build the same tables and columns in a real
PostgreSQL (a throw-away cluster on a loopback port) as in DuckDB, applied exactly once when several gateways
start together."""

from __future__ import annotations

import concurrent.futures as cf

import duckdb
import psycopg
import pytest
from aibridge_gw.store.schema import MIGRATIONS, migrate, migrate_postgres

from tests.support.postgres import Cluster


@pytest.fixture(scope="module")
def cluster():
    c = Cluster().start()
    yield c
    c.stop()


def _columns(rows) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for table, column, dtype in rows:
        out.setdefault(table, []).append((column, dtype))
    return out


def test_migrations_build_the_same_tables_and_columns_as_duckdb(cluster, tmp_path):
    dsn = cluster.create_database("same_schema")
    with psycopg.connect(dsn) as conn:
        assert migrate_postgres(conn) == [v for v, _, _ in MIGRATIONS]
        pg = _columns(conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_name LIKE 'aibridge_%' ORDER BY table_name, ordinal_position").fetchall())
    duck = duckdb.connect(str(tmp_path / "same.duckdb"))
    migrate(duck)
    dd = _columns(duck.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_name LIKE 'aibridge_%' ORDER BY table_name, ordinal_position").fetchall())
    duck.close()
    assert {t: [c for c, _ in cols] for t, cols in pg.items()} == {t: [c for c, _ in cols] for t, cols in dd.items()}
    # The types are the same, spelled each engine's way.
    spelled = {"character varying": "VARCHAR", "timestamp with time zone": "TIMESTAMP WITH TIME ZONE",
               "uuid": "UUID", "json": "JSON", "boolean": "BOOLEAN", "bigint": "BIGINT", "integer": "INTEGER",
               "double precision": "DOUBLE"}
    assert {t: [(c, spelled[d]) for c, d in cols] for t, cols in pg.items()} == dd


def test_gateways_starting_together_apply_each_migration_once(cluster):
    dsn = cluster.create_database("together")

    def start(_):
        with psycopg.connect(dsn) as conn:
            return migrate_postgres(conn)

    with cf.ThreadPoolExecutor(4) as pool:
        applied = list(pool.map(start, range(4)))
    everything = [v for v, _, _ in MIGRATIONS]
    assert sorted(applied, key=len) == [[], [], [], everything]  # one did the work, the others found it done
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT version FROM aibridge_schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == everything


def _interception(iid: str, now, status: str = "in_progress"):
    from aibridge_gw.store.writer import Insert

    return Insert("aibridge_interceptions", (iid, None, "anthropic", "anthropic", "claude-sonnet-4-0", "Claude Code",
                                             "claude-cli/2.1", "sess-1", None, None, "centralized", "sk-a…CRET",
                                             status, now, None, None, "anthropic.messages", True, None, None, None,
                                             None, "chat"))


def test_the_writer_records_into_postgresql_once_even_when_a_spool_is_replayed(cluster, tmp_path):
    """The same batching writer as DuckDB's: rows and ends in one statement per table, JSON and NULLs typed,
    a start and end in one batch inserted finished, and a spool replayed after its batch was committed adds
    nothing (ids come from flow ids)."""
    import datetime as dt

    from aibridge_gw.store.pg import PgStore
    from aibridge_gw.store.rows import TOKEN_USAGES, interception_end
    from aibridge_gw.store.writer import encode_batch

    dsn = cluster.create_database("writer")
    now = dt.datetime.now(dt.UTC)
    ids = [f"11111111-2222-4333-8444-{n:012d}" for n in range(3)]
    batch = [_interception(ids[0], now),
             TOKEN_USAGES.row(id=ids[1], interception_id=ids[0], provider_response_id="msg_1", input_tokens=12,
                              output_tokens=7, cache_read_input_tokens=3, cache_write_input_tokens=0,
                              metadata='{"service_tier": "standard"}', created_at=now),
             interception_end(ids[0], status="completed", ended_at=now, http_status=200, error=None,
                              metadata='{"response_model": "claude-sonnet-4-20250514"}', credential_hint=None)]
    store = PgStore(dsn, tmp_path / "gw" / "pg")
    store.open()
    for rec in batch:
        store.submit(rec)
    store.submit(_interception(ids[2], now))  # started; its end comes in a later batch
    store.flush().result(timeout=30)
    store.submit(interception_end(ids[2], status="failed", ended_at=now, http_status=529, error="HTTP 529: overloaded",
                                  metadata="{}", credential_hint="sk-a…USED"))
    store.flush().result(timeout=30)
    store.close()
    # A crash after the commit but before the spool was cleared: the next start replays the batch, adding nothing.
    spool = tmp_path / "gw" / "pg.spool"
    spool.write_bytes(encode_batch(batch) + b"\n")
    again = PgStore(dsn, tmp_path / "gw" / "pg")
    again.open()
    again.close()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT CAST(id AS VARCHAR), status, http_status, credential_hint, "
                            "metadata->>'response_model' FROM aibridge_interceptions ORDER BY id").fetchall()
        usage = conn.execute("SELECT input_tokens, output_tokens, cache_read_input_tokens, metadata->>'service_tier' "
                             "FROM aibridge_token_usages").fetchall()
    assert rows == [(ids[0], "completed", 200, "sk-a…CRET", "claude-sonnet-4-20250514"),
                    (ids[2], "failed", 529, "sk-a…USED", None)]
    assert usage == [(12, 7, 3, "standard")]
    assert spool.read_bytes() == b""


def test_the_operations_run_on_postgresql(cluster, tmp_path):
    """Users, tokens and the gateway's token directory through the same operations as DuckDB (`?` placeholders)."""
    from aibridge_gw.policy.auth import hash_token
    from aibridge_gw.store.pg import PgStore

    store = PgStore(cluster.create_database("ops"), tmp_path / "ops")
    store.open()
    try:
        store.run("users.add", True, name="alice").result(timeout=30)
        store.run("users.add", True, name="agents", service_account=True).result(timeout=30)
        token = store.run("tokens.create", True, user="alice", name="laptop").result(timeout=30)["token"]
        directory = store.run("directory").result(timeout=30)
        users = store.run("users").result(timeout=30)
    finally:
        store.close()
    (row,) = directory
    assert row[0] == hash_token(token) and row[2] == "alice" and row[6] is False
    assert sorted(name for _, name, _groups in users) == ["agents", "alice"]


def test_two_gateways_on_one_postgresql_keep_one_audit_and_honour_one_revocation(cluster, tmp_path, mock):
    """Two gateway processes, one PostgreSQL: every call recorded once, whichever gateway served it; a user
    created and a token revoked with the CLI (which writes PostgreSQL directly) take effect on both."""
    import time

    import httpx

    from tests.support.gateway import Gateway
    from tests.support.mock_upstream import Reply
    from tests.support.wire import anthropic_message

    dsn = cluster.create_database("fleet")
    storage = {"storage": {"duckdb": str(tmp_path / "local" / "spools.duckdb"), "postgres": dsn}}
    gateways = [Gateway(tmp_path / name, mock.url, extra=storage) for name in ("a", "b")]
    try:
        for gw in gateways:
            gw.start()
        token = gateways[0].new_user("fleet")
        mock.default = Reply.json(anthropic_message("from the fleet", (11, 5)))
        body = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}

        def call(gw) -> int:
            return httpx.post(gw.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": token},
                              trust_env=False, timeout=30).status_code

        deadline = time.monotonic() + 10
        while any(call(gw) != 200 for gw in gateways):  # the token reaches both within a second or so
            assert time.monotonic() < deadline, "a gateway never learned the new token"
            time.sleep(0.2)
        served = [call(gateways[n % 2]) for n in range(10)]
        assert served == [200] * 10
        with psycopg.connect(dsn) as conn:
            deadline = time.monotonic() + 10
            while True:
                rows = conn.execute(
                    "SELECT CAST(i.id AS VARCHAR), i.status, u.input_tokens, u.output_tokens FROM aibridge_interceptions i "
                    "JOIN aibridge_token_usages u ON u.interception_id = i.id WHERE i.status = 'completed'").fetchall()
                if len(rows) >= 12 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert len(rows) == len({r[0] for r in rows}) >= 12  # the probes and the ten, each once
        assert {(r[2], r[3]) for r in rows} == {(11, 5)}

        tid = gateways[1].op("tokens.list", user="fleet")["rows"][0][0]
        gateways[1].op("tokens.revoke", id=tid)
        deadline = time.monotonic() + 10
        while any(call(gw) != 401 for gw in gateways):
            assert time.monotonic() < deadline, "a gateway still takes the revoked token"
            time.sleep(0.2)
    finally:
        for gw in gateways:
            gw.stop()


def test_budgets_hold_across_the_fleet(cluster, tmp_path, mock):
    """Requests per minute are counted in PostgreSQL by every gateway; tokens per day are what all of them
    recorded (refreshed each second)."""
    import datetime as dt
    import time

    import httpx

    from tests.support.gateway import Gateway
    from tests.support.mock_upstream import Reply
    from tests.support.wire import anthropic_message

    dsn = cluster.create_database("budgets")
    extra = {"storage": {"duckdb": str(tmp_path / "local" / "spools.duckdb"), "postgres": dsn},
             "budgets": {"users": {"capped": {"requests_per_minute": 3}, "heavy": {"tokens_per_day": 20}}}}
    a, b = gateways = [Gateway(tmp_path / name, mock.url, extra=extra) for name in ("a", "b")]
    try:
        for gw in gateways:
            gw.start()
        probe, capped, heavy = (a.new_user(name) for name in ("probe", "capped", "heavy"))
        mock.default = Reply.json(anthropic_message("ok", (11, 5)))  # 16 tokens a call
        body = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}

        def call(gw, token) -> int:
            return httpx.post(gw.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": token},
                              trust_env=False, timeout=30).status_code

        deadline = time.monotonic() + 10
        while any(call(gw, probe) != 200 for gw in gateways):  # both have loaded the new users and tokens
            assert time.monotonic() < deadline
            time.sleep(0.2)
        while dt.datetime.now(dt.UTC).second > 45:  # all four calls within one minute window
            time.sleep(1)
        assert [call(a, capped), call(b, capped), call(a, capped), call(b, capped)] == [200, 200, 200, 429]

        assert call(a, heavy) == 200  # 16 of 20 tokens
        time.sleep(2.5)  # recorded, and every gateway's counters refreshed
        assert call(b, heavy) == 200  # 16 < 20 on b too: it counts a's call
        time.sleep(2.5)
        assert call(a, heavy) == 429  # 32 ≥ 20: a counts b's call (its own alone would be 16)
    finally:
        for gw in gateways:
            gw.stop()


def test_a_killed_gateway_loses_nothing_the_other_served_and_the_other_keeps_serving(cluster, tmp_path, mock):
    import signal
    import time

    import httpx

    from tests.support.gateway import Gateway
    from tests.support.mock_upstream import Reply
    from tests.support.wire import anthropic_message

    dsn = cluster.create_database("killed")
    extra = {"storage": {"duckdb": str(tmp_path / "local" / "spools.duckdb"), "postgres": dsn}}
    a, b = gateways = [Gateway(tmp_path / name, mock.url, extra=extra) for name in ("a", "b")]
    try:
        for gw in gateways:
            gw.start()
        token = a.new_user("survivor")
        mock.default = Reply.json(anthropic_message("ok", (11, 5)))
        body = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}

        def call(gw, prompt: str = "probe") -> int:
            sent = {**body, "messages": [{"role": "user", "content": prompt}]}
            return httpx.post(gw.url + "/anthropic/v1/messages", json=sent, headers={"x-api-key": token},
                              trust_env=False, timeout=30).status_code

        deadline = time.monotonic() + 10
        while any(call(gw) != 200 for gw in gateways):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert [call(b, f"before {n}") for n in range(3)] == [200] * 3
        a.stop(signal.SIGKILL)
        assert [call(b, f"after {n}") for n in range(3)] == [200] * 3  # the other keeps serving
        expected = [f"after {n}" for n in range(3)] + [f"before {n}" for n in range(3)]
        with psycopg.connect(dsn) as conn:
            deadline = time.monotonic() + 10
            while True:
                prompts = sorted(r[0] for r in conn.execute(
                    "SELECT p.prompt FROM aibridge_user_prompts p JOIN aibridge_interceptions i "
                    "ON i.id = p.interception_id WHERE i.status = 'completed' AND p.prompt <> 'probe'").fetchall())
                if prompts == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert prompts == expected  # what b served, each once, whatever happened to a
    finally:
        for gw in gateways:
            gw.stop()


def test_reports_run_on_postgresql(cluster, tmp_path):
    """The CLI's reports and the user list, over PostgreSQL, from what the writer recorded."""
    import datetime as dt

    from aibridge_gw.store.pg import PgStore
    from aibridge_gw.store.rows import TOKEN_USAGES, USER_PROMPTS, interception_end
    from aibridge_gw.store.writer import Insert

    store = PgStore(cluster.create_database("reports"), tmp_path / "reports")
    store.open()
    try:
        uid = store.run("users.add", True, name="rita").result(timeout=30)["id"]
        now = dt.datetime.now(dt.UTC)
        iid = "21111111-2222-4333-8444-555555555555"
        row = list(_interception(iid, now).row)
        row[1] = uid
        store.submit(Insert("aibridge_interceptions", tuple(row)))
        store.submit(TOKEN_USAGES.row(id="31111111-2222-4333-8444-555555555555", interception_id=iid,
                                      provider_response_id="msg_1", input_tokens=1000, output_tokens=200,
                                      cache_read_input_tokens=0, cache_write_input_tokens=0, metadata=None,
                                      created_at=now))
        store.submit(USER_PROMPTS.row(id="41111111-2222-4333-8444-555555555555", interception_id=iid,
                                      provider_response_id="msg_1", typed="audit me", created_at=now,
                                      prompt="<system-reminder>x</system-reminder>audit me"))
        store.submit(interception_end(iid, status="completed", ended_at=now, http_status=200, error=None,
                                      metadata="{}"))
        store.flush().result(timeout=30)
        by_user = store.run("report", kind="usage", group_by="user", since="7d").result(timeout=30)
        by_day = store.run("report", kind="usage", group_by="day", since="7d").result(timeout=30)
        sessions = store.run("report", kind="sessions").result(timeout=30)
        prompts = store.run("report", kind="prompts", user="rita").result(timeout=30)
        view = store.run("admin_query", route="session", viewer=None, filters={}, id="sess-1").result(timeout=30)
        users = store.run("users.list").result(timeout=30)
    finally:
        store.close()
    assert [(d["user"], d["interceptions"], d["input_tokens"], d["output_tokens"]) for d in by_user["data"]] == [
        ("rita", 1, 1000, 200)]
    assert by_day["data"][0]["active_users"] == 1
    assert sessions["data"][0]["session"] == "sess-1"
    assert [(p["prompt"], p["purpose"]) for p in prompts["data"]] == [("audit me", "chat")]
    assert prompts["data"][0]["raw_prompt"].startswith("<system-reminder>")
    assert (sessions["data"][0]["human_turns"], sessions["data"][0]["auxiliary"]) == (1, 0)
    assert [t["prompt"] for t in view["turns"]] == ["audit me"] and len(view["threads"]) == 1
    assert [r[0] for r in users["rows"]] == ["rita"]


def _recorded_calls(gw, token: str, prompts: list[str]) -> None:
    import httpx

    for prompt in prompts:
        body = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": prompt}]}
        r = httpx.post(gw.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": token}, trust_env=False,
                       timeout=30)
        assert r.status_code == 200, r.text


def test_every_admin_surface_works_on_postgresql(cluster, tmp_path, mock):
    """`aibridge sql` (read-only, enforced by PostgreSQL), export (the same parquet and csv as DuckDB's), prune
    and the admin API, over a gateway recording into PostgreSQL."""
    import datetime as dt
    import json
    import time

    import httpx

    from tests.support.gateway import Gateway
    from tests.support.mock_upstream import Reply
    from tests.support.wire import anthropic_message

    dsn = cluster.create_database("surfaces")
    gw = Gateway(tmp_path / "gw", mock.url,
                 extra={"storage": {"duckdb": str(tmp_path / "local" / "spools.duckdb"), "postgres": dsn}}).start()
    try:
        gw.op("users.add", name="boss", role="admin")
        admin = gw.op("tokens.create", user="boss", name="t")["token"]
        mock.default = Reply.json(anthropic_message("ok", (13, 8)))
        deadline = time.monotonic() + 10
        while httpx.get(gw.url + "/aibridge/api/v1/me", headers={"authorization": f"Bearer {admin}"},
                        trust_env=False).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        _recorded_calls(gw, admin, ["first", "second", "50% of it; 'quoted'"])
        gw.wait_for("SELECT * FROM aibridge_interceptions WHERE status = 'completed'", lambda rows: len(rows) == 3)

        r = gw.cli("sql", "SELECT p.prompt, u.input_tokens FROM aibridge_user_prompts p JOIN aibridge_token_usages u "
                   "ON u.interception_id = p.interception_id WHERE p.prompt LIKE '50%' ", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [{"prompt": "50% of it; 'quoted'", "input_tokens": 13}]
        for hostile in ("DELETE FROM aibridge_users", "WITH d AS (DELETE FROM aibridge_tokens RETURNING 1) SELECT * FROM d",
                        "EXPLAIN ANALYZE DELETE FROM aibridge_interceptions", "UPDATE aibridge_users SET role = 'admin'",
                        "SELECT 1; DELETE FROM aibridge_users"):
            r = gw.cli("sql", hostile)
            assert r.returncode == 1, hostile
        assert gw.sql("SELECT count(*) AS n FROM aibridge_tokens")[0]["n"] == 1
        assert gw.sql("SELECT count(*) AS n FROM aibridge_interceptions")[0]["n"] == 3

        api = httpx.get(gw.url + "/aibridge/api/v1/usage?group_by=user", headers={"authorization": f"Bearer {admin}"},
                        trust_env=False).json()
        (row,) = api["data"]
        assert (row["user"], row["interceptions"], row["input_tokens"], row["output_tokens"]) == ("boss", 3, 39, 24)
        listed = httpx.get(gw.url + "/aibridge/api/v1/interceptions", headers={"authorization": f"Bearer {admin}"},
                           trust_env=False).json()
        assert len(listed["data"]) == 3

        for fmt in ("parquet", "csv"):
            out = tmp_path / f"export-{fmt}"
            r = gw.cli("export", "--format", fmt, "--out", str(out))
            assert r.returncode == 0, r.stderr
            check = duckdb.connect()
            read = "read_parquet" if fmt == "parquet" else "read_csv_auto"
            rows = check.execute(f"SELECT status, stream, metadata FROM {read}('{out}/aibridge_interceptions.{fmt}')"
                                 ).fetchall()
            prompts = check.execute(f"SELECT prompt FROM {read}('{out}/aibridge_user_prompts.{fmt}') ORDER BY 1"
                                    ).fetchall()
            assert [r[0] for r in rows] == ["completed"] * 3 and {r[1] for r in rows} == {False}
            assert all(json.loads(r[2])["upstream_path"] == "/v1/messages" for r in rows)
            assert [p[0] for p in prompts] == ["50% of it; 'quoted'", "first", "second"]
            assert not (out / "aibridge_tokens.parquet").exists()

        with psycopg.connect(dsn) as conn:  # an interception from 100 days ago, with its prompt
            conn.execute("UPDATE aibridge_interceptions SET started_at = %s WHERE id = (SELECT interception_id "
                         "FROM aibridge_user_prompts WHERE prompt = 'first')",
                         [dt.datetime.now(dt.UTC) - dt.timedelta(days=100)])
        r = gw.cli("prune", "--days", "30")
        assert r.returncode == 0 and "deleted 1" in r.stdout, r.stdout + r.stderr
        assert sorted(x["prompt"] for x in gw.sql("SELECT prompt FROM aibridge_user_prompts")) == [
            "50% of it; 'quoted'", "second"]
    finally:
        gw.stop()


def test_migrate_store_copies_a_duckdb_audit_into_postgresql_once(cluster, tmp_path, mock):
    """`aibridge migrate-store --to postgresql://…`: users, tokens and every audit row, exactly once however often
    it runs; a gateway on PostgreSQL then takes the old tokens and reports the old usage."""
    import json

    from tests.support.gateway import Gateway
    from tests.support.mock_upstream import Reply
    from tests.support.wire import anthropic_message

    duck_gw = Gateway(tmp_path / "duck", mock.url).start()
    try:
        token = duck_gw.new_user("veteran")
        mock.default = Reply.json(anthropic_message("ok", (21, 9)))
        _recorded_calls(duck_gw, token, ["old one", "old two"])
        duck_gw.interceptions("veteran", 2)
        dsn = cluster.create_database("migrated")
        busy = duck_gw.cli("migrate-store", "--to", dsn)
        assert busy.returncode == 1 and "in use" in busy.stderr  # not while a gateway writes it
    finally:
        duck_gw.stop()

    first = duck_gw.cli("migrate-store", "--to", dsn, "--json")
    assert first.returncode == 0, first.stderr
    copied = {r["table"]: (r["rows"], r["copied"]) for r in json.loads(first.stdout.split("\n", 1)[1].rsplit("\n", 2)[0])}
    assert copied["aibridge_users"] == (1, 1) and copied["aibridge_tokens"] == (1, 1)
    assert copied["aibridge_interceptions"] == (2, 2) and copied["aibridge_user_prompts"] == (2, 2)
    again = duck_gw.cli("migrate-store", "--to", dsn, "--json")
    assert again.returncode == 0, again.stderr
    assert all(r["copied"] == 0 for r in json.loads(again.stdout.split("\n", 1)[1].rsplit("\n", 2)[0]))

    pg_gw = Gateway(tmp_path / "pg", mock.url,
                    extra={"storage": {"duckdb": str(tmp_path / "pg" / "spool.duckdb"), "postgres": dsn}}).start()
    try:
        _recorded_calls(pg_gw, token, ["new one"])  # the migrated token works
        rows = pg_gw.wait_for("SELECT p.prompt, u.input_tokens FROM aibridge_user_prompts p JOIN aibridge_token_usages u "
                              "ON u.interception_id = p.interception_id ORDER BY p.prompt", lambda rows: len(rows) == 3)
        assert [(r["prompt"], r["input_tokens"]) for r in rows] == [("new one", 21), ("old one", 21), ("old two", 21)]
        usage = json.loads(pg_gw.cli("usage", "--json").stdout)
        assert [(u["user"], u["interceptions"]) for u in usage] == [("veteran", 3)]
    finally:
        pg_gw.stop()

    with psycopg.connect(dsn, autocommit=True) as conn:  # a user of the same name, created separately in PostgreSQL
        conn.execute("UPDATE aibridge_users SET id = gen_random_uuid() WHERE name = 'veteran'")
    clash = duck_gw.cli("migrate-store", "--to", dsn)
    assert clash.returncode == 1 and "veteran" in clash.stderr


def test_postgresql_urls_never_leak_their_password(tmp_path, mock):
    """libpq quotes a URL it cannot parse whole: the config check, the CLI and the gateway's start-up say what is
    wrong without the password."""
    from tests.support.gateway import Gateway

    secret = "pw-SHOULD-NOT-APPEAR"
    malformed = f"postgresql://aibridge:{secret}@[db.internal/aibridge"
    unreachable = f"postgresql://aibridge:{secret}@127.0.0.1:1/aibridge"
    for name, url, named in (("malformed", malformed, "storage.postgres"), ("unreachable", unreachable, "127.0.0.1:1")):
        gw = Gateway(tmp_path / name, mock.url, extra={"storage": {"duckdb": str(tmp_path / f"{name}.duckdb"),
                                                                   "postgres": url}})
        r = gw.cli("users", "list")
        assert r.returncode == 1 and named in r.stderr and secret not in r.stderr + r.stdout
        with pytest.raises(RuntimeError) as started:
            gw.start()
        gw.stop()
        assert ("storage.postgres" if name == "malformed" else "PostgreSQL") in str(started.value)
        assert secret not in str(started.value)

    duck = Gateway(tmp_path / "source", mock.url)
    duck.op("users.add", name="someone")
    for url in (malformed, unreachable):
        r = duck.cli("migrate-store", "--to", url)
        assert r.returncode == 1 and secret not in r.stderr + r.stdout, r.stderr
    holding = [p.name for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert holding == ["aibridge.yaml", "aibridge.yaml"]  # only the two configs that hold it: no log, no spool


def test_calls_a_dead_gateway_left_in_progress_for_hours_are_ended_by_the_fleet(cluster, tmp_path, mock):
    """No gateway may close every in-progress row at start-up in a fleet (the others' are live); rows hours old
    can only have been left by a gateway that died, and are ended failed. A recent one is left alone."""
    import datetime as dt
    import time

    from tests.support.gateway import Gateway

    dsn = cluster.create_database("abandoned")
    with psycopg.connect(dsn) as conn:
        migrate_postgres(conn)
    now = dt.datetime.now(dt.UTC)
    old, recent = "aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"
    from aibridge_gw.store.pg import PgStore

    store = PgStore(dsn, tmp_path / "seed")
    store.open()
    store.submit(_interception(old, now - dt.timedelta(hours=7)))
    store.submit(_interception(recent, now - dt.timedelta(minutes=3)))
    store.flush().result(timeout=30)
    store.close()
    gw = Gateway(tmp_path / "gw", mock.url,
                 extra={"storage": {"duckdb": str(tmp_path / "gw" / "spool.duckdb"), "postgres": dsn}}).start()
    try:
        deadline = time.monotonic() + 10
        while True:
            with psycopg.connect(dsn) as conn:
                rows = dict(conn.execute("SELECT CAST(id AS VARCHAR), status || ': ' || coalesce(error, '') "
                                         "FROM aibridge_interceptions").fetchall())
            if rows[old] != "in_progress: " or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert rows == {old: "failed: gateway stopped (abandoned in progress)", recent: "in_progress: "}
    finally:
        gw.stop()


def test_sql_on_postgresql_cannot_touch_the_servers_files(cluster, tmp_path):
    """`aibridge sql` on PostgreSQL runs read-only and as a role that may not use the server's file functions,
    even when the configured role is a superuser (as here); every audit table stays queryable by name."""
    from aibridge_gw.store.ops import OpError

    from tests.support.gateway import Gateway

    dsn = cluster.create_database("nofiles")
    gw = Gateway(tmp_path / "gw", "http://127.0.0.1:9", extra={"storage": {"duckdb": str(tmp_path / "s.duckdb"),
                                                                            "postgres": dsn}})
    gw.op("users.add", name="mallory")  # creates the schema
    written = tmp_path / "written.txt"
    for hostile in ("SELECT pg_read_file('/etc/hostname')", "SELECT pg_read_binary_file('/etc/hostname')",
                    "SELECT * FROM pg_ls_dir('/')", "SELECT pg_stat_file('/etc/hostname')",
                    "SELECT lo_export(lo_from_bytea(0, 'x'), '%s')" % written,
                    f"COPY (SELECT 1) TO '{written}'", f"COPY (SELECT 1) TO PROGRAM 'touch {written}'",
                    "EXPLAIN ANALYZE UPDATE aibridge_users SET role = 'admin'"):
        with pytest.raises(OpError):
            gw.op("sql", query_text=hostile)
    assert not written.exists()
    assert gw.sql("SELECT role FROM aibridge_users") == [{"role": "member"}]
    for table in ("aibridge_interceptions", "aibridge_token_usages", "aibridge_user_prompts", "aibridge_tool_usages",
                  "aibridge_model_thoughts", "aibridge_users", "aibridge_tokens"):
        assert gw.sql(f"SELECT count(*) AS n FROM {table}")[0]["n"] >= 0


def test_clamped_and_estimated_usages_are_recorded_in_postgresql_and_poison_no_fleet_budget(cluster, tmp_path, mock):
    """#22 on PostgreSQL: a usage beyond BIGINT is recorded clamped and flagged (never dead-lettered) and the fleet's
    token counters, rebuilt from the database every second, do not count it; a stream cut when its client left
    (drain off) is recorded with usage_estimated."""
    import json
    import time

    import httpx

    from tests.support.gateway import Gateway
    from tests.support.mock_upstream import Reply
    from tests.support.wire import PATHS, anthropic_message, anthropic_stream, api_request, request_body

    dsn = cluster.create_database("usage_values")
    gw = Gateway(tmp_path / "gw", mock.url, extra={
        "storage": {"duckdb": str(tmp_path / "local" / "spools.duckdb"), "postgres": dsn},
        "timeouts": {"drain_after_disconnect_seconds": 0},
        "budgets": {"users": {"capped": {"tokens_per_day": 1000}}}})
    try:
        gw.start()
        token = gw.new_user("capped")
        huge = anthropic_message()
        huge["usage"]["input_tokens"] = 2**63 + 5
        mock.script(Reply.json(huge), Reply.sse(anthropic_stream(usage=(18, 254)), delay=0.3))
        body = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        post = lambda: httpx.post(gw.url + "/anthropic/v1/messages", json=body,  # noqa: E731
                                  headers={"x-api-key": token}, trust_env=False, timeout=30).status_code
        deadline = time.monotonic() + 10
        while (status := post()) == 401 and time.monotonic() < deadline:  # the token reaches the fleet's directory
            time.sleep(0.2)
        assert status == 200
        api_request(gw.port, PATHS["anthropic"], token, request_body("anthropic"), read_until=b"content_block_stop")
        rows = gw.wait_for("SELECT input_tokens, output_tokens, usage_estimated, CAST(metadata AS VARCHAR) AS metadata "
                           "FROM aibridge_token_usages ORDER BY input_tokens", lambda rows: len(rows) == 2)
        assert [(r["input_tokens"], r["output_tokens"], r["usage_estimated"]) for r in rows] == [
            (18, 1, True), (2**63 - 1, 7, False)]
        assert json.loads(rows[1]["metadata"])["usage_clamped"] == ["input_tokens"]
        time.sleep(2.5)  # the fleet's counters refreshed from the database
        mock.script(Reply.json(anthropic_message()))
        assert post() == 200
    finally:
        gw.stop()


def test_provider_objects_are_claimed_once_across_gateways_on_postgresql(cluster, tmp_path):
    """Two gateways fetching the same batch results at once: one UPDATE decides, so usage is metered once."""
    from aibridge_gw.store.pg import PgStore

    from tests.test_paid_objects import claim_scenario

    dsn = cluster.create_database("claims")
    stores = [PgStore(dsn, tmp_path / name / "pg") for name in ("a", "b")]
    for store in stores:
        store.open()
    try:
        claim_scenario(stores)
    finally:
        for store in stores:
            store.close()
