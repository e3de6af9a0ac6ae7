"""Read-side queries over the audit tables, shared by the admin API and the CLI reports.

Every function takes a DuckDB connection (a read cursor), a `Viewer` (admins see everything, others only
their own interceptions) and validated filters; bad input raises `BadParameter` naming the parameter.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..pricing import PriceTable


class BadParameter(ValueError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"bad parameter {name!r}: {why}")
        self.name, self.why = name, why


@dataclass(frozen=True)
class Viewer:
    user_id: str | None  # None: everything (admin, or the local CLI)
    admin: bool = False

    @classmethod
    def everyone(cls) -> "Viewer":
        return cls(None, True)


BILLED_MODEL = "coalesce(i.metadata->>'response_model', i.model)"
OPEN_COLUMNS = ", ".join(f"coalesce(u.open_{k}, 0) AS open_{k}" for k in (
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens"))
# The client's session id, else (a client that names none: flow/purpose.py) its conversation, else the thread.
SESSION_KEY = ("coalesce(i.client_session_id, i.metadata->>'conversation', "
               "CAST(coalesce(i.thread_root_id, i.id) AS VARCHAR))")
_BASE = f"""
    WITH u AS ({{usage}}),
    t AS (SELECT interception_id, count(*) AS tool_calls,
                 count(*) FILTER (WHERE injected) AS injected_tool_calls
          FROM aibridge_tool_usages GROUP BY interception_id),
    p AS (SELECT interception_id, count(*) AS prompts FROM aibridge_user_prompts GROUP BY interception_id)
    SELECT i.id, {{purpose}} AS purpose, i.started_at, i.ended_at, usr.name AS "user", i.initiator_id,
           i.on_behalf_of_id,
           i.on_behalf_of_name AS on_behalf_of, i.provider, i.provider_name,
           i.model, {BILLED_MODEL} AS billed_model, i.client, i.user_agent, i.client_session_id,
           i.thread_parent_id, i.thread_root_id, {SESSION_KEY} AS session, i.credential_kind,
           i.credential_hint, i.status, i.api, i.stream, i.http_status, i.error,
           coalesce(u.input_tokens, 0) AS input_tokens, coalesce(u.output_tokens, 0) AS output_tokens,
           coalesce(u.cache_read_input_tokens, 0) AS cache_read_input_tokens,
           coalesce(u.cache_write_input_tokens, 0) AS cache_write_input_tokens,
           coalesce(t.tool_calls, 0) AS tool_calls, coalesce(t.injected_tool_calls, 0) AS injected_tool_calls,
           coalesce(p.prompts, 0) AS prompts, u.stored_cost, {OPEN_COLUMNS}
    FROM aibridge_interceptions i
    LEFT JOIN aibridge_users usr ON usr.id = i.initiator_id
    LEFT JOIN u ON u.interception_id = i.id
    LEFT JOIN t ON t.interception_id = i.id
    LEFT JOIN p ON p.interception_id = i.id
