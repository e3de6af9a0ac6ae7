"""The `Housekeeping` addon: background duties on the event loop — record retention, upstream timeouts for
exchanges in flight, and the event-loop and garbage-collector stall counters that /aibridge/healthz reports."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from mitmproxy import ctx

from .runtime import Runtime

log = logging.getLogger("aibridge")


class Housekeeping:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.loop_lag_max = 0.0  # longest event-loop stall seen (seconds), for operators and scripts/bench
        self.gc_pause_max = 0.0  # longest garbage-collector pause seen (seconds): one known cause of stalls
        self._gc_started = 0.0
        self._tasks: list[asyncio.Task] = []

    async def running(self) -> None:
        if self.rt.store is None or not ctx.options.server or self._tasks:
            return
        jobs = [self._watch_event_loop(), self._watch_upstreams()]
        if self.rt.worker in (None, 1):  # the workers of one machine share a store: one of them prunes it
            jobs.append(self._prune_periodically())
        self._tasks = [asyncio.create_task(c) for c in jobs]

    def done(self) -> None:
        if self._gc_timer in gc.callbacks:
            gc.callbacks.remove(self._gc_timer)
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def _prune_periodically(self) -> None:
        """Retention: delete records older than retention_days, at start-up and then hourly."""
        while True:
            days = self.rt.config.retention_days
            if days and self.rt.store is not None:
                try:
                    result = await asyncio.wrap_future(self.rt.store.run("prune", True, days=days))
                    if result["deleted"]:
                        log.info("aibridge: retention removed %d interception(s) older than %d days",
                                 result["deleted"], days)
                except Exception as e:
                    log.warning("aibridge: retention job failed: %s", e)
            await asyncio.sleep(3600)

    def _gc_timer(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.gc_pause_max = max(self.gc_pause_max, time.perf_counter() - self._gc_started)

    async def _watch_event_loop(self, interval: float = 0.02) -> None:
        """How late a short sleep wakes up is how long something held the event loop (a busy loop with many
        ready callbacks shows up here too, not only single blocking calls; GC pauses are measured apart)."""
        if self._gc_timer not in gc.callbacks:
            gc.callbacks.append(self._gc_timer)
        loop = asyncio.get_running_loop()
        ticks = 0
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            lag = loop.time() - start - interval
            ticks += 1
            if self.rt.metrics.multiprocess and ticks % 50 == 0:  # about every second
                self.rt.metrics.refresh()
            if lag > self.loop_lag_max:
                self.loop_lag_max = lag
                self.rt.metrics.loop_lag_max.set(lag)

    async def _watch_upstreams(self) -> None:
        """Timeouts for provider connections (mitmproxy itself only times out idle client connections)."""
        while True:
            await asyncio.sleep(self.rt.watch.interval())
            if self.rt.inflight:
                self.rt.watch.check([s for s in self.rt.inflight
                                     if (not s.via_loop or s.client_gone is not None) and not s.on_socket])
