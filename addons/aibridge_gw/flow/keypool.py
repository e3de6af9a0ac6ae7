"""A failover pool of upstream keys for one provider instance (`keys:` in its config).

Keys are tried in their configured order. A 429 cools a key down for the provider's `retry-after`; a 401 or 403
disables it until the gateway restarts or an admin runs `aibridge keys reset`. The request is sent again with the
next usable key before the client sees an error; when none is left the client gets a 429 carrying the soonest
`retry-after` (some key is only cooling) or a 502 (every key was refused). State lives in the gateway's memory.
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass, field

COOLING, DISABLED = 429, (401, 403)
DEFAULT_COOLDOWN = 30.0  # seconds, when a 429 carries no usable retry-after
MAX_COOLDOWN = 3600.0
MAX_KEYS = 8


@dataclass(eq=False)
class PooledKey:
    key: str = field(repr=False)
    hint: str  # masked: what logs, metrics and records show
    cooling_until: float = 0.0  # time.monotonic()
    disabled: str | None = None  # why it was refused (401/403), until restart or reset

    def state(self, now: float) -> str:
        if self.disabled:
            return "disabled"
        return "cooling" if self.cooling_until > now else "ready"


@dataclass(frozen=True)
class Exhausted:
    """No key could serve the request: the answer the client gets."""

    status: int  # 429 (a key is only cooling) or 502
    retry_after: int | None
    message: str


class KeyPool:
    def __init__(self, provider: str, keys: list[tuple[str, str]], on_change=None) -> None:
        self.provider = provider
        self.keys = [PooledKey(k, hint) for k, hint in keys]
        self.on_change = on_change  # (pool, key, reason) when a key cools down, is disabled or is reset

    def usable(self, now: float | None = None) -> list[PooledKey]:
        now = time.monotonic() if now is None else now
        return [k for k in self.keys if not k.disabled and k.cooling_until <= now]

    def exhausted(self, now: float | None = None) -> Exhausted:
        now = time.monotonic() if now is None else now
        waits = [k.cooling_until - now for k in self.keys if not k.disabled and k.cooling_until > now]
        if waits:
            wait = max(1, math.ceil(min(waits)))
            return Exhausted(429, wait, f"aibridge: every upstream key of provider {self.provider!r} is rate limited; "
                                        f"retry in {wait} s")
        return Exhausted(502, None, f"aibridge: every upstream key of provider {self.provider!r} was refused by the "
                                    "provider (401/403); an admin must fix them and run `aibridge keys reset`")

    def failed(self, key: PooledKey, status: int, retry_after: str | None) -> bool:
        """Note a provider's answer to `key`; True when another key should be tried."""
        if status == COOLING:
            key.cooling_until = time.monotonic() + cooldown_seconds(retry_after)
            self._changed(key, "rate_limited")
            return True
        if status in DISABLED:
            key.disabled = f"HTTP {status}"
            self._changed(key, "refused")
            return True
        return False

    def reset(self) -> int:
        """Every key usable again; returns how many were not."""
        now = time.monotonic()
        n = 0
        for k in self.keys:
            if k.disabled or k.cooling_until > now:
                n += 1
                k.disabled, k.cooling_until = None, 0.0
                self._changed(k, "reset")
        return n

    def status(self) -> list[dict]:
        now = time.monotonic()
        return [{"provider": self.provider, "key": k.hint, "state": k.state(now),
                 "retry_in": max(0, math.ceil(k.cooling_until - now)) if k.state(now) == "cooling" else None,
                 "reason": k.disabled} for k in self.keys]

    def _changed(self, key: PooledKey, reason: str) -> None:
        if self.on_change is not None:
            self.on_change(self, key, reason)


def cooldown_seconds(retry_after: str | None) -> float:
    """A retry-after header (seconds or an HTTP date) as seconds, bounded."""
    if retry_after:
        value = retry_after.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - time.time()
            except (TypeError, ValueError, IndexError):
                seconds = DEFAULT_COOLDOWN
        if math.isfinite(seconds):
            return min(max(seconds, 1.0), MAX_COOLDOWN)
    return DEFAULT_COOLDOWN