"""
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens")
# Usage rows keep the cost they were charged at (`cost_usd`, with the rates in `price`): reports sum those, and
# price at today's rates only the tokens of rows without one (recorded before prices were stored, or unpriced then).
OPEN_FIELDS = tuple(f"open_{k}" for k in TOKEN_FIELDS)


def usage_sums(conn) -> str:
    """Per interception: its tokens, the stored cost, and the tokens that have none (`open_…`)."""
    tokens = ", ".join(f"sum({k}) AS {k}" for k in TOKEN_FIELDS)
    if has_column(conn, "aibridge_token_usages", "cost_usd"):
        stored = "sum(cost_usd) AS stored_cost, " + ", ".join(
            f"sum(CASE WHEN cost_usd IS NULL AND (metadata IS NULL OR metadata->>'usage_clamped' IS NULL) "
            f"THEN {k} ELSE 0 END) AS open_{k}" for k in TOKEN_FIELDS)  # clamped: no figure to charge
    else:  # a store of an older version, read as it is
        stored = "CAST(NULL AS DOUBLE PRECISION) AS stored_cost, " + ", ".join(f"sum({k}) AS open_{k}" for k in TOKEN_FIELDS)
    return f"SELECT interception_id, {tokens}, {stored} FROM aibridge_token_usages GROUP BY interception_id"


def has_column(conn, table: str, column: str) -> bool:
    return conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?",
                        [table, column]).fetchone()[0] > 0


def parse_time(name: str, value: str | None) -> dt.datetime | None:
    """ISO timestamps/dates, or a relative age like 30m, 24h, 7d, 2w."""
    if value in (None, ""):
        return None
    m = re.fullmatch(r"(\d+)\s*([mhdw])", value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        delta = {"m": dt.timedelta(minutes=n), "h": dt.timedelta(hours=n), "d": dt.timedelta(days=n),
                 "w": dt.timedelta(weeks=n)}[unit]
        return dt.datetime.now(dt.UTC) - delta
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadParameter(name, "expected an ISO 8601 time (2026-01-31T12:00:00Z) or an age like 7d") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def parse_limit(value: str | None, default: int = 50, maximum: int = 500) -> int:
    if value in (None, ""):
        return default
    try:
        n = int(value)
    except ValueError:
        raise BadParameter("limit", "expected an integer") from None
    if not 1 <= n <= maximum:
        raise BadParameter("limit", f"must be between 1 and {maximum}")
    return n


def _where(viewer: Viewer, filters: dict[str, Any]) -> tuple[str, list]:
    clauses, params = [], []
    if viewer.user_id is not None:  # a member sees their own calls and those made on their behalf
        clauses.append("(i.initiator_id = ? OR i.on_behalf_of_id = ?)")
        params += [viewer.user_id] * 2
    simple = {"initiator": 'usr.name', "client": "i.client", "on_behalf_of": "i.on_behalf_of_name"}
    for key, col in simple.items():
        if filters.get(key):
            clauses.append(f"{col} = ?")
            params.append(filters[key])
    if filters.get("provider"):
        clauses.append("(i.provider = ? OR i.provider_name = ?)")
        params += [filters["provider"]] * 2
    if filters.get("model"):
        clauses.append(f"(i.model = ? OR {BILLED_MODEL} = ?)")
        params += [filters["model"]] * 2
    if filters.get("session"):
        clauses.append(f"({SESSION_KEY} = ? OR CAST(i.thread_root_id AS VARCHAR) = ?)")
        params += [filters["session"]] * 2
    for key, op in (("started_after", ">="), ("started_before", "<")):
        t = parse_time(key, filters.get(key))
        if t is not None:
            clauses.append(f"i.started_at {op} ?")
            params.append(t)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def rows_csv(rows: list[dict]) -> str:
    """Report rows as CSV (the admin API's `format=csv`, `aibridge usage --csv`): one column per field, in the order
    they first appear; lists joined with commas, objects as JSON."""
    import csv
    import io

    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    return buf.getvalue()


def _cell(v):
    """A CSV cell; text a spreadsheet would run as a formula (=, +, -, @ first: a client or model name is chosen by
    whoever calls) is quoted with a leading apostrophe."""
    if isinstance(v, list):
        v = ",".join(map(str, v))
    elif isinstance(v, dict):
        v = json.dumps(v)
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def base(conn) -> str:
    """The interception listing's query, with this store's usage sums."""
    return _BASE.replace("{usage}", usage_sums(conn)).replace("{purpose}", _purpose_column(conn))


def _purpose_column(conn) -> str:
    """What each call was for (NULL on a store of an older version, read as it is)."""
    return "i.purpose" if has_column(conn, "aibridge_interceptions", "purpose") else "CAST(NULL AS VARCHAR)"


def _typed_column(conn) -> str:
    """The prompt as the person typed it: the recorded `typed`, else (older rows, older stores) the raw prompt."""
    if has_column(conn, "aibridge_user_prompts", "typed"):
        return "CASE WHEN p.typed IS NULL THEN p.prompt ELSE p.typed END"
    return "p.prompt"


# Auxiliary calls (a title, a router, memory extraction: flow/purpose.py) are not the person's turns: left out of
# prompts and prompt counts unless asked for. Rows recorded before purposes were (NULL) count as the person's.
AUXILIARY_SQL = "coalesce({col}, 'chat') <> 'chat'"


def _is_auxiliary(purpose: str | None) -> bool:
    return purpose is not None and purpose != "chat"


def _rows(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [{c: jsonable(v) for c, v in zip(cols, r)} for r in cur.fetchall()]


def _cost(row: dict, prices: PriceTable) -> float | None:
    """What the row's usage cost: what was stored with it, plus today's price of the tokens that have no stored
    cost (None when those have no price either)."""
    stored = row.get("stored_cost") or 0.0
    open_tokens = [int(row.get(f"open_{k}") or 0) for k in TOKEN_FIELDS]
    if not any(open_tokens):
        return stored if row.get("stored_cost") is not None or not any(int(row.get(k) or 0) for k in TOKEN_FIELDS) \
            else None
    cost = prices.cost(row.get("billed_model"), *open_tokens, provider=row.get("provider"))
    return None if cost is None else stored + cost


def _with_cost(row: dict, prices: PriceTable) -> dict:
    cost = _cost(row, prices)
    row["cost_usd"] = None if cost is None else round(cost, 6)
    row["priced"] = cost is not None
    for k in ("stored_cost", *OPEN_FIELDS):
        row.pop(k, None)
    return row


def _encode_cursor(row: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps([row["started_at"], row["id"]]).encode()).decode()


def _decode_cursor(value: str) -> tuple[dt.datetime, str]:
    try:
        ts, iid = json.loads(base64.urlsafe_b64decode(value.encode()))
        return dt.datetime.fromisoformat(ts), str(iid)
    except Exception:
        raise BadParameter("cursor", "not a cursor returned by this API") from None


def list_interceptions(conn, viewer: Viewer, filters: dict, prices: PriceTable, limit: int = 50,
                       cursor: str | None = None) -> dict:
    """Newest first; the cursor is (started_at, id) of the last row, so pages stay stable under inserts."""
    where, params = _where(viewer, filters)
    if cursor:
        ts, iid = _decode_cursor(cursor)
        where += (" AND " if where else " WHERE ") + "(i.started_at < ? OR (i.started_at = ? AND CAST(i.id AS VARCHAR) < ?))"
        params += [ts, ts, iid]
    cur = conn.execute(f"{base(conn)}{where} ORDER BY i.started_at DESC, CAST(i.id AS VARCHAR) DESC LIMIT ?", params + [limit + 1])
    rows = [_with_cost(r, prices) for r in _rows(cur)]
    more = len(rows) > limit
    rows = rows[:limit]
    return {"data": rows, "next_cursor": _encode_cursor(rows[-1]) if more and rows else None}


def interception_detail(conn, viewer: Viewer, iid: str, prices: PriceTable) -> dict | None:
    where, params = _where(viewer, {})
    where += (" AND " if where else " WHERE ") + "CAST(i.id AS VARCHAR) = ?"
    rows = _rows(conn.execute(f"{base(conn)}{where}", params + [iid]))
    if not rows:
        return None
    out = _with_cost(rows[0], prices)
    for key, table, order in (
        ("token_usages", "aibridge_token_usages", "created_at, id"),
        ("prompts", "aibridge_user_prompts", "created_at, id"),
        ("tool_usages", "aibridge_tool_usages", "created_at, id"),
        ("thoughts", "aibridge_model_thoughts", "created_at, id"),
    ):
        out[key] = _rows(conn.execute(f"SELECT * FROM {table} WHERE CAST(interception_id AS VARCHAR) = ? ORDER BY {order}", [iid]))
    out["policy_decisions"] = [_decision(r) for r in _rows(conn.execute(
        f"SELECT {_DECISION_COLUMNS} FROM aibridge_policy_decisions d WHERE CAST(d.interception_id AS VARCHAR) = ? "
        "ORDER BY d.created_at, CAST(d.id AS VARCHAR)", [iid]))]
    return out


def _fold_costs(groups: dict[Any, dict], key: Any, row: dict, prices: PriceTable, extra: tuple[str, ...] = ()) -> None:
    g = groups.setdefault(key, {**{k: 0 for k in TOKEN_FIELDS + extra}, "cost_usd": 0.0, "unpriced_models": []})
    for k in TOKEN_FIELDS + extra:
        g[k] += int(row.get(k) or 0)
    cost = _cost(row, prices)
    if cost is None:
        if row.get("billed_model") not in g["unpriced_models"] and any(int(row.get(k) or 0) for k in TOKEN_FIELDS):
            g["unpriced_models"].append(row.get("billed_model"))
    else:
        g["cost_usd"] += cost


def _finish_cost(g: dict) -> dict:
    g["cost_usd"] = round(g["cost_usd"], 6)
    g["cost"] = "unpriced" if g["unpriced_models"] and not g["cost_usd"] else (
        f"{g['cost_usd']:.4f}" + (" (+unpriced)" if g["unpriced_models"] else ""))
    return g


GROUPS = {
    "user": 'usr.name',
    "on_behalf_of": "i.on_behalf_of_name",  # the person a service account acted for (null: nobody)
    "person": "coalesce(i.on_behalf_of_name, usr.name)",  # whom the call was for: acted-for, else the caller
    "model": BILLED_MODEL,
    "client": "i.client",
    "provider": "i.provider_name",
    "day": "CAST(date_trunc('day', i.started_at AT TIME ZONE 'UTC') AS DATE)",
    "week": "CAST(date_trunc('week', i.started_at AT TIME ZONE 'UTC') AS DATE)",  # ISO weeks: the Monday they begin
    "month": "CAST(date_trunc('month', i.started_at AT TIME ZONE 'UTC') AS DATE)",
    # The groups of the person a call was for (aibridge users groups set): a person in two groups counts in both,
    # so group totals may add up to more than the whole; people in none are "(no group)".
    "group": "coalesce(ug.group_name, '(no group)')",
}
BUCKETS = ("day", "week", "month")
_GROUP_JOIN = (" LEFT JOIN aibridge_user_groups ug ON ug.user_id = coalesce(i.on_behalf_of_id, i.initiator_id)")


def _group_join(conn, keys: tuple[str, ...]) -> str:
    if "group" not in keys:
        return ""
    if not table_exists(conn, "aibridge_user_groups"):
        return " LEFT JOIN (SELECT NULL AS user_id, CAST(NULL AS VARCHAR) AS group_name) ug ON false"
    return _GROUP_JOIN


def usage(conn, viewer: Viewer, group_by: str, prices: PriceTable, since: str | None = None,
          filters: dict | None = None, until: str | None = None) -> dict:
    """Tokens and cost per user (person, model, client, provider, group, day, week or month) of the calls started
    in [since, until)."""
    if group_by not in GROUPS:
        raise BadParameter("group_by", f"one of {', '.join(GROUPS)}")
    filters = dict(filters or {})
    if since:
        filters["started_after"] = since
    if until:
        filters["started_before"] = until
    where, params = _where(viewer, filters)
    cur = conn.execute(
        f"SELECT {GROUPS[group_by]} AS key, {BILLED_MODEL} AS billed_model, count(*) AS interceptions, "
        "count(DISTINCT i.initiator_id) AS users, "
        + ", ".join(f"coalesce(sum(u.{k}), 0) AS {k}" for k in TOKEN_FIELDS + OPEN_FIELDS)
        + ", sum(u.stored_cost) AS stored_cost, i.provider"
        + " FROM aibridge_interceptions i LEFT JOIN aibridge_users usr ON usr.id = i.initiator_id "
        f"LEFT JOIN ({usage_sums(conn)}) u ON u.interception_id = i.id" + _group_join(conn, (group_by,))
        + f"{where} GROUP BY 1, 2, i.provider",
        params,
    )
    groups: dict[Any, dict] = {}
    for row in _rows(cur):
        _fold_costs(groups, row["key"], row, prices, ("interceptions",))
    data = [{group_by: k, **_finish_cost(g)} for k, g in groups.items()]
    data.sort(key=lambda d: (-d["cost_usd"], -(d["input_tokens"] + d["output_tokens"]), str(d[group_by])))
    if group_by in BUCKETS:
        data.sort(key=lambda d: str(d[group_by]))
    if group_by == "day":
        active = _rows(conn.execute(
            "SELECT CAST(date_trunc('day', i.started_at AT TIME ZONE 'UTC') AS DATE) AS day, count(DISTINCT i.initiator_id) AS active_users "
            f"FROM aibridge_interceptions i LEFT JOIN aibridge_users usr ON usr.id = i.initiator_id{where} GROUP BY 1", params))
        by_day = {a["day"]: a["active_users"] for a in active}
        for d in data:
            d["active_users"] = by_day.get(d["day"], 0)
    return {"group_by": group_by, "since": since, "until": until, "prices_taken": prices.taken, "data": data}


def sessions(conn, viewer: Viewer, prices: PriceTable, filters: dict | None = None, limit: int = 50,
             include_auxiliary: bool = False) -> dict:
    """Interceptions grouped by the client's session id, else by thread root. `prompts` counts the person's turns
    (`human_turns`: calls made for a prompt the person typed); the client's own calls (`auxiliary`) are counted
    apart, and their prompts only with `include_auxiliary`."""
    where, params = _where(viewer, filters or {})
    rows = _rows(conn.execute(f"SELECT * FROM ({base(conn)}{where}) AS base ORDER BY started_at", params))
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.get(r["session"])
        if g is None:
            g = groups[r["session"]] = {"session": r["session"], "user": r["user"], "client": r["client"],
                                        "first_at": r["started_at"], "last_at": r["ended_at"] or r["started_at"],
                                        "interceptions": 0, "prompts": 0, "human_turns": 0, "auxiliary": 0,
                                        "tool_calls": 0, "models": [], "_cost": {}}
        g["interceptions"] += 1
        aux = _is_auxiliary(r["purpose"])
        if aux:
            g["auxiliary"] += 1
        elif r["prompts"]:
            g["human_turns"] += 1
        if include_auxiliary or not aux:
            g["prompts"] += r["prompts"]
        g["tool_calls"] += r["tool_calls"]
        g["last_at"] = max(g["last_at"], r["ended_at"] or r["started_at"])
        if r["billed_model"] not in g["models"]:
            g["models"].append(r["billed_model"])
        _fold_costs(g["_cost"], 0, r, prices)
    out = []
    for g in groups.values():
        cost = _finish_cost(g.pop("_cost")[0])
        out.append({**g, **cost})
    out.sort(key=lambda g: g["last_at"], reverse=True)
    return {"data": out[:limit]}


SESSION_CALLS_MAX = 2000  # calls a session view lists, at most (newest kept)


def session_detail(conn, viewer: Viewer, session: str, prices: PriceTable) -> dict | None:
    """One session as people read it: its threads (a call and the calls that answered its tool calls, linked by
    tool call ids: `thread_root_id`), oldest first, each with its calls; the person's turns (`turns`: a chat
    call with a prompt, shown as typed) apart from the client's own calls (`auxiliary`: titles, routers, memory)."""
    where, params = _where(viewer, {"session": session})
    rows = _rows(conn.execute(f"SELECT * FROM ({base(conn)}{where}) AS base ORDER BY started_at DESC, "
                              f"CAST(id AS VARCHAR) DESC LIMIT ?", params + [SESSION_CALLS_MAX]))
    if not rows:
        return None
    rows.reverse()
    ids = [r["id"] for r in rows]
    typed = _typed_column(conn)
    prompts: dict[str, tuple[str | None, str | None]] = {}
    for n in range(0, len(ids), 500):
        chunk = ids[n:n + 500]
        marks = ", ".join("?" * len(chunk))
        for iid, text, raw in conn.execute(
                f"SELECT CAST(p.interception_id AS VARCHAR), {typed}, p.prompt FROM aibridge_user_prompts p "
                f"WHERE CAST(p.interception_id AS VARCHAR) IN ({marks}) ORDER BY p.created_at", chunk).fetchall():
            prompts.setdefault(iid, (text, raw))
    threads: dict[str, dict] = {}
    turns, auxiliary = [], []
    cost = {}
    for r in rows:
        _fold_costs(cost, 0, r, prices)
        text, raw = prompts.get(r["id"], (None, None))
        call = {k: r[k] for k in ("id", "started_at", "ended_at", "purpose", "model", "billed_model", "status",
                                  "api", "thread_parent_id", "tool_calls", "input_tokens", "output_tokens")}
        call["prompt"], call["raw_prompt"] = text, raw
        aux = _is_auxiliary(r["purpose"])
        call["kind"] = "auxiliary" if aux else ("turn" if raw is not None else "continuation")
        root = r["thread_root_id"] or r["id"]
        t = threads.get(root)
        if t is None:
            t = threads[root] = {"root": root, "kind": "auxiliary" if aux else "chat", "purpose": r["purpose"],
                                 "prompt": text, "started_at": r["started_at"], "calls": []}
        t["calls"].append(call)
        if aux:
            auxiliary.append(call)
        elif raw is not None:
            turns.append({"id": r["id"], "started_at": r["started_at"], "prompt": text, "raw_prompt": raw,
                          "thread": root})
    first = rows[0]
    return {"session": session, "user": first["user"], "client": first["client"], "first_at": first["started_at"],
            "last_at": max(r["ended_at"] or r["started_at"] for r in rows), "interceptions": len(rows),
            "human_turns": len(turns), "auxiliary": len(auxiliary), **_finish_cost(cost[0]),
            "turns": turns, "threads": list(threads.values())}


