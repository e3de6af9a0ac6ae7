"""`aibridge` command line: users, tokens and read-only SQL over the audit tables.

Works the same whether or not the gateway runs: a running gateway owns the DuckDB file and executes the
operation for the CLI (see gateway_client.py), so token changes take effect at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..certs import CA_P12, bundle, default_confdir, ensure_ca, gateway_url
from ..config import Config, ConfigError, load_config, postgres_error, postgres_label, resolve_config_path
from ..store.ops import OpError
from .gateway_client import run_gateway_op, run_op
from .guides import GUIDES, env_lines


def _table(result: dict, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in result["columns"]:
        table.add_column(str(c), overflow="fold")
    for row in result["rows"]:
        table.add_row(*["" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for v in row])
    # Piped output (scripts, less) gets room for whole values instead of 80-column wrapping.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    n = len(result["rows"])
    print(f"({n} row{'s' if n != 1 else ''})")


@dataclass
class Context:
    """What every command gets besides its arguments: the config and a way to run store operations."""

    config: Config

    @property
    def db(self) -> Path:
        return self.config.duckdb_path

    def op(self, _op: str, **kw: Any) -> Any:
        return run_op(self.db, _op, kw, self.config.storage.postgres)


def _users_add(args, cx: Context) -> None:
    r = cx.op("users.add", name=args.name, role="admin" if args.admin else "member",
              service_account=args.service_account)
    kind = f"{r['role']}, service account" if r.get("service_account") else r["role"]
    print(f"added user {r['name']} ({kind}), id {r['id']}")


def _users_list(args, cx: Context) -> None:
    _out(cx.op("users.list"), args.json, "users", lists=", ")


def _users_set_role(args, cx: Context) -> None:
    r = cx.op("users.set_role", name=args.name, role=args.role)
    print(f"{r['name']} is now {r['role']}")


def _users_groups_set(args, cx: Context) -> None:
    r = cx.op("users.groups_set", name=args.name, groups=args.groups)
    print(f"{r['name']} is in {', '.join(r['groups'])}" if r["groups"] else f"{r['name']} is in no group")


def _groups_list(args, cx: Context) -> None:
    _out(cx.op("groups.list"), args.json, "groups", lists=", ")


_BUDGET_COLUMNS = ["user", "groups", "tokens_today", "tokens_per_day", "usd_today", "usd_per_day", "usd_week",
                   "usd_per_week", "usd_month", "usd_per_month", "requests_per_minute"]


def _budget_report(cx: Context, whole: bool = False):
    """Each user's budget status (`data`), or with `whole` the report with `users` and `groups` use and forecast."""
    spec = _budgets_spec(cx.config)
    if spec is None:
        return {} if whole else []
    pricing = str(cx.config.pricing) if cx.config.pricing else None
    r = cx.op("report", kind="budgets", budgets=spec, pricing_file=pricing)
    return r if whole else r["data"]


def _budgets_status(args, cx: Context) -> None:
    """Each user's use of every budget in its current period (UTC day, ISO week, month) against the limit that
    applies to them."""
    data = _budget_report(cx)
    if args.json:
        report = _budget_report(cx, whole=True)
        print(json.dumps({"data": data, "users": report.get("users", []), "groups": report.get("groups", [])}
                         if args.detail else data, indent=2))
        return
    if not data:
        print("no budgets are configured (budgets: in the config)")
        return
    rows = [[", ".join(d["groups"]) if c == "groups" else d.get(c) for c in _BUDGET_COLUMNS] for d in data]
    _table({"columns": _BUDGET_COLUMNS, "rows": rows}, "budgets (UTC day, ISO week, month; USD at list prices)")
    report = _budget_report(cx, whole=True)
    cols = ["user", "limit", "value", "from", "used", "share", "forecast"]
    _table({"columns": cols, "rows": [[u[c] for c in cols] for u in report.get("users", [])]},
           "use of each limit, with the forecast to the period's end at the pace so far")
    gcols = ["group", "limit", "value_per_member", "members", "used", "forecast", "near", "at_limit"]
    if report.get("groups"):
        _table({"columns": gcols, "rows": [[g[c] for c in gcols] for g in report["groups"]]}, "groups")


def _budgets_explain(args, cx: Context) -> None:
    """Which budget entry applies to a user, limit by limit, and why (own entry, a group's, the highest of
    several groups', or default), with what they used so far."""
    from ..config import LIMIT_KEYS

    users = cx.op("users.list")
    cols = users["columns"]
    row = next((dict(zip(cols, r)) for r in users["rows"] if r[cols.index("name")] == args.user), None)
    if row is None:
        raise OpError(f"no user {args.user!r}")
    groups = tuple(row.get("groups") or ())
    limits, why = cx.config.budgets.explain(args.user, groups)
    status = next((d for d in _budget_report(cx) if d["user"] == args.user), {})
    used = {"tokens_per_day": status.get("tokens_today"), "usd_per_day": status.get("usd_today"),
            "usd_per_week": status.get("usd_week"), "usd_per_month": status.get("usd_month")}
    out = [{"limit": k, "value": getattr(limits, k), "from": why[k] if getattr(limits, k) is not None or
            why[k] != "default" else "no limit", "used": used.get(k)} for k in LIMIT_KEYS]
    if args.json:
        print(json.dumps({"user": args.user, "groups": list(groups), "limits": out}, indent=2))
        return
    own = "its own entry (users." + args.user + ") replaces everything" if args.user in cx.config.budgets.users \
        else "groups " + ", ".join(groups) if groups else "no group"
    _table({"columns": ["limit", "value", "from", "used"], "rows": [[o[c] for c in ("limit", "value", "from", "used")]
                                                                     for o in out]},
           f"budgets of {args.user} ({own})")


