"""Budget notices: a person's use crossing a share of a budget (by default 85 % and 100 %) is said once — in the
log, and to a webhook when one is configured (`notifications:`).

Once per person, limit, period and threshold across the fleet: the process that first sees a crossing claims it
in the shared store (`aibridge_budget_notices`, a primary key on exactly that), and only the claimant sends. The
body is JSON with a `text` field (what Slack's incoming webhooks and most generic receivers show) and the facts
apart. Nothing here waits on the request path: the check is a few dictionary reads after a call is charged, and
the claim and the POST run in a task of their own, bounded by `notifications.timeout_seconds`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from ..config import NotificationSettings
from .budgets import PERIOD_OF

log = logging.getLogger("aibridge")

# The budgets a notice is about (requests per minute is a rate, not a budget that fills up), with their period.
# The budgets a notice is about (requests per minute is a rate, not a budget that fills up): their period is the
# budgets' own (`PERIOD_OF`); how a notice names them.
WORDS = {"tokens_per_day": "daily token budget", "usd_per_day": "daily budget", "usd_per_week": "weekly budget",
         "usd_per_month": "monthly budget"}
STORE_WAIT = 5.0


def period_id(period: str, now: dt.datetime) -> str:
    now = now.astimezone(dt.UTC)
    if period == "day":
        return now.date().isoformat()
    if period == "week":
        iso = now.isocalendar()
        return f"{iso.year}-W{iso.week:02d}"
    return f"{now.year}-{now.month:02d}"


def percent(threshold: float) -> str:
    return f"{threshold * 100:g} %"


def amount(limit: str, value: float) -> str:
    return f"{int(value)} tokens" if limit.startswith("tokens") else f"${value:.2f}"


class BudgetNotices:
    def __init__(self, settings: NotificationSettings, store: Any) -> None:
        self.settings = settings
        self.store = store  # runs `claim_budget_notice` (None: this process alone decides)
        self._seen: set[tuple[str, str, str, float]] = set()  # (user id, limit, period id, threshold) this process did
        self._periods: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    def after_charge(self, budgets, user_id: str, user_name: str, groups: tuple[str, ...]) -> None:
        """After a call was charged to a person: any threshold their use crossed is noticed (at most once)."""
        thresholds = self.settings.thresholds
        if not thresholds:
            return
        now = dt.datetime.now(dt.UTC)
        limits, why = budgets.settings.explain(user_name, groups)
        used = budgets.used(user_id, now)
        for limit, period in PERIOD_OF.items():
            words = WORDS[limit]
            value = getattr(limits, limit)
            if not value:
                continue
            share = used[limit] / value
            pid = period_id(period, now)
            for t in thresholds:
                key = (user_id, limit, pid, t)
                if share >= t and key not in self._seen:
                    self._remember(key, pid)
                    source = why[limit]
                    group = source.split(" ", 1)[0].removeprefix("groups.") if source.startswith("groups.") else None
                    facts = {"user": user_name, "user_id": user_id, "group": group, "limit": limit, "period": pid,
                             "threshold": t, "used": round(used[limit], 6), "value": value, "from": source}
                    facts["text"] = (f"aibridge: {user_name} has used {percent(t)} of their {words} "
                                     f"({amount(limit, used[limit])} of {amount(limit, value)}, {pid}"
                                     + (f"; group {group}" if group else "; " + source) + ")")
                    task = asyncio.get_running_loop().create_task(self._notice(key, facts))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    def sweep(self, budgets, people: list) -> None:
        """Fleet mode, after the counters became the fleet's totals: crossings by calls other processes charged
        (this one may never charge that person again: over the limit, their calls are refused)."""
        for uid, name, groups in people:
            self.after_charge(budgets, uid, name, groups)

    def _remember(self, key: tuple, pid: str) -> None:
        if pid not in self._periods:
            self._periods.add(pid)
            current = {period_id(p, dt.datetime.now(dt.UTC)) for p in ("day", "week", "month")}
            self._seen = {k for k in self._seen if k[2] in current}
            self._periods &= current | {pid}
        self._seen.add(key)

    async def _notice(self, key: tuple, facts: dict) -> None:
        try:
            if self.store is not None:
                try:
                    claimed = await asyncio.wait_for(asyncio.wrap_future(self.store.run(
                        "claim_budget_notice", writes=True, user_id=key[0], limit_name=key[1], period=key[2],
                        threshold=key[3])), STORE_WAIT)
                except Exception as e:  # the store is away: said here rather than lost (another may say it too)
                    log.warning("aibridge: budget notice not claimed in the store (%s); sending it anyway",
                                type(e).__name__)
                    claimed = True
                if not claimed:
                    return  # another process (or this one before a restart) said it already
            log.warning("%s", facts["text"])
            if self.settings.webhook:
                await self._post(facts)
        except Exception:
            log.exception("aibridge: a budget notice failed")

    async def _post(self, facts: dict) -> None:
        """The webhook's URL is a secret of its own (Slack's carries one): never in a log line."""
        import httpx

        try:
            async with httpx.AsyncClient(timeout=self.settings.timeout_seconds) as client:
                r = await client.post(self.settings.webhook, json=facts)
            if r.status_code >= 300:
                log.warning("aibridge: the budget notification webhook answered %d", r.status_code)
        except httpx.HTTPError as e:
            log.warning("aibridge: the budget notification webhook failed: %s", type(e).__name__)

    async def aclose(self) -> None:
        """Notices under way finish (bounded by their timeouts) before the gateway stops."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.timeout_seconds + STORE_WAIT)
