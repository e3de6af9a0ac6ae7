"""Admin operations (users, tokens, read-only SQL), run by the CLI on its own connection or by a running
gateway on behalf of the CLI. Each takes a DuckDB connection and returns JSON-able data."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from ..config import Limits
from ..policy.auth import Actor, hash_token, mask, new_token
from ..policy.budgets import Budgets, budget_report, count_request, prune_request_counts, usage_rows, usage_totals
from ..pricing import PriceTable
from . import mcp_oauth, reports
from .lockdown import locked, staging_directory
from .reports import jsonable

ROLES = ("member", "admin")


class OpError(Exception):
    """A clear, user-facing failure (unknown user, bad SQL...)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _user(conn, name: str) -> tuple:
    row = conn.execute("SELECT id, name, role FROM aibridge_users WHERE name = ?", [name]).fetchone()
    if row is None:
        raise OpError(f"unknown user {name!r}")
    return row


def users_add(conn, name: str, role: str = "member", service_account: bool = False) -> dict:
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise OpError("user name must be 1-200 characters")
    if role not in ROLES:
        raise OpError(f"role must be one of {', '.join(ROLES)}")
    if conn.execute("SELECT 1 FROM aibridge_users WHERE name = ?", [name]).fetchone():
        raise OpError(f"user {name!r} already exists")
    uid = uuid.uuid4()
    conn.execute("INSERT INTO aibridge_users (id, name, role, created_at, service_account) VALUES (?, ?, ?, ?, ?)",
                 [uid, name, role, _now(), bool(service_account)])
    return {"id": str(uid), "name": name, "role": role, "service_account": bool(service_account)}


def users_list(conn) -> dict:
    result = query(
        conn,
        "SELECT u.name, u.role, u.service_account, u.id, u.created_at, "
        "count(t.id) FILTER (WHERE t.revoked_at IS NULL) AS active_tokens "
        "FROM aibridge_users u LEFT JOIN aibridge_tokens t ON t.user_id = u.id "
        "GROUP BY 1, 2, 3, 4, 5 ORDER BY u.name",
    )
    groups = groups_by_user(conn) if reports.table_exists(conn, "aibridge_user_groups") else {}
    result["columns"].append("groups")
    for row in result["rows"]:
        row.append(groups.get(str(row[3]), []))
    return result


# --- groups: a user may be in several; names are lower-case, validated and deduplicated -------------------

GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_GROUPS = 64  # per user: each travels with every request's identity (policies test user.groups)


def group_names(groups) -> list[str]:
    """Group names as stored: stripped, lower-case, deduplicated, sorted; a name that is not one is refused.
    Takes a list, or the CLI's comma-separated text (empty: no groups)."""
    if groups is None:
        return []
    if isinstance(groups, str):
        groups = groups.split(",")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) for g in groups):
        raise OpError("groups must be a list of names")
    names = sorted({g.strip().lower() for g in groups if g.strip()})
    bad = [g for g in names if not GROUP_NAME.match(g)]
    if bad:
        raise OpError(f"bad group name {bad[0]!r}: 1-64 characters, letters, digits, '_', '.', '-', starting "
                      "with a letter or digit")
    if len(names) > MAX_GROUPS:
        raise OpError(f"a user may be in {MAX_GROUPS} groups at most ({len(names)} given)")
    return names


def groups_by_user(conn) -> dict[str, list[str]]:
    """User id -> the user's groups, sorted."""
    out: dict[str, list[str]] = {}
    for uid, name in conn.execute(
            "SELECT user_id, group_name FROM aibridge_user_groups ORDER BY user_id, group_name").fetchall():
        out.setdefault(str(uid), []).append(name)
    return out


def users_groups_set(conn, name: str, groups) -> dict:
    """Replace the user's groups with `groups` (none clears them)."""
    names = group_names(groups)
    uid, uname, _ = _user(conn, name)
    had = [r[0] for r in conn.execute("SELECT group_name FROM aibridge_user_groups WHERE user_id = ? "
                                      "ORDER BY group_name", [uid]).fetchall()]
    gone = [g for g in had if g not in names]
    for g in gone:
        conn.execute("DELETE FROM aibridge_user_groups WHERE user_id = ? AND group_name = ?", [uid, g])
    now = _now()
    for g in names:
        if g not in had:
            conn.execute("INSERT INTO aibridge_user_groups (user_id, group_name, created_at) VALUES (?, ?, ?)",
                         [uid, g, now])
    return {"name": uname, "groups": names, "added": [g for g in names if g not in had], "removed": gone}


def groups_list(conn) -> dict:
    """Every group with its members (users by name, sorted)."""
    members: dict[str, list[str]] = {}
    if not reports.table_exists(conn, "aibridge_user_groups"):  # a file no gateway of this version opened yet
        return {"columns": ["group", "members", "users"], "rows": []}
    for group, user in conn.execute(
            "SELECT g.group_name, u.name FROM aibridge_user_groups g JOIN aibridge_users u ON u.id = g.user_id "
            "ORDER BY g.group_name, u.name").fetchall():
        members.setdefault(group, []).append(user)
    return {"columns": ["group", "members", "users"],
            "rows": [[g, m, len(m)] for g, m in members.items()]}


