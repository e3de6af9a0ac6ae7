"""Per-person budgets and rate limits: requests per minute, tokens per day, USD per day, ISO week or month (UTC);
which limits apply to whom (own entry, groups, default) is `config.BudgetSettings.explain`.

Counters live in memory for the hot path and are rebuilt from the audit database at start-up, so a restart
does not reset anyone's budget. Over a limit a request gets a 429 in the provider's format with retry-after.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from ..config import BudgetSettings, Limits
from ..flow.exchange import BIGINT_MAX, CLAMPED, TokenTotals, TokenUsage
from ..pricing import PriceTable


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after: int  # seconds


def _day(t: dt.datetime) -> dt.date:
    return t.astimezone(dt.UTC).date()


def _month(t: dt.datetime) -> tuple[int, int]:
    t = t.astimezone(dt.UTC)
    return (t.year, t.month)


def _week(t: dt.datetime) -> tuple[int, int]:
    iso = t.astimezone(dt.UTC).isocalendar()
    return (iso.year, iso.week)


def _week_start(now: dt.datetime) -> dt.datetime:
    day = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - dt.timedelta(days=day.weekday())


def period_ends(now: dt.datetime) -> dict[str, dt.datetime]:
    """When each period of the budgets ends (UTC): the day, the ISO week, the month."""
    tomorrow = dt.datetime.combine(_day(now) + dt.timedelta(days=1), dt.time(), dt.UTC)
    y, m = _month(now)
    return {"day": tomorrow, "week": _week_start(now) + dt.timedelta(days=7),
            "month": dt.datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=dt.UTC)}


def _spent(conn, started: str, since: dt.datetime, by_model: bool = True) -> list[list]:
    """Recorded usage since `since` per charged user and `started` (an expression of the UTC start), as plain
    values [user id, started at (ISO, UTC), billed model, input, output, cache read, cache write, stored cost].

    Spend is what each usage row was charged at when recorded (`cost_usd`, priced per call: a tier applies to a
    call's own input, never to a day's): rows that have it are summed in SQL, across models unless `by_model`.
    Rows without one (recorded before costs were stored) come per billed model with a null cost, to be priced
    now. A usage row that names its own model (a batch's results, summed per model) is billed at that model."""
    from ..store.reports import has_column

    costed = has_column(conn, "aibridge_token_usages", "cost_usd")
    billed = "coalesce(t.metadata->>'model', i.metadata->>'response_model', i.model)"
    model = billed if by_model or not costed else f"CASE WHEN t.cost_usd IS NULL THEN {billed} END"
    cost = "sum(t.cost_usd)" if costed else "CAST(NULL AS DOUBLE PRECISION)"
    split = ", t.cost_usd IS NULL" if costed else ""
    rows = conn.execute(
        f"SELECT CAST(coalesce(i.on_behalf_of_id, i.initiator_id) AS VARCHAR), {started}, {model}, "
        "coalesce(sum(t.input_tokens), 0), coalesce(sum(t.output_tokens), 0), "
        "coalesce(sum(t.cache_read_input_tokens), 0), coalesce(sum(t.cache_write_input_tokens), 0), "
        f"{cost} "
        "FROM aibridge_interceptions i LEFT JOIN aibridge_token_usages t ON t.interception_id = i.id "
        # A usage clamped to the column type (the provider sent more than it holds) is charged to no budget.
        f"AND (t.metadata IS NULL OR t.metadata->>'{CLAMPED}' IS NULL) "
        f"WHERE i.started_at >= ? AND i.initiator_id IS NOT NULL AND i.status <> 'rejected' GROUP BY 1, 2, 3{split}",
        [since],
    ).fetchall()
    out = []
    for uid, at, model, inp, out_, cr, cw, stored in rows:
        if at.tzinfo is None:  # the UTC wall time (AT TIME ZONE 'UTC' gives a naive timestamp)
            at = at.replace(tzinfo=dt.UTC)
        out.append([uid, at.isoformat(), model, int(inp), int(out_), int(cr), int(cw),
                    None if stored is None else float(stored)])
    return out


def _month_start(now: dt.datetime) -> dt.datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _counted_since(now: dt.datetime) -> dt.datetime:
    """The oldest usage a budget looks at: this month's, this ISO week's (it may have begun last month)."""
    return min(_month_start(now), _week_start(now))


def usage_rows(conn) -> list[list]:
    """What each user spent this month and week (and, for the rate limit, this minute): one row per interception."""
    now = dt.datetime.now(dt.UTC)
    return _spent(conn, "i.started_at", min(_counted_since(now), now - dt.timedelta(minutes=1)))


def usage_totals(conn) -> list[list]:
    """This month's and week's usage per user, day and billed model: the fleet's counters (every gateway's
    calls), in `usage_rows`' shape with the day standing for the start time."""
    return _spent(conn, "date_trunc('day', i.started_at AT TIME ZONE 'UTC')", _counted_since(dt.datetime.now(dt.UTC)),
                  by_model=False)


# DuckDB's optimistic concurrency turns two concurrent upserts of one row into a conflict error; within the one
# process that owns the file they simply take turns (PostgreSQL's row lock does the same across processes).
_COUNTING = threading.Lock()


def count_request(conn, user_id: str, window_start: str) -> int:
    """One more request for the user in this minute, counted in the database every gateway shares."""
    with _COUNTING:
        row = conn.execute(
            "INSERT INTO aibridge_request_counts (user_id, window_start, requests) VALUES (?, ?, 1) "
            "ON CONFLICT (user_id, window_start) DO UPDATE SET requests = aibridge_request_counts.requests + 1 "
            "RETURNING requests", [user_id, dt.datetime.fromisoformat(window_start)]).fetchone()
    return int(row[0])


def prune_request_counts(conn) -> None:
    with _COUNTING:
        conn.execute("DELETE FROM aibridge_request_counts WHERE window_start < ?",
                     [dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)])