def _prices_set(args, cx: Context) -> None:
    r = cx.op("prices.set", model=args.model, input=args.input, output=args.output, cache_read=args.cache_read,
              cache_write=args.cache_write, note=args.note)
    print(f"{r['model']}: ${r['input']:g} input, ${r['output']:g} output, ${r['cache_read']:g} cache read, "
          f"${r['cache_write']:g} cache write per 1M tokens (the database's price: it wins over the pricing file "
          "and the package's data; costs already recorded keep the price they were charged at)")


def _prices_delete(args, cx: Context) -> None:
    cx.op("prices.delete", model=args.model)
    print(f"{args.model}: the database's price removed (the pricing file's or the package's applies again)")


def _prices_list(args, cx: Context) -> None:
    _out(cx.op("prices.list"), args.json, "prices set in the database (USD per 1M tokens)")


def _prices_show(args, cx: Context) -> None:
    """Which price a model gets, and from where: the database, the pricing file, the package's data, or none."""
    from ..pricing import Price, PriceTable

    rows = cx.op("prices.list")
    overrides = {r[0]: Price(*r[1:5], "database") for r in rows["rows"]}
    price = PriceTable.load(cx.config.pricing, overrides).resolve(args.model, args.provider)
    out = {"model": args.model, "provider": args.provider,
           **(price.rates() if price else {"source": None, "unpriced": True})}
    if args.json:
        print(json.dumps(out, indent=2))
    elif price is None:
        print(f"{args.model}: unpriced (no price in the database, the pricing file or the package's data); "
              f"set one with: aibridge prices set {args.model} --input … --output …")
    else:
        print(json.dumps(out))


_DECISION_COLUMNS = ["created_at", "user", "rule", "action", "enforced", "hook", "tool", "detectors", "message",
                     "interception_id"]
_SUMMARY_COLUMNS = ["rule", "action", "decisions", "enforced", "monitored", "users", "last_at"]


def _policy_decisions(args, cx: Context) -> None:
    """Recent policy decisions (newest first), or with --summary their counts per rule and action and per user."""
    filters = {k: v for k, v in (("since", args.since), ("rule", args.rule), ("action", args.action),
                                 ("user", args.user), ("interception", args.interception), ("hook", args.hook))
               if v}
    if args.enforced is not None:
        filters["enforced"] = "true" if args.enforced else "false"
    if args.summary:
        filters.setdefault("since", "7d")
        r = cx.op("report", kind="policy_summary", filters=filters)
        if args.json:
            print(json.dumps({"data": r["data"], "by_user": r["by_user"]}, indent=2))
            return
        title = f"policy decisions per rule and action since {filters['since']}"
        _table({"columns": _SUMMARY_COLUMNS, "rows": [[d.get(c) for c in _SUMMARY_COLUMNS] for d in r["data"]]}, title)
        actions = sorted({a for u in r["by_user"] for a in u["actions"]})
        cols = ["user", "decisions", "enforced", *actions]
        _table({"columns": cols, "rows": [[u["user"], u["decisions"], u["enforced"],
                                            *(u["actions"].get(a, 0) for a in actions)] for u in r["by_user"]]},
               "per user")
        return
    r = cx.op("report", kind="policy_decisions", filters=filters, limit=args.limit)
    if args.json:
        print(json.dumps(r["data"], indent=2))
        return
    rows = [[", ".join(d[c]) if c == "detectors" else d.get(c) for c in _DECISION_COLUMNS] for d in r["data"]]
    _table({"columns": _DECISION_COLUMNS, "rows": rows},
           "policy decisions" + (f" since {args.since}" if args.since else ""))


def _report(args, cx: Context) -> None:
    """usage, sessions and prompts: a report from the store, as a table or JSON."""
    config = cx.config
    pricing = str(config.pricing) if config.pricing else None
    if args.cmd == "usage":
        r = cx.op("report", kind="usage", group_by=args.by, since=args.since, until=args.until, pricing_file=pricing)
        cols = [args.by, "interceptions", "input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_write_input_tokens", "cost"] + (["active_users"] if args.by == "day" else [])
        title = f"usage by {args.by} since {args.since}" + (f" until {args.until}" if args.until else "") + \
            f" (prices of {r.get('prices_taken') or 'n/a'}, USD)"
    elif args.cmd == "sessions":
        r = cx.op("report", kind="sessions", user=args.user, limit=args.limit, pricing_file=pricing,
                  include_auxiliary=args.all)
        cols = ["session", "user", "client", "first_at", "last_at", "interceptions", "human_turns", "auxiliary",
                "prompts", "tool_calls", "input_tokens", "output_tokens", "cost"]
        title = "sessions"
    else:
        r = cx.op("report", kind="prompts", user=args.user, search=args.search, limit=args.limit,
                  include_auxiliary=args.all)
        cols = ["created_at", "user", "client", "model", "prompt"] + (["purpose"] if args.all else [])
        title = "prompts"
    budgets = None
    if args.cmd == "usage" and args.by == "user" and _budgets_spec(config):
        budgets = cx.op("report", kind="budgets", budgets=_budgets_spec(config), pricing_file=pricing)
        remaining = {b["user"]: b for b in budgets["data"]}
        for d in r["data"]:
            b = remaining.get(d["user"], {})
            d["tokens_remaining_today"] = b.get("tokens_remaining")
            d["usd_remaining_month"] = b.get("usd_remaining")
        cols += ["tokens_remaining_today", "usd_remaining_month"]
    if args.json:
        print(json.dumps(r["data"], indent=2))
        return
    if getattr(args, "csv", False):
        from ..store.reports import rows_csv

        sys.stdout.write(rows_csv(r["data"]))
        return
    _table({"columns": cols, "rows": [[d.get(c) for c in cols] for d in r["data"]]}, title)
    if budgets:
        bcols = ["user", "tokens_today", "tokens_per_day", "tokens_remaining", "usd_month", "usd_per_month",
                 "usd_remaining", "requests_per_minute"]
        _table({"columns": bcols, "rows": [[b.get(c) for c in bcols] for b in budgets["data"]]},
               "budgets (today UTC, this month UTC)")