def tokens_create(conn, user: str, name: str | None = None) -> dict:
    uid, uname, _ = _user(conn, user)
    token = new_token()
    tid = secrets.token_hex(6)
    conn.execute(
        "INSERT INTO aibridge_tokens VALUES (?, ?, ?, ?, ?, ?, NULL)",
        [tid, uid, name, hash_token(token), mask(token), _now()],
    )
    return {"id": tid, "user": uname, "name": name, "hint": mask(token), "token": token}


def tokens_list(conn, user: str | None = None) -> dict:
    where, params = "", []
    if user:
        _user(conn, user)
        where, params = "WHERE u.name = ?", [user]
    return query(
        conn,
        "SELECT t.id, u.name AS user, t.name, t.hint, t.created_at, t.revoked_at, "
        "CASE WHEN t.revoked_at IS NULL THEN 'active' ELSE 'revoked' END AS state "
        f"FROM aibridge_tokens t JOIN aibridge_users u ON u.id = t.user_id {where} ORDER BY t.created_at",
        params,
    )


def tokens_revoke(conn, id: str) -> dict:
    row = conn.execute("SELECT revoked_at FROM aibridge_tokens WHERE id = ?", [id]).fetchone()
    if row is None:
        raise OpError(f"unknown token {id!r}")
    if row[0] is not None:
        return {"id": id, "revoked": True, "already": True}
    conn.execute("UPDATE aibridge_tokens SET revoked_at = ? WHERE id = ?", [_now(), id])
    return {"id": id, "revoked": True, "already": False}


_READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def postgres(conn) -> bool:
    return getattr(conn, "dialect", "duckdb") == "postgres"


def sql(conn, query_text: str, limit: int | None = None) -> dict:
    """Run read-only SQL: only SELECT (incl. WITH, SHOW, DESCRIBE) and EXPLAIN statements pass.

    What holds on DuckDB does not rest on reading the text: the statements run in a READ ONLY transaction (DuckDB
    refuses any write in it, `EXPLAIN ANALYZE DELETE …`, a data-modifying CTE or `nextval` included) that is
    rolled back, on an instance without external access and with its configuration locked (see lockdown.py:
    no `read_text`, `COPY … TO`, `ATTACH`, `INSTALL`, file scans; the gateway's writer locks its instance at open,
    the CLI opens the file read-only and locked). The statement types are checked first, for a clear refusal."""
    if postgres(conn):
        return _postgres_sql(conn.raw, query_text, limit)
    try:
        statements = duckdb.extract_statements(query_text)
    except duckdb.Error as e:
        raise OpError(str(e).splitlines()[0]) from None
    if not statements:
        raise OpError("empty query")
    for st in statements:
        if st.type not in _READ_ONLY:
            raise OpError(f"only read-only queries are allowed (got {st.type.name})")
    if not locked(conn):  # never run user SQL where it could reach the file system
        raise OpError("refusing to run SQL on a database instance that can reach the file system")
    result = None
    conn.execute("BEGIN TRANSACTION READ ONLY")
    try:
        for st in statements:
            result = query(conn, st.query, limit=limit)
    except duckdb.TransactionException as e:
        if "read-only" in str(e):
            raise OpError("only read-only queries are allowed (the statement would write)") from None
        raise OpError(str(e).strip().splitlines()[0]) from None
    except duckdb.PermissionException:
        raise OpError("only read-only queries are allowed (no file system access from SQL)") from None
    except duckdb.Error as e:
        raise OpError(str(e).strip().splitlines()[0]) from None
    finally:
        try:
            conn.execute("ROLLBACK")
        except duckdb.Error:  # an instance that broke mid-query has nothing to roll back
            pass
    return result


SQL_TIMEOUT = "120s"


# Predefined roles that let a role read or write the server's files or run programs on it (besides superuser).
PG_FILE_ROLES = ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program")


def _pg_without_file_access(raw) -> None:
    """Inside the query's transaction: make sure PostgreSQL's own privileges refuse the server's file functions
    (`pg_read_file`, `pg_ls_dir`, `lo_export`, `COPY … TO '<file>'`/`PROGRAM`). A role without superuser and
    without the predefined file roles cannot use them already; a role that has them runs the query as
    `pg_read_all_data` (`SET LOCAL ROLE`, undone with the transaction), which may read every table and no file.
    Without that role to step down to, the query is refused."""
    files, can_read_all = raw.execute(
        "SELECT r.rolsuper OR " + " OR ".join(f"pg_has_role(current_user, '{x}', 'MEMBER')" for x in PG_FILE_ROLES)
        + ", CASE WHEN to_regrole('pg_read_all_data') IS NULL THEN false "
        "ELSE pg_has_role(current_user, 'pg_read_all_data', 'MEMBER') END "
        "FROM pg_roles r WHERE r.rolname = current_user").fetchone()
    if not files:
        return
    if not can_read_all:
        raise OpError("refusing to run SQL as a PostgreSQL role that can read or write the server's files "
                      "(superuser or a member of " + ", ".join(PG_FILE_ROLES) + ") and cannot step down to "
                      "pg_read_all_data: use a role without those privileges")
    raw.execute("SET LOCAL ROLE pg_read_all_data")


