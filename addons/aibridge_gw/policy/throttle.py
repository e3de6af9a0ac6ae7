"""Failed token checks per client address: past a limit per minute, that address gets 429 for a while.

Tokens carry 256 random bits, so guessing one is hopeless anyway; the throttle keeps a misconfigured or
hostile client from burning CPU and filling logs with refusals, and makes the refusal explicit.
"""

from __future__ import annotations

import time
from collections import OrderedDict

WINDOW = 60.0
MAX_ADDRESSES = 10_000  # memory bound: the oldest addresses are forgotten first


class AuthThrottle:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failures: OrderedDict[str, list[float]] = OrderedDict()  # address -> failure times in the window

    def retry_after(self, address: str) -> int | None:
        """Seconds until this address may try again, or None if it may now."""
        if self.per_minute <= 0:
            return None
        times = self._failures.get(address)
        if not times:
            return None
        now = time.monotonic()
        while times and now - times[0] > WINDOW:
            times.pop(0)
        if len(times) <= self.per_minute:
            return None
        return max(1, int(WINDOW - (now - times[0])) + 1)

    def failed(self, address: str) -> None:
        if self.per_minute <= 0:
            return
        times = self._failures.get(address)
        if times is None:
            times = self._failures[address] = []
            if len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
        times.append(time.monotonic())
        if len(times) > self.per_minute + 1:
            del times[: len(times) - self.per_minute - 1]

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