def _export(args, cx: Context) -> None:
    if args.focus:
        pricing = str(cx.config.pricing) if cx.config.pricing else None
        r = cx.op("export", fmt=args.format, out=args.out, focus=True, since=args.since, until=args.until,
                  pricing_file=pricing)
    elif args.since or args.until:
        raise OpError("--since and --until go with --focus (the tables are written whole)")
    else:
        r = cx.op("export", fmt=args.format, out=args.out)
    print("\n".join(r["files"]))


def _migrate_store(args, cx: Context) -> None:
    """DuckDB -> PostgreSQL, directly on both (a gateway writing the DuckDB file holds its lock: stop it first,
    so the copy misses nothing it was writing)."""
    import duckdb
    import psycopg

    from ..store.copy import CopyRefused, duckdb_to_postgres

    source = Path(args.source).expanduser() if args.source else cx.db
    target = args.to or cx.config.storage.postgres
    if not target:
        raise OpError("name the PostgreSQL database: --to postgresql://user@host:5432/db (or storage.postgres)")
    if not target.startswith(("postgresql://", "postgres://")):
        raise OpError("--to takes a postgresql:// URL")
    if not source.exists():
        raise OpError(f"no DuckDB store at {source}")
    try:
        duck = duckdb.connect(str(source))
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            raise OpError(f"{source} is in use (a gateway is running on it); stop it, then migrate") from None
        raise OpError(str(e)) from None
    try:
        pg = psycopg.connect(target, autocommit=True)
    except psycopg.Error as e:
        duck.close()
        raise OpError(f"cannot connect to {postgres_label(target)}: {postgres_error(e, target)}") from None
    try:
        result = duckdb_to_postgres(duck, pg)
    except CopyRefused as e:
        raise OpError(str(e)) from None
    except psycopg.Error as e:
        raise OpError(f"nothing was copied: {postgres_error(e, target)}") from None
    finally:
        pg.close()
        duck.close()
    print(f"copied {source} into {postgres_label(target)}")
    _out({"columns": ["table", "rows", "copied"],
          "rows": [[t, r["rows"], r["copied"]] for t, r in result.items()]}, args.json, None)
    print("rows already there were kept; run it again at any time: it copies only what is missing")


def _prune(args, cx: Context) -> None:
    days = args.days if args.days is not None else cx.config.retention_days
    r = cx.op("prune", days=days)
    print(f"deleted {r['deleted']} interception(s) older than {days} days" if days else
          "retention is 0 (keep forever): nothing deleted")


def _tokens_create(args, cx: Context) -> None:
    r = cx.op("tokens.create", user=args.user, name=args.name)
    print(f"created token {r['id']} for {r['user']} ({r['hint']}); it is shown only now:", file=sys.stderr)
    print(r["token"])


def _tokens_list(args, cx: Context) -> None:
    _out(cx.op("tokens.list", user=args.user), args.json, "tokens")


def _tokens_revoke(args, cx: Context) -> None:
    r = cx.op("tokens.revoke", id=args.id)
    print(f"token {r['id']} {'was already' if r['already'] else 'is now'} revoked")


def _keys_list(args, cx: Context) -> None:
    _out(run_gateway_op(cx.db, "keys.list", {}), args.json, "upstream keys")


def _keys_reset(args, cx: Context) -> None:
    r = run_gateway_op(cx.db, "keys.reset", {"provider": args.provider} if args.provider else {})
    print(f"{r['reset']} key(s) made usable again" + (" in the worker that answered; every other worker resets "
                                                       "its own within a second" if r.get("workers") else ""))


def _known_mcp_server(args, cx: Context) -> None:
    servers = cx.config.mcp_servers
    if not any(m.name == args.server for m in servers):
        known = ", ".join(m.name for m in servers) or "none configured"
        raise OpError(f"unknown MCP server {args.server!r} ({known})")


def _mcp_token_set(args, cx: Context) -> None:
    _known_mcp_server(args, cx)
    token = sys.stdin.readline().strip()
    r = cx.op("mcp_token.set", user=args.user, server=args.server, token=token)
    print(f"stored MCP token for {r['user']} on {r['server']} ({r['hint']})")


def _mcp_token_delete(args, cx: Context) -> None:
    _known_mcp_server(args, cx)
    cx.op("mcp_token.delete", user=args.user, server=args.server)
    print(f"deleted MCP token for {args.user} on {args.server}")


def _mcp_token_list(args, cx: Context) -> None:
    _out(cx.op("mcp_token.list", user=args.user), args.json, "MCP tokens")


def _oauth_server(args, cx: Context) -> None:
    _known_mcp_server(args, cx)
    if not next(m for m in cx.config.mcp_servers if m.name == args.server).oauth:
        raise OpError(f"MCP server {args.server!r} is not an oauth server (oauth: true in its mcp_servers entry)")