def _postgres_sql(raw, text: str, limit: int | None) -> dict:
    """On PostgreSQL the server enforces read-only: the query runs in a READ ONLY transaction, which refuses a
    data-modifying CTE, EXPLAIN ANALYZE of a DELETE or a function that writes; as a role that may not touch the
    server's files (see _pg_without_file_access); with a time limit."""
    import psycopg

    if not text.strip().rstrip(";").strip():
        raise OpError("empty query")
    try:
        with raw.transaction():  # a savepoint when the CLI's transaction is open: read-only still applies
            raw.execute("SET TRANSACTION READ ONLY")
            raw.execute(f"SET LOCAL statement_timeout = '{SQL_TIMEOUT}'")
            _pg_without_file_access(raw)
            cur = raw.execute(text.strip().rstrip(";").replace("%", "%%"), ())  # `%` as psycopg escapes it
            while cur.nextset():  # several statements: the last one's rows, as on DuckDB
                pass
            columns = [d.name for d in cur.description] if cur.description else []
            rows = (cur.fetchmany(limit) if limit else cur.fetchall()) if cur.description else []
    except psycopg.errors.ReadOnlySqlTransaction:
        raise OpError("only read-only queries are allowed") from None
    except psycopg.errors.InsufficientPrivilege as e:
        raise OpError(f"only read-only queries are allowed ({str(e).strip().splitlines()[0]})") from None
    except psycopg.Error as e:
        raise OpError(str(e).strip().splitlines()[0]) from None
    return {"columns": columns, "rows": [[jsonable(v) for v in r] for r in rows]}


def query(conn, text: str, params: list | None = None, limit: int | None = None) -> dict:
    cur = conn.execute(text, params or [])
    columns = [d[0] for d in cur.description] if cur.description else []
    rows = cur.fetchmany(limit) if limit else cur.fetchall()
    return {"columns": columns, "rows": [[jsonable(v) for v in r] for r in rows]}


def load_directory(conn) -> dict[str, Actor]:
    """Active tokens by hash, for the gateway's in-memory TokenDirectory (each with its user's groups)."""
    rows = conn.execute(
        "SELECT t.token_hash, u.id, u.name, u.role, t.id, t.hint, coalesce(u.service_account, false) "
        "FROM aibridge_tokens t JOIN aibridge_users u ON u.id = t.user_id WHERE t.revoked_at IS NULL"
    ).fetchall()
    groups = {uid: tuple(g) for uid, g in groups_by_user(conn).items()}
    return {r[0]: Actor(str(r[1]), r[2], r[3], r[4], r[5], bool(r[6]), groups.get(str(r[1]), ())) for r in rows}


SECRET_KEY_ENV = "AIBRIDGE_SECRET_KEY"


def _fernet():
    """The key that encrypts per-user MCP tokens; without one, nothing is stored."""
    import os

    from cryptography.fernet import Fernet

    key = os.environ.get(SECRET_KEY_ENV)
    if not key:
        return None
    try:
        return Fernet(key.encode())
    except ValueError:
        raise OpError(f"{SECRET_KEY_ENV} is not a valid Fernet key (32 url-safe base64-encoded bytes)") from None


def mcp_token_set(conn, user: str, server: str, token: str) -> dict:
    f = _fernet()
    if f is None:
        raise OpError(
            f"refusing to store an MCP token unencrypted: set {SECRET_KEY_ENV} for the gateway and the CLI "
            "(generate one with: python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
        )
    token = (token or "").strip()
    if not token:
        raise OpError("empty token")
    uid, uname, _ = _user(conn, user)
    conn.execute(
        "INSERT OR REPLACE INTO aibridge_mcp_tokens VALUES (?, ?, ?, ?, ?)",
        [uid, server, f.encrypt(token.encode()).decode(), mask(token), _now()],
    )
    return {"user": uname, "server": server, "hint": mask(token)}


def mcp_token_delete(conn, user: str, server: str) -> dict:
    uid, uname, _ = _user(conn, user)
    n = conn.execute("DELETE FROM aibridge_mcp_tokens WHERE user_id = ? AND server = ? RETURNING 1",
                     [uid, server]).fetchall()
    if not n:
        raise OpError(f"user {uname!r} has no token for MCP server {server!r}")
    return {"user": uname, "server": server, "deleted": True}