class Budgets:
    def __init__(self, default: Limits, per_user: dict[str, Limits], prices: PriceTable, fleet: bool = False,
                 groups: dict[str, Limits] | None = None) -> None:
        self.settings = BudgetSettings(default, per_user, groups or {})
        # Fleet mode: requests per minute are counted in the shared database (see `count_request`), tokens and
        # spend replaced each second by what every gateway recorded (see `replace_totals`).
        self.fleet = fleet
        self.prices = prices
        self._requests: dict[str, deque] = defaultdict(deque)  # user id -> monotonic times, last minute
        self._tokens: dict[tuple[str, dt.date], int] = defaultdict(int)
        self._usd_day: dict[tuple[str, dt.date], float] = defaultdict(float)
        self._usd_week: dict[tuple[str, tuple[int, int]], float] = defaultdict(float)
        self._usd: dict[tuple[str, tuple[int, int]], float] = defaultdict(float)
        self._pruned_on: dt.date | None = None  # counters of periods that ended are dropped once a day

    @property
    def active(self) -> bool:
        return self.settings.any

    def limits_for(self, user_name: str, groups: tuple[str, ...] = ()) -> Limits:
        return self.settings.limits_for(user_name, groups)

    def load(self, conn) -> None:
        """Rebuild counters from what the database recorded (this minute, today, this month)."""
        self.load_rows(usage_rows(conn))

    def load_rows(self, rows: list) -> None:
        """Counters from `usage_rows` (which may come from the writer process, as plain values)."""
        now = dt.datetime.now(dt.UTC)
        mono_now, wall_now = time.monotonic(), now.timestamp()
        totals = self.totals_from(rows)
        for uid, started, *_ in rows:
            started = dt.datetime.fromisoformat(started) if isinstance(started, str) else started
            if started >= now - dt.timedelta(minutes=1):
                self._requests[uid].append(mono_now - (wall_now - started.timestamp()))
        self.install_totals(totals)
        for q in self._requests.values():
            q_sorted = sorted(q)
            q.clear()
            q.extend(q_sorted)

    def totals_from(self, rows: list) -> tuple[dict, dict, dict, dict]:
        """The token and spend counters `rows` (`usage_rows`/`usage_totals`) make: plain work on plain values, so a
        fleet's refresh runs it on a thread; `install_totals` puts them in place."""
        tokens: dict = defaultdict(int)
        usd_day: dict = defaultdict(float)
        usd_week: dict = defaultdict(float)
        usd: dict = defaultdict(float)
        for uid, started, model, inp, out, cr, cw, *stored in rows:
            started = dt.datetime.fromisoformat(started) if isinstance(started, str) else started
            day = _day(started)
            tokens[(uid, day)] += inp + out + cr + cw
            cost = stored[0] if stored and stored[0] is not None else \
                self.prices.cost(model, inp, out, cr, cw)  # recorded before costs were stored: today's price
            if cost:
                usd_day[(uid, day)] += cost
                usd_week[(uid, _week(started))] += cost
                usd[(uid, _month(started))] += cost
        return tokens, usd_day, usd_week, usd

    def install_totals(self, totals: tuple[dict, dict, dict, dict]) -> None:
        self._tokens, self._usd_day, self._usd_week, self._usd = totals

    def check(self, user_id: str, user_name: str, groups: tuple[str, ...] = ()) -> Refusal | None:
        """Called before a request is forwarded; counts it against the per-minute limit when admitted."""
        limits = self.limits_for(user_name, groups)
        if not limits.any:
            return None
        now = dt.datetime.now(dt.UTC)
        ends = period_ends(now)
        if limits.tokens_per_day is not None:
            used = self._tokens[(user_id, _day(now))]
            if used >= limits.tokens_per_day:
                return Refusal(f"aibridge: daily token budget of {limits.tokens_per_day} used ({used})",
                               math.ceil((ends["day"] - now).total_seconds()))
        for limit, spent, period, word in (
                (limits.usd_per_day, self._usd_day[(user_id, _day(now))], "day", "daily"),
                (limits.usd_per_week, self._usd_week[(user_id, _week(now))], "week", "weekly"),
                (limits.usd_per_month, self._usd[(user_id, _month(now))], "month", "monthly")):
            if limit is not None and spent >= limit:
                return Refusal(f"aibridge: {word} budget of ${limit:.2f} used (${spent:.2f})",
                               math.ceil((ends[period] - now).total_seconds()))
        if not self.fleet:
            return self.local_rate_refusal(user_id, limits)
        return None

    def local_rate_refusal(self, user_id: str, limits: Limits) -> Refusal | None:
        """Requests per minute counted in this process (a single gateway; a fleet whose store is away)."""
        if limits.requests_per_minute is None:
            return None
        q = self._requests[user_id]
        t = time.monotonic()
        while q and q[0] <= t - 60:
            q.popleft()
        if len(q) >= limits.requests_per_minute:
            return Refusal(f"aibridge: rate limit of {limits.requests_per_minute} requests per minute reached",
                           max(1, math.ceil(q[0] + 60 - t)))
        q.append(t)
        return None

    def replace_totals(self, rows: list) -> None:
        """Fleet mode: the token and spend counters become what the shared database holds (`usage_totals`)."""
        self.install_totals(self.totals_from(rows))

    def fleet_refusal(self, count: int, limits: Limits) -> Refusal | None:
        """The per-minute limit against the fleet's count for this minute (the request already counted)."""
        if limits.requests_per_minute is None or count <= limits.requests_per_minute:
            return None
        now = dt.datetime.now(dt.UTC)
        return Refusal(f"aibridge: rate limit of {limits.requests_per_minute} requests per minute reached",
                       max(1, 60 - now.second))

    def record(self, user_id: str, started: dt.datetime, model: str | None, usages: list[TokenUsage]) -> None:
        self._add(user_id, started, model, usages)

    def _add(self, user_id: str, started: dt.datetime, model: str | None, usages: list[TokenUsage]) -> None:
        # A clamped usage (a count beyond what the store holds) is charged to no budget: one absurd figure from a
        # provider must not refuse every later call of the user's.
        usages = [u for u in usages if not (u.clamped or _beyond(u))]
        if not usages:
            return
        self._prune()
        t = TokenTotals.of(usages)
        self._tokens[(user_id, _day(started))] += t.all
        # Each usage at its own price (a tier applies to one call's input, never to several rounds' sum).
        costs = [self.prices.cost(u.metadata.get("model") or model, u.input_tokens, u.output_tokens,
                                  u.cache_read_input_tokens, u.cache_write_input_tokens) for u in usages]
        cost = sum(c for c in costs if c)
        if cost:
            self._usd_day[(user_id, _day(started))] += cost
            self._usd_week[(user_id, _week(started))] += cost
            self._usd[(user_id, _month(started))] += cost

    def _prune(self) -> None:
        """Drop the counters of days, weeks and months that are over (a long-running gateway's memory stays flat)."""
        now = dt.datetime.now(dt.UTC)
        today = _day(now)
        if self._pruned_on == today:
            return
        self._pruned_on = today
        week, month = _week(now), _month(now)
        for counters, current in ((self._tokens, lambda d: d >= today), (self._usd_day, lambda d: d >= today),
                                  (self._usd_week, lambda w: w >= week), (self._usd, lambda m: m >= month)):
            for key in [k for k in counters if not current(k[1])]:
                del counters[key]

    def people(self) -> set[str]:
        """The ids of everyone with usage counted in the current periods."""
        now = dt.datetime.now(dt.UTC)
        day, week, month = _day(now), _week(now), _month(now)
        return ({u for u, d in self._tokens if d == day} | {u for u, w in self._usd_week if w == week}
                | {u for u, m in self._usd if m == month})

    def used(self, user_id: str, now: dt.datetime | None = None) -> dict[str, float]:
        """What a person used in each budget's current period, by limit name."""
        now = now or dt.datetime.now(dt.UTC)
        return {"tokens_per_day": self._tokens.get((user_id, _day(now)), 0),
                "usd_per_day": self._usd_day.get((user_id, _day(now)), 0.0),
                "usd_per_week": self._usd_week.get((user_id, _week(now)), 0.0),
                "usd_per_month": self._usd.get((user_id, _month(now)), 0.0)}

    def status(self, user_id: str, user_name: str, groups: tuple[str, ...] = ()) -> dict:
        limits = self.limits_for(user_name, groups)
        used = self.used(user_id)
        tokens, usd = used["tokens_per_day"], used["usd_per_month"]
        return {
            "tokens_today": tokens, "tokens_per_day": limits.tokens_per_day,
            "tokens_remaining": None if limits.tokens_per_day is None else max(limits.tokens_per_day - tokens, 0),
            "usd_today": round(used["usd_per_day"], 6), "usd_per_day": limits.usd_per_day,
            "usd_week": round(used["usd_per_week"], 6), "usd_per_week": limits.usd_per_week,
            "usd_month": round(usd, 6), "usd_per_month": limits.usd_per_month,
            "usd_remaining": None if limits.usd_per_month is None else round(max(limits.usd_per_month - usd, 0), 6),
            "requests_per_minute": limits.requests_per_minute,
        }


