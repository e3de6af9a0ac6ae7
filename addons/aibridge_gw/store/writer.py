"""The gateway's DuckDB owner: one writer thread applies record batches and admin operations in order.

DuckDB allows one writing process per file, so the gateway keeps the file open and everything that writes
(recording, token changes from the CLI) goes through this thread. The event loop only enqueues.

Durability: each batch is appended to an on-disk spool and fsynced before it is applied to DuckDB, and the
spool is emptied once DuckDB has committed it. A gateway killed in between replays the spool at start-up;
records carry their own ids, so a replayed batch never yields a row twice.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import pickle
import struct
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from .schema import migrate

log = logging.getLogger(__name__)

COLUMNS: dict[str, tuple[str, ...]] = {
    "aibridge_users": ("id", "name", "role", "created_at"),
    "aibridge_interceptions": (
        "id", "initiator_id", "provider", "provider_name", "model", "client", "user_agent",
        "client_session_id", "thread_parent_id", "thread_root_id", "credential_kind", "credential_hint",
        "status", "started_at", "ended_at", "metadata", "api", "stream", "http_status", "error",
    ),
    "aibridge_token_usages": (
        "id", "interception_id", "provider_response_id", "input_tokens", "output_tokens",
        "cache_read_input_tokens", "cache_write_input_tokens", "metadata", "created_at",
    ),
    "aibridge_user_prompts": ("id", "interception_id", "provider_response_id", "prompt", "created_at"),
    "aibridge_tool_usages": (
        "id", "interception_id", "provider_response_id", "provider_tool_call_id", "tool", "server_url",
        "input", "injected", "invocation_error", "created_at",
    ),
    "aibridge_model_thoughts": ("id", "interception_id", "source", "content", "created_at"),
}
# Columns an interception's end sets; the row was inserted when the request arrived.
END_COLUMNS = ("status", "ended_at", "http_status", "error", "metadata")
_END_INDEX = {c: COLUMNS["aibridge_interceptions"].index(c) for c in END_COLUMNS}
BATCH_WINDOW = 0.1  # seconds records may wait in memory before their batch is spooled and committed
MAX_BATCH = 2000  # records per transaction (binding them holds the GIL; keep each bind short)


@dataclass(slots=True)
class Insert:
    table: str
    row: tuple


@dataclass(slots=True)
class EndInterception:
    id: str
    values: tuple  # in END_COLUMNS order


@dataclass(slots=True)
class _Op:
    fn: Callable[[duckdb.DuckDBPyConnection], Any]
    future: cf.Future


_STOP = object()


class Store:
    def __init__(self, path: Path, after_op: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
                 spool: bool = True):
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".spool") if spool else None
        self._spool = None
        self.after_op = after_op
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._thread: threading.Thread | None = None
        self._readers = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="aibridge-read")
        self.written = 0
        self.failed = 0

    # --- lifecycle (called from the addon's configure/done) ----------------------------------------

    def open(self) -> duckdb.DuckDBPyConnection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = duckdb.connect(str(self.path))
        migrate(self._conn)
        self._prepare_statements()
        if self.spool_path is not None:
            self._replay_spool()
            self._spool = open(self.spool_path, "ab")
        self._thread = threading.Thread(target=self._run, name="aibridge-writer", daemon=True)
        self._thread.start()
        return self._conn

    def _prepare_statements(self) -> None:
        """The batch statements, built once: each column is bound as one typed list and unnested (a list of NULLs
        alone gives DuckDB no type to infer, hence the casts from the schema's own column types)."""
        types: dict[str, dict[str, str]] = {}
        for table, column, dtype in self._conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_name LIKE 'aibridge_%'"
        ).fetchall():
            types.setdefault(table, {})[column] = dtype
        self._insert_sql: dict[str, str] = {}
        for table, cols in COLUMNS.items():
            sel = ", ".join(f"unnest(${n + 1}::{types[table][c]}[])" for n, c in enumerate(cols))
            self._insert_sql[table] = f"INSERT INTO {table} ({', '.join(cols)}) SELECT {sel}"
        cols = ("id",) + END_COLUMNS
        sel = ", ".join(f"unnest(${n + 1}::{types['aibridge_interceptions'][c]}[]) AS {c}" for n, c in enumerate(cols))
        sets = ", ".join(f"{c} = v.{c}" for c in END_COLUMNS)
        self._end_sql = (f"UPDATE aibridge_interceptions SET {sets} FROM (SELECT {sel}) AS v "
                         "WHERE aibridge_interceptions.id = v.id")

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything queued, then close the file. Safe to call twice."""
        if self._thread is None:
            return
        self._q.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        self._readers.shutdown(wait=True)
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- producers (any thread, never blocks) ------------------------------------------------------

    def submit(self, record: Insert | EndInterception) -> None:
        self._q.put(record)

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> cf.Future:
        """Run fn(conn) on the writer thread in its own transaction, after everything queued before it."""
        fut: cf.Future = cf.Future()
        self._q.put(_Op(fn, fut))
        return fut

    def read(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> cf.Future:
        """Run fn(cursor) on a reader thread; sees committed data."""
        assert self._conn is not None
        conn = self._conn

        def work():
            cur = conn.cursor()
            try:
                return fn(cur)
            finally:
                cur.close()

        return self._readers.submit(work)

    # --- the writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._q.get()
            # Let records gather: DuckDB is columnar, and a commit costs about the same for 1 row as for 100,
            # so one commit per window instead of one per record. The spool keeps the window crash-safe.
            if self._q.qsize() < MAX_BATCH:
                time.sleep(BATCH_WINDOW)
            batch = []
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Op):
                    self._write(batch)
                    batch = []
                    self._run_op(item)
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
            self._write(batch)

    def _run_op(self, op: _Op) -> None:
        if not op.future.set_running_or_notify_cancel():
            return
        conn = self._conn
        try:
            conn.execute("BEGIN")
            result = op.fn(conn)
            conn.execute("COMMIT")
        except BaseException as e:
            try:
                conn.execute("ROLLBACK")
            except Exception:
                pass
            op.future.set_exception(e)
            return
        try:
            if self.after_op:
                self.after_op(conn)
        except Exception:
            log.exception("after-op hook failed")
        op.future.set_result(result)

    # --- the spool ----------------------------------------------------------------------------------

    def _spool_append(self, batch: list) -> None:
        if self._spool is None:
            return
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        self._spool.write(struct.pack(">I", len(data)) + data)
        self._spool.flush()
        os.fsync(self._spool.fileno())

    def _spool_clear(self) -> None:
        if self._spool is not None:
            self._spool.truncate(0)
            self._spool.seek(0)

    def _replay_spool(self) -> None:
        """Apply batches a previous run spooled but may not have committed (a crash, kill -9)."""
        try:
            data = self.spool_path.read_bytes()
        except FileNotFoundError:
            return
        pos, batches = 0, []
        while pos + 4 <= len(data):
            (n,) = struct.unpack(">I", data[pos : pos + 4])
            if pos + 4 + n > len(data):
                break  # a frame cut short by the crash: it was never acknowledged
            try:
                batches.append(pickle.loads(data[pos + 4 : pos + 4 + n]))
            except Exception:
                break
            pos += 4 + n
        for batch in batches:
            self._write(batch, spool=False)
        if batches:
            log.info("replayed %d spooled batch(es) (%d records)", len(batches), sum(map(len, batches)))
        self.spool_path.write_bytes(b"")

    def _write(self, batch: list, spool: bool = True) -> None:
        if not batch:
            return
        if spool:
            try:
                self._spool_append(batch)
            except OSError as e:
                log.error("spool write failed (%s); writing to DuckDB only", e)
        try:
            try:
                self._apply(batch)
            except duckdb.ConstraintException:
                self._apply(batch, tolerant=True)  # rows of a replayed spool or flow that are there already
            self.written += len(batch)
        except Exception as e:
            log.warning("batch of %d records failed (%s); retrying one by one", len(batch), e)
            for rec in batch:
                try:
                    self._apply([rec], tolerant=True)
                    self.written += 1
                except Exception as e1:
                    self.failed += 1
                    log.error("dropping record for %s: %s", getattr(rec, "table", "interception end"), e1)
        if spool:
            self._spool_clear()  # committed (or rejected for good): no longer needed for recovery

    def _apply(self, batch: list, tolerant: bool = False) -> None:
        """One transaction, one statement per table (columns passed as lists and unnested: DuckDB's cost is per
        statement and per bound parameter, not per row). `tolerant` skips rows whose id exists already — the
        retry for a spool or flow replayed after its rows were committed; live batches never need it."""
        inserts: dict[str, list[tuple]] = {}
        pending_rows: dict[str, list] = {}  # interception id -> its row, while still in this batch
        ends: list[EndInterception] = []
        for rec in batch:
            if isinstance(rec, Insert):
                row = list(rec.row) if rec.table == "aibridge_interceptions" else rec.row
                inserts.setdefault(rec.table, []).append(row)
                if rec.table == "aibridge_interceptions":
                    pending_rows[row[0]] = row
            else:
                row = pending_rows.get(rec.id)
                if row is not None:  # start and end in one batch: insert the finished row once
                    for col, v in zip(END_COLUMNS, rec.values):
                        row[_END_INDEX[col]] = v
                else:
                    ends.append(rec)
        conn = self._conn
        conn.execute("BEGIN")
        try:
            for table, rows in inserts.items():
                if tolerant and len({r[0] for r in rows}) < len(rows):
                    rows = list({r[0]: r for r in rows}.values())  # a replay may repeat a record
                sql = self._insert_sql[table] + (" ON CONFLICT DO NOTHING" if tolerant else "")
                conn.execute(sql, [list(col) for col in zip(*rows)])
            if ends:
                conn.execute(self._end_sql,
                             [[e.id for e in ends], *([list(col) for col in zip(*(e.values for e in ends))])])
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far is written (tests and shutdown paths)."""
        try:
            self.call(lambda conn: None).result(timeout)
            return True
        except cf.TimeoutError:
            return False