def mcp_token_list(conn, user: str | None = None) -> dict:
    where, params = "", []
    if user:
        _user(conn, user)
        where, params = "WHERE u.name = ?", [user]
    return query(
        conn,
        "SELECT u.name AS user, m.server, m.hint, m.updated_at FROM aibridge_mcp_tokens m "
        f"JOIN aibridge_users u ON u.id = m.user_id {where} ORDER BY u.name, m.server",
        params,
    )


def load_mcp_tokens(conn) -> dict[tuple[str, str], str]:
    """(user id, server) -> decrypted token, for the gateway's MCP registry."""
    import logging

    from cryptography.fernet import InvalidToken

    rows = conn.execute("SELECT user_id, server, ciphertext FROM aibridge_mcp_tokens").fetchall()
    if not rows:
        return {}
    f = _fernet()
    if f is None:
        logging.getLogger("aibridge").warning("%d per-user MCP token(s) stored but %s is not set: not used",
                                              len(rows), SECRET_KEY_ENV)
        return {}
    out = {}
    for uid, server, ct in rows:
        try:
            out[(str(uid), server)] = f.decrypt(ct.encode()).decode()
        except InvalidToken:
            logging.getLogger("aibridge").warning("MCP token of user %s for %s cannot be decrypted with %s",
                                                  uid, server, SECRET_KEY_ENV)
    return out


# --- OAuth sign-ins to MCP servers (store/mcp_oauth.py has the gateway's side) ------------------------------

def mcp_oauth_list(conn, user: str | None = None, server: str | None = None) -> dict:
    """Who is signed in to which OAuth server (no secret: when the access token expires, the scope, when)."""
    where, params = [], []
    if user:
        _user(conn, user)
        where.append("u.name = ?")
        params.append(user)
    if server:
        where.append("t.server = ?")
        params.append(server)
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    return query(conn, "SELECT u.name AS user, t.server, t.scope, t.expires_at AS access_expires_at, "
                       "t.created_at AS signed_in_at, t.updated_at FROM aibridge_mcp_oauth_tokens t "
                       f"JOIN aibridge_users u ON u.id = t.user_id {clause}ORDER BY u.name, t.server", params)


def mcp_oauth_logout(conn, user: str, server: str) -> dict:
    uid, uname, _ = _user(conn, user)
    if not mcp_oauth.token_drop(conn, str(uid), server):
        raise OpError(f"user {uname!r} is not signed in to MCP server {server!r}")
    return {"user": uname, "server": server, "signed_out": True}


AUDIT_CHILD_TABLES = ("aibridge_token_usages", "aibridge_user_prompts", "aibridge_tool_usages",
                      "aibridge_model_thoughts", "aibridge_policy_decisions")


def prune(conn, days: int) -> dict:
    """Delete interceptions (and their rows) that started more than `days` days ago; 0 keeps everything."""
    if days <= 0:
        return {"deleted": 0, "days": days}
    cutoff = _now() - dt.timedelta(days=days)
    old = "SELECT id FROM aibridge_interceptions WHERE started_at < ?"
    for table in AUDIT_CHILD_TABLES:
        conn.execute(f"DELETE FROM {table} WHERE interception_id IN ({old})", [cutoff])
    # A decision whose interception never reached the store (its start lost) goes by its own age, and so do MCP
    # gateway calls (and the decisions taken on them), which have no interception.
    conn.execute("DELETE FROM aibridge_policy_decisions WHERE created_at < ?", [cutoff])
    if reports.table_exists(conn, "aibridge_mcp_calls"):
        conn.execute("DELETE FROM aibridge_mcp_calls WHERE created_at < ?", [cutoff])
    n = conn.execute("DELETE FROM aibridge_interceptions WHERE started_at < ? RETURNING 1", [cutoff]).fetchall()
    # Batches and background responses older than the audit kept (providers keep results for 29 days at most).
    conn.execute("DELETE FROM aibridge_provider_objects WHERE created_at < ?", [cutoff])
    if reports.table_exists(conn, "aibridge_budget_notices"):  # once their period is long over (a month at most)
        conn.execute("DELETE FROM aibridge_budget_notices WHERE sent_at < ?", [_now() - dt.timedelta(days=62)])
    return {"deleted": len(n), "days": days, "cutoff": cutoff.isoformat()}


def users_set_role(conn, name: str, role: str) -> dict:
    if role not in ROLES:
        raise OpError(f"role must be one of {', '.join(ROLES)}")
    uid, uname, _ = _user(conn, name)
    conn.execute("UPDATE aibridge_users SET role = ? WHERE id = ?", [role, uid])
    return {"name": uname, "role": role}


