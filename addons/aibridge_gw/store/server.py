"""The writer process (`python -m aibridge_gw.store.server DB`): owns the DuckDB file for a gateway. See
`store/process.py` for the protocol; everything about storing (batches, spool, dead letters) is `Store`'s."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import duckdb

from .ops import ALL_OPS
from .process import POSTGRES_ENV
from .writer import Store, decode_records


def main(argv: list[str]) -> int:
    # The gateway decides when its writer ends: it closes our input (also when it dies). A Ctrl-C or a SIGTERM
    # sent to the whole process group must not cut off the records of its own shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="[store] %(message)s", stream=sys.stderr)
    path = Path(argv[0])
    out = sys.stdout.buffer
    lock = threading.Lock()

    def send(obj: dict) -> None:
        data = json.dumps(obj, default=str).encode() + b"\n"
        with lock:
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError):
                pass  # the gateway is gone; what it sent is still committed

    on_commit = lambda: send({"t": "s", "w": store.written, "d": store.dead_lettered})  # noqa: E731
    dsn = os.environ.get(POSTGRES_ENV)
    if dsn:
        from .pg import PgStore

        store = PgStore(dsn, path, spool="--no-spool" not in argv, on_commit=on_commit)
    else:
        store = Store(path, spool="--no-spool" not in argv, close_stale="--close-stale" in argv, on_commit=on_commit)
    deadline = time.monotonic() + 30
    while True:
        try:
            store.open()
            break
        except duckdb.IOException as e:  # a previous writer (of a gateway just killed) still finishing
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                send({"t": "error", "m": f"cannot open {path}: {e}"})
                return 1
            time.sleep(0.1)
        except Exception as e:
            send({"t": "error", "m": f"cannot open {'PostgreSQL' if dsn else path}: {type(e).__name__}: {e}"})
            return 1
    send({"t": "ready", "stale": store.stale_closed})

    for line in sys.stdin.buffer:
        try:
            msg = json.loads(line)
        except ValueError:
            logging.error("unreadable message from the gateway (%d bytes)", len(line))
            continue
        if msg.get("t") == "rec":
            try:
                for rec in decode_records(msg["b"]):
                    store.submit(rec)
            except (KeyError, TypeError, ValueError) as e:
                logging.error("records the store cannot read: %s", e)
        elif msg.get("t") == "op":
            _run(store, msg, send)
    store.close()
    send({"t": "s", "w": store.written, "d": store.dead_lettered})
    return 0


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
