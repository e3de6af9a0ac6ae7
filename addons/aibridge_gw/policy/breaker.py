"""Circuit breakers per provider instance, endpoint and model.

Closed: requests pass; `failures` consecutive failures (5xx, 429/529, connection errors) open it. Open: requests
are answered by the gateway for `open_seconds`. Half-open: `half_open_requests` trial requests pass; if they
all succeed it closes, any failure opens it again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


@dataclass
class _State:
    state: int = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trials: int = 0
    successes: int = 0


class CircuitBreakers:
    def __init__(self, failures: int = 5, open_seconds: float = 30.0, half_open_requests: int = 3,
                 on_change=None) -> None:
        self.failures = failures
        self.open_seconds = open_seconds
        self.half_open_requests = half_open_requests
        self.on_change = on_change  # (key, state, tripped: bool) -> None, for metrics
        self._states: dict[tuple, _State] = {}

    def allow(self, key: tuple) -> int | None:
        """None if the request may go upstream, else seconds until the breaker lets trials through."""
        s = self._states.get(key)
        if s is None or s.state == CLOSED:
            return None
        now = time.monotonic()
        if s.state == OPEN:
            remaining = s.opened_at + self.open_seconds - now
            if remaining > 0:
                return max(1, math.ceil(remaining))
            self._set(key, s, HALF_OPEN)
            s.trials = s.successes = 0
        if s.trials < self.half_open_requests:
            s.trials += 1
            return None
        return 1

    def record(self, key: tuple, ok: bool) -> None:
        s = self._states.setdefault(key, _State())
        if ok:
            if s.state == HALF_OPEN:
                s.successes += 1
                if s.successes >= self.half_open_requests:
                    self._set(key, s, CLOSED)
                    s.failures = 0
            else:
                s.failures = 0
            return
        if s.state == HALF_OPEN:
            self._open(key, s)
            return
        s.failures += 1
        if s.state == CLOSED and s.failures >= self.failures:
            self._open(key, s)

    def _open(self, key: tuple, s: _State) -> None:
        s.opened_at = time.monotonic()
        s.failures = 0
        self._set(key, s, OPEN, tripped=True)

    def _set(self, key: tuple, s: _State, state: int, tripped: bool = False) -> None:
        s.state = state
        if self.on_change:
            self.on_change(key, state, tripped)


def is_failure(status: int | None, connection_error: bool) -> bool:
    return connection_error or (status is not None and (status >= 500 or status in (429, 529)))
