"""How the CLI reaches the database: through a running gateway (which owns the DuckDB file) or directly.

A running gateway writes `<db>.gateway.json` (mode 0600) with its address and a random secret; the CLI
posts operations to `/aibridge/control/v1/op` with that secret. Without a gateway the CLI opens the file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import duckdb

from ..config import postgres_error, postgres_label
from ..store import ops
from ..store.schema import migrate, transaction

CONTROL_PATH = "/aibridge/control/v1/op"


def runtime_file(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".gateway.json")


def write_runtime_file(db_path: Path, url: str) -> str:
    secret = secrets.token_urlsafe(32)
    path = runtime_file(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "url": url, "secret": secret}, f)
    os.replace(tmp, path)
    return secret


def remove_runtime_file(db_path: Path, secret: str | None) -> None:
    path = runtime_file(db_path)
    try:
        if secret is None or json.loads(path.read_text()).get("secret") == secret:
            path.unlink()
    except (OSError, ValueError):
        pass


class GatewayUnreachable(Exception):
    pass


def run_op(db_path: Path, name: str, args: dict[str, Any], postgres: str | None = None) -> Any:
    """Run an admin operation via the running gateway if there is one, else on the file directly. With
    PostgreSQL, which takes any number of writers, always directly: gateways pick changes up within a second."""
    if postgres:
        return _postgres(postgres, name, args)
    try:
        return _remote(db_path, name, args)
    except GatewayUnreachable:
        return _local(db_path, name, args)


def run_gateway_op(db_path: Path, name: str, args: dict[str, Any], offline=None,
                   missing: str = "upstream key state lives in the gateway's memory (a restart starts every key "
                                  "afresh)") -> Any:
    """An operation on the running gateway's own memory (key pools, MCP servers); without one, `offline()` answers
    when given, else there is nothing to do (`missing` says why)."""
    try:
        return _remote(db_path, name, args)
    except GatewayUnreachable:
        if offline is not None:
            return offline()
        raise ops.OpError(f"no gateway is running with {db_path}; {missing}") from None


def _remote(db_path: Path, name: str, args: dict) -> Any:
    import httpx

    try:
        info = json.loads(runtime_file(db_path).read_text())
    except (OSError, ValueError):
        raise GatewayUnreachable() from None
    if not _alive(info.get("pid")):  # left behind by a gateway that was killed
        raise GatewayUnreachable()
    try:
        # trust_env=False: an HTTPS_PROXY meant for AI clients must not capture the CLI's own call.
        r = httpx.post(
            info["url"].rstrip("/") + CONTROL_PATH,
            json={"op": name, "args": args},
            headers={"authorization": f"Bearer {info['secret']}"},
            timeout=60,
            trust_env=False,
        )
    except httpx.TransportError:
        raise GatewayUnreachable() from None
    try:
        payload = r.json()
    except ValueError:
        raise ops.OpError(f"gateway answered {r.status_code} without JSON") from None
    if r.status_code != 200:
        raise ops.OpError(payload.get("error", {}).get("message") or f"gateway answered {r.status_code}")
    return payload["result"]


def _postgres(dsn: str, name: str, args: dict) -> Any:
    import psycopg

    from ..store.pg import PgConnection
    from ..store.schema import migrate_postgres

    fn, writes = ops.OPS[name]
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as e:
        raise ops.OpError(f"cannot connect to {postgres_label(dsn)}: {postgres_error(e, dsn)}") from None
    try:
        if writes:
            migrate_postgres(conn)
        with transaction(PgConnection(conn)) as c:
            return fn(c, **args)
    except psycopg.Error as e:
        raise ops.OpError(postgres_error(e, dsn)) from None
    finally:
        conn.close()


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local(db_path: Path, name: str, args: dict) -> Any:
    fn, writes = ops.OPS[name]
    if not writes and not db_path.exists():
        # A query must not create an empty database somewhere unexpected (a wrong working directory or config).
        raise ops.OpError(f"no database at {db_path}: check storage.duckdb in the config (relative paths are "
                          "relative to the config file), or start the gateway once")
    read_only = not writes
    if not read_only:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    # User SQL gets an instance that cannot reach the file system and whose settings cannot change; it runs
    # in a read-only transaction of its own (ops.sql). Every other operation runs the gateway's own SQL.
    user_sql = name == "sql"
    config = {"enable_external_access": False, "lock_configuration": True} if user_sql else {}
    try:
        conn = duckdb.connect(str(db_path), read_only=read_only, config=config)
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            raise ops.OpError(
                f"{db_path} is locked by another process and no running gateway answered; "
                "stop that process or start the gateway with this database"
            ) from None
        raise ops.OpError(str(e)) from None
    try:
        if not read_only:
            migrate(conn)
        if user_sql:
            return fn(conn, **args)
        with transaction(conn):
            return fn(conn, **args)
    finally:
        conn.close()
