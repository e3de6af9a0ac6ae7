"""The gateway's DuckDB owner: one writer thread applies record batches and admin operations in order.

DuckDB allows one writing process per file, so the gateway keeps the file open and everything that writes
(recording, token changes from the CLI) goes through this thread. The event loop only enqueues.

Durability: each batch is appended to an on-disk spool (JSON lines, data only) and fsynced before it is
applied to DuckDB, and the spool is emptied once DuckDB has committed it. A gateway killed in between replays
the spool at start-up; records carry their own ids, so a replayed batch never yields a row twice.

No record is dropped: text DuckDB cannot hold (lone surrogates from hostile JSON, undecodable header bytes)
is stored escaped; a batch that still fails is split in halves until the record at fault is found, and that
one record goes to a dead-letter file (`<db>.deadletter.jsonl`) and is counted.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import functools
import json
import logging
import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb

from .rows import COLUMNS, END_COLUMNS, JSON_COLUMNS, KEPT_UNLESS_SET, EndInterception, Insert
from .schema import migrate, transaction
from .statements import column_types, insert_statements

log = logging.getLogger(__name__)

_END_INDEX = {c: COLUMNS["aibridge_interceptions"].index(c) for c in END_COLUMNS}
BATCH_WINDOW = 0.1  # seconds records may wait in memory before their batch is spooled and committed
READERS = 2  # threads (and PostgreSQL connections) that run reads beside the writer
MAX_BATCH = 2000  # records per transaction (binding them holds the GIL; keep each bind short)


@dataclass(slots=True)
class _Op:
    fn: Callable[[duckdb.DuckDBPyConnection], Any]
    future: cf.Future


_STOP = object()


def private_file(path: Path, mode: str = "ab"):
    """Open a file that only this user may read (audit data, credentials' hints)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC), 0o600)
    os.chmod(path, 0o600)  # an existing file keeps its old mode otherwise
    return os.fdopen(fd, mode)


def restrict(path: Path) -> None:
    try:
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _escape_surrogate(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"


def clean_text(v: str) -> str:
    """Text DuckDB can store: lone surrogates (hostile JSON, header bytes decoded with surrogateescape) are
    written as visible escapes (\\xff for an undecodable byte, \\ud800 for a lone surrogate)."""
    if v.isascii():
        return v
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, v)


def scrub(obj):
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, list):
        return [scrub(x) for x in obj]
    if isinstance(obj, dict):
        return {clean_text(k) if isinstance(k, str) else k: scrub(v) for k, v in obj.items()}
    return obj


def clean_json(text: str) -> str:
    """JSON text DuckDB accepts: \\ud800-style escapes of lone surrogates become escaped text."""
    text = clean_text(text)
    if not _JSON_SURROGATE_ESCAPE.search(text):
        return text
    try:
        return json.dumps(scrub(json.loads(text)), ensure_ascii=False)
    except (ValueError, RecursionError):
        return json.dumps({"unparseable": clean_text(text)})


class StoreApi(Protocol):
    """What the gateway needs of a store; `Store` (in this process) and `WriterProcess` (its own) provide it."""

    path: Path
    written: int
    dead_lettered: int
    stale_closed: int

    @property
    def alive(self) -> bool: ...

    def submit(self, record: Insert | EndInterception) -> None: ...

    def run(self, op: str, writes: bool = False, **args) -> cf.Future: ...

    def flush(self) -> cf.Future: ...

    def close(self) -> None: ...