def _mcp_login(args, cx: Context) -> None:
    """Sign a user in to an oauth MCP server: the running gateway starts the login (its callback receives the
    browser); this prints the URL to open and waits until the sign-in completes, fails or times out."""
    import time

    if args.list:
        _out(cx.op("mcp_oauth.list", user=args.user, server=args.server), args.json, "MCP sign-ins")
        return
    if not args.server or not args.user:
        raise OpError("aibridge mcp login needs --server and --user (or --list)")
    _oauth_server(args, cx)
    missing = "a sign-in is started by the running gateway (the browser comes back to it)"
    r = run_gateway_op(cx.db, "mcp.login", {"server": args.server, "user": args.user}, missing=missing)
    if args.json and args.no_wait:
        print(json.dumps(r, indent=2))
        return
    print(f"To sign {r['user']} in to {r['server']}, open this address in a browser (valid for 10 minutes):\n\n"
          f"  {r['url']}\n", flush=True)
    if args.no_wait:
        print("not waiting: `aibridge mcp login --list` shows who is signed in")
        return
    print("waiting for the sign-in to complete…", flush=True)
    deadline = time.monotonic() + args.timeout
    while True:
        status = run_gateway_op(cx.db, "mcp.login_status", {"id": r["id"]}, missing=missing)
        if status["status"] == "done":
            print(f"signed in to {r['server']} as {r['user']}")
            return
        if status["status"] == "failed":
            raise OpError(f"the sign-in to {r['server']} as {r['user']} failed: {status.get('error') or 'no reason'}")
        if status["status"] == "expired" or time.monotonic() > deadline:
            raise OpError(f"the sign-in to {r['server']} as {r['user']} was not completed in time; run "
                          f"aibridge mcp login again")
        time.sleep(1)


def _mcp_logout(args, cx: Context) -> None:
    _oauth_server(args, cx)
    cx.op("mcp_oauth.logout", user=args.user, server=args.server)
    print(f"signed {args.user} out of {args.server} (their tokens are deleted)")


def _mcp_access(args, cx: Context) -> None:
    """What a user may call through the MCP gateway, tool by tool, and why (the running gateway lists the servers
    as that user; without one, the CLI lists those that need no per-user token itself)."""
    r = run_gateway_op(cx.db, "mcp.access", {"user": args.user}, offline=lambda: _mcp_access_offline(cx, args.user))
    if args.json:
        print(json.dumps({k: r[k] for k in ("user", "groups", "rules")} | {"tools": [
            dict(zip(r["columns"], row)) for row in r["rows"]]}, indent=2))
        return
    rows = [[{True: "yes", False: "no", None: "?"}.get(v, v) if c == "allowed" else v
             for c, v in zip(r["columns"], row)] for row in r["rows"]]
    groups = ", ".join(r["groups"]) or "no group"
    rules = f"{r['rules']} mcp_access rule(s)" if r["rules"] else "no mcp_access rules: everything is everyone's"
    _table({"columns": r["columns"], "rows": rows}, f"MCP tools for {r['user']} ({groups}; {rules})")


def _mcp_access_offline(cx: Context, user: str) -> dict:
    import asyncio

    from ..mcp.access import ACCESS_COLUMNS, Caller, McpAccess, access_rows
    from ..mcp.gateway import LIST_BOUND
    from ..mcp.registry import McpRegistry

    users = cx.op("users.list")
    cols = users["columns"]
    row = next((dict(zip(cols, r)) for r in users["rows"] if r[cols.index("name")] == user), None)
    if row is None:
        raise OpError(f"no user {user!r}")
    caller = Caller(row["name"], tuple(row.get("groups") or ()))
    servers = cx.config.mcp_servers
    registry = McpRegistry(servers, cx.config.mcp, lambda uid, server: None)

    async def listings() -> dict:
        shared = [s for s in servers if not s.per_user]
        try:
            found = await asyncio.gather(*(registry.listing(s, str(row["id"]), LIST_BOUND) for s in shared))
        finally:
            await registry.aclose()  # its sessions, and stdio servers' processes
        out = {s.name: found[n] for n, s in enumerate(shared)}
        out.update({s.name: "per_user_token: listed with the user's own token by a running gateway only"
                    for s in servers if s.per_user_token})
        out.update({s.name: "oauth: listed with the user's sign-in by a running gateway only"
                    for s in servers if s.oauth})
        return out

    rows = access_rows(servers, asyncio.run(listings()), McpAccess(cx.config.mcp_access), caller,
                       cx.config.mcp.tool_name_max_length)
    return {"user": row["name"], "groups": list(caller.groups), "rules": len(cx.config.mcp_access),
            "columns": ACCESS_COLUMNS, "rows": rows}


_MCP_CALL_COLUMNS = ["created_at", "user", "client", "method", "server", "tool", "outcome", "duration_ms",
                     "result_bytes", "error", "session_id"]
_MCP_SUMMARY_COLUMNS = ["server", "tool", "method", "calls", "errors", "users", "avg_ms", "max_ms", "last_at"]


def _mcp_calls(args, cx: Context) -> None:
    """Recent MCP gateway calls (newest first), or with --summary the calls per server and tool, per user and the
    slowest."""
    filters = {k: v for k, v in (("since", args.since), ("user", args.user), ("server", args.server),
                                 ("tool", args.tool), ("outcome", args.outcome), ("client", args.client)) if v}
    if args.errors:
        filters["errors"] = "true"
    if args.summary:
        filters.setdefault("since", "7d")
        r = cx.op("report", kind="mcp_summary", filters=filters)
        if args.json:
            print(json.dumps({k: r[k] for k in ("data", "by_user", "slowest")}, indent=2, default=str))
            return
        _table({"columns": _MCP_SUMMARY_COLUMNS, "rows": [[d.get(c) for c in _MCP_SUMMARY_COLUMNS]
                                                          for d in r["data"]]},
               f"MCP calls per server and tool since {filters['since']}")
        ucols = ["user", "calls", "errors", "tools", "last_at"]
        _table({"columns": ucols, "rows": [[u.get(c) for c in ucols] for u in r["by_user"]]}, "per user")
        _table({"columns": _MCP_CALL_COLUMNS, "rows": [[d.get(c) for c in _MCP_CALL_COLUMNS] for d in r["slowest"]]},
               "slowest")
        return
    r = cx.op("report", kind="mcp_calls", filters=filters, limit=args.limit)
    if args.json:
        print(json.dumps(r["data"], indent=2, default=str))
        return
    _table({"columns": _MCP_CALL_COLUMNS, "rows": [[d.get(c) for c in _MCP_CALL_COLUMNS] for d in r["data"]]},
           "MCP calls" + (f" since {args.since}" if args.since else ""))