def report(conn, kind: str, **kw) -> dict:
    """CLI reports: the same queries the admin API serves, seen by an administrator."""
    prices = price_book(conn, kw.pop("pricing_file", None))
    viewer = reports.Viewer.everyone()
    try:
        if kind == "usage":
            return reports.usage(conn, viewer, kw.get("group_by", "user"), prices, kw.get("since"),
                                 until=kw.get("until"))
        if kind == "sessions":
            return reports.sessions(conn, viewer, prices, {"initiator": kw.get("user")} if kw.get("user") else {},
                                    kw.get("limit", 50), include_auxiliary=bool(kw.get("include_auxiliary")))
        if kind == "prompts":
            return reports.prompts(conn, viewer, kw.get("user"), kw.get("search"), kw.get("limit", 50),
                                   include_auxiliary=bool(kw.get("include_auxiliary")))
        if kind in ("policy_decisions", "policy_summary") and not reports.table_exists(
                conn, "aibridge_policy_decisions"):  # read-only, on a file no gateway of this version opened yet
            return {"since": (kw.get("filters") or {}).get("since"), "data": [], "by_user": []}
        if kind in ("mcp_calls", "mcp_summary") and not reports.table_exists(conn, "aibridge_mcp_calls"):
            return {"since": (kw.get("filters") or {}).get("since"), "data": [], "by_user": [], "slowest": []}
        if kind == "mcp_calls":
            return reports.mcp_calls(conn, viewer, kw.get("filters") or {}, _limit(kw.get("limit", 50)))
        if kind == "mcp_summary":
            return reports.mcp_summary(conn, viewer, kw.get("filters") or {})
        if kind == "policy_decisions":
            return reports.policy_decisions(conn, viewer, kw.get("filters") or {}, _limit(kw.get("limit", 50)))
        if kind == "policy_summary":
            return reports.policy_summary(conn, viewer, kw.get("filters") or {})
        if kind == "budgets":
            spec = kw.get("budgets") or {}
            b = Budgets(Limits(**spec.get("default", {})),
                        {k: Limits(**v) for k, v in (spec.get("users") or {}).items()}, prices,
                        groups={k: Limits(**v) for k, v in (spec.get("groups") or {}).items()})
            b.load(conn)
            people = sorted(user_rows(conn), key=lambda r: r[1])
            return {"data": [{"user": name, "groups": groups, **b.status(uid, name, tuple(groups))}
                             for uid, name, groups in people], **budget_report(b, people)}
    except reports.BadParameter as e:
        raise OpError(str(e)) from None
    raise OpError(f"unknown report {kind!r}")


def _limit(limit) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise OpError("limit must be a positive number")
    return limit


def export(conn, fmt: str, out: str, focus: bool = False, since: str | None = None, until: str | None = None,
           pricing_file: str | None = None) -> dict:
    """Write every aibridge table to OUT as parquet or csv files (never token hashes or MCP secrets); with `focus`,
    the spend as one FOCUS 1.2 file instead (store/focus.py), of the calls started in [since, until)."""
    import os
    import pathlib

    if fmt not in ("parquet", "csv"):
        raise OpError("format must be parquet or csv")
    target = pathlib.Path(out).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    if focus:
        from . import focus as focus_export

        try:
            groups = groups_by_user(conn) if reports.table_exists(conn, "aibridge_user_groups") else {}
            rows = focus_export.rows(conn, price_book(conn, pricing_file), since, until, groups)
        except reports.BadParameter as e:
            raise OpError(str(e)) from None
        path = target / f"focus.{fmt}"
        focus_export.write(rows, fmt, path)
        os.chmod(path, 0o600)
        return {"files": [str(path)], "rows": len(rows), "focus_version": focus_export.FOCUS_VERSION}
    # Provider objects (batches, their files, background responses) say whom paid work metered later belongs to.
    tables = ("aibridge_interceptions",) + AUDIT_CHILD_TABLES + ("aibridge_users", "aibridge_user_groups",
                                                                  "aibridge_provider_objects", "aibridge_mcp_calls")
    if not postgres(conn):  # a file no gateway of this version opened yet lacks the newer tables
        tables = tuple(t for t in tables if reports.table_exists(conn, t))
    if postgres(conn):  # through a DuckDB file of the same schema: the same files, types and formats
        import tempfile

        from .copy import postgres_to_duckdb
        from .schema import migrate

        with tempfile.TemporaryDirectory(prefix="aibridge-export-") as tmp:
            duck = duckdb.connect(str(pathlib.Path(tmp) / "export.duckdb"))
            try:
                migrate(duck)
                postgres_to_duckdb(conn.raw, duck, tables)
                return _export_files(duck, fmt, target, tables)
            finally:
                duck.close()
    return _export_files(conn, fmt, target, tables)


def _export_files(conn, fmt: str, target, tables: tuple[str, ...]) -> dict:
    """COPY each table to a file. A locked-down instance (the gateway's: no file access for user SQL) may write
    only into its staging directory: the files are written there, then moved to the target."""
    import os
    import shutil

    staging = staging_directory(conn)
    where = staging / secrets.token_hex(8) if staging is not None else target
    if staging is not None:
        where.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for table in tables:
            path = where / f"{table}.{fmt}"
            opts = "(FORMAT parquet)" if fmt == "parquet" else "(FORMAT csv, HEADER true)"
            conn.execute(f"COPY (SELECT * FROM {table}) TO '{str(path).replace(chr(39), chr(39) * 2)}' {opts}")
            if staging is not None:
                final = target / path.name
                shutil.move(str(path), str(final))
                os.chmod(final, 0o600)
                path = final
            written.append(str(path))
    finally:
        if staging is not None:
            shutil.rmtree(where, ignore_errors=True)
    return {"files": written}


