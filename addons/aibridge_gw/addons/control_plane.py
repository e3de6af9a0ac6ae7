"""The `ControlPlane` addon: the gateway's own endpoints under /aibridge — health, dashboard, Prometheus
metrics, the admin API and the CLI's control endpoint. Only requests addressed to the gateway itself (see
`ProxyMode.is_ours`) get here; nothing under /aibridge is ever relayed."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import os
from pathlib import Path

from mitmproxy import ctx, http

from ..admin.api import PREFIX as API_PREFIX
from ..admin.api import error as api_error
from ..admin.gateway_client import CONTROL_PATH
from ..flow.errors import error_response
from ..flow.state import HANDED_OFF
from ..mcp.access import ACCESS_COLUMNS, Caller, access_rows
from ..mcp.gateway import LIST_BOUND, MCP_PATH
from ..mcp.oauth import CALLBACK_PATH as OAUTH_CALLBACK_PATH
from ..mcp.oauth import OAuthError
from ..mcp.registry import Unavailable
from ..policy.auth import credential_from_headers
from ..store import ops
from .mcp_front import METADATA_PATHS, McpFront
from .proxy_mode import ProxyMode
from .runtime import Runtime

log = logging.getLogger("aibridge")

DASHBOARD = Path(__file__).parents[1] / "dashboard" / "index.html"
DASHBOARD_JS = Path(__file__).parents[1] / "dashboard" / "dashboard.js"
DASHBOARD_HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' "
                                "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                                "form-action 'none'"),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class ControlPlane:
    def __init__(self, runtime: Runtime, proxy: ProxyMode, health) -> None:
        self.rt = runtime
        self.proxy = proxy
        self.health = health  # Housekeeping: event-loop and GC stall counters
        self.mcp = McpFront(runtime, proxy)  # /aibridge/mcp: the MCP gateway's front door

    def request(self, flow: http.HTTPFlow):
        """Sync, returning a coroutine only for /aibridge requests: this hook runs for every request."""
        if flow.response is not None or self.rt.router is None or not flow.live:
            return None
        path = flow.request.path
        bare = path.split("?")[0]
        if not (path.startswith("/aibridge/") or bare == "/aibridge" or bare in METADATA_PATHS) \
                or not self.proxy.is_ours(flow):
            return None
        return self._request(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The MCP gateway's notification stream is relayed as it comes (it never ends by itself)."""
        if flow.metadata.get(HANDED_OFF) == "mcp" and flow.response is not None \
                and flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True

    async def _request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._answer(flow)
        except Exception:
            log.exception("aibridge: a control-plane request failed")
            flow.response = error_response(None, 500, "aibridge: internal error")

    async def _answer(self, flow: http.HTTPFlow) -> None:
        req, rt = flow.request, self.rt
        path = req.path.split("?")[0]
        if path == "/aibridge/healthz":
            self._health(flow)
        elif path == "/aibridge/readyz":
            self._ready(flow)
        elif path in ("/aibridge", "/aibridge/", "/aibridge/dashboard"):
            flow.response = http.Response.make(200, DASHBOARD.read_bytes(), {
                "content-type": "text/html; charset=utf-8", **DASHBOARD_HEADERS})
        elif path == "/aibridge/dashboard.js":
            flow.response = http.Response.make(200, DASHBOARD_JS.read_bytes(), {
                "content-type": "text/javascript; charset=utf-8", **DASHBOARD_HEADERS})
        elif path == MCP_PATH:
            await self.mcp.answer(flow)
        elif path == OAUTH_CALLBACK_PATH:
            await self.mcp.oauth_callback(flow)
        elif path in METADATA_PATHS:
            self.mcp.metadata(flow)
        elif path == "/aibridge/metrics":
            if rt.config.metrics.token is not None:
                given = credential_from_headers(req.headers) or ""
                if not hmac.compare_digest(given.encode(), rt.config.metrics.token.encode()):
                    flow.response = http.Response.make(401, b"aibridge: metrics need a bearer token\n",
                                                       {"www-authenticate": 'Bearer realm="aibridge-metrics"'})
                    return
            flow.response = http.Response.make(200, rt.metrics.render(), {"content-type": rt.metrics.content_type})
        elif path.startswith(API_PREFIX) or path == API_PREFIX.rstrip("/"):
            await self._admin_api(flow)
        elif path == CONTROL_PATH and req.method == "POST":
            await self._control_op(flow)
        else:
            flow.response = error_response(None, 404, f"unknown endpoint {path}")

    def _health(self, flow: http.HTTPFlow) -> None:
        req, rt = flow.request, self.rt
        if "reset" in req.path.partition("?")[2]:
            # Counters are evidence (stalls, dead letters): only an admin may zero them.
            actor = rt.check_token(flow, credential_from_headers(req.headers), None)
            if flow.response is not None:
                return
            if actor is None or actor.role != "admin":
                flow.response = api_error(403 if actor else 401, "resetting health counters needs an admin token")
                return
        store = rt.store
        dead = store.dead_lettered if store else 0
        recording = rt.store_health()
        # ok: everything records. degraded: calls are served and their records held (a balancer keeps this
        # gateway). refusing (storage.on_failure: refuse) and unavailable (no store process): 503.
        if recording["refusing"]:
            status = "refusing"
        elif store is None or (not store.alive and store.journal_error):
            status = "unavailable"  # nothing takes records: not even this process's journal
        else:  # a writer being restarted while calls are served and journaled is degraded, not down
            status = "degraded" if recording["reasons"] else "ok"
        reasons = recording.pop("reasons")
        flow.response = _json(503 if status in ("refusing", "unavailable") else 200, {
            "status": status, "reasons": reasons, "store": recording, "inflight": len(rt.inflight),
            "records_written": store.written if store else 0,
            "records_failed": dead, "records_dead_lettered": dead,
            "stale_interceptions_closed": store.stale_closed if store else 0,
            "event_loop_lag_max_ms": round(self.health.loop_lag_max * 1000, 2),
            "gc_pause_max_ms": round(self.health.gc_pause_max * 1000, 2),
            "connections": len(getattr(ctx.master.addons.get("proxyserver"), "connections", ())),
            "websockets": len(getattr(getattr(ctx.master.addons.get("pipeline"), "sockets", None), "open", ())),
            "loopback_jobs": len(rt.loopback.jobs) if rt.loopback is not None else 0,
            "tasks": len(asyncio.all_tasks()),
            "worker": rt.worker, "pid": os.getpid(),  # which process answered (`scripts/run --workers N`)
        })
        if "reset_lag=1" in req.path:
            self.health.loop_lag_max = self.health.gc_pause_max = 0.0

    def _ready(self, flow: http.HTTPFlow) -> None:
        """For balancers: 200 once the config, the store and the CA are loaded and model calls are taken (not
        while `storage.on_failure: refuse` refuses them). A writer being restarted does not make a serving gateway
        unready: its calls are journaled, and a balancer that took it out would leave it nothing to recover with."""
        rt = self.rt
        missing = []
        if rt.config is None or rt.router is None:
            missing.append("config not loaded")
        if rt.store is None:
            missing.append("store not open")
        elif rt.store_health()["refusing"]:
            missing.append("refusing model calls: the store cannot record them")
        confdir = Path(os.path.expanduser(ctx.options.confdir))
        if not (confdir / "mitmproxy-ca.pem").exists():
            missing.append("CA not loaded")
        flow.response = _json(503 if missing else 200, {"status": "not ready" if missing else "ready",
                                                        "reasons": missing, "worker": rt.worker, "pid": os.getpid()})

    async def _admin_api(self, flow: http.HTTPFlow) -> None:
        rt = self.rt
        if rt.tokens.lookup(credential_from_headers(flow.request.headers)) is None:
            if rt.auth_failed(flow, None):
                return
        else:
            await self._flushed()  # read your writes: what finished before this query is in its answer
        try:
            flow.response = await rt.api.handle(flow)
        except Exception as e:
            log.exception("admin API failed")
            flow.response = api_error(500, f"{type(e).__name__}: {e}")

    async def _control_op(self, flow: http.HTTPFlow) -> None:
        """The CLI's store operations, run by the gateway's own writer (DuckDB allows one writing process)."""
        req, rt = flow.request, self.rt
        given = credential_from_headers(req.headers) or ""
        if not rt.control_secret or not hmac.compare_digest(given.encode(), rt.control_secret.encode()):
            flow.response = error_response(None, 401, "control endpoint: bad or missing secret")
            return
        try:
            payload = json.loads(req.content or b"")
            name, args = payload["op"], payload.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
            if name in self.memory_ops:
                result = self.memory_ops[name](**args)
                if inspect.isawaitable(result):
                    result = await result
                flow.response = _json(200, {"result": result})
                return
            _, writes = ops.OPS[name]  # the CLI's operations only, never the gateway's own
        except (ValueError, KeyError, TypeError) as e:
            flow.response = error_response(None, 400, f"bad control request: {e}")
            return
        if not writes:
            await self._flushed()
        try:
            result = await asyncio.wrap_future(rt.store.run(name, writes, **args))
            if name == "mcp_oauth.logout":  # this process stops using the tokens at once (others within seconds)
                rt.mcp_oauth.forget_all()
            if writes:
                await rt.reload_directory()
        except (ops.OpError, TypeError) as e:
            flow.response = error_response(None, 400, str(e))
            return
        except Exception as e:
            log.exception("control op failed")
            flow.response = error_response(None, 500, f"{type(e).__name__}: {e}")
            return
        flow.response = _json(200, {"result": result})

    @property
    def memory_ops(self) -> dict:
        """Operations on the gateway's memory rather than the store (the CLI's `aibridge keys`)."""
        return {"keys.list": self._keys_list, "keys.reset": self._keys_reset, "mcp.access": self._mcp_access,
                "mcp.servers": self._mcp_servers, "mcp.login": self._mcp_login,
                "mcp.login_status": self._mcp_login_status}

    async def _mcp_login(self, server: str, user: str) -> dict:
        """Start a user's OAuth sign-in to an oauth MCP server (`aibridge mcp login`): the address to open."""
        try:
            return await self.rt.mcp_oauth.start_named(self.rt.mcp, server, user)
        except (OAuthError, Unavailable) as e:
            raise TypeError(str(e)) from None

    async def _mcp_login_status(self, id: str) -> dict:
        try:
            return await self.rt.mcp_oauth.status(id)
        except (OAuthError, Unavailable) as e:
            raise TypeError(str(e)) from None

    async def _mcp_access(self, user: str) -> dict:
        """What `user` may call through the MCP gateway and why (`aibridge mcp access`), with the tools every
        server lists for them now (waited for LIST_BOUND seconds at most)."""
        rt = self.rt
        users = await asyncio.wrap_future(rt.store.run("users.list"))
        cols = users["columns"]
        row = next((dict(zip(cols, r)) for r in users["rows"] if r[cols.index("name")] == user), None)
        if row is None:
            raise TypeError(f"no user {user!r}")
        caller = Caller(row["name"], tuple(row.get("groups") or ()))
        servers = rt.mcp.servers if rt.mcp is not None else ()
        found = await asyncio.gather(*(rt.mcp.listing(s, str(row["id"]), LIST_BOUND) for s in servers))
        listings = {s.name: found[n] for n, s in enumerate(servers)}
        return {"user": row["name"], "groups": list(caller.groups), "rules": len(rt.config.mcp_access),
                "columns": ACCESS_COLUMNS, "rows": access_rows(servers, listings, rt.mcp_access, caller,
                                                                 rt.config.mcp.tool_name_max_length)}

    async def _mcp_servers(self) -> dict:
        rows = self.rt.mcp.status() if self.rt.mcp is not None else []
        if any(r["oauth"] for r in rows):  # how many users are signed in to each oauth server
            signed = await asyncio.wrap_future(self.rt.store.run("mcp_oauth.list"))
            for r in rows:
                r["signed_in"] = sum(1 for s in signed["rows"] if s[1] == r["server"]) if r["oauth"] else None
        cols = ["server", "available", "tools", "resources", "prompts", "per_user_token", "oauth", "signed_in",
                "error", "transport", "url"]
        return {"columns": cols, "rows": [[r.get(c) if c != "url" else r.get("url") or r.get("command") for c in cols]
                                          for r in rows]}

    def _keys_list(self) -> dict:
        rows = [k for pool in self.rt.pools.values() for k in pool.status()]
        cols = ["provider", "key", "state", "retry_in", "reason"]
        if self.rt.keyboard is not None:  # `--workers N`: each worker's pools (its own failovers)
            rows, cols = self.rt.keyboard.everyone(rows), ["worker", *cols]
        return {"columns": cols, "rows": [[r[c] for c in cols] for r in rows]}

    def _keys_reset(self, provider: str | None = None) -> dict:
        pools = self.rt.pools
        if provider is not None and provider not in pools:
            raise TypeError(f"provider {provider!r} has no key pool (pools: {', '.join(pools) or 'none'})")
        if self.rt.keyboard is not None:  # the other workers apply it within a second
            self.rt.keyboard.request_reset(provider)
        return {"reset": sum(p.reset() for name, p in pools.items() if provider in (None, name)),
                "workers": self.rt.keyboard is not None}

    async def _flushed(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until records queued so far are committed, so a query sees finished interceptions."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.rt.store.flush()), timeout)
        except (asyncio.TimeoutError, Exception) as e:
            log.warning("aibridge: records not flushed before a query (%s); it may miss the newest", type(e).__name__)


def _json(status: int, obj) -> http.Response:
    return http.Response.make(status, json.dumps(obj).encode(), {"content-type": "application/json"})