def _mcp_servers(args, cx: Context) -> None:
    _out(run_gateway_op(cx.db, "mcp.servers", {}, missing="what each MCP server offers is listed by the gateway"),
         args.json, "MCP servers")


def _replay(args, cx: Context) -> None:
    flows, recorded = replay_files(args.files, Path(args.db) if args.db else cx.db, cx.config.pricing)
    print(f"replayed {flows} flow(s): {recorded} interception(s) recorded into {args.db or cx.db}")


def _ca_path(args, cx: Context) -> None:
    print(ensure_ca(Path(args.confdir) if args.confdir else default_confdir()))


def _ca_export(args, cx: Context) -> None:
    _export_ca(Path(args.confdir) if args.confdir else default_confdir(), args.format, args.out)


def _env(args, cx: Context) -> None:
    confdir = Path(args.confdir) if args.confdir else default_confdir()
    if args.mode == "proxy":
        ensure_ca(confdir)
        bundle(confdir)
    url = args.gateway or gateway_url(cx.db)
    print("\n".join(env_lines(args.client, args.mode, url, args.token, confdir, args.user)))


def _replay_deadletters(args, cx: Context) -> None:
    from ..store import deadletters

    files = [Path(f) for f in args.file] or deadletters.files_for(cx.db, cx.config.storage.postgres)
    rows = []
    for path in files:
        r = deadletters.replay(path, lambda record: cx.op("store.apply_record", record=record))
        rows.append([r["file"], r["entries"], r["applied"], r["kept"], r["errors"][0] if r["errors"] else ""])
    _table({"columns": ["file", "entries", "applied", "kept", "first error"], "rows": rows}, "dead letters")
    if any(row[3] for row in rows):
        raise OpError("some dead letters are still refused; they stay in their file (see the first error)")