# name -> (function, writes?)
def apply_record(conn, record: list) -> dict:
    """One audit record as the writer would apply it (`aibridge store replay-deadletters`): an insert that adds
    nothing when its row is there already, or an interception's end. Its own transaction, so a record the database
    still refuses fails alone."""
    from .codec import _clean_values, decode_records
    from .rows import COLUMNS, END_COLUMNS, KEPT_UNLESS_SET, Insert

    try:
        (rec,) = decode_records([record])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise OpError(f"not an audit record: {type(e).__name__}: {e}") from None
    if isinstance(rec, Insert):
        cols = COLUMNS[rec.table]
        conn.execute(f"INSERT INTO {rec.table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                     "ON CONFLICT DO NOTHING", _clean_values(cols, rec.row))
        return {"table": rec.table, "id": str(rec.row[0])}
    sets = ", ".join(f"{c} = coalesce(?, {c})" if c in KEPT_UNLESS_SET else f"{c} = ?" for c in END_COLUMNS)
    found = conn.execute(f"UPDATE aibridge_interceptions SET {sets} WHERE id = ? RETURNING id",
                         [*_clean_values(END_COLUMNS, rec.values), rec.id]).fetchall()
    if not found:  # its start is not there (yet): the end stays a dead letter
        raise OpError(f"interception {rec.id} has no row yet: replay its start first")
    return {"table": "aibridge_interceptions", "id": rec.id}


OPS: dict[str, tuple[Callable[..., Any], bool]] = {
    "users.add": (users_add, True),
    "users.list": (users_list, False),
    "tokens.create": (tokens_create, True),
    "tokens.list": (tokens_list, False),
    "tokens.revoke": (tokens_revoke, True),
    "sql": (sql, False),
    "mcp_token.set": (mcp_token_set, True),
    "mcp_token.delete": (mcp_token_delete, True),
    "mcp_token.list": (mcp_token_list, False),
    "users.set_role": (users_set_role, True),
    "users.groups_set": (users_groups_set, True),
    "groups.list": (groups_list, False),
    "prune": (prune, True),
    "report": (report, False),
    "export": (export, False),
    "store.apply_record": (apply_record, True),
    "mcp_oauth.list": (mcp_oauth_list, False),
    "mcp_oauth.logout": (mcp_oauth_logout, True),
}


# --- what the gateway itself reads, by name (its writer may be another process: plain values only) -----------


def directory_rows(conn) -> list[list]:
    """load_directory as plain values: [token hash, user id, name, role, token id, hint, service account, groups]
    (the rest of the row is Actor's fields in order: Actor(*row[1:]))."""
    return [[h, a.user_id, a.user_name, a.role, a.token_id, a.token_hint, a.service_account, list(a.groups)]
            for h, a in load_directory(conn).items()]


def user_rows(conn) -> list[list]:
    """Every user as [id, name, groups]: whom a service account may act for, and whose groups budgets follow."""
    groups = groups_by_user(conn) if reports.table_exists(conn, "aibridge_user_groups") else {}
    return [[str(i), n, list(groups.get(str(i), ()))] for i, n in conn.execute("SELECT id, name FROM aibridge_users")
            .fetchall()]


def mcp_token_rows(conn) -> list[list]:
    """load_mcp_tokens as plain values: [user id, server, token]."""
    return [[uid, server, token] for (uid, server), token in load_mcp_tokens(conn).items()]


def tool_call_thread(conn, call_id: str) -> list | None:
    """The interception that made a tool call, and its thread's root: [id, root id], or None."""
    row = conn.execute(
        "SELECT CAST(i.id AS VARCHAR), CAST(coalesce(i.thread_root_id, i.id) AS VARCHAR) FROM aibridge_tool_usages t "
        "JOIN aibridge_interceptions i ON i.id = t.interception_id "
        "WHERE t.provider_tool_call_id = ? ORDER BY t.created_at DESC LIMIT 1",
        [call_id],
    ).fetchone()
    return list(row) if row else None


_OBJECT = ("SELECT CAST(o.user_id AS VARCHAR), o.user_name, CAST(o.on_behalf_of_id AS VARCHAR), o.on_behalf_of_name, "
           "CAST(o.metered_by AS VARCHAR), CAST(o.parent_id AS VARCHAR) FROM aibridge_provider_objects o "
           "WHERE o.id = CAST(? AS UUID)")


def claim_object(conn, id: str, interception_id: str, at: str, adopt: dict | None = None, claim: bool = True) -> dict:
    """Meter a provider object's usage once: marks it metered by `interception_id` unless an interception did
    before (one UPDATE: two gateways fetching the same results at once cannot both win). Returns whether this
    call claimed it, whether the object was known, and its creator ([user id, name, on behalf of id, name]; a
    file's creator is its batch's). An unknown object is `adopt`ed (inserted as created and metered by the
    fetching user, with `adopt`'s columns) when given, else left unknown. `claim` False: only who created it."""
    when = dt.datetime.fromisoformat(at)
    claimed = claim and conn.execute(
        "UPDATE aibridge_provider_objects SET metered_at = ?, metered_by = CAST(? AS UUID) "
        "WHERE id = CAST(? AS UUID) AND metered_at IS NULL RETURNING id", [when, interception_id, id]).fetchall()
    row = conn.execute(_OBJECT, [id]).fetchone()
    if row is None:
        if adopt is None or not claim:
            return {"known": False, "claimed": False, "creator": None}
        cols = ("id", "provider_name", "kind", "object_id", "user_id", "user_name", "on_behalf_of_id",
                "on_behalf_of_name", "interception_id", "created_at", "metered_at", "metered_by")
        values = {**adopt, "id": id, "interception_id": interception_id, "metered_by": interception_id,
                  "created_at": when, "metered_at": when}
        inserted = conn.execute(
            f"INSERT INTO aibridge_provider_objects ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            "ON CONFLICT DO NOTHING RETURNING id", [values.get(c) for c in cols]).fetchall()
        if inserted:
            return {"known": False, "claimed": True, "creator": None}
        row = conn.execute(_OBJECT, [id]).fetchone()  # adopted by a fetch that ran at the same time
    creator = list(row[:4])
    if creator[0] is None and row[5] is not None:  # an output file: its batch's creator
        parent = conn.execute(_OBJECT, [row[5]]).fetchone()
        creator = list(parent[:4]) if parent is not None else creator
    return {"known": creator[0] is not None, "claimed": bool(claimed), "creator": creator if creator[0] else None,
            "metered_by": row[4]}


_PRICES: dict[str | None, PriceTable] = {}


def price_book(conn, pricing: str | None) -> PriceTable:
    """The price book reports use: the database's prices over the file's (`pricing`) over the package's."""
    from ..pricing import Price

    prices = _PRICES.get(pricing)
    if prices is None:
        prices = _PRICES[pricing] = PriceTable.load(Path(pricing) if pricing else None)
    prices.set_overrides({m: Price(i, o, r, w, "database") for m, i, o, r, w in price_rows(conn)})
    return prices


def admin_query(conn, route: str, viewer: str | None, filters: dict, pricing: str | None = None, **params) -> Any:
    """One admin API read (`route` as in /aibridge/api/v1/<route>); `viewer` is the user whose rows may be seen,
    None for everything (an admin)."""
    prices = price_book(conn, pricing)
    v = reports.Viewer.everyone() if viewer is None else reports.Viewer(viewer)
    if route == "interceptions":
        return reports.list_interceptions(conn, v, filters, prices, params["limit"], params.get("cursor"))
    if route == "interception":
        return reports.interception_detail(conn, v, params["id"], prices)
    if route == "sessions":
        return reports.sessions(conn, v, prices, filters, params["limit"],
                                include_auxiliary=params.get("include_auxiliary", False))
    if route == "session":
        return reports.session_detail(conn, v, params["id"], prices)
    if route == "usage":
        return reports.usage(conn, v, params["group_by"], prices, params.get("since"), filters, params.get("until"))
    if route == "usage/timeseries":
        return reports.timeseries(conn, v, params["stack"], prices, params.get("since"), params.get("until"),
                                  params.get("bucket") or "day")
    if route in ("client", "model"):
        return reports.distinct(conn, v, route, params.get("prefix"))
    if route == "users":
        return reports.users(conn, v)
    if route == "groups":
        return reports.groups(conn, v)
    if route == "policy/decisions":
        return reports.policy_decisions(conn, v, filters, params["limit"])
    if route == "policy/decisions/summary":
        return reports.policy_summary(conn, v, filters)
    if route == "mcp/calls":
        return reports.mcp_calls(conn, v, filters, params["limit"])
    if route == "mcp/calls/summary":
        return reports.mcp_summary(conn, v, filters)
    raise OpError(f"unknown admin query {route!r}")


def flush(conn) -> None:
    """Nothing: a barrier that resolves once everything queued before it is committed."""
    return None


ABANDONED_AFTER = dt.timedelta(hours=6)


PRICE_FIELDS = ("input", "output", "cache_read", "cache_write")


def prices_set(conn, model: str, input: float, output: float, cache_read: float | None = None,
               cache_write: float | None = None, note: str | None = None) -> dict:
    """The deployment's price of a model (USD per 1M tokens), winning over the `pricing:` file and the package's
    data. Cache reads default to the input price, cache writes to it too (say them when they differ)."""
    model = (model or "").strip().lower()
    if not model or len(model) > 200:
        raise OpError("a model name is required (at most 200 characters)")
    values = {"input": input, "output": output, "cache_read": input if cache_read is None else cache_read,
              "cache_write": input if cache_write is None else cache_write}
    for k, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < 1e6):
            raise OpError(f"{k} must be a price in USD per 1M tokens (0 or more)")
    conn.execute("INSERT INTO aibridge_prices (model, input, output, cache_read, cache_write, note, updated_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET input = excluded.input, "
                 "output = excluded.output, cache_read = excluded.cache_read, cache_write = excluded.cache_write, "
                 "note = excluded.note, updated_at = excluded.updated_at",
                 [model, *map(float, values.values()), note, _now()])
    return {"model": model, **values, "note": note}


def prices_delete(conn, model: str) -> dict:
    model = (model or "").strip().lower()
    n = conn.execute("DELETE FROM aibridge_prices WHERE model = ? RETURNING 1", [model]).fetchall()
    if not n:
        raise OpError(f"no price set for {model!r} (aibridge prices list)")
    return {"model": model, "deleted": True}


def prices_list(conn) -> dict:
    if not reports.table_exists(conn, "aibridge_prices"):
        return {"columns": ["model", *PRICE_FIELDS, "note", "updated_at"], "rows": []}
    return query(conn, "SELECT model, input, output, cache_read, cache_write, note, updated_at FROM aibridge_prices "
                       "ORDER BY model", [])


def price_rows(conn) -> list[list]:
    """The database's prices as plain values, for the gateway's price book: [model, input, output, read, write]."""
    if not reports.table_exists(conn, "aibridge_prices"):
        return []
    return [list(r) for r in conn.execute(
        "SELECT model, input, output, cache_read, cache_write FROM aibridge_prices").fetchall()]


OPS.update({"prices.set": (prices_set, True), "prices.delete": (prices_delete, True),
            "prices.list": (prices_list, False)})


def claim_budget_notice(conn, user_id: str, limit_name: str, period: str, threshold: float) -> bool:
    """True for the first process to notice this crossing (policy/notices.py); False for every later one."""
    row = conn.execute(
        "INSERT INTO aibridge_budget_notices (user_id, limit_name, period, threshold, sent_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING RETURNING 1", [user_id, limit_name, period, threshold, _now()]).fetchone()
    return row is not None


def close_abandoned(conn) -> int:
    """Shared stores: interceptions still in progress long after any call could last were left by a gateway that
    died (`kill -9`, a lost machine); a restart cannot close them, because other gateways' rows are live. End them
    failed. Should such a call still finish after all, its end overwrites this."""
    rows = conn.execute(
        "UPDATE aibridge_interceptions SET status = 'failed', error = 'gateway stopped (abandoned in progress)', "
        "ended_at = ? WHERE status = 'in_progress' AND started_at < ? RETURNING 1",
        [_now(), _now() - ABANDONED_AFTER]).fetchall()
    return len(rows)


# The gateway's own reads and writes, beside the CLI's OPS. Never reachable through the control endpoint:
# mcp_tokens carries decrypted credentials.
GATEWAY_OPS: dict[str, tuple[Callable[..., Any], bool]] = {
    "directory": (directory_rows, False),
    "users": (user_rows, False),
    "mcp_tokens": (mcp_token_rows, False),
    "budget_usage": (usage_rows, False),
    "budget_totals": (usage_totals, False),
    "count_request": (count_request, False),  # an upsert on the reader path: shared stores only
    "prune_request_counts": (prune_request_counts, False),
    "close_abandoned": (close_abandoned, True),
    "claim_budget_notice": (claim_budget_notice, True),
    "prices": (price_rows, False),
    "tool_call_thread": (tool_call_thread, False),
    "claim_object": (claim_object, True),
    "admin_query": (admin_query, False),
    "flush": (flush, True),
    # OAuth sign-in to MCP servers (store/mcp_oauth.py): ciphertext only, never reachable from the CLI.
    "mcp_oauth.client_get": (mcp_oauth.client_get, False),
    "mcp_oauth.client_put": (mcp_oauth.client_put, True),
    "mcp_oauth.client_forget": (mcp_oauth.client_forget, True),
    "mcp_oauth.login_put": (mcp_oauth.login_put, True),
    "mcp_oauth.login_pending": (mcp_oauth.login_pending, False),
    "mcp_oauth.login_take": (mcp_oauth.login_take, True),
    "mcp_oauth.login_finish": (mcp_oauth.login_finish, True),
    "mcp_oauth.login_status": (mcp_oauth.login_status, False),
    "mcp_oauth.token_get": (mcp_oauth.token_get, False),
    "mcp_oauth.token_put": (mcp_oauth.token_put, True),
    "mcp_oauth.token_drop": (mcp_oauth.token_drop, True),
}
ALL_OPS = {**OPS, **GATEWAY_OPS}
