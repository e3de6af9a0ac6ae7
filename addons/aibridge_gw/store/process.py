"""The gateway's store in a process of its own, so recording never competes with the proxy for the GIL.

DuckDB allows one process per file, and turning Python rows into DuckDB values holds the GIL: in the proxy's
process the writer thread took the interpreter away from the event loop on every batch. Here a child process
(`store/server.py`) owns the file and runs the same `Store` (batching, spool, dead letters); the gateway only
encodes records as JSON and writes them to a pipe. Reads and admin operations travel the same pipe by name
(`ops.ALL_OPS`) with plain-value arguments and results — never pickle.

Messages are JSON lines. To the child: {"t": "rec", "b": [records]} and {"t": "op", "id", "op", "a", "w"}.
From it: {"t": "ready"}, {"t": "r", "id", "ok", ...} answers and {"t": "s", ...} counters after each batch.
The child ignores SIGINT/SIGTERM and ends when its input closes: when the gateway shuts down, or dies — then it
commits what it has received.

The journal closes the rest: every record is appended to this process's own journal file (one JSON line, one
`write`, no fsync: it must outlive the process, not the machine) before it is queued, so before the provider sees
the request it records. A gateway killed before its records reached the writer, or a writer killed before it
committed what it had read, loses nothing: the next gateway (or the restarted writer's gateway) sends the journal
again, and ids from flow ids make repeats harmless. Calls the dead process had started and never ended are ended
failed ("gateway stopped"). About once a second the journal is rotated and the old part deleted once a flush
confirms everything in it is committed.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import errno
import glob
import importlib.util
import itertools
import json
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import claim, reports
from .codec import _datetime, _encode
from .ops import OpError
from .rows import INTERCEPTIONS, EndInterception, Insert, interception_end
from .server import POSTGRES_ENV, serve
from .writer import has_room

log = logging.getLogger(__name__)

_STOP = object()
SEND_WINDOW = 0.05  # seconds records may wait in the gateway before they are sent (the child batches again)
# Where this package was imported from (a checkout's addons/ or site-packages): the child imports the same code.
PACKAGE_PARENT = str(Path(importlib.util.find_spec("aibridge_gw").origin).resolve().parent.parent)


_STATUS = INTERCEPTIONS.columns.index("status")


class _Op:
    __slots__ = ("id", "line")

    def __init__(self, id: int, line: bytes) -> None:
        self.id, self.line = id, line


JOURNAL_ROTATE_SECONDS = 1.0
RESPAWN_MAX = 5  # seconds between attempts to start a writer again
JOURNAL_CLAIM_WAIT = 10.0  # seconds a new process waits for an old one of the same name to let go of its journal

def start_writer_process(path: Path, flags: list[str], postgres: str | None = None,
                         backlog_max_mb: int | None = None) -> subprocess.Popen:
    """`python -m aibridge_gw.store.server PATH FLAGS…`, importing this same code, its stdin and stdout piped."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.pop(POSTGRES_ENV, None)
    if postgres:  # in the environment, not the arguments: a URL may carry a password (ps shows argv)
        env[POSTGRES_ENV] = postgres
    if backlog_max_mb:
        flags = [*flags, "--backlog-max-mb", str(int(backlog_max_mb))]
    if os.environ.get(IN_THREAD_ENV) == "1":
        return StoreThread(path, flags, postgres)
    args = [sys.executable, "-m", "aibridge_gw.store.server", str(path), *flags]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


IN_THREAD_ENV = "AIBRIDGE_STORE_IN_THREAD"  # "1": the writer runs in a thread of this process (the fast test tier)