def _sql(args, cx: Context) -> None:
    _out(cx.op("sql", query_text=args.query), args.json, None)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every command names its handler (`run`)."""
    ap = argparse.ArgumentParser(prog="aibridge", description="aibridge gateway administration")
    ap.add_argument("--config", help="config file (default: $AIBRIDGE_CONFIG, else config/aibridge.yaml)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="sub", required=True)
    ua = users.add_parser("add", help="add a user")
    ua.add_argument("name")
    ua.add_argument("--admin", action="store_true", help="give the user the admin role")
    ua.add_argument("--service-account", action="store_true",
                    help="an agent platform's account (Coder Agents, a bot): may name the person it acts for in "
                         "X-Coder-Owner-Id or X-AIBridge-On-Behalf-Of; their budget is charged")
    ua.set_defaults(run=_users_add)
    ul = users.add_parser("list", help="list users")
    ul.add_argument("--json", action="store_true")
    ul.set_defaults(run=_users_list)
    sr = users.add_parser("set-role", help="make a user an admin or a member")
    sr.add_argument("name")
    sr.add_argument("role", choices=("admin", "member"))
    sr.set_defaults(run=_users_set_role)
    ug = users.add_parser("groups", help="a user's groups (policies test user.groups)").add_subparsers(
        dest="groups_cmd", required=True)
    gs = ug.add_parser("set", help="replace the user's groups: aibridge users groups set alice staff,ml "
                                   "('' clears them)")
    gs.add_argument("name")
    gs.add_argument("groups", help="comma-separated group names (lower-case letters, digits, '_', '.', '-'); "
                                   "an empty string clears them")
    gs.set_defaults(run=_users_groups_set)

    gr = sub.add_parser("groups", help="user groups").add_subparsers(dest="sub", required=True)
    gl = gr.add_parser("list", help="each group with its members")
    gl.add_argument("--json", action="store_true")
    gl.set_defaults(run=_groups_list)

    pr = sub.add_parser("prices", help="the price book: the database's prices over the pricing file's and "
                                       "the genai-prices package's (docs/prices.md)").add_subparsers(dest="sub",
                                                                                                   required=True)
    pset = pr.add_parser("set", help="set a model's price (USD per 1M tokens), winning over every other source")
    pset.add_argument("model")
    pset.add_argument("--input", type=float, required=True, help="USD per 1M input tokens (uncached)")
    pset.add_argument("--output", type=float, required=True, help="USD per 1M output tokens")
    pset.add_argument("--cache-read", type=float, help="USD per 1M cache-read tokens (default: --input)")
    pset.add_argument("--cache-write", type=float, help="USD per 1M cache-write tokens (default: --input)")
    pset.add_argument("--note", help="why (a negotiated rate, a fine-tune)")
    pset.set_defaults(run=_prices_set)
    pdel = pr.add_parser("delete", help="remove the database's price of a model")
    pdel.add_argument("model")
    pdel.set_defaults(run=_prices_delete)
    pls = pr.add_parser("list", help="the prices set in the database")
    pls.add_argument("--json", action="store_true")
    pls.set_defaults(run=_prices_list)
    psh = pr.add_parser("show", help="which price a model gets and where it comes from")
    psh.add_argument("model")
    psh.add_argument("--provider", help="provider type (anthropic, openai, gemini, bedrock…) when the name is "
                                        "ambiguous")
    psh.add_argument("--json", action="store_true")
    psh.set_defaults(run=_prices_show)

    bu = sub.add_parser("budgets", help="who may spend what (docs/budgets.md)").add_subparsers(dest="sub",
                                                                                                 required=True)
    bs = bu.add_parser("status", help="every user's use of their budgets in the current periods")
    bs.add_argument("--json", action="store_true")
    bs.add_argument("--detail", action="store_true", help="with --json: also each limit's use and forecast, and "
                                                          "the groups'")
    bs.set_defaults(run=_budgets_status)
    be = bu.add_parser("explain", help="which budget entry applies to a user, limit by limit, and why")
    be.add_argument("user")
    be.add_argument("--json", action="store_true")
    be.set_defaults(run=_budgets_explain)

    _policy_commands(sub)

    us = sub.add_parser("usage", help="tokens and cost, grouped")
    us.add_argument("--by", choices=("user", "person", "on_behalf_of", "group", "model", "client", "provider", "day",
                                     "week", "month"),
                    default="user", help="user: who called; person: whom it was for (acted-for, else the caller); "
                                         "group: the person's groups (a person in two counts in both)")
    us.add_argument("--since", default="30d", help="an age (7d, 24h) or an ISO date; default 30d")
    us.add_argument("--until", help="calls started before this ISO date (default: now)")
    us.add_argument("--csv", action="store_true", help="every row as CSV")
    us.add_argument("--json", action="store_true")
    us.set_defaults(run=_report)
    se = sub.add_parser("sessions", help="recent sessions: interceptions grouped by client session or thread")
    se.add_argument("--user")
    se.add_argument("--limit", type=int, default=50)
    se.add_argument("--all", action="store_true", help="count the prompts of the client's own calls too "
                    "(titles, routers, memory extraction)")
    se.add_argument("--json", action="store_true")
    se.set_defaults(run=_report)
    pr = sub.add_parser("prompts", help="recent user prompts, as the person typed them (raw text: --json's raw_prompt)")
    pr.add_argument("--user")
    pr.add_argument("--all", action="store_true", help="also the prompts of the client's own calls (titles, "
                    "routers, memory extraction), with their purpose")
    pr.add_argument("--search", help="case-insensitive text to look for")
    pr.add_argument("--limit", type=int, default=50)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(run=_report)
    ex = sub.add_parser("export", help="write the audit tables (or, with --focus, the spend as FOCUS 1.2) to parquet "
                                       "or csv files")
    ex.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    ex.add_argument("--out", required=True, help="directory to write into")
    ex.add_argument("--focus", action="store_true", help="the FinOps FOCUS 1.2 cost and usage format: one row per "
                                                         "day, person, model and provider (docs/spend.md)")
    ex.add_argument("--since", help="with --focus: calls started at or after (an age such as 30d, or an ISO date)")
    ex.add_argument("--until", help="with --focus: calls started before (an ISO date)")
    ex.set_defaults(run=_export)
    ms = sub.add_parser("migrate-store", help="copy the DuckDB audit, users and tokens into PostgreSQL (idempotent)")
    ms.add_argument("--to", help="postgresql://user@host:5432/db (default: storage.postgres)")
    ms.add_argument("--from", dest="source", help="the DuckDB file (default: storage.duckdb)")
    ms.add_argument("--json", action="store_true")
    ms.set_defaults(run=_migrate_store)
    pn = sub.add_parser("prune", help="delete records older than the retention period")
    pn.add_argument("--days", type=int, help="default: retention_days from the config (60)")
    pn.set_defaults(run=_prune)

    tokens = sub.add_parser("tokens", help="manage gateway tokens").add_subparsers(dest="sub", required=True)
    tc = tokens.add_parser("create", help="create a token; it is printed once, as the last line")
    tc.add_argument("--user", required=True)
    tc.add_argument("--name", help="a label for the token, e.g. the machine it is for")
    tc.set_defaults(run=_tokens_create)
    tl = tokens.add_parser("list", help="list tokens (never the secrets)")
    tl.add_argument("--user")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(run=_tokens_list)
    tr = tokens.add_parser("revoke", help="revoke a token by id")
    tr.add_argument("id")
    tr.set_defaults(run=_tokens_revoke)

    keys = sub.add_parser("keys", help="the running gateway's upstream key pools (keys: in a provider)"
                          ).add_subparsers(dest="sub", required=True)
    kl = keys.add_parser("list", help="each pooled key (masked) and whether it is ready, cooling down or disabled")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(run=_keys_list)
    kr = keys.add_parser("reset", help="make disabled and cooling keys usable again (after fixing them)")
    kr.add_argument("--provider", help="only this provider instance's pool")
    kr.set_defaults(run=_keys_reset)

    mt = sub.add_parser("mcp-token", help="per-user credentials for per_user_token MCP servers").add_subparsers(
        dest="sub", required=True)
    ms = mt.add_parser("set", help="store a user's token for a server (read from stdin, encrypted at rest)")
    ms.add_argument("--user", required=True)
    ms.add_argument("--server", required=True)
    ms.set_defaults(run=_mcp_token_set)
    md = mt.add_parser("delete", help="remove a user's token for a server")
    md.add_argument("--user", required=True)
    md.add_argument("--server", required=True)
    md.set_defaults(run=_mcp_token_delete)
    ml = mt.add_parser("list", help="list stored MCP tokens (hints only)")
    ml.add_argument("--user")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(run=_mcp_token_list)

    mg = sub.add_parser("mcp", help="the MCP gateway (/aibridge/mcp): who may call what, and every call made"
                        ).add_subparsers(dest="sub", required=True)
    ma = mg.add_parser("access", help="what a user may call, tool by tool, and why (mcp_access rules, server "
                                      "regexes, per-user tokens)")
    ma.add_argument("--user", required=True)
    ma.add_argument("--json", action="store_true")
    ma.set_defaults(run=_mcp_access)
    mc = mg.add_parser("calls", help="recent MCP gateway calls, newest first (--summary: per server and tool, per "
                                     "user, the slowest)")
    mc.add_argument("--since", help="an age (7d, 24h) or an ISO date (default: all; --summary: 7d)")
    mc.add_argument("--user", help="a user's name")
    mc.add_argument("--server")
    mc.add_argument("--tool", help="the server's own tool name")
    mc.add_argument("--outcome", choices=("ok", "error", "denied", "refused", "rate_limited", "unknown",
                                          "unavailable", "timeout", "sign_in"))
    mc.add_argument("--client", help="the MCP client's name, as it said in initialize")
    mc.add_argument("--errors", action="store_true", help="only calls that ended in an error")
    mc.add_argument("--limit", type=int, default=50)
    mc.add_argument("--summary", action="store_true")
    mc.add_argument("--json", action="store_true")
    mc.set_defaults(run=_mcp_calls)
    mv = mg.add_parser("servers", help="each MCP server as the running gateway last listed it (available or why "
                                       "not, what it offers)")
    mv.add_argument("--json", action="store_true")
    mv.set_defaults(run=_mcp_servers)
    mli = mg.add_parser("login", help="sign a user in to an oauth MCP server (OAuth 2.1: prints the address to open "
                                      "in a browser, waits until done); --list: who is signed in")
    mli.add_argument("--server")
    mli.add_argument("--user")
    mli.add_argument("--no-wait", action="store_true", help="print the address and return")
    mli.add_argument("--timeout", type=float, default=600, help="seconds to wait for the sign-in (default 600)")
    mli.add_argument("--list", action="store_true", help="who is signed in to which server (no secrets)")
    mli.add_argument("--json", action="store_true")
    mli.set_defaults(run=_mcp_login)
    mlo = mg.add_parser("logout", help="sign a user out of an oauth MCP server (deletes their tokens)")
    mlo.add_argument("--server", required=True)
    mlo.add_argument("--user", required=True)
    mlo.set_defaults(run=_mcp_logout)

    rp = sub.add_parser("replay", help="rebuild audit rows from captured flow files (idempotent)")
    rp.add_argument("files", nargs="+", help="mitmproxy flow files written by the capture option")
    rp.add_argument("--db", help="DuckDB file to write (default: storage.duckdb from the config)")
    rp.set_defaults(run=_replay)

    ca = sub.add_parser("ca", help="the gateway CA for proxy mode").add_subparsers(dest="sub", required=True)
    cp = ca.add_parser("path", help="print the CA certificate's path")
    cp.add_argument("--confdir")
    cp.set_defaults(run=_ca_path)
    ce = ca.add_parser("export", help="print the CA certificate (pem) or write it (p12)")
    ce.add_argument("--format", choices=("pem", "p12", "bundle"), default="pem",
                    help="pem: the CA; bundle: public CAs + the CA; p12: PKCS#12 (binary)")
    ce.add_argument("--out", help="write to this file instead of stdout")
    ce.add_argument("--confdir")
    ce.set_defaults(run=_ca_export)

    ev = sub.add_parser("env", help="print what a client must set to use the gateway, ready to paste")
    ev.add_argument("client", choices=list(GUIDES))
    ev.add_argument("--mode", choices=("base-url", "proxy"), default="base-url")
    ev.add_argument("--gateway", help="gateway URL (default: the running gateway's, else http://127.0.0.1:8080)")
    ev.add_argument("--token", default="<your aibridge token>")
    ev.add_argument("--user", default="user", help="user name to put in the proxy URL (informational)")
    ev.add_argument("--confdir")
    ev.set_defaults(run=_env)

    st = sub.add_parser("store", help="the audit store's own files").add_subparsers(dest="sub", required=True)
    rd = st.add_parser("replay-deadletters", help="apply records the database refused again (after fixing the cause); "
                       "applied ones leave the dead-letter file, a second run adds nothing")
    rd.add_argument("--file", action="append", default=[], help="a dead-letter file (default: the configured store's)")
    rd.set_defaults(run=_replay_deadletters)

    cf = sub.add_parser("config", help="check the configuration file; print its JSON Schema"
                        ).add_subparsers(dest="sub", required=True)
    cc = cf.add_parser("check", help="validate a config file (default: --config / $AIBRIDGE_CONFIG / "
                                     "config/aibridge.yaml); exit 1 with every problem named")
    cc.add_argument("file", nargs="?", help="the file to check (overrides --config)")
    cc.set_defaults(run=_config_check, standalone=True)
    cs = cf.add_parser("schema", help="the config file's JSON Schema, for editors (yaml-language-server)")
    cs.add_argument("--out", help="write to this file instead of stdout")
    cs.set_defaults(run=_config_schema, standalone=True)

    sq = sub.add_parser("sql", help="run read-only SQL over the audit tables")
    sq.add_argument("query")
    sq.add_argument("--json", action="store_true", help="print rows as JSON objects")
    sq.set_defaults(run=_sql)
    return ap


def _policy_commands(sub) -> argparse._SubParsersAction:
    """`aibridge policy …`: the policies' commands, one subcommand each (`decisions` reads the audit; checking and
    replaying rules add theirs here). Returns the subcommands' group."""
    policy = sub.add_parser("policy", help="policies: what their rules decided").add_subparsers(
        dest="sub", required=True)
    pd = policy.add_parser("decisions", help="recent policy decisions, newest first (--summary: counts per rule "
                                             "and action, and per user)")
    pd.add_argument("--since", help="an age (7d, 24h) or an ISO date (default: all; --summary: 7d)")
    pd.add_argument("--rule")
    pd.add_argument("--action", help="deny, route, redact, tag, allow, … as recorded (monitored decisions too)")
    pd.add_argument("--user", help="a user's name")
    pd.add_argument("--interception", help="one interception's id")
    pd.add_argument("--hook", choices=("request", "tool", "response"))
    mode = pd.add_mutually_exclusive_group()
    mode.add_argument("--enforced", dest="enforced", action="store_true", default=None, help="only enforced ones")
    mode.add_argument("--monitored", dest="enforced", action="store_false", help="only monitored (not enforced) ones")
    pd.add_argument("--limit", type=int, default=50)
    pd.add_argument("--summary", action="store_true")
    pd.add_argument("--json", action="store_true")
    pd.set_defaults(run=_policy_decisions, enforced=None)
    pc = policy.add_parser("check", help="compile a policies file (or a config's policies:) and list its rules; "
                                         "no database needed")
    pc.add_argument("file")
    pc.add_argument("--json", action="store_true")
    pc.set_defaults(run=_policy_check, standalone=True)
    pr = policy.add_parser("replay", help="what a candidate policy would have decided on the recorded audit, per "
                                          "rule and user (no traffic, no provider or guardrail call)")
    pr.add_argument("file")
    pr.add_argument("--since", default="7d", help="an age (7d, 24h) or an ISO date; default 7d")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(run=_policy_replay)
    return policy


