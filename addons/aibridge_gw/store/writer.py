"""The gateway's DuckDB owner: one writer thread applies record batches and admin operations in order.

DuckDB allows one writing process per file, so the gateway keeps the file open and everything that writes
(recording, token changes from the CLI) goes through this thread. The event loop only enqueues.

Durability: each batch is appended to an on-disk spool (JSON lines, data only) and fsynced before it is
applied to DuckDB, and the spool is emptied once DuckDB has committed it. A gateway killed in between replays
the spool at start-up; records carry their own ids, so a replayed batch never yields a row twice.

No record is dropped: text DuckDB cannot hold (lone surrogates from hostile JSON, undecodable header bytes)
is stored escaped; a batch that still fails is split in halves until the record at fault is found, and that
one record goes to a dead-letter file (`<db>.deadletter.jsonl`) and is counted. Only the database's verdict on
the data sends a record there (a constraint, a type) — never a fault of the store itself.

Faults of the store (a database that restarts or is down, a full disk, a read-only file system, lost
permissions) hold records instead: batches not yet committed wait in order — in the spool, and in memory up to
`storage.backlog_max_mb` (beyond that, spooled batches wait on disk only and are read back in turn) — and are
retried with backoff (at most `RETRY_MAX` seconds apart) until the store takes them. The writer thread never
dies of an exception; its state (up or down, why, since when, what is held) is reported on every change, and
the spool is emptied only once everything in it is committed.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import errno
import functools
import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb

from ..files import private_file
from . import deadletters
from .codec import (
    _clean_row,
    _clean_values,
    _datetime,
    _encode,
    decode_batch,
    encode_batch,
)
from .lockdown import lock_down
from .rows import COLUMNS, END_COLUMNS, KEPT_UNLESS_SET, EndInterception, Insert
from .schema import migrate, transaction
from .statements import column_types, insert_statements

log = logging.getLogger(__name__)

_END_INDEX = {c: COLUMNS["aibridge_interceptions"].index(c) for c in END_COLUMNS}
BATCH_WINDOW = 0.1  # seconds records may wait in memory before their batch is spooled and committed
READERS = 2  # threads (and PostgreSQL connections) that run reads beside the writer
MAX_BATCH = 2000  # records per transaction (binding them holds the GIL; keep each bind short)
RETRY_FIRST, RETRY_MAX = 0.25, 5.0  # seconds between attempts to reach a store that failed: doubling, capped
IDLE_PROBE = 1.0  # seconds: an idle writer checks its store this often, so health tells the truth within seconds
BACKLOG_MAX_BYTES = 512 * 1024 * 1024  # storage.backlog_max_mb: records held in memory while the store is away
LOW_DISK_BYTES = 64 * 1024  # free space below which a DuckDB directory counts as full
STALL_SECONDS = 10.0  # a commit that has not returned after this long means the store stopped answering


def has_room(directory: Path) -> bool:
    """Whether a directory's file system is writable and not (nearly) full."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return not st.f_flag & os.ST_RDONLY and st.f_bavail * st.f_frsize >= LOW_DISK_BYTES


_DATA_ERRORS = (duckdb.ConstraintException, duckdb.ConversionException, duckdb.InvalidInputException,
                duckdb.TypeMismatchException, duckdb.OutOfRangeException, duckdb.BinderException)


class StoreUnavailable(Exception):
    """The store cannot take records now (not the records' fault): they are held and retried."""


@dataclass(slots=True)
class _Op:
    fn: Callable[[duckdb.DuckDBPyConnection], Any]
    future: cf.Future


_STOP = object()