PERIOD_OF = {"tokens_per_day": "day", "usd_per_day": "day", "usd_per_week": "week", "usd_per_month": "month"}


def period_starts(now: dt.datetime) -> dict[str, dt.datetime]:
    day = dt.datetime.combine(_day(now), dt.time(), dt.UTC)
    return {"day": day, "week": _week_start(now), "month": _month_start(now.astimezone(dt.UTC))}


def forecast(used: float, period: str, now: dt.datetime) -> float:
    """What a person will have used by the period's end at the pace so far (linear; the period's first hour is
    too little to tell: what was used)."""
    start, end = period_starts(now)[period], period_ends(now)[period]
    elapsed = (now - start).total_seconds()
    if elapsed < 3600:
        return used
    return used * (end - start).total_seconds() / elapsed


def budget_report(budgets: "Budgets", people: list, now: dt.datetime | None = None, notice: float = 0.85) -> dict:
    """Budget use of each person (id, name, groups) and each group, in the current periods: per limit the value,
    where it comes from, what was used, the share and the forecast to the period's end. A group's limits are each
    member's: its row says how many members it covers, their use together, and how many are near (`notice`) or at
    their limit."""
    now = now or dt.datetime.now(dt.UTC)
    users, groups = [], {}
    for uid, name, member_of in people:
        limits, why = budgets.settings.explain(name, tuple(member_of))
        used = budgets.used(uid, now)
        for limit, period in PERIOD_OF.items():
            value = getattr(limits, limit)
            if value is None:
                continue
            share = used[limit] / value if value else (1.0 if used[limit] else 0.0)
            users.append({"user": name, "groups": list(member_of), "limit": limit, "period": period, "value": value,
                          "from": why[limit], "used": round(used[limit], 6), "share": round(share, 4),
                          "forecast": round(forecast(used[limit], period, now), 6)})
            if why[limit].startswith("groups."):
                group = why[limit].split(" ", 1)[0].removeprefix("groups.")
                g = groups.setdefault((group, limit), {"group": group, "limit": limit, "period": period,
                                                      "value_per_member": value, "members": 0, "used": 0.0,
                                                      "forecast": 0.0, "near": 0, "at_limit": 0})
                g["members"] += 1
                g["used"] += used[limit]
                g["forecast"] += forecast(used[limit], period, now)
                g["near"] += notice <= share < 1
                g["at_limit"] += share >= 1
    group_rows = [{**g, "used": round(g["used"], 6), "forecast": round(g["forecast"], 6)} for g in groups.values()]
    return {"users": users, "groups": sorted(group_rows, key=lambda g: (g["group"], g["limit"]))}