class StoreThread:
    """The writer's own code (store/server.py `serve`) in a thread of this process over two pipes, shaped like
    the Popen of a writer process: stdin, stdout, poll, wait, kill. For the in-process test tier, where a
    process start per test costs more than the test; never chosen by a gateway unless AIBRIDGE_STORE_IN_THREAD=1."""

    def __init__(self, path: Path, flags: list[str], postgres: str | None) -> None:
        to_writer_r, to_writer_w = os.pipe()
        from_writer_r, from_writer_w = os.pipe()
        self.stdin = os.fdopen(to_writer_w, "wb")
        self.stdout = os.fdopen(from_writer_r, "rb")
        self.returncode: int | None = None
        self._done = threading.Event()
        rfile, wfile = os.fdopen(to_writer_r, "rb"), os.fdopen(from_writer_w, "wb")

        def run() -> None:
            try:
                self.returncode = serve(Path(path), flags, rfile, wfile, postgres)
            except BaseException:
                log.exception("aibridge: the in-thread store failed")
                self.returncode = 1
            finally:
                for f in (rfile, wfile):
                    try:
                        f.close()
                    except OSError:
                        pass
                self._done.set()

        self.pid = None
        threading.Thread(target=run, name="aibridge-store-thread", daemon=True).start()

    def poll(self) -> int | None:
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired("aibridge store thread", timeout)
        return self.returncode

    def kill(self) -> None:
        try:
            self.stdin.close()
        except OSError:
            pass

    def send_signal(self, sig) -> None:
        self.kill()