def distinct(conn, viewer: Viewer, column: str, prefix: str | None = None) -> dict:
    col = {"client": "i.client", "model": BILLED_MODEL}[column]
    where, params = _where(viewer, {})
    if prefix:
        where += (" AND " if where else " WHERE ") + f"starts_with(CAST({col} AS VARCHAR), ?)"
        params.append(prefix)
    cur = conn.execute(
        f"SELECT {col} AS value, count(*) AS interceptions FROM aibridge_interceptions i "
        f"LEFT JOIN aibridge_users usr ON usr.id = i.initiator_id{where} GROUP BY 1 ORDER BY 2 DESC, 1", params)
    return {"data": [r for r in _rows(cur) if r["value"] is not None]}


def prompts(conn, viewer: Viewer, user: str | None = None, search: str | None = None, limit: int = 50,
            include_auxiliary: bool = False) -> dict:
    """Prompts newest first: `prompt` is what the person typed (the client's own wrappers left out), `raw_prompt`
    what was recorded; the client's own calls (`purpose` other than chat) only with `include_auxiliary`."""
    where, params = _where(viewer, {"initiator": user} if user else {})
    purpose = _purpose_column(conn)
    if not include_auxiliary:
        where += (" AND " if where else " WHERE ") + "NOT (" + AUXILIARY_SQL.format(col=purpose) + ")"
    if search:
        where += (" AND " if where else " WHERE ") + "p.prompt ILIKE ?"
        params.append(f"%{search}%")
    cur = conn.execute(
        f"SELECT p.created_at, usr.name AS \"user\", i.client, i.model, {_typed_column(conn)} AS prompt, "
        f"p.prompt AS raw_prompt, {purpose} AS purpose, {SESSION_KEY} AS session, i.id AS interception_id "
        "FROM aibridge_user_prompts p JOIN aibridge_interceptions i ON i.id = p.interception_id "
        f"LEFT JOIN aibridge_users usr ON usr.id = i.initiator_id{where} ORDER BY p.created_at DESC LIMIT ?",
        params + [limit])
    return {"data": _rows(cur)}