def _beyond(u: TokenUsage) -> bool:
    """A count no store holds (not yet clamped by the recorder): charged to no budget either."""
    return any(not isinstance(v, int) or v < 0 or v > BIGINT_MAX
               for v in (u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_write_input_tokens))


class McpCallLimit:
    """`budgets.*.mcp_calls_per_minute`: MCP gateway tool calls per person and minute, apart from model calls.
    Counted like `requests_per_minute`: in this process, or, when several processes share the store, in its
    per-minute counter (under an id of its own per person, so the two limits never share a count)."""

    def __init__(self, default: Limits, per_user: dict[str, Limits], groups: dict[str, Limits] | None = None) -> None:
        self.settings = BudgetSettings(default, per_user, groups or {})
        self._calls: dict[str, deque] = defaultdict(deque)  # person id -> monotonic times, last minute

    def limit_for(self, user_name: str, groups: tuple[str, ...] = ()) -> int | None:
        return self.settings.limits_for(user_name, groups).mcp_calls_per_minute

    @staticmethod
    def counter_id(user_id: str) -> str:
        """The id the shared per-minute counter keeps this person's MCP calls under."""
        import uuid

        return str(uuid.uuid5(uuid.UUID(user_id), "mcp_calls_per_minute"))

    def local(self, user_id: str, limit: int) -> Refusal | None:
        q = self._calls[user_id]
        t = time.monotonic()
        while q and q[0] <= t - 60:
            q.popleft()
        if len(q) >= limit:
            return Refusal(f"aibridge: rate limit of {limit} MCP calls per minute reached",
                           max(1, math.ceil(q[0] + 60 - t)))
        q.append(t)
        return None

    @staticmethod
    def fleet(count: int, limit: int) -> Refusal | None:
        """The limit against the shared count for this minute (this call already counted)."""
        if count <= limit:
            return None
        return Refusal(f"aibridge: rate limit of {limit} MCP calls per minute reached",
                       max(1, 60 - dt.datetime.now(dt.UTC).second))
