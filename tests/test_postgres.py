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
               "uuid": "UUID", "json": "JSON", "boolean": "BOOLEAN", "bigint": "BIGINT", "integer": "INTEGER"}
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
