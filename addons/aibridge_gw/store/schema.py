"""Numbered schema migrations, applied in order at start-up; never edit one that has shipped.

The same list builds DuckDB (the embedded default) and PostgreSQL (fleet mode): the SQL is kept to what both
take (UUID, VARCHAR, TIMESTAMPTZ, JSON, BOOLEAN, BIGINT; ALTER TABLE … ADD COLUMN). A migration that needs
a dialect of its own says so with a {"duckdb": …, "postgres": …} mapping instead of one string."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb

_POLICY_DECISIONS = """
    CREATE TABLE aibridge_policy_decisions (
        id UUID PRIMARY KEY,
        interception_id UUID NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        user_id UUID,
        rule VARCHAR NOT NULL,
        policy_version VARCHAR,
        hook VARCHAR NOT NULL,
        action VARCHAR NOT NULL,
        enforced BOOLEAN NOT NULL,
        detectors JSON,
        message VARCHAR,
        tool VARCHAR,
        tool_call_id VARCHAR
    );
"""

_MCP_CALLS = """
    CREATE TABLE aibridge_mcp_calls (
        id UUID PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        user_id UUID,
        user_name VARCHAR,
        on_behalf_of_id UUID,
        on_behalf_of_name VARCHAR,
        client VARCHAR,
        client_version VARCHAR,
        session_id VARCHAR,
        method VARCHAR NOT NULL,
        server VARCHAR,
        tool VARCHAR NOT NULL,
        arguments JSON,
        is_error BOOLEAN NOT NULL,
        outcome VARCHAR NOT NULL,
        error VARCHAR,
        result_bytes BIGINT,
        duration_ms BIGINT
    );
