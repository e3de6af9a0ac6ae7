"""One JSON line per finished interception ("interception log"), for SIEM export.

Lines go through a queue to a logging thread, so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from pathlib import Path

from .files import private_file
from .store.codec import scrub


class InterceptionLog:
    def __init__(self, target: str) -> None:
        if target == "-":
            handler: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            path = Path(target).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            private_file(path, "ab").close()  # created 0600 before the handler appends to it
            handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(q, handler)
        self._logger = logging.getLogger(f"aibridge.interceptions.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(logging.handlers.QueueHandler(q))
        self._listener.start()

    def write(self, record: dict) -> None:
        # Client-supplied text may hold lone surrogates (undecodable header bytes): written escaped, never lost.
        self._logger.info(json.dumps(scrub(record), ensure_ascii=False, default=str))

    def close(self) -> None:
        self._listener.stop()
        for h in list(self._logger.handlers):
            self._logger.removeHandler(h)