def _policy_check(args, config_path: str | None) -> None:
    from ..policy.replay import describe, load_candidate
    from ..policy.rules import policy_version

    policies = load_candidate(args.file)
    listed = describe(policies)
    if args.json:
        print(json.dumps({"policy_version": policy_version(policies), "rules": listed}, indent=2))
        return
    print(f"{args.file}: ok; policy {policy_version(policies)}, mode {policies.mode}, "
          f"{len(policies.rules)} rule(s), {len(policies.guardrails)} guardrail(s)"
          + ("; redact_stored" if policies.redact_stored else ""))
    for r in listed:
        print(f"  {r['kind']} {r['name']}: hook {r['hook']}, {r['action']} ({r['mode']}, fails {r['fail']}): "
              f"{r['when']}")


def _policy_replay(args, cx: "Context") -> None:
    from ..policy.replay import CALLS_SQL, TOOLS_SQL, as_json, load_candidate, render, replay
    from ..store.reports import parse_time

    policies = load_candidate(args.file)
    since = parse_time("since", args.since).isoformat()
    calls, tools = (cx.op("sql", query_text=q.format(since=since)) for q in (CALLS_SQL, TOOLS_SQL))
    rows = [[dict(zip(r["columns"], row)) for row in r["rows"]] for r in (calls, tools)]
    report = replay(policies, *rows)
    print(as_json(report) if args.json else render(report, args.since))


