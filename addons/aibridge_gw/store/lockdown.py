"""DuckDB instances that user SQL (`aibridge sql`) can reach are locked down: no file system access beyond the
database's own files, and a configuration nobody can change afterwards.

DuckDB settings belong to the database instance, not to a connection: the gateway's writer sets them once, right
after opening and migrating its file, so every cursor of that instance (the writer's own, the reader threads' that
run admin queries) is bound by them. What the gateway itself needs from the file system still works: the database
file, its WAL and its temporary directory are DuckDB's own; `aibridge export` writes through the one directory left
open (`export_staging`), then moves the files to their destination in Python.
"""

from __future__ import annotations

from pathlib import Path

import duckdb


def export_staging(db_path: Path) -> Path:
    """The one directory a locked-down instance may write files to: `<db>.export/` (what `export` writes, first)."""
    return db_path.with_name(db_path.name + ".export")


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def lock_down(conn: duckdb.DuckDBPyConnection, db_path: Path) -> None:
    """Turn off external access (files, other databases, extensions' downloads) except the export staging
    directory and DuckDB's own temporary directory, and lock the configuration. Idempotent: an instance already
    locked is left as it is."""
    if locked(conn):
        return
    allowed = [str(export_staging(db_path)) + "/", str(db_path) + ".tmp/"]
    conn.execute(f"SET allowed_directories = [{', '.join(_literal(a) for a in allowed)}]")
    conn.execute("SET enable_external_access = false")
    conn.execute("SET lock_configuration = true")


def locked(conn) -> bool:
    """External access is off and the configuration is locked (so it stays off)."""
    external, frozen = conn.execute(
        "SELECT current_setting('enable_external_access'), current_setting('lock_configuration')").fetchone()
    return not external and bool(frozen)


def staging_directory(conn) -> Path | None:
    """Where a locked-down instance may write (its first allowed directory); None when it may write anywhere."""
    if not locked(conn):
        return None
    dirs = conn.execute("SELECT current_setting('allowed_directories')").fetchone()[0]
    return Path(dirs[0]) if dirs else None