def open_spool(path: Path):
    """The spool, for appending and for reading held ranges back (by descriptor: a spool deleted under the writer
    can still be read, and written out again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "r+b", buffering=0)


def restrict(path: Path) -> None:
    try:
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


class StoreApi(Protocol):
    """What the gateway needs of a store; `Store` (in this process) and `WriterProcess` (its own) provide it."""

    path: Path
    written: int
    dead_lettered: int
    stale_closed: int
    state: dict  # whether the store takes records, why not, since when, what is held (Store.state)

    @property
    def alive(self) -> bool: ...

    def submit(self, record: Insert | EndInterception) -> None: ...

    def run(self, op: str, writes: bool = False, **args) -> cf.Future: ...

    def flush(self) -> cf.Future: ...

    def close(self) -> None: ...


class Store:
    CONFLICT: type[Exception] = duckdb.ConstraintException  # a row whose id is there already

    def __init__(self, path: Path, after_op: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
                 spool: bool = True, close_stale: bool = False, on_commit: Callable[[], None] | None = None,
                 backlog_max_bytes: int = BACKLOG_MAX_BYTES):
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".spool") if spool else None
        self.dead_letter_path = self.path.with_name(self.path.name + deadletters.SUFFIX)
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
        # Held: batches not yet committed, oldest first. ("mem", batch, bytes, spooled) in memory; ("disk", start,
        # end, records) a range of the spool read back when its turn comes (memory past backlog_max_bytes).
        self._held: deque = deque()
        self.backlog = 0  # records held
        self.backlog_bytes = 0  # of which in memory (encoded size)
        self.backlog_max_bytes = backlog_max_bytes
        self.lost = 0  # records neither the store, the spool nor memory could take (all three full)
        self._lost_flushed = 0  # `lost` when a flush last failed for it (each loss fails one flush: the journal stays)
        self._busy_since: float | None = None  # a commit is running since (the watchdog's view)
        self._db_inode: tuple[int, int] | None = None  # the DuckDB file opened (a file deleted under us is noticed)
        self.up = True
        self.reason: str | None = None  # why the store cannot take records, while it cannot
        self.since: float | None = None  # wall-clock time it went away
        self._retry_at = 0.0
        self._delay = 0.0
        self._last_ok = time.monotonic()
        self._spool_failing: str | None = None  # the spool could not be written (logged once per change)
        self._unwritten_dead: list[dict] = []  # dead letters the disk could not take yet
        self.on_state: Callable[[], None] | None = None  # after each change of up/reason (the server reports it)

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
        st = os.stat(self.path)
        self._db_inode = (st.st_dev, st.st_ino)
        migrate(self._conn)
        lock_down(self._conn, self.path)  # admin SQL runs on this instance: no file access, locked settings
        self._prepare_statements()
        if self.spool_path is not None:
            self._replay_spool()
            self._spool = open_spool(self.spool_path)
        if self.close_stale:
            self.stale_closed = self._close_stale()
        self._start_threads()
        return self._conn

    def _start_threads(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aibridge-writer", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="aibridge-writer-watch", daemon=True).start()

    def _watch(self) -> None:
        """A commit that hangs (a database that stopped answering without closing the connection) would leave
        health saying `up` while records pile up: past STALL_SECONDS the store is reported down and the stuck
        connection is cut, so the writer fails over to holding and retrying."""
        while self._thread is not None:
            time.sleep(1.0)
            since = self._busy_since
            if since is None or time.monotonic() - since < STALL_SECONDS:
                continue
            if self.up:
                self.up, self.reason, self.since = False, "store not answering", time.time()
                log.error("aibridge store: a commit has waited %.0f s for the store; holding records and cutting the "
                          "connection", time.monotonic() - since)
                self._state_changed()
            try:
                self._abort_stalled()
            except Exception as e:
                log.debug("cutting a stalled connection failed: %s", e)

    def _abort_stalled(self) -> None:
        """Cut a connection a commit hangs on (engines that can hang say how)."""

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

        if op == "flush":  # the barrier itself: it must fail while records are held, never commit nothing
            return self.flush()
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
            try:
                stop = self._round()
            except Exception:  # nothing may end this thread: what failed is logged, the records stay held
                log.exception("aibridge store: the writer hit an unexpected error; it goes on")
                time.sleep(RETRY_FIRST)
        try:
            self._finish()
        except Exception:
            log.exception("aibridge store: finishing the writer failed")

    def _round(self) -> bool:
        """One batch window: gather records, hold them, commit what the store takes. True once told to stop."""
        try:
            item = self._q.get(timeout=self._wait_time())
        except queue.Empty:
            self._tick()
            return False
        # Let records gather: DuckDB is columnar, and a commit costs about the same for 1 row as for 100,
        # so one commit per window instead of one per record. The spool keeps the window crash-safe.
        if self._q.qsize() < MAX_BATCH and not isinstance(item, _Op) and item is not _STOP:
            self._wake.wait(BATCH_WINDOW)
        self._wake.clear()
        batch: list = []
        stop = False
        while True:
            if item is _STOP:
                stop = True
                break
            if isinstance(item, _Op):
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
        return stop

    def _wait_time(self) -> float:
        if self._held:
            return max(0.01, min(IDLE_PROBE, self._retry_at - time.monotonic()))
        return IDLE_PROBE

    def _tick(self) -> None:
        """Idle: retry what is held when its time comes; otherwise check the store now and then, so a store that
        went away while nothing was recorded shows in health within seconds, not at the next call."""
        if self._held:
            self._drain()
        elif time.monotonic() - self._last_ok >= IDLE_PROBE:
            self._busy_since = time.monotonic()  # a probe can hang on a store that stopped answering, too
            try:
                problem = self._probe()
            finally:
                self._busy_since = None
            if problem is None:
                self._ok()
            elif self.up or problem != self.reason:
                self._down(problem)
        if self._unwritten_dead:
            self._write_dead_letters()
        if self._spool_gone():
            log.error("aibridge store: the spool %s was deleted under the writer; writing what is held to a new one",
                      self.spool_path)
            if not self._respool():
                self._spool_trouble(FileNotFoundError(errno.ENOENT, "spool deleted", str(self.spool_path)))
        if self._spool_failing == "disk full" and self.spool_path is not None and has_room(self.spool_path.parent):
            self._spool_failing = None  # the next append tells for sure; health need not wait for traffic
            log.warning("aibridge store: the spool %s has room again", self.spool_path)
            self._state_changed()

    def _run_op(self, op: _Op) -> None:
        if not op.future.set_running_or_notify_cancel():
            return
        if op.fn is _noop:  # a flush: resolves once everything before it is committed, fails while it is held
            if self._held and not self._drain():
                op.future.set_exception(StoreUnavailable(self.describe()))
            elif self.lost > self._lost_flushed:  # some records reached neither the store nor the spool
                self._lost_flushed = self.lost
                op.future.set_exception(StoreUnavailable(f"{self.lost} record(s) lost (store, spool and memory "
                                                         "full): the gateway's journal keeps its copy"))
            else:
                op.future.set_result(None)
            return
        if self._held:
            self._drain()
        conn = self._conn
        try:
            with transaction(conn):
                result = op.fn(conn)
        except BaseException as e:
            if self._transient(e):
                self._down(self._classify(e))
                self._recover()
            op.future.set_exception(e)
            return
        try:
            if self.after_op:
                self.after_op(conn)
        except Exception:
            log.exception("after-op hook failed")
        op.future.set_result(result)

    def _finish(self) -> None:
        """Shutting down: one last attempt; what the store still cannot take stays in the spool for the next
        start (and in the gateway's journal), never deleted."""
        if self._held and not self._drain(now=True):
            if self._spool_everything():
                log.error("aibridge store: %d record(s) could not be committed before shutdown (%s); kept in the "
                          "spool %s for the next start", self.backlog, self.reason, self.spool_path)
            else:
                unspooled = sum(len(e[1]) for e in self._held if e[0] == "mem" and not e[3])
                self.lost += unspooled
                log.error("aibridge store: %d record(s) could not be committed before shutdown (%s), and %d of them "
                          "could not be spooled either: lost unless a gateway's journal has them", self.backlog,
                          self.reason, unspooled)
        if self._unwritten_dead:
            self._write_dead_letters()

    # --- the store's state ---------------------------------------------------------------------------

    def describe(self) -> str:
        return f"store unavailable: {self.reason or 'unknown'}; {self.backlog} record(s) held"

    @property
    def state(self) -> dict:
        """What health reports: plain values."""
        waiting = self._q.qsize() if not self.up else 0  # a stalled writer's queue is held too
        return {"up": self.up, "reason": self.reason, "since": self.since, "backlog": self.backlog + waiting,
                "backlog_bytes": self.backlog_bytes, "lost": self.lost, "spool": self._spool_failing}

    def _ok(self) -> None:
        self._last_ok = time.monotonic()
        self._delay = 0.0
        if not self.up:
            down_for = time.time() - (self.since or time.time())
            self.up, self.reason, self.since = True, None, None
            log.warning("aibridge store: the store takes records again (after %.1f s)%s", down_for,
                        f"; committing {self.backlog} held record(s)" if self.backlog else "")
            self._state_changed()

    def _down(self, reason: str) -> None:
        self._delay = min(RETRY_MAX, max(RETRY_FIRST, self._delay * 2))
        self._retry_at = time.monotonic() + self._delay
        if self.up or reason != self.reason:
            if self.up:
                self.since = time.time()
            self.up, self.reason = False, reason
            log.error("aibridge store: the store cannot take records (%s); holding them and retrying every %.0f s "
                      "at most", reason, RETRY_MAX)
            self._state_changed()

    def _state_changed(self) -> None:
        if self.on_state is not None:
            try:
                self.on_state()
            except Exception:
                log.exception("aibridge store: reporting the store's state failed")

    # What a store's faults look like; each engine says which of its errors are the store's, not the data's.
    _FAULT_WORDS = re.compile(r"no space|could not write|read-only|permission denied|not permitted|invalidated|"
                              r"i/o error|"
                              r"input/output|disk|too many open files|out of memory", re.I)

    def _transient(self, e: BaseException) -> bool:
        """A fault of the store (hold and retry), not of the record (dead-letter)."""
        if isinstance(e, (OSError, MemoryError, StoreUnavailable)):
            return True
        if isinstance(e, (duckdb.IOException, duckdb.FatalException, duckdb.OutOfMemoryException,
                          duckdb.InterruptException, duckdb.TransactionException)):
            return True
        if isinstance(e, _DATA_ERRORS):  # the data's fault, whatever words its message quotes from the record
            return False
        return bool(self._FAULT_WORDS.search(str(e).splitlines()[0] if str(e) else ""))

    @staticmethod
    def _classify(e: BaseException) -> str:
        """The reason health gives, in the operator's words."""
        text = str(e)
        code = getattr(e, "errno", None)
        low = text.lower()
        if code == errno.ENOSPC or "no space" in low or "disk full" in low:
            return "disk full"
        if code == errno.EROFS or "read-only file system" in low:
            return "read-only file system"
        if code in (errno.EACCES, errno.EPERM) or "permission denied" in low or "operation not permitted" in low:
            return "permission denied"
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return f"store error: {first[:200]}"

    def _probe(self) -> str | None:
        """None when the store can take records, else why not (DuckDB: the file system's free space)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError as e:
            return self._classify(e)
        if st.f_flag & os.ST_RDONLY:
            return "read-only file system"
        if st.f_bavail * st.f_frsize < LOW_DISK_BYTES:
            return "disk full"
        if self._conn is None:
            return "store error: not open"
        if self._file_replaced():
            return "database file deleted or replaced"
        try:
            self._conn.execute("SELECT 1").fetchone()
        except Exception as e:
            return self._classify(e)
        return None

    def _file_replaced(self) -> bool:
        """The database file was deleted or replaced under the writer: commits would go to a file no one opens
        again (the next start would begin an empty one). Records are held instead, and health says so."""
        if self._db_inode is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._db_inode

    def _recover(self) -> None:
        """After a fault: DuckDB invalidates a database after some I/O failures; open it again."""
        try:
            self._conn.execute("SELECT 1").fetchone()
            return
        except Exception:
            pass
        try:
            fresh = duckdb.connect(str(self.path))
        except Exception as e:
            log.debug("reopening %s failed: %s", self.path, e)
            return
        try:
            lock_down(fresh, self.path)
        except Exception as e:  # never hand admin SQL an instance that can reach the file system
            log.debug("locking down %s failed: %s", self.path, e)
            fresh.close()
            return
        old, self._conn = self._conn, fresh
        try:
            old.close()
        except Exception:
            pass

    # --- holding and committing ------------------------------------------------------------------------

    def _write(self, batch: list, spool: bool = True) -> None:
        """Take a batch: into the spool (crash safety), then held until the store commits it, in order."""
        if not batch:
            return
        try:
            data = encode_batch(batch) if (spool and self._spool is not None) else None
        except (TypeError, ValueError) as e:  # not JSON-able: cannot be spooled, still held and committed
            log.error("aibridge store: a batch could not be spooled (%s)", e)
            data = None
        size = len(data) if data is not None else 256 * len(batch)
        where = self._spool_append(data) if data is not None else None
        if where is not None and self._memory_full(size):
            self._hold_on_disk(where[0], where[1], len(batch))
        elif self.backlog_bytes + size > self.backlog_max_bytes and self._held:
            self.lost += len(batch)
            log.error("aibridge store: %d record(s) lost: the store, the spool and memory (storage.backlog_max_mb) "
                      "are all full", len(batch))
            self._state_changed()
            return
        else:
            self._held.append(("mem", batch, size, where is not None))
            self.backlog_bytes += size
        self.backlog += len(batch)
        self._drain()
        if self.on_commit is not None:
            self.on_commit()

    def _memory_full(self, size: int) -> bool:
        """Whether a batch of `size` bytes must wait in the spool only: memory is at its bound, or batches already
        wait on disk (it goes after them, in turn)."""
        return self.backlog_bytes + size > self.backlog_max_bytes or bool(self._held and self._held[-1][0] == "disk")

    def _hold_on_disk(self, start: int, end: int, records: int) -> None:
        """Hold a spooled byte range; joined to the last range when it follows on."""
        last = self._held[-1] if self._held else None
        if last is not None and last[0] == "disk" and last[2] == start:
            self._held[-1] = ("disk", last[1], end, last[3] + records)
        else:
            self._held.append(("disk", start, end, records))

    def _drain(self, now: bool = False) -> bool:
        """Commit held batches in order, as many records per transaction as MAX_BATCH allows. True once nothing
        is held. While the store is failing, attempts wait for their backoff unless `now`."""
        if not now and self._held and not self.up and time.monotonic() < self._retry_at:
            return False
        released = False
        while self._held:
            try:
                if self._file_replaced():
                    raise StoreUnavailable("database file deleted or replaced")
                batch, release = self._next_batch()
                self._busy_since = time.monotonic()
                try:
                    self._store(batch)
                finally:
                    self._busy_since = None
            except Exception as e:  # StoreUnavailable, or a fault reading the spool back
                self._down(e.args[0] if isinstance(e, StoreUnavailable) and e.args else self._classify(e))
                if released:
                    self._state_changed()
                return False
            release()
            released = True
            self._ok()
        self.backlog = self.backlog_bytes = 0
        self._spool_clear()
        if released and not now:
            self._state_changed()  # health sees the backlog gone even if no record follows
        return True

    def _next_batch(self) -> tuple[list, Callable[[], None]]:
        """The oldest held records, up to about MAX_BATCH (spooled ones read back from disk), and what to release
        once they are committed."""
        head = self._held[0]
        if head[0] == "disk":
            batch, upto = self._read_back(head[1], head[2])
            short = head[3] - len(batch) if upto >= head[2] else 0

            def release() -> None:
                if upto >= head[2]:
                    self._held.popleft()
                else:
                    self._held[0] = ("disk", upto, head[2], head[3] - len(batch))
                self.backlog -= len(batch) + max(short, 0)
                if short > 0:  # the spool lost part of the range (truncated under us, a bad line): say so
                    self.lost += short
                    log.error("aibridge store: %d spooled record(s) could not be read back from %s", short,
                              self.spool_path)
                    self._state_changed()

            return batch, release
        batch, n = list(head[1]), 1
        while n < len(self._held) and self._held[n][0] == "mem" and len(batch) + len(self._held[n][1]) <= MAX_BATCH:
            batch.extend(self._held[n][1])
            n += 1

        def release() -> None:
            for _ in range(n):
                entry = self._held.popleft()
                self.backlog -= len(entry[1])
                self.backlog_bytes -= entry[2]

        return batch, release

    def _read_back(self, start: int, end: int) -> tuple[list, int]:
        """Batches the spool holds from byte `start` (lines appended in order), about MAX_BATCH records' worth,
        and where the next read starts."""
        fd = self._spool.fileno()
        out: list = []
        pos, buf = start, b""
        while len(out) < MAX_BATCH:
            if b"\n" not in buf:
                if pos >= end:
                    if not buf:
                        break
                    line, buf = buf, b""  # a last line without its newline
                else:
                    chunk = os.pread(fd, min(1 << 20, end - pos), pos)
                    if not chunk:
                        break
                    buf += chunk
                    pos += len(chunk)
                    continue
            else:
                line, buf = buf.split(b"\n", 1)
            if line.strip():
                try:
                    out.extend(decode_batch(line))
                except (ValueError, KeyError, TypeError, IndexError):
                    log.warning("spool %s: skipped an unreadable entry (%d bytes)", self.spool_path, len(line))
        return out, (pos - len(buf)) if out else end

    def _store(self, batch: list) -> None:
        """Commit a batch; on a data error, split it until the record at fault is alone, and dead-letter only that
        one. A fault of the store raises StoreUnavailable: the batch is held and retried."""
        try:
            try:
                orphans = self._apply(batch)
            except self.CONFLICT:
                orphans = self._apply(batch, tolerant=True)  # rows of a replayed spool or flow already there
            self.written += len(batch) - len(orphans)
            for end in orphans:  # kept, never silently dropped: replayed once its start is back
                self._dead_letter(end, LookupError("no interception row for this end (its start never reached the "
                                                   "store)"))
            return
        except Exception as e:
            if self._transient(e):
                reason = self._classify(e)
                self._recover()
                raise StoreUnavailable(reason) from e
            if len(batch) == 1:
                problem = self._probe()  # blame the record only when the store itself is fine
                if problem is not None:
                    raise StoreUnavailable(problem) from e
                self._dead_letter(batch[0], e)
                return
            log.warning("batch of %d records failed (%s); splitting it to find the record at fault", len(batch),
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
        half = len(batch) // 2
        self._store(batch[:half])
        self._store(batch[half:])

    # --- the spool ----------------------------------------------------------------------------------

    def _spool_append(self, data: bytes) -> tuple[int, int] | None:
        """Append one batch and fsync; its byte range in the spool, or None when the disk would not take it (then
        the file is cut back to where it was: a partial line must not spoil the next batch)."""
        fd = self._spool.fileno()
        start = None
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            view = memoryview(data + b"\n")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            end = start + len(data) + 1
        except (OSError, ValueError) as e:
            if start is not None:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
            self._spool_trouble(e)
            return None
        if self._spool_failing is not None:
            log.warning("aibridge store: the spool %s can be written again", self.spool_path)
            self._spool_failing = None
            self._state_changed()
        return start, end

    def _spool_trouble(self, e: Exception) -> None:
        reason = self._classify(e)
        if self._spool_failing != reason:
            self._spool_failing = reason
            log.error("aibridge store: the spool %s cannot be written (%s); records wait in memory (up to %d MB)",
                      self.spool_path, e, self.backlog_max_bytes // (1024 * 1024))
            self._state_changed()

    def _spool_everything(self) -> bool:
        """At shutdown with records held: the spool becomes exactly what is held, in held order (a batch that could
        not be spooled when it came goes in its place, never after later ones: an end replayed before its start
        would find no row). True when it is all there."""
        if self._spool is None:
            return False
        if not self._spool_gone() and all(entry[0] == "disk" or entry[3] for entry in self._held):
            return True  # everything held is in the spool already, in order
        return self._respool()

    def _spool_gone(self) -> bool:
        """The spool file was deleted (or its directory) under the writer: appends go to a file nobody will read."""
        try:
            return self._spool is not None and os.fstat(self._spool.fileno()).st_nlink == 0
        except (OSError, ValueError):
            return True

    def _respool(self) -> bool:
        """Write a new spool holding exactly what is held, in order (written beside, fsynced, renamed over; its
        directory made again if it was removed), and go on with it. True when it worked."""
        tmp = self.spool_path.with_name(self.spool_path.name + ".new")
        old = self._spool.fileno()
        held = []
        try:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            out = open_spool(tmp)
            try:
                os.ftruncate(out.fileno(), 0)
                for entry in self._held:
                    at = out.seek(0, os.SEEK_END)
                    if entry[0] == "mem":
                        out.write(encode_batch(entry[1]) + b"\n")
                        held.append(("mem", entry[1], entry[2], True))
                    else:
                        data = os.pread(old, entry[2] - entry[1], entry[1])
                        out.write(data)
                        held.append(("disk", at, at + len(data), entry[3]))
                os.fsync(out.fileno())
                os.replace(tmp, self.spool_path)
            except BaseException:
                out.close()
                raise
        except (OSError, ValueError, TypeError) as e:
            log.error("aibridge store: writing the spool again failed (%s)", e)
            try:
                tmp.unlink()
            except OSError:
                pass
            return False
        self._spool.close()
        self._spool = out
        self._held = deque(held)
        return True

    def _spool_clear(self) -> None:
        if self._spool is None:
            return
        try:
            os.ftruncate(self._spool.fileno(), 0)
        except (OSError, ValueError) as e:  # committed records left in it are harmless: a replay adds nothing
            self._spool_trouble(e)

    def _replay_spool(self) -> None:
        """Apply batches a previous run spooled but may not have committed (a crash, kill -9, a store that was
        away at shutdown). Read line by line: memory holds up to the bound, the rest is held as ranges of the
        spool and read back in turn. Whatever the store cannot take now stays held, and in the spool."""
        try:
            f = open(self.spool_path, "rb")
        except FileNotFoundError:
            return
        batches = records = 0
        with f:
            while True:
                start = f.tell()
                line = f.readline()
                if not line:
                    break
                body = line.rstrip(b"\n")
                if not body:
                    continue
                try:
                    if self._held and self._memory_full(len(body)):
                        n = len(json.loads(body))  # past the bound: counted, left on disk
                        self._hold_on_disk(start, f.tell(), n)
                    else:
                        batch = decode_batch(body)
                        n = len(batch)
                        self._held.append(("mem", batch, len(body), True))
                        self.backlog_bytes += len(body)
                except (ValueError, KeyError, TypeError, IndexError):
                    # a line cut short by the crash was never acknowledged; anything else is not ours to trust
                    log.warning("spool %s: skipped an unreadable entry (%d bytes)", self.spool_path, len(body))
                    continue
                self.backlog += n
                batches += 1
                records += n
        if batches and self._drain(now=True):
            log.info("replayed %d spooled batch(es) (%d records)", batches, records)
        elif batches:
            log.error("aibridge store: %d spooled record(s) wait for the store (%s)", self.backlog, self.reason)
            return  # the spool keeps them; new batches are appended after them
        with private_file(self.spool_path, "wb"):
            pass

    # --- dead letters ----------------------------------------------------------------------------------

    def _dead_letter(self, rec, error: Exception) -> None:
        self.dead_lettered += 1
        what = getattr(rec, "table", "interception end")
        log.error("record for %s could not be stored (%s); kept in %s", what, str(error).splitlines()[0],
                  self.dead_letter_path)
        self._unwritten_dead.append({"at": dt.datetime.now(dt.UTC).isoformat(), "error": str(error),
                                     "record": _encode(rec)})
        self._write_dead_letters()

    def _write_dead_letters(self) -> None:
        """Append waiting dead letters (a full disk keeps them in memory until it takes them)."""
        entries, self._unwritten_dead = self._unwritten_dead, []
        data = b"".join(json.dumps(e, default=lambda v: _datetime(v) if isinstance(v, dt.datetime) else str(v))
                        .encode() + b"\n" for e in entries)
        try:
            deadletters.append(self.dead_letter_path, data)  # under the lock `replay-deadletters` rewrites with
        except OSError as e:
            self._unwritten_dead[:0] = entries
            log.error("dead-letter write failed (%s); %d kept in memory for now", e, len(self._unwritten_dead))

    def _apply(self, batch: list, tolerant: bool = False) -> list[EndInterception]:
        """One transaction, one statement per table (columns passed as lists and unnested: DuckDB's cost is per
        statement and per bound parameter, not per row). `tolerant` skips rows whose id exists already — the
        retry for a spool or flow replayed after its rows were committed; live batches never need it. Returns the
        ends that found no interception row (their start never reached the store)."""
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
            matched: set[str] = set()
            if ends:
                matched = {str(r[0]) for r in self._execute_returning(
                    self._end_sql + " RETURNING aibridge_interceptions.id",
                    [[e.id for e in ends], *([list(col) for col in zip(*(e.values for e in ends))])])}
        return [e for e in ends if str(e.id) not in matched]

    def _execute_batch(self, sql: str, params: list) -> None:
        self._conn.execute(sql, params)

    def _execute_returning(self, sql: str, params: list) -> list:
        return self._conn.execute(sql, params).fetchall()



def _noop(conn) -> None:
    return None