class Store:
    CONFLICT: type[Exception] = duckdb.ConstraintException  # a row whose id is there already

    def __init__(self, path: Path, after_op: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
                 spool: bool = True, close_stale: bool = False, on_commit: Callable[[], None] | None = None):
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".spool") if spool else None
        self.dead_letter_path = self.path.with_name(self.path.name + ".deadletter.jsonl")
        self._spool = None
        self.after_op = after_op
        self.on_commit = on_commit  # after each batch is stored (the writer process reports its counters)
        self.close_stale = close_stale  # the gateway, at start-up: rows left in_progress by a crash end failed
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()  # cuts the batch window short when someone waits for the writes
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._thread: threading.Thread | None = None
        self._readers = cf.ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="aibridge-read")
        self.written = 0
        self.dead_lettered = 0  # records the store could not take, kept in the dead-letter file
        self.stale_closed = 0

    @property
    def failed(self) -> int:
        return self.dead_lettered

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- lifecycle (called from the addon's configure/done) ----------------------------------------

    def open(self) -> duckdb.DuckDBPyConnection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = duckdb.connect(str(self.path))
        for f in (self.path, self.path.with_name(self.path.name + ".wal")):
            restrict(f)
        migrate(self._conn)
        self._prepare_statements()
        if self.spool_path is not None:
            self._replay_spool()
            self._spool = private_file(self.spool_path, "ab")
        if self.close_stale:
            self.stale_closed = self._close_stale()
        self._thread = threading.Thread(target=self._run, name="aibridge-writer", daemon=True)
        self._thread.start()
        return self._conn

    def _close_stale(self) -> int:
        """Interceptions a killed gateway left in_progress can never finish now: end them failed."""
        n = self._conn.execute(
            "UPDATE aibridge_interceptions SET status = 'failed', error = 'gateway stopped', "
            "ended_at = coalesce(ended_at, now()) WHERE status = 'in_progress'"
        ).fetchone()
        count = int(n[0]) if n else 0
        if count:
            log.warning("closed %d interception(s) left in progress by a previous run as failed (gateway stopped)",
                        count)
        return count

    def _prepare_statements(self) -> None:
        self._insert_sql = insert_statements(self._conn)
        types = column_types(self._conn)
        cols = ("id",) + END_COLUMNS
        sel = ", ".join(f"unnest(${n + 1}::{types['aibridge_interceptions'][c]}[]) AS {c}" for n, c in enumerate(cols))
        sets = ", ".join(f"{c} = COALESCE(v.{c}, aibridge_interceptions.{c})" if c in KEPT_UNLESS_SET
                         else f"{c} = v.{c}" for c in END_COLUMNS)
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
        self._wake.set()
        return fut

    def flush(self) -> cf.Future:
        """Resolves once everything queued before the call is committed (read-your-writes for queries)."""
        return self.call(_noop)

    def run(self, op: str, writes: bool = False, **args) -> cf.Future:
        """A named operation (`ops.ALL_OPS`): the interface this store shares with `WriterProcess`."""
        from .ops import ALL_OPS  # ops imports the reports and the budgets; the writer needs them only here

        fn = functools.partial(ALL_OPS[op][0], **args)
        return self.call(fn) if writes else self.read(fn)

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
            if self._q.qsize() < MAX_BATCH and not isinstance(item, _Op):
                self._wake.wait(BATCH_WINDOW)
            self._wake.clear()
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
            with transaction(conn):
                result = op.fn(conn)
        except BaseException as e:
            op.future.set_exception(e)
            return
        try:
            if self.after_op and op.fn is not _noop:  # a flush barrier changes nothing to reload
                self.after_op(conn)
        except Exception:
            log.exception("after-op hook failed")
        op.future.set_result(result)

    # --- the spool ----------------------------------------------------------------------------------

    def _spool_append(self, batch: list) -> None:
        if self._spool is None:
            return
        self._spool.write(encode_batch(batch) + b"\n")
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
        batches = []
        for line in data.split(b"\n"):
            if not line:
                continue
            try:
                batches.append(decode_batch(line))
            except (ValueError, KeyError, TypeError, IndexError):
                # a line cut short by the crash was never acknowledged; anything else is not ours to trust
                log.warning("spool %s: skipped an unreadable entry (%d bytes)", self.spool_path, len(line))
        for batch in batches:
            self._write(batch, spool=False)
        if batches:
            log.info("replayed %d spooled batch(es) (%d records)", len(batches), sum(map(len, batches)))
        with private_file(self.spool_path, "wb"):
            pass

    def _write(self, batch: list, spool: bool = True) -> None:
        if not batch:
            return
        if spool:
            try:
                self._spool_append(batch)
            except OSError as e:
                log.error("spool write failed (%s); writing to DuckDB only", e)
        self._store(batch)
        if spool:
            self._spool_clear()  # committed (or dead-lettered): no longer needed for recovery
        if self.on_commit is not None:
            self.on_commit()

    def _store(self, batch: list) -> None:
        """Commit a batch; on failure, split it until the record at fault is alone, and dead-letter only that one."""
        try:
            try:
                self._apply(batch)
            except self.CONFLICT:
                self._apply(batch, tolerant=True)  # rows of a replayed spool or flow that are there already
            self.written += len(batch)
            return
        except Exception as e:
            if len(batch) == 1:
                self._dead_letter(batch[0], e)
                return
            log.warning("batch of %d records failed (%s); splitting it to find the record at fault", len(batch), e)
        half = len(batch) // 2
        self._store(batch[:half])
        self._store(batch[half:])

    def _dead_letter(self, rec, error: Exception) -> None:
        self.dead_lettered += 1
        what = getattr(rec, "table", "interception end")
        log.error("record for %s could not be stored (%s); kept in %s", what, str(error).splitlines()[0],
                  self.dead_letter_path)
        try:
            with private_file(self.dead_letter_path, "ab") as f:
                entry = {"at": dt.datetime.now(dt.UTC).isoformat(), "error": str(error), "record": _encode(rec)}
                f.write(json.dumps(entry, default=lambda v: _datetime(v) if isinstance(v, dt.datetime) else str(v))
                        .encode() + b"\n")
        except OSError as e:
            log.error("dead-letter write failed: %s", e)

    def _apply(self, batch: list, tolerant: bool = False) -> None:
        """One transaction, one statement per table (columns passed as lists and unnested: DuckDB's cost is per
        statement and per bound parameter, not per row). `tolerant` skips rows whose id exists already — the
        retry for a spool or flow replayed after its rows were committed; live batches never need it."""
        inserts: dict[str, list[tuple]] = {}
        pending_rows: dict[str, list] = {}  # interception id -> its row, while still in this batch
        ends: list[EndInterception] = []
        for rec in batch:
            if isinstance(rec, Insert):
                row = _clean_row(rec.table, rec.row)
                inserts.setdefault(rec.table, []).append(row)
                if rec.table == "aibridge_interceptions":
                    pending_rows[row[0]] = row
            else:
                values = _clean_values(END_COLUMNS, rec.values)
                # Start and end in one batch: insert the finished row once. Not when replaying: the start may be
                # in the store already (then the insert does nothing, and the end must still be applied).
                row = pending_rows.get(rec.id) if not tolerant else None
                if row is not None:
                    for col, v in zip(END_COLUMNS, values):
                        if v is not None or col not in KEPT_UNLESS_SET:
                            row[_END_INDEX[col]] = v
                else:
                    ends.append(EndInterception(rec.id, values))
        conn = self._conn
        with transaction(conn):
            for table, rows in inserts.items():
                if tolerant and len({r[0] for r in rows}) < len(rows):
                    rows = list({r[0]: r for r in rows}.values())  # a replay may repeat a record
                sql = self._insert_sql[table] + (" ON CONFLICT DO NOTHING" if tolerant else "")
                self._execute_batch(sql, [list(col) for col in zip(*rows)])
            if ends:
                self._execute_batch(self._end_sql,
                                    [[e.id for e in ends], *([list(col) for col in zip(*(e.values for e in ends))])])

    def _execute_batch(self, sql: str, params: list) -> None:
        self._conn.execute(sql, params)



def _noop(conn) -> None:
    return None



def _clean_values(cols: tuple[str, ...], values) -> list:
    out = list(values)
    for n, v in enumerate(out):
        if isinstance(v, str):
            out[n] = clean_json(v) if cols[n] in JSON_COLUMNS else clean_text(v)
    return out


def _clean_row(table: str, row: tuple) -> list:
    return _clean_values(COLUMNS[table], row)


# --- the spool's data-only format: one JSON array per batch, one line each ------------------------------


def _datetime(v):
    """json.dumps calls this only for what JSON cannot hold itself: the rows' timestamps."""
    if isinstance(v, dt.datetime):
        return {"$t": v.isoformat()}
    raise TypeError(f"{type(v).__name__} is not a record value")


def _unvalue(v):
    return dt.datetime.fromisoformat(v["$t"]) if isinstance(v, dict) else v


def _encode(rec) -> list:
    if isinstance(rec, Insert):
        return ["i", rec.table, rec.row]
    return ["e", rec.id, rec.values]


def encode_batch(batch: list) -> bytes:
    return json.dumps([_encode(r) for r in batch], separators=(",", ":"), default=_datetime).encode()


def decode_batch(line: bytes) -> list:
    return decode_records(json.loads(line))


def decode_records(entries: list) -> list:
    out = []
    for kind, key, values in entries:
        vals = tuple(_unvalue(v) for v in values)
        if kind == "i":
            if key not in COLUMNS:
                raise KeyError(key)
            # A spool written before a migration appended columns lacks their values (NULL, like the migration).
            out.append(Insert(key, vals + (None,) * (len(COLUMNS[key]) - len(vals))))
        else:  # a spool from before a column was added to END_COLUMNS lacks its value
            out.append(EndInterception(key, vals + (None,) * (len(END_COLUMNS) - len(vals))))
    return out