"""

MIGRATIONS: list[tuple[int, str, str | dict[str, str]]] = [
    (
        1,
        "users, tokens and the audit tables",
        """
        CREATE TABLE aibridge_users (
            id UUID PRIMARY KEY,
            name VARCHAR NOT NULL UNIQUE,
            role VARCHAR NOT NULL DEFAULT 'member',
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE aibridge_tokens (
            id VARCHAR PRIMARY KEY,
            user_id UUID NOT NULL,
            name VARCHAR,
            token_hash VARCHAR NOT NULL UNIQUE,
            hint VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            revoked_at TIMESTAMPTZ
        );
        CREATE TABLE aibridge_interceptions (
            id UUID PRIMARY KEY,
            initiator_id UUID,
            provider VARCHAR NOT NULL,
            provider_name VARCHAR NOT NULL,
            model VARCHAR,
            client VARCHAR,
            user_agent VARCHAR,
            client_session_id VARCHAR,
            thread_parent_id UUID,
            thread_root_id UUID,
            credential_kind VARCHAR NOT NULL,
            credential_hint VARCHAR,
            status VARCHAR NOT NULL,
            started_at TIMESTAMPTZ NOT NULL,
            ended_at TIMESTAMPTZ,
            metadata JSON,
            api VARCHAR,
            stream BOOLEAN,
            http_status INTEGER,
            error VARCHAR
        );
        CREATE TABLE aibridge_token_usages (
            id UUID PRIMARY KEY,
            interception_id UUID NOT NULL,
            provider_response_id VARCHAR,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_input_tokens BIGINT NOT NULL,
            cache_write_input_tokens BIGINT NOT NULL,
            metadata JSON,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE aibridge_user_prompts (
            id UUID PRIMARY KEY,
            interception_id UUID NOT NULL,
            provider_response_id VARCHAR,
            prompt VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE aibridge_tool_usages (
            id UUID PRIMARY KEY,
            interception_id UUID NOT NULL,
            provider_response_id VARCHAR,
            provider_tool_call_id VARCHAR,
            tool VARCHAR NOT NULL,
            server_url VARCHAR,
            input VARCHAR,
            injected BOOLEAN NOT NULL,
            invocation_error VARCHAR,
            created_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE aibridge_model_thoughts (
            id UUID PRIMARY KEY,
            interception_id UUID NOT NULL,
            source VARCHAR NOT NULL,
            content VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    (
        2,
        "per-user MCP server credentials, encrypted at rest",
        """
        CREATE TABLE aibridge_mcp_tokens (
            user_id UUID NOT NULL,
            server VARCHAR NOT NULL,
            ciphertext VARCHAR NOT NULL,
            hint VARCHAR,
            updated_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (user_id, server)
        );
        """,
    ),
    (
        3,
        "service accounts, and the person an interception was made for",
        """
        ALTER TABLE aibridge_users ADD COLUMN service_account BOOLEAN DEFAULT false;
        ALTER TABLE aibridge_interceptions ADD COLUMN on_behalf_of_id UUID;
        ALTER TABLE aibridge_interceptions ADD COLUMN on_behalf_of_name VARCHAR;
        """,
    ),
    (
        4,
        "requests per user and minute, counted across every gateway (fleet mode)",
        """
        CREATE TABLE aibridge_request_counts (
            user_id UUID NOT NULL,
            window_start TIMESTAMPTZ NOT NULL,
            requests BIGINT NOT NULL,
            PRIMARY KEY (user_id, window_start)
        );
        """,
    ),
    (
        5,
        "usage_estimated: a usage row that is the best figure a stream gave, not the provider's final usage",
        """
        ALTER TABLE aibridge_token_usages ADD COLUMN usage_estimated BOOLEAN DEFAULT false;
        """,
    ),
    (
        6,
        "provider objects (batches, their output files, background responses) and who created them",
        """
        CREATE TABLE aibridge_provider_objects (
            id UUID PRIMARY KEY,
            provider_name VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            object_id VARCHAR NOT NULL,
            parent_id UUID,
            user_id UUID,
            user_name VARCHAR,
            on_behalf_of_id UUID,
            on_behalf_of_name VARCHAR,
            interception_id UUID,
            created_at TIMESTAMPTZ NOT NULL,
            metered_at TIMESTAMPTZ,
            metered_by UUID
        );
        """,
    ),
    (
        7,
        "user groups: a user's memberships, one row each (policies and reports name groups)",
        """
        CREATE TABLE aibridge_user_groups (
            user_id UUID NOT NULL,
            group_name VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (user_id, group_name)
        );
        """,
    ),
    (
        8,
        "policy decisions: what each policy rule decided for a request or a tool call",
        # Reports read decisions by time and by interception. PostgreSQL gets an index for each; DuckDB reads them
        # from its zone maps (min/max per row group, rows arrive in time order) and an index there would only slow
        # the writer's batches and prune's deletes.
        {"duckdb": _POLICY_DECISIONS, "postgres": _POLICY_DECISIONS + """
            CREATE INDEX aibridge_policy_decisions_created_at ON aibridge_policy_decisions (created_at);
            CREATE INDEX aibridge_policy_decisions_interception ON aibridge_policy_decisions (interception_id);
            """},
    ),
    (
        9,
        "MCP gateway calls: one row per tools/call (resources/read, prompts/get) at /aibridge/mcp",
        # Read by time (reports, retention); PostgreSQL indexes it, DuckDB reads its zone maps (see 8).
        {"duckdb": _MCP_CALLS, "postgres": _MCP_CALLS + """
            CREATE INDEX aibridge_mcp_calls_created_at ON aibridge_mcp_calls (created_at);
            """},
    ),
    (
        10,
        "budget notices: which threshold of which budget was noticed for whom, once per period across the fleet",
        """
        CREATE TABLE aibridge_budget_notices (
            user_id UUID NOT NULL,
            limit_name VARCHAR NOT NULL,
            period VARCHAR NOT NULL,
            threshold DOUBLE PRECISION NOT NULL,
            sent_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (user_id, limit_name, period, threshold)
        );
        """,
    ),
    (
        11,
        "prices: the deployment's own (aibridge prices set), and the cost and rates each usage row was charged at",
        """
        CREATE TABLE aibridge_prices (
            model VARCHAR PRIMARY KEY,
            input DOUBLE PRECISION NOT NULL,
            output DOUBLE PRECISION NOT NULL,
            cache_read DOUBLE PRECISION NOT NULL,
            cache_write DOUBLE PRECISION NOT NULL,
            note VARCHAR,
            updated_at TIMESTAMPTZ NOT NULL
        );
        ALTER TABLE aibridge_token_usages ADD COLUMN cost_usd DOUBLE PRECISION;
        ALTER TABLE aibridge_token_usages ADD COLUMN price JSON;
        """,
    ),
    (
        12,
        "OAuth 2.1 sign-in to MCP servers: the gateway's client registrations, logins under way, users' tokens",
        # Every secret (client secret, PKCE verifier, access and refresh tokens) is in a `ciphertext` column,
        # Fernet-encrypted by the gateway with AIBRIDGE_SECRET_KEY; the rest is what listings and lookups need.
        """
        CREATE TABLE aibridge_mcp_oauth_clients (
            server VARCHAR NOT NULL,
            issuer VARCHAR NOT NULL,
            redirect_uri VARCHAR NOT NULL,
            client_id VARCHAR NOT NULL,
            ciphertext VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (server, issuer, redirect_uri)
        );
        CREATE TABLE aibridge_mcp_oauth_logins (
            id VARCHAR PRIMARY KEY,
            state_hash VARCHAR NOT NULL,
            user_id UUID NOT NULL,
            server VARCHAR NOT NULL,
            ciphertext VARCHAR NOT NULL,
            status VARCHAR NOT NULL,
            error VARCHAR,
            created_at TIMESTAMPTZ NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL,
            completed_at TIMESTAMPTZ
        );
        CREATE TABLE aibridge_mcp_oauth_tokens (
            user_id UUID NOT NULL,
            server VARCHAR NOT NULL,
            ciphertext VARCHAR NOT NULL,
            expires_at TIMESTAMPTZ,
            scope VARCHAR,
            version BIGINT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (user_id, server)
        );
        """,
    ),
    (
        13,
        "sessions as people read them: what each call was for, and the words the person typed",
        # purpose: chat (a human turn or its continuation), title, router, memory, summary, suggestion,
        # other_auxiliary (flow/purpose.py); NULL for rows recorded before, and for calls that are not a
        # conversation. typed: the person's words of the prompt, without the client's own wrappers (the raw
        # prompt stays in `prompt`; NULL when the prompt is exactly those words).
        """
        ALTER TABLE aibridge_interceptions ADD COLUMN purpose VARCHAR;
        ALTER TABLE aibridge_user_prompts ADD COLUMN typed VARCHAR;
        """,
    ),
]


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction: committed when the block ends, rolled back if it raises (the error propagates)."""
    conn.execute("BEGIN")
    try:
        yield conn
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except Exception:  # a connection that broke mid-transaction has nothing left to roll back
            pass
        raise
    conn.execute("COMMIT")


def _sql(sql, dialect: str) -> str:
    return sql[dialect] if isinstance(sql, dict) else sql


# Held while migrating PostgreSQL, so that of several gateways starting together exactly one applies each version.
PG_MIGRATION_LOCK = 0x41494252  # "AIBR"


def migrate_postgres(conn) -> list[int]:
    """Apply pending migrations to PostgreSQL (a psycopg connection), all in one transaction under an advisory
    lock: processes starting at once wait for the first, then find nothing left to do."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [PG_MIGRATION_LOCK])
        conn.execute(
            "CREATE TABLE IF NOT EXISTS aibridge_schema_migrations "
            "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM aibridge_schema_migrations").fetchall()}
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute(_sql(sql, "postgres"))
            conn.execute("INSERT INTO aibridge_schema_migrations VALUES (%s, %s, %s)",
                         [version, description, dt.datetime.now(dt.UTC)])
            applied.append(version)
    return applied


def migrate(conn: duckdb.DuckDBPyConnection) -> list[int]:
    """Apply pending migrations, each in its own transaction; returns the versions applied."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS aibridge_schema_migrations "
        "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)"
    )
    done = {r[0] for r in conn.execute("SELECT version FROM aibridge_schema_migrations").fetchall()}
    applied = []
    for version, description, sql in MIGRATIONS:
        if version in done:
            continue
        with transaction(conn):
            conn.execute(_sql(sql, "duckdb"))
            conn.execute(
                "INSERT INTO aibridge_schema_migrations VALUES (?, ?, ?)",
                [version, description, dt.datetime.now(dt.UTC)],
            )
        applied.append(version)
    return applied
