"""Moving the store between engines, in column-wise chunks (the writer's own batch statements):

- `aibridge migrate-store --to postgresql://…` copies a DuckDB audit, users (with their groups) and tokens into
  PostgreSQL.
  Idempotent: run it again (after more traffic, or after an interruption) and it adds only what is missing.
- `aibridge export` on PostgreSQL copies the tables into a temporary DuckDB file that DuckDB writes as parquet or
  csv, so both engines export the same files with the same types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class CopyRefused(Exception):
    """The copy would be wrong; nothing was copied. The message says what to do."""


# Every table a store holds, in an order that keeps references valid; key columns for ON CONFLICT.
# aibridge_request_counts is not copied: per-minute counters mean nothing an hour later; nor are
# aibridge_mcp_oauth_logins: sign-ins under way last ten minutes.
COPIED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("aibridge_users", ("id",)),
    ("aibridge_user_groups", ("user_id", "group_name")),
    ("aibridge_budget_notices", ("user_id", "limit_name", "period", "threshold")),
    ("aibridge_prices", ("model",)),
    ("aibridge_tokens", ("id",)),
    ("aibridge_mcp_tokens", ("user_id", "server")),
    ("aibridge_mcp_oauth_clients", ("server", "issuer", "redirect_uri")),
    ("aibridge_mcp_oauth_tokens", ("user_id", "server")),
    ("aibridge_interceptions", ("id",)),
    ("aibridge_token_usages", ("id",)),
    ("aibridge_user_prompts", ("id",)),
    ("aibridge_tool_usages", ("id",)),
    ("aibridge_model_thoughts", ("id",)),
    ("aibridge_provider_objects", ("id",)),
    ("aibridge_policy_decisions", ("id",)),
    ("aibridge_mcp_calls", ("id",)),
)
CHUNK = 5000


def _columns(execute: Callable[[str], Any], table: str) -> tuple[str, ...]:
    return tuple(r[0] for r in execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = '%s' ORDER BY ordinal_position"
        % table).fetchall())


def duckdb_to_postgres(duck, pg, progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """Copy every table of the DuckDB connection `duck` into PostgreSQL (`pg`, a psycopg connection in autocommit
    mode), in one transaction: all of it or nothing. Rows already there are kept — PostgreSQL is where users and
    tokens live once a fleet runs — except an interception still in progress there, which takes DuckDB's ending."""
    from .schema import migrate, migrate_postgres
    from .statements import pg_insert_statements

    migrate(duck)  # an older DuckDB file gains the newer (empty) columns first, in memory of this transaction
    migrate_postgres(pg)
    clashes = _clashing_users(duck, pg)
    if clashes:
        raise CopyRefused("these user names exist in both stores with different ids: " + ", ".join(clashes)
                      + "; rename or remove them in PostgreSQL first (their calls would belong to the wrong user)")
    tables = {t: _columns(duck.execute, t) for t, _ in COPIED}
    statements = pg_insert_statements(pg, tables)
    result = {}
    with pg.transaction():
        for table, key in COPIED:
            cols = tables[table]
            sql = statements[table] + f" ON CONFLICT ({', '.join(key)}) " + _on_conflict(table, cols)
            cur = duck.execute(f"SELECT {', '.join(cols)} FROM {table}")
            read = copied = 0
            while rows := cur.fetchmany(CHUNK):
                copied += pg.execute(sql, [list(col) for col in zip(*rows)]).rowcount
                read += len(rows)
                if progress:
                    progress(table, read, copied)
            result[table] = {"rows": read, "copied": copied}
    return result


def _on_conflict(table: str, cols: tuple[str, ...]) -> str:
    if table != "aibridge_interceptions":
        return "DO NOTHING"
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "id")
    return f"DO UPDATE SET {sets} WHERE aibridge_interceptions.status = 'in_progress'"


def _clashing_users(duck, pg) -> list[str]:
    theirs = {name: str(uid) for uid, name in pg.execute("SELECT id, name FROM aibridge_users").fetchall()}
    return sorted(name for uid, name in duck.execute("SELECT id, name FROM aibridge_users").fetchall()
                  if name in theirs and theirs[name] != str(uid))


def postgres_to_duckdb(pg, duck, tables: tuple[str, ...]) -> None:
    """Copy `tables` from PostgreSQL into a DuckDB connection whose schema is migrated (export on PostgreSQL).
    JSON comes over as its text, as DuckDB stores it."""
    from psycopg.types.string import TextLoader

    from .statements import insert_statements

    columns = {t: _columns(duck.execute, t) for t in tables}
    statements = insert_statements(duck, columns)
    with pg.transaction():  # one snapshot of every table; server-side cursors need a transaction
        for table in tables:
            with pg.cursor(name=f"aibridge_export_{table}") as cur:  # server-side: never a whole table in memory
                cur.adapters.register_loader("json", TextLoader)
                cur.execute(f"SELECT {', '.join(columns[table])} FROM {table}")
                while rows := cur.fetchmany(CHUNK):
                    duck.execute(statements[table], [list(col) for col in zip(*rows)])
