"""The writer process (`python -m aibridge_gw.store.server DB`): owns the DuckDB file. See `store/process.py`
for the protocol; everything about storing (batches, spool, dead letters) is `Store`'s.

Two ways to serve: one gateway over stdin/stdout (its own child), or — with `--listen SOCKET`, started by
`scripts/run --workers N` — every worker of one machine over a Unix socket, because DuckDB takes one writing
process per file. Then stdin belongs to the supervisor: the writer ends when that closes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import duckdb

from ..logsafe import install_log_redaction
from .codec import decode_records
from .ops import ALL_OPS
from .writer import Store

CONNECTION_FLUSH_TIMEOUT = 30.0
POSTGRES_ENV = "AIBRIDGE_STORE_POSTGRES"  # the writer process records into PostgreSQL at this URL


class _Peer:
    """Where answers go: the one gateway's stdout, or one worker's connection."""

    def __init__(self, out) -> None:
        self.out = out
        self.lock = threading.Lock()

    def send(self, obj: dict) -> None:
        data = json.dumps(obj, default=str).encode() + b"\n"
        with self.lock:
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):
                pass  # that gateway is gone; what it sent is still committed


def main(argv: list[str]) -> int:
    # The gateway (or the supervisor) decides when its writer ends: it closes our input (also when it dies). A
    # Ctrl-C or a SIGTERM sent to the whole process group must not cut off the records of its own shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="[store] %(message)s", stream=sys.stderr)
    install_log_redaction()  # no credential in the writer's lines either (a database URL's password, …)
    # The read pool logs each failed reconnection; the store's own state changes say it once.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    return serve(Path(argv[0]), argv[1:], sys.stdin.buffer, sys.stdout.buffer, os.environ.get(POSTGRES_ENV))


def serve(path: Path, argv: list[str], rfile, wfile, dsn: str | None) -> int:
    """The writer's whole life: open the store, answer what comes on `rfile` until it closes, commit, close.
    Its own process's stdin/stdout (main), or a pair of pipes in a thread of the gateway (process.StoreThread,
    the in-process test tier)."""
    listen = argv[argv.index("--listen") + 1] if "--listen" in argv else None
    own = _Peer(wfile)
    peers: set[_Peer] = set() if listen else {own}  # who hears the counters after each batch

    def on_commit() -> None:
        counters = status_message(store)
        for peer in list(peers):
            peer.send(counters)

    backlog = int(argv[argv.index("--backlog-max-mb") + 1]) if "--backlog-max-mb" in argv else None
    kw = {"backlog_max_bytes": backlog * 1024 * 1024} if backlog else {}
    if dsn:
        from .pg import PgStore

        store = PgStore(dsn, path, spool="--no-spool" not in argv, on_commit=on_commit, **kw)
    else:
        store = Store(path, spool="--no-spool" not in argv, close_stale="--close-stale" in argv, on_commit=on_commit,
                      **kw)
    store.on_state = on_commit
    deadline = time.monotonic() + 30
    while True:
        try:
            store.open()
            break
        except duckdb.IOException as e:  # a previous writer (of a gateway just killed) still finishing
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                own.send({"t": "error", "m": f"cannot open {path}: {e}"})
                return 1
            time.sleep(0.1)
        except Exception as e:
            if dsn:
                from ..config import postgres_error

                own.send({"t": "error", "m": f"cannot open PostgreSQL: {type(e).__name__}: {postgres_error(e, dsn)}"})
            else:
                own.send({"t": "error", "m": f"cannot open {path}: {type(e).__name__}: {e}"})
            return 1
    if listen:
        try:
            server = _listen(listen)
        except OSError as e:
            own.send({"t": "error", "m": f"cannot listen on {listen}: {e}"})
            store.close()
            return 1
        threading.Thread(target=_accept, args=(server, store, peers), name="aibridge-store-accept",
                         daemon=True).start()
    own.send({"t": "ready", "stale": store.stale_closed})

    for line in rfile:
        if not listen:
            _handle(store, line, own)
    store.close()
    on_commit()
    if listen:
        try:
            os.unlink(listen)
        except OSError:
            pass
    return 0 if store.backlog == 0 else HELD_AT_EXIT


HELD_AT_EXIT = 3  # exit status: records the store could not take are held in the spool for the next start


def status_message(store: Store) -> dict:
    """Counters and the store's state, sent to every gateway after each batch and on each change."""
    return {"t": "s", "w": store.written, "d": store.dead_lettered, "st": store.state}


def _listen(path: str) -> socket.socket:
    try:
        os.unlink(path)  # left by a writer that was killed
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is as private as the database: 0600
    try:
        server.bind(path)
    finally:
        os.umask(old)
    server.listen(64)
    return server


def _accept(server: socket.socket, store: Store, peers: set) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=_serve, args=(conn, store, peers), name="aibridge-store-conn", daemon=True).start()


def _serve(conn: socket.socket, store: Store, peers: set) -> None:
    """One worker: its records and operations, answered on its own connection. When it goes (shutdown, or
    `kill -9`) everything it sent is committed before the connection closes, so its shutdown waits for that."""
    peer = _Peer(conn.makefile("wb"))
    peers.add(peer)
    peer.send({"t": "ready", "stale": store.stale_closed})
    peer.send(status_message(store))
    try:
        for line in conn.makefile("rb"):
            _handle(store, line, peer)
        try:
            store.flush().result(CONNECTION_FLUSH_TIMEOUT)
        except Exception as e:  # the store is away: they are held (spool, memory) and committed when it is back
            logging.warning("a departed worker's records are not committed yet: %s", e)
        peer.send(status_message(store))
    except OSError:
        pass
    finally:
        peers.discard(peer)
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()


def _handle(store: Store, line: bytes, peer: _Peer) -> None:
    try:
        msg = json.loads(line)
    except ValueError:
        logging.error("unreadable message from the gateway (%d bytes)", len(line))
        return
    if msg.get("t") == "rec":
        try:
            for rec in decode_records(msg["b"]):
                store.submit(rec)
        except (KeyError, TypeError, ValueError) as e:
            logging.error("records the store cannot read: %s", e)
    elif msg.get("t") == "op":
        _run(store, msg, peer.send)


def _run(store: Store, msg: dict, send) -> None:
    n = msg.get("id")
    try:
        if msg.get("op") not in ALL_OPS:
            raise KeyError(f"unknown operation {msg.get('op')!r}")
        fut = store.run(msg["op"], bool(msg.get("w")), **(msg.get("a") or {}))
    except Exception as e:
        send(_failure(n, e))
        return

    def done(f) -> None:
        e = f.exception()
        send(_failure(n, e) if e is not None else {"t": "r", "id": n, "ok": True, "r": f.result()})

    fut.add_done_callback(done)


def _failure(n, e: BaseException) -> dict:
    return {"t": "r", "id": n, "ok": False, "e": type(e).__name__, "m": str(e),
            "name": getattr(e, "name", None), "why": getattr(e, "why", None)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
