"""The admin HTTP API under /aibridge/api/v1/: admins see everything, other users only their own data.

Queries run where the store is (the writer process, never on the event loop); errors are JSON with a message, bad filters are
400s naming the parameter.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from mitmproxy import http

from ..policy.auth import TokenDirectory, credential_from_headers
from ..pricing import PriceTable
from ..store.ops import OpError
from ..store.reports import DECISION_FILTERS, MCP_CALL_FILTERS, BadParameter, Viewer, parse_limit, rows_csv
from ..store.writer import StoreApi

PREFIX = "/aibridge/api/v1/"
FILTERS = ("initiator", "on_behalf_of", "provider", "model", "client", "started_after", "started_before", "session")


def _flag(name: str, value: str | None) -> bool:
    if value in (None, "", "false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise BadParameter(name, "must be true or false")


def json_response(status: int, obj) -> http.Response:
    return http.Response.make(status, json.dumps(obj).encode(), {"content-type": "application/json",
                                                                  "cache-control": "no-store"})


def csv_response(route: str, result) -> http.Response:
    """A report's rows (`data`) as a CSV download (store/reports.py `rows_csv`)."""
    rows = result.get("data", []) if isinstance(result, dict) else []
    name = route.replace("/", "-") or "report"
    return http.Response.make(200, rows_csv(rows).encode(), {
        "content-type": "text/csv; charset=utf-8", "cache-control": "no-store",
        "content-disposition": f'attachment; filename="aibridge-{name}.csv"'})


def error(status: int, message: str, parameter: str | None = None) -> http.Response:
    body = {"error": {"message": message}}
    if parameter:
        body["error"]["parameter"] = parameter
    return json_response(status, body)


