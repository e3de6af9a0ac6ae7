"""The PostgreSQL store (fleet mode): the same writer as DuckDB's — records gathered into batches, spooled per
process before they are committed, split to dead-letter only a record at fault — over psycopg 3. Each batch is
one statement per table: every column bound as one typed array and unnested, as for DuckDB.

The operations (`ops.py`) are written in the SQL both engines take, with `?` placeholders; `PgConnection` gives
them a DuckDB-like connection (`execute(sql, params)` returning a cursor) over psycopg.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg_pool import ConnectionPool

from ..files import private_file
from . import claim
from .rows import END_COLUMNS, KEPT_UNLESS_SET
from .schema import migrate_postgres
from .statements import pg_column_types, pg_insert_statements
from .writer import READERS, Store, StoreUnavailable, open_spool

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 3  # seconds: a writer reconnecting to a database that is away must not stall for long
# TCP keepalives and an unacknowledged-data timeout: a database host that vanished (no FIN, no RST) is noticed in
# seconds by the kernel, not after its default retransmission timeout of about 15 minutes.
LIVENESS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
            "tcp_user_timeout": 10000}

_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\?|%")


def to_pyformat(sql: str) -> str:
    """`?` placeholders (outside string literals) as psycopg's `%s`; a literal `%` doubled."""
    return _PLACEHOLDER.sub(lambda m: "%s" if m.group() == "?" else ("%%" if m.group() == "%" else m.group()), sql)


class PgConnection:
    """What the operations use of a DuckDB connection, over a psycopg one."""

    dialect = "postgres"

    def __init__(self, conn: psycopg.Connection) -> None:
        self.raw = conn

    def execute(self, sql: str, params=None):
        return self.raw.execute(to_pyformat(sql), params) if params is not None else self.raw.execute(sql)

    def cursor(self) -> "PgConnection":
        return self

    def close(self) -> None:
        pass