def timeseries(conn, viewer: Viewer, stack: str, prices: PriceTable, since: str | None = "30d",
               until: str | None = None, bucket: str = "day") -> dict:
    """Per day (ISO week, month) and per model (or client, user, person, provider, group): tokens and cost, for
    stacked charts. Each entry's bucket start is in `day` (and in the bucket's own name)."""
    if stack not in ("model", "client", "user", "person", "provider", "group"):
        raise BadParameter("stack", "one of model, client, user, person, provider, group")
    if bucket not in BUCKETS:
        raise BadParameter("bucket", "one of day, week, month")
    filters = {k: v for k, v in (("started_after", since), ("started_before", until)) if v}
    where, params = _where(viewer, filters)
    cur = conn.execute(
        f"SELECT {GROUPS[bucket]} AS day, {GROUPS[stack]} AS key, "
        f"{BILLED_MODEL} AS billed_model, count(*) AS interceptions, "
        + ", ".join(f"coalesce(sum(u.{k}), 0) AS {k}" for k in TOKEN_FIELDS + OPEN_FIELDS)
        + ", sum(u.stored_cost) AS stored_cost, i.provider"
        + " FROM aibridge_interceptions i LEFT JOIN aibridge_users usr ON usr.id = i.initiator_id "
        f"LEFT JOIN ({usage_sums(conn)}) u ON u.interception_id = i.id" + _group_join(conn, (stack,))
        + f"{where} GROUP BY 1, 2, 3, i.provider",
        params,
    )
    groups: dict[Any, dict] = {}
    for row in _rows(cur):
        _fold_costs(groups, (row["day"], row["key"]), row, prices, ("interceptions",))
    data = [{"day": k[0], bucket: k[0], stack: k[1], **_finish_cost(g)} for k, g in groups.items()]
    data.sort(key=lambda d: (str(d["day"]), str(d[stack])))
    return {"stack": stack, "bucket": bucket, "since": since, "until": until, "data": data}


