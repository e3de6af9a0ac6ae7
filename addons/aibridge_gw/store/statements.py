"""The batch statements of each engine, built once from the schema's own column types: every column bound as one
typed list (DuckDB) or array (PostgreSQL) and unnested. Used by the writers and by copies between engines."""

from __future__ import annotations

from .rows import COLUMNS

# DuckDB's information_schema spellings of the column types -> PostgreSQL array casts.
PG_TYPES = {"uuid": "uuid", "character varying": "varchar", "timestamp with time zone": "timestamptz", "json": "json",
            "boolean": "boolean", "bigint": "bigint", "integer": "integer", "double precision": "float8",
            "real": "float4"}


def _types(conn, spelled=lambda t: t) -> dict[str, dict[str, str]]:
    types: dict[str, dict[str, str]] = {}
    for table, column, dtype in conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_name LIKE 'aibridge_%' ORDER BY table_name, ordinal_position").fetchall():
        types.setdefault(table, {})[column] = spelled(dtype)
    return types


def column_types(conn) -> dict[str, dict[str, str]]:
    """Table -> column -> DuckDB type, of every aibridge table (in column order)."""
    return _types(conn)


def pg_column_types(raw) -> dict[str, dict[str, str]]:
    """Table -> column -> PostgreSQL array element type (over a psycopg connection)."""
    return _types(raw, PG_TYPES.__getitem__)


def insert_statements(conn, tables: dict[str, tuple[str, ...]] = COLUMNS) -> dict[str, str]:
    """Batch inserts for DuckDB (a list of NULLs alone gives DuckDB no type to infer, hence the casts)."""
    types = column_types(conn)
    out = {}
    for table, cols in tables.items():
        sel = ", ".join(f"unnest(${n + 1}::{types[table][c]}[])" for n, c in enumerate(cols))
        out[table] = f"INSERT INTO {table} ({', '.join(cols)}) SELECT {sel}"
    return out


def pg_insert_statements(raw, tables: dict[str, tuple[str, ...]] = COLUMNS) -> dict[str, str]:
    """Batch inserts for PostgreSQL."""
    types = pg_column_types(raw)
    out = {}
    for table, cols in tables.items():
        arrays = ", ".join(f"%s::{types[table][c]}[]" for c in cols)
        out[table] = f"INSERT INTO {table} ({', '.join(cols)}) SELECT * FROM unnest({arrays})"
    return out
