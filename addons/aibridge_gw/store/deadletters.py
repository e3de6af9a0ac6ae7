"""Dead letters: records the database refused as data (a constraint, a type), one JSON line each in
`<db>.deadletter.jsonl` (or a PostgreSQL writer's `postgres-….deadletter.jsonl`), with when and why.

`aibridge store replay-deadletters` applies them again once the cause is fixed (a user row restored, a column
widened): each entry in its own transaction, so one that is still refused stays alone; applied ones leave the
file. Replaying is idempotent like every record (an insert whose row exists adds nothing). The writer appends
and the command rewrites under an exclusive lock, never held while records are applied: nothing appended
meanwhile is lost."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

SUFFIX = ".deadletter.jsonl"


def files_for(duckdb_path: Path, postgres: str | None) -> list[Path]:
    """The dead-letter files a config's writers use: the DuckDB writer's, or every writer's of this machine for
    that PostgreSQL database (one per gateway process, beside its spool)."""
    if postgres:
        from ..config import postgres_tag

        return sorted(duckdb_path.parent.glob(f"postgres-{postgres_tag(postgres)}-*" + SUFFIX))
    return [duckdb_path.with_name(duckdb_path.name + SUFFIX)]


def append(path: Path, lines: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, lines)
    finally:
        os.close(fd)  # closing releases the lock


def replay(path: Path, apply: Callable[[list], None]) -> dict:
    """Apply every entry of one file with `apply(record)`; drop the applied ones from it. Returns counts and the
    first error of each entry still refused."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            lines = [line for line in f.read().split(b"\n") if line.strip()]
    except FileNotFoundError:
        return {"file": str(path), "entries": 0, "applied": 0, "kept": 0, "errors": []}
    applied: list[bytes] = []
    errors: list[str] = []
    for line in lines:
        try:
            entry = json.loads(line)
            apply(entry["record"])
        except Exception as e:  # still refused (or unreadable): it stays in the file
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            continue
        applied.append(line)
    if applied:
        with open(path, "r+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            current = [line for line in f.read().split(b"\n") if line.strip()]
            remove = {}
            for line in applied:
                remove[line] = remove.get(line, 0) + 1
            kept = []
            for line in current:  # lines appended since the first read stay
                if remove.get(line):
                    remove[line] -= 1
                else:
                    kept.append(line)
            f.seek(0)
            f.truncate()
            f.write(b"".join(line + b"\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
    return {"file": str(path), "entries": len(lines), "applied": len(applied), "kept": len(lines) - len(applied),
            "errors": errors}