def table_exists(conn, name: str) -> bool:
    """Whether the store has the table (a file read-only, never migrated by this version, may lack newer ones)."""
    return conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0] > 0


# --- users and groups ----------------------------------------------------------------------------------


def users(conn, viewer: Viewer) -> dict:
    """Users with their role, groups and active tokens: every user for an admin, a member's own entry otherwise."""
    where, params = ("", []) if viewer.user_id is None else (" WHERE CAST(u.id AS VARCHAR) = ?", [viewer.user_id])
    rows = _rows(conn.execute(
        "SELECT u.id, u.name, u.role, coalesce(u.service_account, false) AS service_account, u.created_at, "
        "(SELECT count(*) FROM aibridge_tokens t WHERE t.user_id = u.id AND t.revoked_at IS NULL) AS active_tokens "
        f"FROM aibridge_users u{where} ORDER BY u.name", params))
    memberships: dict[str, list[str]] = {}
    for group, uid in _memberships(conn, viewer):
        memberships.setdefault(uid, []).append(group)
    for r in rows:
        r["groups"] = sorted(memberships.get(r["id"], []))
    return {"data": rows}


def groups(conn, viewer: Viewer) -> dict:
    """Each group with its members: every group for an admin; a member sees the groups they are in (and no other
    member's name)."""
    members: dict[str, list[str]] = {}
    where, params = ("", []) if viewer.user_id is None else (" WHERE CAST(g.user_id AS VARCHAR) = ?", [viewer.user_id])
    for group, name in conn.execute(
            "SELECT g.group_name, u.name FROM aibridge_user_groups g JOIN aibridge_users u ON u.id = g.user_id"
            f"{where} ORDER BY g.group_name, u.name", params).fetchall():
        members.setdefault(group, []).append(name)
    return {"data": [{"group": g, "members": m, "users": len(m)} for g, m in members.items()]}