class PgStore(Store):
    """Store over PostgreSQL at `dsn`; the spool and dead-letter file live under `local` (per process)."""

    CONFLICT = psycopg.errors.UniqueViolation

    def __init__(self, dsn: str, local: Path, after_op: Callable[[Any], None] | None = None, spool: bool = True,
                 on_commit: Callable[[], None] | None = None, **kw) -> None:
        super().__init__(Path(local), after_op=after_op, spool=spool, close_stale=False, on_commit=on_commit, **kw)
        self.dsn = dsn
        # Reads (the token directory each second, reports, admin API) on pooled connections, never the writer's;
        # each checked before use, so a database that restarted costs no failed read.
        self._pool = ConnectionPool(dsn, min_size=1, max_size=READERS, kwargs={"autocommit": True,
                                    "connect_timeout": CONNECT_TIMEOUT}, open=False, name="aibridge-read",
                                    check=ConnectionPool.check_connection, timeout=2)

    def open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT, **LIVENESS)
        migrate_postgres(conn)
        self._pool.open(wait=True, timeout=30)
        self._conn = PgConnection(conn)
        self._prepare_statements()
        if self.spool_path is not None:
            self._adopt_orphan_spools()
            self._replay_spool()
            self._spool = open_spool(self.spool_path)
        self._start_threads()
        return self._conn

    def _adopt_orphan_spools(self) -> None:
        """Spools of this machine's PostgreSQL writers that are gone for good (another port, fewer workers): their
        batches join ours, to be replayed and committed with it."""
        # The writer of a gateway just killed may still be finishing with this spool: wait, then use a name of our
        # own (adopted by a later start), never share it.
        self.spool_path, self._claim = claim.hold_or_own(self.spool_path, 30)
        tag = "-".join(self.spool_path.name.split("-")[:2])  # postgres-<database tag>
        for orphan in claim.orphans(self.spool_path, f"{glob.escape(tag)}-*.spool"):
            data = orphan.read_bytes()
            if data.strip():
                with private_file(self.spool_path, "ab") as f:
                    f.write(data if data.endswith(b"\n") else data + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                log.warning("aibridge store: adopted the spool %s of a writer that is gone", orphan.name)
            claim.forget(orphan)

    def _prepare_statements(self) -> None:
        self._insert_sql = pg_insert_statements(self._conn.raw)
        types = pg_column_types(self._conn.raw)
        cols = ("id",) + END_COLUMNS
        arrays = ", ".join(f"%s::{types['aibridge_interceptions'][c]}[]" for c in cols)
        sets = ", ".join(f"{c} = COALESCE(v.{c}, aibridge_interceptions.{c})" if c in KEPT_UNLESS_SET
                         else f"{c} = v.{c}" for c in END_COLUMNS)
        self._end_sql = (f"UPDATE aibridge_interceptions SET {sets} FROM unnest({arrays}) AS v({', '.join(cols)}) "
                         "WHERE aibridge_interceptions.id = v.id")

    def _execute_batch(self, sql: str, params: list) -> None:
        self._conn.raw.execute(sql, params)

    def _execute_returning(self, sql: str, params: list) -> list:
        return self._conn.raw.execute(sql, params).fetchall()

    # --- faults: a database that restarts, goes away or refuses writes is the store's fault, never the data's ---

    def _transient(self, e: BaseException) -> bool:
        if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError, OSError, StoreUnavailable)):
            return True  # connection lost, server shutting down or starting, disk full (53100), timeouts
        if isinstance(e, (psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege)):
            return True  # a replica promoted back, a role that lost its grants: the operator fixes it
        return False

    @staticmethod
    def _classify(e: BaseException) -> str:
        if isinstance(e, psycopg.errors.DiskFull):
            return "disk full"
        if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
            return "store read-only"
        if isinstance(e, psycopg.errors.InsufficientPrivilege):
            return "permission denied"
        if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
            return "store unreachable"
        return Store._classify(e)

    def _probe(self) -> str | None:
        """Reachable, writable (not a standby, not read-only) and still allowed to insert the audit."""
        for attempt in (1, 2):
            try:
                standby, read_only, may_insert = self._conn.raw.execute(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', "
                    "has_table_privilege('aibridge_interceptions', 'INSERT')").fetchone()
                if standby or read_only:
                    return "store read-only"
                return None if may_insert else "permission denied"
            except Exception as e:
                if attempt == 2:
                    return self._classify(e)
                self._recover()
        return None

    def _abort_stalled(self) -> None:
        """Shut the stuck connection's socket down: the commit waiting on it fails at once (and is retried)."""
        import socket

        fd = self._conn.raw.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)

    def _recover(self) -> None:
        """A broken writer connection is replaced (each attempt bounded by CONNECT_TIMEOUT)."""
        raw = self._conn.raw
        if not (raw.closed or raw.broken):
            try:
                raw.execute("SELECT 1")
                return
            except Exception:
                pass
        try:
            fresh = psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT, **LIVENESS)
        except Exception:
            return  # still away: the next attempt comes after the backoff
        try:
            raw.close()
        except Exception:
            pass
        self._conn = PgConnection(fresh)

    def read(self, fn):
        """Run fn(connection) on a reader thread, over a pooled connection (sees committed data). While the
        database is away, reads fail at once: no caller (a budget check, the directory reload) waits on it."""
        if not self.up and self.reason in ("store unreachable", "store not answering"):
            fut: cf.Future = cf.Future()
            fut.set_exception(StoreUnavailable(self.describe()))
            return fut

        def work():
            if not self.up and self.reason in ("store unreachable", "store not answering"):
                raise StoreUnavailable(self.describe())  # it went away while this read waited its turn
            with self._pool.connection() as conn:
                return fn(PgConnection(conn))

        return self._readers.submit(work)

    def close(self, timeout: float = 30.0) -> None:
        conn = self._conn
        super().close(timeout)
        self._pool.close()
        if conn is not None:
            conn.raw.close()
        if getattr(self, "_claim", None) is not None:
            os.close(self._claim)
            self._claim = None
