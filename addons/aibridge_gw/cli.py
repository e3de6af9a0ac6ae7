"""`aibridge` command line: users, tokens and read-only SQL over the audit tables.

Works the same whether or not the gateway runs: a running gateway owns the DuckDB file and executes the
operation for the CLI (see control.py), so token changes take effect at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import ConfigError, load_config
from .control import run_op
from .store.ops import OpError


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aibridge", description="aibridge gateway administration")
    ap.add_argument("--config", help="config file (default: $AIBRIDGE_CONFIG, else config/aibridge.yaml)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="sub", required=True)
    ua = users.add_parser("add", help="add a user")
    ua.add_argument("name")
    ua.add_argument("--admin", action="store_true", help="give the user the admin role")
    users.add_parser("list", help="list users").add_argument("--json", action="store_true")

    tokens = sub.add_parser("tokens", help="manage gateway tokens").add_subparsers(dest="sub", required=True)
    tc = tokens.add_parser("create", help="create a token; it is printed once, as the last line")
    tc.add_argument("--user", required=True)
    tc.add_argument("--name", help="a label for the token, e.g. the machine it is for")
    tl = tokens.add_parser("list", help="list tokens (never the secrets)")
    tl.add_argument("--user")
    tl.add_argument("--json", action="store_true")
    tokens.add_parser("revoke", help="revoke a token by id").add_argument("id")

    sq = sub.add_parser("sql", help="run read-only SQL over the audit tables")
    sq.add_argument("query")
    sq.add_argument("--json", action="store_true", help="print rows as JSON objects")

    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
        db = config.duckdb_path

        def op(_op: str, **kw: Any) -> Any:
            return run_op(db, _op, kw)

        if args.cmd == "users" and args.sub == "add":
            r = op("users.add", name=args.name, role="admin" if args.admin else "member")
            print(f"added user {r['name']} ({r['role']}), id {r['id']}")
        elif args.cmd == "users" and args.sub == "list":
            _out(op("users.list"), args.json, "users")
        elif args.cmd == "tokens" and args.sub == "create":
            r = op("tokens.create", user=args.user, name=args.name)
            print(f"created token {r['id']} for {r['user']} ({r['hint']}); it is shown only now:", file=sys.stderr)
            print(r["token"])
        elif args.cmd == "tokens" and args.sub == "list":
            _out(op("tokens.list", user=args.user), args.json, "tokens")
        elif args.cmd == "tokens" and args.sub == "revoke":
            r = op("tokens.revoke", id=args.id)
            print(f"token {r['id']} {'was already' if r['already'] else 'is now'} revoked")
        elif args.cmd == "sql":
            _out(op("sql", query_text=args.query), args.json, None)
    except (OpError, ConfigError) as e:
        print(f"aibridge: {e}", file=sys.stderr)
        return 1
    return 0


def _out(result: dict, as_json: bool, title: str | None) -> None:
    if as_json:
        cols = result["columns"]
        print(json.dumps([dict(zip(cols, r)) for r in result["rows"]], indent=2))
    else:
        _table(result, title)


if __name__ == "__main__":
    sys.exit(main())