def _memberships(conn, viewer: Viewer) -> list[tuple[str, str]]:
    where, params = ("", []) if viewer.user_id is None else (" WHERE CAST(user_id AS VARCHAR) = ?", [viewer.user_id])
    return [(g, str(uid)) for g, uid in conn.execute(
        f"SELECT group_name, user_id FROM aibridge_user_groups{where}", params).fetchall()]


# --- policy decisions ---------------------------------------------------------------------------------------

_DECISION_COLUMNS = ("d.id, d.created_at, d.interception_id, d.user_id, d.rule, d.policy_version, d.hook, d.action, "
                     "d.enforced, d.detectors, d.message, d.tool, d.tool_call_id")
_DECISIONS_FROM = ("FROM aibridge_policy_decisions d LEFT JOIN aibridge_interceptions i ON i.id = d.interception_id "
                   "LEFT JOIN aibridge_users usr ON usr.id = coalesce(d.user_id, i.initiator_id)")
DECISION_FILTERS = ("since", "until", "rule", "action", "user", "interception", "hook", "enforced")


def _decision(row: dict) -> dict:
    """detectors as a list on both engines (DuckDB hands JSON over as its text, PostgreSQL parsed)."""
    d = row.get("detectors")
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except ValueError:
            d = [d]
    row["detectors"] = d if isinstance(d, list) else []
    return row