class AdminApi:
    def __init__(self, store: StoreApi, tokens: TokenDirectory, prices: PriceTable, pricing: Path | None = None) -> None:
        self.store, self.tokens, self.prices = store, tokens, prices
        self.pricing = str(pricing) if pricing else None  # the writer process loads the same price table
        self.mcp_status = None  # () -> each MCP server's state (registry.status), set by the runtime
        self.budget_report = None  # (user id or None) -> budget use of users and groups (policy/budgets.py)
        self.mcp_oauth = None  # mcp.oauth.McpOAuth (sign-ins to oauth MCP servers), set by the runtime
        self.mcp_registry = lambda: None  # () -> the MCP registry now

    async def handle(self, flow: http.HTTPFlow) -> http.Response:
        req = flow.request
        actor = self.tokens.lookup(credential_from_headers(req.headers))
        if actor is None:
            return error(401, "a valid aibridge token is required (Authorization: Bearer <token>)")
        parts = urlsplit(req.path)
        route = parts.path[len(PREFIX):].strip("/")
        if route.startswith("mcp/oauth/"):
            return await self._oauth(req, actor, route)
        if req.method != "GET":
            return error(405, f"{req.method} is not supported")
        viewer = Viewer.everyone() if actor.role == "admin" else Viewer(actor.user_id)
        q = dict(parse_qsl(parts.query))
        try:
            if route == "me":  # as the gateway's directory knows the caller now
                return json_response(200, {"user": actor.user_name, "id": actor.user_id, "role": actor.role,
                                           "groups": list(actor.groups)})
            if route in ("policy/decisions", "policy/decisions/summary"):
                return json_response(200, await self._decisions(route, viewer, q))
            if route in ("mcp/calls", "mcp/calls/summary"):
                return json_response(200, await self._mcp_calls(route, viewer, q))
            if route == "budgets":  # budget use in the current periods: an admin everyone's, a member their own
                if set(q) - {"format"}:
                    raise BadParameter(sorted(set(q) - {"format"})[0], "unknown parameter")
                report = self.budget_report(viewer.user_id) if self.budget_report is not None else \
                    {"users": [], "groups": []}
                if q.get("format") == "csv":
                    return csv_response("budgets", {"data": report["users"]})
                return json_response(200, report)
            if route == "mcp/servers":
                if q:
                    raise BadParameter(sorted(q)[0], "unknown parameter")
                servers = self.mcp_status() if self.mcp_status is not None else []
                if not viewer.admin:  # members see which servers work, not where they are
                    servers = [{k: v for k, v in s.items() if k not in ("url", "command")} for s in servers]
                if any(s.get("oauth") for s in servers):  # who is signed in: admins a count, members themselves
                    signed = await asyncio.wrap_future(self.store.run(
                        "mcp_oauth.list", user=None if viewer.admin else actor.user_name))
                    per_server: dict[str, int] = {}
                    for row in signed["rows"]:
                        per_server[row[1]] = per_server.get(row[1], 0) + 1
                    servers = [{**s, "signed_in": (per_server.get(s["server"], 0) if viewer.admin else
                                                   bool(per_server.get(s["server"])))} if s.get("oauth") else s
                               for s in servers]
                return json_response(200, {"data": servers})
            if route in ("users", "groups"):
                if q:
                    raise BadParameter(sorted(q)[0], "unknown parameter")
                return json_response(200, await self._query(route, viewer, {}))
            unknown = set(q) - set(FILTERS) - {"limit", "cursor", "group_by", "since", "until", "prefix", "stack",
                                               "bucket", "format", "include_auxiliary"}
            if unknown:
                name = sorted(unknown)[0]
                raise BadParameter(name, "unknown parameter")
            filters = {k: q[k] for k in FILTERS if q.get(k)}
            if route == "interceptions":
                result = await self._query("interceptions", viewer, filters, limit=parse_limit(q.get("limit")),
                                           cursor=q.get("cursor"))
            elif route.startswith("interceptions/"):
                iid = route.split("/", 1)[1]
                result = await self._query("interception", viewer, filters, id=iid)
                if result is None:
                    return error(404, f"no interception {iid!r}")
            elif route == "sessions":
                result = await self._query("sessions", viewer, filters, limit=parse_limit(q.get("limit")),
                                           include_auxiliary=_flag("include_auxiliary", q.get("include_auxiliary")))
            elif route.startswith("sessions/"):
                sid = urllib.parse.unquote(route.split("/", 1)[1])
                result = await self._query("session", viewer, filters, id=sid)
                if result is None:
                    return error(404, f"no session {sid!r}")
            elif route == "usage":
                result = await self._query("usage", viewer, filters, group_by=q.get("group_by", "user"),
                                           since=q.get("since"), until=q.get("until"))
            elif route == "usage/timeseries":
                result = await self._query("usage/timeseries", viewer, filters, stack=q.get("stack", "model"),
                                           since=q.get("since", "30d"), until=q.get("until"),
                                           bucket=q.get("bucket", "day"))
            elif route in ("clients", "models"):
                result = await self._query(route[:-1], viewer, filters, prefix=q.get("prefix"))
            else:
                return error(404, f"unknown endpoint {parts.path}")
        except BadParameter as e:
            return error(400, str(e), e.name)
        if q.get("format") == "csv":  # every table as CSV, for spreadsheets (the dashboard's download buttons)
            return csv_response(route, result)
        if q.get("format") not in (None, "", "json"):
            return error(400, "format must be json or csv", "format")
        return json_response(200, result)

    async def _oauth(self, req, actor, route: str) -> http.Response:
        """OAuth sign-ins to MCP servers: `POST mcp/oauth/login` {server, user} starts one (the address to open),
        `GET mcp/oauth/login/<id>` says how it went, `GET mcp/oauth/signins` lists who is signed in, `POST
        mcp/oauth/logout` {server, user} signs out. Members act for themselves only (`user` unset or their own)."""
        from ..mcp.oauth import OAuthError
        from ..mcp.registry import Unavailable

        admin = actor.role == "admin"
        if route in ("mcp/oauth/login", "mcp/oauth/logout"):
            if req.method != "POST":
                return error(405, f"{req.method} is not supported (POST)")
            try:
                body = json.loads(req.content or b"{}")
            except ValueError:
                return error(400, "the body is not JSON")
            if not isinstance(body, dict) or not isinstance(body.get("server"), str):
                return error(400, "server is required", "server")
            user = body.get("user") or actor.user_name
            if not isinstance(user, str):
                return error(400, "user must be a user's name", "user")
            if user != actor.user_name and not admin:
                return error(403, "members sign in and out for themselves only")
            try:
                if route == "mcp/oauth/login":
                    if self.mcp_oauth is None:
                        return error(404, "no MCP servers are configured")
                    login = await self.mcp_oauth.start_named(self.mcp_registry(), body["server"], user)
                    return json_response(200, {k: login[k] for k in ("id", "url", "server", "user", "expires_at")})
                out = await asyncio.wrap_future(self.store.run("mcp_oauth.logout", True, user=user,
                                                               server=body["server"]))
                if self.mcp_oauth is not None:  # this process stops using the tokens at once
                    self.mcp_oauth.forget_all()
                return json_response(200, out)
            except (OAuthError, OpError) as e:
                return error(400, str(e))
            except Unavailable as e:
                return error(503, str(e))
        if req.method != "GET":
            return error(405, f"{req.method} is not supported")
        if route.startswith("mcp/oauth/login/") and self.mcp_oauth is not None:
            try:
                status = await self.mcp_oauth.status(route.rsplit("/", 1)[1])
            except OAuthError as e:
                return error(404, str(e))
            if not admin and status.get("user") != actor.user_name:
                return error(404, "no such sign-in")
            return json_response(200, status)
        if route == "mcp/oauth/signins":
            return json_response(200, await asyncio.wrap_future(self.store.run(
                "mcp_oauth.list", user=None if admin else actor.user_name)))
        return error(404, f"unknown endpoint {req.path.split('?')[0]}")

    async def _decisions(self, route: str, viewer: Viewer, q: dict):
        """Policy decisions (newest first) or their counts per rule and action and per user; `since` defaults to
        seven days for the counts."""
        unknown = set(q) - set(DECISION_FILTERS) - ({"limit"} if route == "policy/decisions" else set())
        if unknown:
            raise BadParameter(sorted(unknown)[0], "unknown parameter")
        filters = {k: q[k] for k in DECISION_FILTERS if q.get(k)}
        if route == "policy/decisions":
            return await self._query(route, viewer, filters, limit=parse_limit(q.get("limit")))
        filters.setdefault("since", "7d")
        return await self._query(route, viewer, filters)

    async def _mcp_calls(self, route: str, viewer: Viewer, q: dict):
        """MCP gateway calls (newest first), or their counts per server and tool, per user and the slowest;
        `since` defaults to seven days for the counts."""
        unknown = set(q) - set(MCP_CALL_FILTERS) - ({"limit"} if route == "mcp/calls" else set())
        if unknown:
            raise BadParameter(sorted(unknown)[0], "unknown parameter")
        filters = {k: q[k] for k in MCP_CALL_FILTERS if q.get(k)}
        if route == "mcp/calls":
            return await self._query(route, viewer, filters, limit=parse_limit(q.get("limit")))
        filters.setdefault("since", "7d")
        return await self._query(route, viewer, filters)

    async def _query(self, route: str, viewer: Viewer, filters: dict, **params):
        """One report, run where the store is (in the writer process) with plain-value arguments."""
        return await asyncio.wrap_future(self.store.run(
            "admin_query", route=route, viewer=viewer.user_id, filters=filters, pricing=self.pricing, **params))
