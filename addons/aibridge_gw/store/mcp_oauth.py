"""The store's side of OAuth 2.1 sign-in to MCP servers (mcp/oauth.py): the gateway's client registrations, the
logins under way and each user's tokens. Shared by every worker and machine (DuckDB through its one writer, or
PostgreSQL), so a browser's callback may land on any of them.

Every secret — a client secret, a PKCE verifier and `state`, access and refresh tokens — arrives here already
encrypted by the gateway (Fernet, AIBRIDGE_SECRET_KEY) in a `ciphertext` column; these operations never see one in
clear. `state` is looked up by its SHA-256 only. Times travel as ISO strings and return as epoch seconds."""

from __future__ import annotations

import datetime as dt

LOGIN_KEPT = dt.timedelta(days=1)  # finished or expired logins are deleted after this (their status was read)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _at(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _epoch(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


# --- client registrations (per server, authorization server and redirect URI; reused by every user) -----------

def client_get(conn, server: str, issuer: str, redirect_uri: str) -> str | None:
    row = conn.execute("SELECT ciphertext FROM aibridge_mcp_oauth_clients WHERE server = ? AND issuer = ? AND "
                       "redirect_uri = ?", [server, issuer, redirect_uri]).fetchone()
    return row[0] if row else None


def client_put(conn, server: str, issuer: str, redirect_uri: str, client_id: str, ciphertext: str) -> str:
    """Keep a registration; when another process registered first, theirs is kept and returned (one per key)."""
    conn.execute("INSERT INTO aibridge_mcp_oauth_clients (server, issuer, redirect_uri, client_id, ciphertext, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                 [server, issuer, redirect_uri, client_id, ciphertext, _now()])
    return client_get(conn, server, issuer, redirect_uri)


def client_forget(conn, server: str, issuer: str, redirect_uri: str) -> None:
    """A registration the authorization server no longer knows (invalid_client): registered again next time."""
    conn.execute("DELETE FROM aibridge_mcp_oauth_clients WHERE server = ? AND issuer = ? AND redirect_uri = ?",
                 [server, issuer, redirect_uri])


# --- logins under way: one-time, expiring ----------------------------------------------------------------------

def login_put(conn, id: str, state_hash: str, user_id: str, server: str, ciphertext: str, expires_at: str) -> dict:
    conn.execute("DELETE FROM aibridge_mcp_oauth_logins WHERE expires_at < ?", [_now() - LOGIN_KEPT])
    conn.execute("INSERT INTO aibridge_mcp_oauth_logins (id, state_hash, user_id, server, ciphertext, status, "
                 "created_at, expires_at) VALUES (?, ?, CAST(? AS UUID), ?, ?, 'pending', ?, ?)",
                 [id, state_hash, user_id, server, ciphertext, _now(), _at(expires_at)])
    return {"id": id}


def login_pending(conn, user_id: str, server: str, min_seconds: float = 120) -> list | None:
    """The newest login under way for (user, server) with at least `min_seconds` left: [id, ciphertext, expires]."""
    row = conn.execute(
        "SELECT id, ciphertext, expires_at FROM aibridge_mcp_oauth_logins WHERE user_id = CAST(? AS UUID) AND "
        "server = ? AND status = 'pending' AND expires_at > ? ORDER BY created_at DESC LIMIT 1",
        [user_id, server, _now() + dt.timedelta(seconds=min_seconds)]).fetchone()
    return [row[0], row[1], _epoch(row[2])] if row else None


def login_take(conn, state_hash: str) -> dict:
    """The login a callback's `state` names, taken once: a second callback with the same state finds it used."""
    row = conn.execute(
        "UPDATE aibridge_mcp_oauth_logins SET status = 'exchanging' WHERE state_hash = ? AND status = 'pending' "
        "RETURNING id, CAST(user_id AS VARCHAR), server, ciphertext, expires_at", [state_hash]).fetchone()
    if row is None:
        known = conn.execute("SELECT status FROM aibridge_mcp_oauth_logins WHERE state_hash = ?",
                             [state_hash]).fetchone()
        return {"found": False, "why": "used" if known else "unknown"}
    return {"found": True, "id": row[0], "user_id": row[1], "server": row[2], "ciphertext": row[3],
            "expires_at": _epoch(row[4])}


def login_finish(conn, id: str, status: str, error: str | None = None) -> None:
    conn.execute("UPDATE aibridge_mcp_oauth_logins SET status = ?, error = ?, completed_at = ? WHERE id = ?",
                 [status, error, _now(), id])


def login_status(conn, id: str) -> dict | None:
    row = conn.execute(
        "SELECT l.status, l.error, l.server, u.name, l.expires_at FROM aibridge_mcp_oauth_logins l "
        "LEFT JOIN aibridge_users u ON u.id = l.user_id WHERE l.id = ?", [id]).fetchone()
    if row is None:
        return None
    status, expires = row[0], _epoch(row[4])
    if status == "pending" and expires is not None and expires < _now().timestamp():
        status = "expired"
    return {"status": status, "error": row[1], "server": row[2], "user": row[3], "expires_at": expires}


# --- each user's tokens, versioned: a refresh writes only over the version it read -----------------------------

def token_get(conn, user_id: str, server: str) -> list | None:
    """[ciphertext, version] of the user's tokens for the server, or None."""
    row = conn.execute("SELECT ciphertext, version FROM aibridge_mcp_oauth_tokens WHERE user_id = CAST(? AS UUID) "
                       "AND server = ?", [user_id, server]).fetchone()
    return [row[0], int(row[1])] if row else None


def token_put(conn, user_id: str, server: str, ciphertext: str, expires_at: str | None, scope: str | None,
              version: int | None = None) -> dict:
    """A sign-in's tokens (`version` None: replaces whatever was there) or a refresh's (written only over
    `version`, the one refreshed: a refresh another process wrote meanwhile is kept). Returns whether it was
    written, and the version now stored."""
    now = _now()
    if version is None:
        row = conn.execute(
            "INSERT INTO aibridge_mcp_oauth_tokens (user_id, server, ciphertext, expires_at, scope, version, "
            "created_at, updated_at) VALUES (CAST(? AS UUID), ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (user_id, server) "
            "DO UPDATE SET ciphertext = excluded.ciphertext, expires_at = excluded.expires_at, scope = "
            "excluded.scope, version = aibridge_mcp_oauth_tokens.version + 1, created_at = excluded.created_at, "
            "updated_at = excluded.updated_at RETURNING version",
            [user_id, server, ciphertext, _at(expires_at), scope, now, now]).fetchone()
        return {"written": True, "version": int(row[0])}
    row = conn.execute(
        "UPDATE aibridge_mcp_oauth_tokens SET ciphertext = ?, expires_at = ?, scope = coalesce(?, scope), "
        "version = version + 1, updated_at = ? WHERE user_id = CAST(? AS UUID) AND server = ? AND version = ? "
        "RETURNING version", [ciphertext, _at(expires_at), scope, now, user_id, server, version]).fetchone()
    return {"written": row is not None, "version": int(row[0]) if row else None}


def token_drop(conn, user_id: str, server: str, version: int | None = None) -> bool:
    """Forget tokens the authorization server refused (only the version that was refused: a newer sign-in stays)."""
    sql = "DELETE FROM aibridge_mcp_oauth_tokens WHERE user_id = CAST(? AS UUID) AND server = ?"
    params: list = [user_id, server]
    if version is not None:
        sql, params = sql + " AND version = ?", params + [version]
    return bool(conn.execute(sql + " RETURNING 1", params).fetchall())