def _decision_where(viewer: Viewer, filters: dict[str, Any]) -> tuple[str, list]:
    clauses, params = [], []
    if viewer.user_id is not None:  # a member sees the decisions on their own calls (and those made for them)
        clauses.append("(CAST(d.user_id AS VARCHAR) = ? OR CAST(i.initiator_id AS VARCHAR) = ? "
                       "OR CAST(i.on_behalf_of_id AS VARCHAR) = ?)")
        params += [viewer.user_id] * 3
    _column_filters(filters, clauses, params, "d", {
        "rule": "d.rule", "action": "d.action", "hook": "d.hook", "user": "usr.name",
        "interception": "CAST(d.interception_id AS VARCHAR)"}, ("enforced", "d.enforced"))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _column_filters(filters: dict[str, Any], clauses: list, params: list, table: str, columns: dict[str, str],
                    flag: tuple[str, str]) -> None:
    """The filters every audit listing shares: equality on `columns` (an id compared lower-case), one yes/no flag
    on a boolean column, and `since`/`until` on the table's created_at."""
    for key, col in columns.items():
        value = filters.get(key)
        if value:
            clauses.append(f"{col} = ?")
            params.append(str(value).strip().lower() if key == "interception" else str(value))
    name, column = flag
    given = filters.get(name)
    if given not in (None, ""):
        on = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            str(given).strip().lower())
        if on is None:
            raise BadParameter(name, "true or false")
        clauses.append(column if on else f"NOT {column}")
    for key, op in (("since", ">="), ("until", "<")):
        t = parse_time(key, filters.get(key))
        if t is not None:
            clauses.append(f"{table}.created_at {op} ?")
            params.append(t)


def policy_decisions(conn, viewer: Viewer, filters: dict, limit: int = 50) -> dict:
    """Decisions newest first (filters: since, until, rule, action, user, interception, hook, enforced), with the
    user's name and the interception's model and client."""
    where, params = _decision_where(viewer, filters)
    rows = _rows(conn.execute(
        f'SELECT {_DECISION_COLUMNS}, usr.name AS "user", i.model, i.client, i.provider_name {_DECISIONS_FROM}'
        f"{where} ORDER BY d.created_at DESC, CAST(d.id AS VARCHAR) DESC LIMIT ?", params + [limit]))
    return {"data": [_decision(r) for r in rows]}


def policy_summary(conn, viewer: Viewer, filters: dict) -> dict:
    """Counts of decisions per rule and action (`data`: how many, how many enforced, by how many users, the latest)
    and per user (`by_user`: how many, how many enforced, and how many of each action)."""
    where, params = _decision_where(viewer, filters)
    per_rule = _rows(conn.execute(
        "SELECT d.rule, d.action, count(*) AS decisions, count(*) FILTER (WHERE d.enforced) AS enforced, "
        "count(DISTINCT coalesce(d.user_id, i.initiator_id)) AS users, max(d.created_at) AS last_at "
        f"{_DECISIONS_FROM}{where} GROUP BY d.rule, d.action ORDER BY count(*) DESC, d.rule, d.action", params))
    for r in per_rule:
        r["monitored"] = r["decisions"] - r["enforced"]
    by_user: dict[Any, dict] = {}
    for r in _rows(conn.execute(
            'SELECT usr.name AS "user", d.action, count(*) AS decisions, '
            f"count(*) FILTER (WHERE d.enforced) AS enforced {_DECISIONS_FROM}{where} GROUP BY usr.name, d.action",
            params)):
        u = by_user.setdefault(r["user"], {"user": r["user"], "decisions": 0, "enforced": 0, "actions": {}})
        u["decisions"] += r["decisions"]
        u["enforced"] += r["enforced"]
        u["actions"][r["action"]] = r["decisions"]
    users_ = sorted(by_user.values(), key=lambda u: (-u["decisions"], str(u["user"])))
    return {"since": filters.get("since"), "data": per_rule, "by_user": users_}