def _config_check(args, config_path: str | None) -> None:
    """Validate a config file as the gateway would load it (no database, no running gateway needed)."""
    path = resolve_config_path(args.file or config_path)
    config = load_config(path)
    kinds = ", ".join(f"{p.name} ({p.type})" for p in config.providers) or "none"
    print(f"{path}: ok; providers: {kinds}")


def _config_schema(args, config_path: str | None) -> None:
    from .. import config_model

    text = json.dumps(config_model.schema(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o077)  # a database, export or CA file the CLI creates is readable by its owner only
    try:
        if getattr(args, "standalone", False):  # needs no loadable default config
            args.run(args, args.config)
            return 0
        args.run(args, Context(load_config(args.config)))
    except (OpError, ConfigError) as e:
        print(f"aibridge: {e}", file=sys.stderr)
        return 1
    return 0


def _budgets_spec(config) -> dict | None:
    """The configured budgets as plain data (they travel to a running gateway with the report request)."""
    from dataclasses import asdict

    b = config.budgets
    if not b.any:
        return None
    return {"default": asdict(b.default), "users": {k: asdict(v) for k, v in b.users.items()},
            "groups": {k: asdict(v) for k, v in b.groups.items()}}


def _export_ca(confdir: Path, fmt: str, out: str | None) -> None:
    cert = ensure_ca(confdir)
    if fmt == "p12":
        data = (confdir / CA_P12).read_bytes()
    elif fmt == "bundle":
        data = bundle(confdir).read_bytes()
    else:
        data = cert.read_bytes()
    if out:
        Path(out).write_bytes(data)
        print(f"wrote {out}", file=sys.stderr)
    elif fmt == "p12":
        if sys.stdout.isatty():
            raise OpError("p12 is binary: use --out FILE or redirect stdout")
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data.decode())


def replay_files(files: list[str], db: Path, pricing: Path | None = None) -> tuple[int, int]:
    """Re-run recording over saved flows into db. Ids come from the flows, so a second run adds nothing. Costs come
    from the price book the gateway uses (the database's prices, `pricing`, the package's data), as when live."""
    import duckdb
    from mitmproxy import http, io
    from mitmproxy.exceptions import FlowReadException

    from ..flow.recorder import Recorder
    from ..store.writer import Store

    store = Store(db)
    try:
        store.open()
    except duckdb.IOException as e:
        raise OpError(f"cannot open {db}: {str(e).splitlines()[0]} (replay into a database no gateway is using)") from None
    from ..pricing import Price, PriceTable

    recorder = Recorder(store)
    overrides = {m: Price(i, o, r, w, "database") for m, i, o, r, w in store.run("prices").result()}
    recorder.prices = PriceTable.load(pricing, overrides)
    flows = recorded = 0
    try:
        for name in files:
            try:
                with open(name, "rb") as f:
                    for flow in io.FlowReader(f).stream():
                        if isinstance(flow, http.HTTPFlow):
                            flows += 1
                            recorded += recorder.replay(flow) is not None
            except (OSError, FlowReadException) as e:
                raise OpError(f"{name}: {e}") from None
    finally:
        store.close()
    return flows, recorded


def _out(result: dict, as_json: bool, title: str | None, lists: str | None = None) -> None:
    """Rows as JSON objects, or a table (`lists`: how a list value is joined in the table, else shown as JSON)."""
    if as_json:
        cols = result["columns"]
        print(json.dumps([dict(zip(cols, r)) for r in result["rows"]], indent=2))
    else:
        if lists is not None:
            result = {**result, "rows": [[lists.join(map(str, v)) if isinstance(v, list) else v for v in row]
                                         for row in result["rows"]]}
        _table(result, title)


if __name__ == "__main__":
    sys.exit(main())