class _Connection:
    """A connection to the writer every worker shares (`scripts/run --workers N`, store/server.py --listen),
    shaped like the Popen of a writer of one's own: stdin, stdout, poll, wait, kill."""

    def __init__(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the supervisor may be restarting the writer
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock = sock
        self.stdin = _WriteEnd(sock)
        self._rfile = sock.makefile("rb")
        self._eof = threading.Event()
        self.returncode = None

    @property
    def stdout(self):
        try:
            yield from self._rfile
        except OSError:
            pass
        self.returncode = 0
        self._eof.set()

    def poll(self):
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._eof.wait(timeout):
            raise subprocess.TimeoutExpired("aibridge store", timeout)
        return 0

    def kill(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _WriteEnd:
    """Closing it ends the sending half only: the writer then commits what came and closes its side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.file = sock, sock.makefile("wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        try:
            self.file.flush()
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class WriterProcess:
    def __init__(self, path: Path, close_stale: bool = False, spool: bool = True, postgres: str | None = None,
                 shared: str | None = None, journal: Path | None = None, backlog_max_mb: int | None = None) -> None:
        self.path = Path(path)  # the DuckDB file, or with `postgres` the base name of this process's spool
        self.postgres = postgres
        self.shared = shared  # the Unix socket of the writer all workers share, instead of a child of our own
        self.close_stale = close_stale
        self.spool = spool
        self.written = 0
        self.dead_lettered = 0
        self.stale_closed = 0
        self._proc: subprocess.Popen | None = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, cf.Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None
        self._receiver: threading.Thread | None = None
        self._dead: str | None = None  # why the child is gone, once it is
        self._closing = False
        self._respawning = threading.Lock()
        self._wake = threading.Event()  # an operation is waiting: send now, not at the end of the window
        self.journal = Path(journal) if journal is not None else None  # this process's write-ahead file
        self._journal_fd: int | None = None
        self._journal_lock = threading.Lock()  # one order for the journal and the queue
        self._journal_rotated = 0.0
        self._journal_flushing = False
        self.recovered = 0  # records a previous process journaled, sent again at start
        self._undelivered = False
        self.backlog_max_mb = backlog_max_mb
        # The store's state as the writer last reported it (store/writer.py Store.state): up, reason, backlog…
        self.state: dict = {"up": True, "reason": None, "since": None, "backlog": 0, "backlog_bytes": 0, "lost": 0,
                            "spool": None}
        self.journal_error: str | None = None  # the journal cannot be written (a full disk), while it cannot
        # Start records of calls in flight, by interception id: a rotation copies them into the new part, so a
        # killed process's unfinished calls are still found (and ended) by its next start.
        self._open_starts: dict[str, bytes] = {}
        self._journal_claim: int | None = None  # the lock that says this journal's process is alive

    @property
    def failed(self) -> int:
        return self.dead_lettered

    @property
    def alive(self) -> bool:
        """False once the writer process is gone: nothing can be recorded any more (healthz says so)."""
        return self._dead is None

    def open(self, timeout: float = 60.0) -> None:
        hello = self._spawn(self.close_stale, timeout)
        self.stale_closed = hello.get("stale", 0)
        if self.journal is not None:
            self._open_journal()
        self._sender = threading.Thread(target=self._send, name="aibridge-store-tx", daemon=True)
        self._sender.start()

    # --- the journal ------------------------------------------------------------------------------------

    @property
    def _journal_old(self) -> Path:
        return self.journal.with_name(self.journal.name + ".old")

    def _journal_lines(self) -> list[bytes]:
        """The journal's records, old part first."""
        return _read_journal(self._journal_old) + _read_journal(self.journal)

    def _open_journal(self) -> None:
        """Send again what a previous process journaled (most of it committed already: repeats add nothing), end
        the calls it started and never ended, and go on appending to the same file."""
        if self.journal.name.startswith("postgres-"):  # postgres-<database tag>-<listen address>[-w<N>]
            patterns = [f"{glob.escape('-'.join(self.journal.name.split('-')[:2]))}-*.journal"]
        else:  # <db>.journal (one gateway), <db>.w<N>.journal (workers), .p<pid> names, of the same database
            base = re.sub(r"\.w\d+$", "", self.journal.name.removesuffix(".journal"))
            patterns = [f"{glob.escape(base)}.journal", f"{glob.escape(base)}.w[0-9]*.journal",
                        f"{glob.escape(base)}.p[0-9]*.journal"]
        # A process of the same name still finishing (a restart while the old one drains) keeps its journal.
        self.journal, self._journal_claim = claim.hold_or_own(self.journal, JOURNAL_CLAIM_WAIT)
        lines = self._journal_lines()
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self._journal_fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        size = os.fstat(self._journal_fd).st_size
        if size:
            with open(self.journal, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a line cut short: what follows starts on a line of its own
                    os.write(self._journal_fd, b"\n")
        adopted: list[Path] = []
        for orphan in (o for pattern in patterns for o in claim.orphans(self.journal, pattern)):
            more = _read_journal(orphan.with_name(orphan.name + ".old")) + _read_journal(orphan)
            if more:  # ours now: kept until committed, like our own
                os.write(self._journal_fd, b"\n".join(more) + b"\n")
                lines += more
            claim.forget(orphan, orphan.with_name(orphan.name + ".old"))
            adopted.append(orphan)
        if adopted:
            log.warning("aibridge: adopted the journal(s) of gateway processes that are gone: %s",
                        ", ".join(p.name for p in adopted))
        started: dict[str, object] = {}
        ended: set[str] = set()
        for line in lines:
            kind, a, b = json.loads(line)
            if kind == "i" and a == "aibridge_interceptions":
                started[b[0]] = b
            elif kind == "e":
                ended.add(a)
        for line in lines:
            self._q.put(line)
        self.recovered = len(lines)
        now = datetime.datetime.now(datetime.UTC)
        meta = INTERCEPTIONS.columns.index("metadata")
        for iid, row in started.items():
            if iid not in ended and row[_STATUS] == "in_progress":
                self.submit(interception_end(iid, status="failed", ended_at=now, http_status=None,
                                             error="gateway stopped", metadata=row[meta]))
        if lines:
            log.warning("aibridge: sent again %d record(s) a previous gateway process journaled (%d call(s) it "
                        "left unfinished ended as failed)", len(lines), len(set(started) - ended))
        self._journal_rotated = time.monotonic()

    def _rotate_journal(self) -> None:
        """About once a second: start a new journal part; once a flush confirms that everything queued so far is
        committed, the old part goes. If that flush fails, the old part stays until one succeeds."""
        if self._journal_fd is None or self._journal_flushing:
            return
        if time.monotonic() - self._journal_rotated < JOURNAL_ROTATE_SECONDS:
            return
        self._journal_rotated = time.monotonic()
        with self._journal_lock:
            if not self._journal_old.exists():
                if os.fstat(self._journal_fd).st_size == 0:
                    return
                new = self.journal.with_name(self.journal.name + ".new")
                fd = None
                try:
                    if not self.journal.parent.exists():  # removed under us: recorded from now on again
                        self.journal.parent.mkdir(parents=True, exist_ok=True)
                        log.error("aibridge: the journal's directory %s was removed; made it again",
                                  self.journal.parent)
                    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
                    if self._open_starts:  # calls still in flight keep their start in the journal
                        os.write(fd, b"\n".join(self._open_starts.values()) + b"\n")
                    if self.journal.exists():  # (a journal deleted under us has nothing left to keep)
                        os.replace(self.journal, self._journal_old)
                    os.replace(new, self.journal)
                except OSError as e:  # a full disk: keep appending to the part we have
                    if fd is not None:
                        os.close(fd)
                    try:
                        new.unlink()
                    except OSError:
                        pass
                    self._journal_failed(e)
                    return
                fd, self._journal_fd = self._journal_fd, fd
                os.close(fd)
            self._journal_flushing = True
            fut = self.run("flush", writes=True)  # queued after every record of the old part

        def flushed(f: cf.Future) -> None:
            self._journal_flushing = False
            if f.exception() is None:
                try:
                    self._journal_old.unlink()
                except FileNotFoundError:
                    pass

        fut.add_done_callback(flushed)

    def _resend_journal(self) -> None:
        """After the writer was restarted: what the dead one read but had not committed is in the journal."""
        if self._journal_fd is None:
            return
        # Read without the journal's lock: the event loop's submit() takes it, and a journal grown through an
        # outage takes a while to read. A record appended meanwhile is queued anyway.
        lines = self._journal_lines()
        for line in lines:
            self._q.put(line)
        if lines:
            log.warning("aibridge: sent %d journaled record(s) again to the restarted store process", len(lines))

    def _spawn(self, close_stale: bool, timeout: float = 60.0) -> dict:
        """Start a writer process (or connect to the shared one) and wait until it has the file open (and has
        replayed any spool)."""
        if self.shared:
            proc = _Connection(self.shared, timeout)
        else:
            proc = self._popen(close_stale)
        ready = cf.Future()
        receiver = threading.Thread(target=self._receive, args=(proc, ready), name="aibridge-store-rx", daemon=True)
        receiver.start()
        try:
            hello = ready.result(timeout)
        except Exception:
            proc.kill()
            proc.wait()
            raise
        self._proc, self._receiver, self._dead = proc, receiver, None
        return hello

    def _popen(self, close_stale: bool) -> subprocess.Popen:
        flags = (["--close-stale"] if close_stale else []) + ([] if self.spool else ["--no-spool"])
        return start_writer_process(self.path, flags, self.postgres, self.backlog_max_mb)

    def _respawn(self) -> bool:
        """The writer died under the gateway (a crash, an OOM kill): start another. It replays the spool the dead
        one left, so a batch it had spooled is not lost; records it had received but not spooled are."""
        with self._respawning:  # the sender and the receiver may both notice
            if self._closing:
                return False
            if self._proc is not None and self._proc.poll() is None and self._dead is None:
                return True  # the other one restarted it already
            # Until it works (a PostgreSQL writer cannot start while the database is away), at most 5 s apart;
            # meanwhile records wait in the queue and the journal. Logged once, then once when it is back.
            attempt, failing = 0, None
            while not self._closing:
                try:
                    self._spawn(close_stale=False)
                    log.warning("aibridge: the store process was restarted")
                    self._resend_journal()
                    return True
                except Exception as e:
                    if failing is None:
                        log.error("aibridge: restarting the store process failed (%s); retrying every %d s at most",
                                  e, RESPAWN_MAX)
                    failing = str(e)
                    self._dead = f"restarting: {failing}"
                    time.sleep(min(2 ** attempt * 0.2, RESPAWN_MAX))
                    attempt += 1
            return False

    # --- producers (any thread, never block) ------------------------------------------------------------

    def submit(self, record: Insert | EndInterception) -> None:
        line = json.dumps(_encode(record), separators=(",", ":"), default=_datetime).encode()
        if self._journal_fd is None:
            self._q.put(line)
            return
        with self._journal_lock:
            if isinstance(record, EndInterception):
                self._open_starts.pop(record.id, None)
            elif record.table == "aibridge_interceptions" and record.row[_STATUS] == "in_progress":
                self._open_starts[record.row[0]] = line
            start = None
            try:
                start = os.lseek(self._journal_fd, 0, os.SEEK_END)
                data = line + b"\n"
                while data:  # short writes as a disk fills up
                    data = data[os.write(self._journal_fd, data):]
                if self.journal_error is not None:
                    self.journal_error = None
                    log.warning("aibridge: the journal %s can be written again", self.journal)
            except OSError as e:  # a full disk must not stop the gateway: the record still goes to the writer
                if start is not None:  # no half line left to spoil the next record
                    try:
                        os.ftruncate(self._journal_fd, start)
                    except OSError:
                        pass
                self._journal_failed(e)
            self._q.put(line)

    def journal_trouble(self) -> str | None:
        """Why the journal cannot be written, while it cannot (rechecked: a disk with room again clears it)."""
        if self.journal_error == "disk full" and self.journal is not None and has_room(self.journal.parent):
            self.journal_error = None
            log.warning("aibridge: the journal %s has room again", self.journal)
        return self.journal_error

    def _journal_failed(self, e: OSError) -> None:
        """Logged once per change, not once per record."""
        reason = "disk full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"
        if self.journal_error != reason:
            self.journal_error = reason
            log.error("aibridge: the journal %s cannot be written (%s); records still go to the store", self.journal,
                      e)

    def run(self, op: str, writes: bool = False, **args) -> cf.Future:
        """Run the named operation in the writer process; writes are ordered after every record submitted
        before, reads see what is committed."""
        fut: cf.Future = cf.Future()
        if self._dead is not None:
            fut.set_exception(RuntimeError(f"the store process is gone: {self._dead}"))
            return fut
        n = next(self._ids)
        with self._lock:
            self._pending[n] = fut
        line = json.dumps({"t": "op", "id": n, "op": op, "a": args, "w": writes}, default=_datetime).encode()
        self._q.put(_Op(n, line))
        self._wake.set()
        return fut

    def flush(self) -> cf.Future:
        return self.run("flush", writes=True)

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued, let the child commit it and exit. Safe to call twice. The journal is deleted only
        when a last flush confirms that everything in it is committed: a store that is away at shutdown leaves
        it (and the writer's spool) for the next start to send again."""
        if self._sender is None:
            return
        final = self.run("flush", writes=True) if self._dead is None else None
        self._closing = True
        self._q.put(_STOP)
        self._wake.set()
        self._sender.join(timeout)
        self._sender = None
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("the store process did not finish within %s s; killing it", timeout)
                self._proc.kill()
                self._proc.wait()
        if self._receiver is not None:
            self._receiver.join(5)
        # Committed: the last flush says so, the writer exited 0 (not "records held"), and it reported nothing
        # held or lost since.
        committed = (final is not None and final.done() and not final.cancelled() and final.exception() is None
                     and not self._undelivered and code == 0 and not self.state.get("backlog")
                     and not self.state.get("lost"))
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
            if committed:  # everything journaled is in the store: the next start has nothing to send again
                claim.forget(self.journal, self._journal_old)
            else:
                log.warning("aibridge: records not confirmed committed at shutdown; the journal %s keeps them for "
                            "the next start", self.journal)
        if self._journal_claim is not None:
            os.close(self._journal_claim)
            self._journal_claim = None

    # --- the sender thread: records batched into one line, ops in order -------------------------------

    def _send(self) -> None:
        stop = False
        while not stop:
            item = self._q.get()
            # Records gather for a moment: one line, one write and one wake-up of each side per window instead
            # of per record (an operation, or shutdown, cuts the window short).
            if not isinstance(item, _Op) and item is not _STOP:
                self._wake.wait(SEND_WINDOW)
            self._wake.clear()
            records: list = []
            lines: list[bytes] = []
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Op):
                    if records:
                        lines.append(_records_line(records))
                        records = []
                    lines.append(item.line)
                else:
                    records.append(item)
                try:
                    item = self._q.get_nowait() if not stop else None
                except queue.Empty:
                    break
                if item is None:
                    break
            if records:
                lines.append(_records_line(records))
            if not lines:
                continue
            data = b"\n".join(lines) + b"\n"
            for attempt in (1, 2):  # once more to a restarted writer
                proc = self._proc
                try:
                    proc.stdin.write(data)
                    proc.stdin.flush()
                    break
                except (OSError, ValueError) as e:
                    self._gone(f"its input closed ({e})", proc)
                    if attempt == 2 or not self._respawn():
                        log.error("aibridge: %d line(s) of records could not reach the store process: %s",
                                  len(lines), e)
                        self._undelivered = True  # the journal keeps them for the next start
                        break
            try:
                self._rotate_journal()
            except Exception:  # the sender must never die: the journal just grows until the next rotation
                log.exception("aibridge: rotating the journal failed")
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    # --- the receiver thread: answers and counters ----------------------------------------------------

    def _receive(self, proc: subprocess.Popen, ready: cf.Future) -> None:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                log.error("aibridge: unreadable line from the store process (%d bytes)", len(line))
                continue
            kind = msg.get("t")
            if kind == "s":
                self.written, self.dead_lettered = msg["w"], msg["d"]
                if isinstance(msg.get("st"), dict):
                    self.state = msg["st"]
            elif kind == "r":
                with self._lock:
                    fut = self._pending.pop(msg["id"], None)
                if fut is not None and fut.set_running_or_notify_cancel():
                    if msg["ok"]:
                        fut.set_result(msg.get("r"))
                    else:
                        fut.set_exception(_error(msg))
            elif kind == "ready":
                ready.set_result(msg)
            elif kind == "error" and not ready.done():
                ready.set_exception(RuntimeError(msg.get("m", "the store process failed to start")))
        code = proc.wait()
        if not ready.done():
            ready.set_exception(RuntimeError(f"the store process exited ({code}) before it was ready"))
            return
        if proc is not self._proc:
            return  # an earlier writer, already replaced
        self._gone(f"it exited ({code})", proc)
        if not self._closing:
            log.error("aibridge: the store process exited unexpectedly (%s); restarting it", code)
            self._respawn()

    def _gone(self, why: str, proc: subprocess.Popen) -> None:
        if proc is not self._proc:
            return  # news of a writer already replaced
        if self._dead is None:
            self._dead = why
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError(f"the store process is gone: {why}"))


def _read_journal(path: Path) -> list[bytes]:
    """A journal file's records; a line a kill cut short is left out (it would spoil the whole message it travelled
    in, and nobody was told it was recorded)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = []
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            json.loads(line)
        except ValueError:
            log.warning("aibridge: journal %s: skipped an unreadable line (%d bytes)", path, len(line))
            continue
        lines.append(line)
    return lines


def _records_line(records: list[bytes]) -> bytes:
    return b'{"t":"rec","b":[' + b",".join(records) + b"]}"


def _error(msg: dict) -> Exception:
    """The operation's exception, as the in-process store would have raised it."""
    kind, text = msg.get("e"), msg.get("m", "")
    if kind == "OpError":
        return OpError(text)
    if kind == "TypeError":
        return TypeError(text)
    if kind == "BadParameter":
        return reports.BadParameter(msg.get("name") or "?", msg.get("why") or text)
    return RuntimeError(f"{kind}: {text}")