# --- MCP gateway calls -------------------------------------------------------------------------------------

MCP_CALL_FILTERS = ("since", "until", "user", "server", "tool", "outcome", "client", "session", "method", "errors")
_MCP_COLUMNS = ("c.id, c.created_at, c.user_id, c.user_name AS \"user\", c.on_behalf_of_id, "
                "c.on_behalf_of_name AS on_behalf_of, c.client, c.client_version, c.session_id, c.method, c.server, "
                "c.tool, c.arguments, c.is_error, c.outcome, c.error, c.result_bytes, c.duration_ms")


def _mcp_where(viewer: Viewer, filters: dict[str, Any]) -> tuple[str, list]:
    clauses, params = [], []
    if viewer.user_id is not None:  # a member sees the calls they made (and those made for them)
        clauses.append("(CAST(c.user_id AS VARCHAR) = ? OR CAST(c.on_behalf_of_id AS VARCHAR) = ?)")
        params += [viewer.user_id] * 2
    _column_filters(filters, clauses, params, "c", {
        "user": "c.user_name", "server": "c.server", "tool": "c.tool", "outcome": "c.outcome", "client": "c.client",
        "session": "c.session_id", "method": "c.method"}, ("errors", "c.is_error"))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _mcp_call(row: dict) -> dict:
    """arguments as an object on both engines (DuckDB hands JSON over as its text, PostgreSQL parsed)."""
    a = row.get("arguments")
    if isinstance(a, str):
        try:
            row["arguments"] = json.loads(a)
        except ValueError:
            pass
    return row


def mcp_calls(conn, viewer: Viewer, filters: dict, limit: int = 50) -> dict:
    """MCP gateway calls newest first (filters: since, until, user, server, tool, outcome, client, session, method,
    errors)."""
    where, params = _mcp_where(viewer, filters)
    rows = _rows(conn.execute(f"SELECT {_MCP_COLUMNS} FROM aibridge_mcp_calls c{where} "
                              "ORDER BY c.created_at DESC, CAST(c.id AS VARCHAR) DESC LIMIT ?", params + [limit]))
    return {"data": [_mcp_call(r) for r in rows]}


def mcp_summary(conn, viewer: Viewer, filters: dict) -> dict:
    """Calls per server and tool (`data`: calls, errors, users, average and slowest duration, the latest), per user
    (`by_user`) and the slowest calls (`slowest`)."""
    where, params = _mcp_where(viewer, filters)
    per_tool = _rows(conn.execute(
        "SELECT c.server, c.tool, c.method, count(*) AS calls, count(*) FILTER (WHERE c.is_error) AS errors, "
        "count(DISTINCT c.user_id) AS users, CAST(round(avg(c.duration_ms)) AS BIGINT) AS avg_ms, "
        "max(c.duration_ms) AS max_ms, max(c.created_at) AS last_at "
        f"FROM aibridge_mcp_calls c{where} GROUP BY c.server, c.tool, c.method "
        "ORDER BY count(*) DESC, c.server, c.tool", params))
    by_user = _rows(conn.execute(
        'SELECT c.user_name AS "user", count(*) AS calls, count(*) FILTER (WHERE c.is_error) AS errors, '
        "count(DISTINCT c.server || '/' || c.tool) AS tools, max(c.created_at) AS last_at "
        f"FROM aibridge_mcp_calls c{where} GROUP BY c.user_name ORDER BY count(*) DESC, c.user_name", params))
    slowest = _rows(conn.execute(
        f"SELECT {_MCP_COLUMNS} FROM aibridge_mcp_calls c{where} ORDER BY c.duration_ms DESC NULLS LAST, "
        "c.created_at DESC LIMIT 10", params))
    return {"since": filters.get("since"), "data": per_tool, "by_user": by_user,
            "slowest": [_mcp_call(r) for r in slowest]}


def jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (uuid.UUID, decimal.Decimal, dt.timedelta)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.hex()
    return str(v)
