"""The mitmproxy addon: route → identify → relay + tap → record (→ capture). Wire formats live in apis/,
rows in recording.py; this class only connects mitmproxy's hooks to them."""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import json
import logging
import os
import time
from pathlib import Path

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.log import LegacyLogEvents
from mitmproxy.net.http.url import hostport

from .auth import (
    CREDENTIAL_HEADERS,
    GATEWAY_TOKEN_HEADERS,
    Actor,
    AuthRefused,
    Identity,
    TokenDirectory,
    credential_from_headers,
    identify,
    mask,
    proxy_token,
)
from . import bodies
from .budgets import Budgets
from .capture import FlowArchive
from .clients import detect_client, detect_session
from .apis import MODEL_APIS, WIRE_APIS
from .tap import StreamTap
from .egress import EgressPolicy, local_addresses
from .logsafe import printable
from .throttle import AuthThrottle
from .config import Config, ConfigError, Limits, load_config
from .control import CONTROL_PATH, remove_runtime_file, write_runtime_file
from .breaker import CircuitBreakers, is_failure
from .errors import error_response
from .upstream_faults import ClientEnding, UpstreamWatch
from .records import BadRequest, ResponseSummary
from .recording import META_KEY, NOT_JSON, NOT_OBJECT, Interception, Recorder, at, conclude, is_json, is_sse
from . import patches
from .patches import ABSOLUTE, ORIGIN, request_form
from .routing import BadPath, Route, Router
from .admin_api import PREFIX as API_PREFIX
from .admin_api import AdminApi
from .admin_api import error as api_error
from .interception_log import InterceptionLog
from .metrics import Metrics
from .pricing import PriceTable
from .mcp.loop import LoopJob, LoopServer, upstream_headers
from .mcp.registry import McpRegistry
from .store import ops
from .store.writer import Store

log = logging.getLogger("aibridge")
# One line per interception. Wired to the terminal handlers directly (see `running`): through the root logger
# every record also becomes mitmproxy's deprecated `add_log` hook, a cross-thread call and a dispatch to every
# addon — too much to pay on each request.
interception_log = logging.getLogger("aibridge.interceptions")


def tune_logging() -> None:
    """Process-wide logging settings, applied when mitmproxy loads the addon (never at import: the CLI and
    tests import this module too)."""
    # The optimisations the logging HOWTO documents: no caller-frame walk, thread or process lookup per record
    # (mitmproxy's formatters print none of them).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # Libraries used by the MCP loop log every request at INFO; the gateway logs what matters itself.
    for noisy in ("httpx", "httpcore", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

DASHBOARD = Path(__file__).parent / "dashboard" / "index.html"
DASHBOARD_JS = Path(__file__).parent / "dashboard" / "dashboard.js"
DASHBOARD_HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' "
                                "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                                "form-action 'none'"),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
PROXY_AUTH_REQUIRED = {"proxy-authenticate": 'Basic realm="aibridge"'}
OFF_LOOP_BYTES = 256 * 1024  # request bodies larger than this are decoded and parsed on a worker thread


class Gateway:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.router: Router | None = None
        self.store: Store | None = None
        self.recorder: Recorder | None = None
        self.archive: FlowArchive | None = None
        self.mcp: McpRegistry | None = None
        self.loop: LoopServer | None = None
        self.mcp_tokens: dict[tuple[str, str], str] = {}
        self.metrics: Metrics | None = None
        self.api: AdminApi | None = None
        self.json_log: InterceptionLog | None = None
        self._retention: asyncio.Task | None = None
        self.budgets: Budgets | None = None
        self.breakers: CircuitBreakers | None = None
        self.loop_lag_max = 0.0  # longest event-loop stall seen (seconds), for operators and scripts/bench
        self.gc_pause_max = 0.0  # longest garbage-collector pause seen (seconds): one known cause of stalls
        self._gc_started = 0.0
        self._lag_watch: asyncio.Task | None = None
        self._upstream_watch: asyncio.Task | None = None
        self.watch: UpstreamWatch | None = None
        self._breaker_keys: dict[str, tuple] = {}
        self.tokens = TokenDirectory()
        self.live: dict[str, Interception] = {}
        self.proxy_actors: dict[str, Actor] = {}  # client connection id -> identity from CONNECT auth
        self._tunnels: set[str] = set()  # client connections that went through CONNECT
        self.egress: EgressPolicy | None = None
        self.throttle: AuthThrottle | None = None
        self._own_addresses: set = set()  # the listener's addresses, found once it listens (egress never goes there)
        self._passthrough: set[str] = set()
        self._control_secret: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def load(self, loader) -> None:
        # Everything the gateway writes (DuckDB, WAL, spool, dead letters, flow captures, JSON log) is private.
        os.umask(0o077)
        tune_logging()
        patches.install(self._client_ending)
        loader.add_option(
            "aibridge_config", str, "",
            "aibridge YAML config (default: $AIBRIDGE_CONFIG, else config/aibridge.yaml).",
        )
        loader.add_option(
            "aibridge_flows", str, "",
            "Directory for forensic flow capture of intercepted AI flows (credentials redacted); "
            "overrides capture.directory in the config.",
        )

    def configure(self, updated: set[str]) -> None:
        if ctx.options.connection_strategy != "lazy":
            # Eager connects to the CONNECT target before any hook runs; AI hosts are re-routed to their
            # configured base_url, which only works when the upstream connection waits for the request.
            log.info("aibridge: setting connection_strategy=lazy (required to route intercepted hosts)")
            ctx.options.update(connection_strategy="lazy")
        if self.config is None or "aibridge_config" in updated:
            self._load_config()
        if self.store is not None and ("aibridge_flows" in updated or self.archive is None):
            self._setup_capture()

    def _load_config(self) -> None:
        try:
            config = load_config(ctx.options.aibridge_config or None)
        except ConfigError as e:
            raise exceptions.OptionsError(f"aibridge: {e}") from None
        if self.store is not None and config.duckdb_path.resolve() != self.store.path.resolve():
            raise exceptions.OptionsError("aibridge: storage.duckdb cannot change while the gateway runs")
        self.config, self.router = config, Router(config)
        self.throttle = AuthThrottle(config.auth_failures_per_minute)
        self.egress = EgressPolicy(config.proxy.allow_addresses, self._own_addresses)
        for note in config.public_host_notes:
            log.info("aibridge: %s", note)
        if config.proxy.open_relay:
            log.warning("aibridge: running as an OPEN RELAY (proxy.require_auth: false, proxy.egress: all): anyone "
                        "who can reach this listener can use it as a proxy to any non-AI host")
        self.mcp = (
            McpRegistry(config.mcp_servers, config.mcp, lambda uid, srv: self.mcp_tokens.get((uid, srv)))
            if config.mcp_servers else None
        )
        if self.loop is not None:
            self.loop.registry = self.mcp
        if self.metrics is None:
            self.metrics = Metrics(config.metrics_prefix)
        if self.watch is None:
            self.watch = UpstreamWatch(config.timeouts)
        else:
            self.watch.timeouts = config.timeouts
        self.breakers = CircuitBreakers(config.breaker_failures, config.breaker_open_seconds,
                                        config.breaker_half_open_requests, self._breaker_changed)
        if self.json_log is not None:
            self.json_log.close()
        self.json_log = InterceptionLog(config.interceptions_json_log) if config.interceptions_json_log else None
        for p in config.providers:
            if not p.key:
                log.warning("provider %s has no upstream key (%s is empty); only BYOK calls can succeed",
                            p.name, p.key_source)
        if self.store is None:
            store = Store(config.duckdb_path, after_op=self._reload_tokens, close_stale=True)
            try:
                store.open()
            except Exception as e:
                raise exceptions.OptionsError(f"aibridge: cannot open {config.duckdb_path}: {e}") from None
            self.store = store
            self.metrics.dead_letters.set_function(lambda: self.store.dead_lettered if self.store else 0)
            self.tokens.replace(store.read(ops.load_directory).result())
            self.mcp_tokens = store.read(ops.load_mcp_tokens).result()
            self.recorder = Recorder(store)
            log.info(
                "aibridge: %d provider(s) [%s], database %s, %d active token(s)",
                len(config.providers), ", ".join(p.name for p in config.providers),
                config.duckdb_path, len(self.tokens),
            )
        prices = PriceTable.load(config.pricing_file)
        self.api = AdminApi(self.store, self.tokens, prices)
        b = config.budgets or {}
        budgets = Budgets(b.get("default") or Limits(), b.get("users") or {}, prices)
        if budgets.active:
            self.store.read(budgets.load).result()  # counters survive restarts: rebuilt from the records
            self.budgets = budgets
        else:
            self.budgets = None

    def _setup_capture(self) -> None:
        option = ctx.options.aibridge_flows
        directory = Path(option).expanduser() if option else self.config.capture.directory
        if self.archive is not None:
            if directory and self.archive.directory.resolve() == directory.resolve():
                return
            self.archive.close()
            self.archive = None
        if directory:
            cap = self.config.capture
            self.archive = FlowArchive(directory, cap.max_bytes, cap.max_age_seconds).start()
            # Keep streamed bodies on the flow so captured SSE responses can be analysed later.
            ctx.options.update(store_streamed_bodies=True)
            log.info("aibridge: capturing intercepted flows to %s", directory)

    def _breaker_changed(self, key: tuple, state: int, tripped: bool) -> None:
        self.metrics.child(self.metrics.breaker_state, *key).set(state)
        if tripped:
            self.metrics.child(self.metrics.breaker_trips, *key).inc()
            log.warning("circuit breaker opened for %s %s %s", *key)

    def _reload_tokens(self, conn) -> None:
        """After an admin operation: new or revoked tokens take effect for the next request."""
        self.tokens.replace(ops.load_directory(conn))
        self.mcp_tokens = ops.load_mcp_tokens(conn)

    async def running(self) -> None:
        if self.store is None or not ctx.options.server:
            return
        if self._retention is None:
            self._retention = asyncio.create_task(self._prune_periodically())
        if self._lag_watch is None:
            self._lag_watch = asyncio.create_task(self._watch_event_loop())
        if self._upstream_watch is None:
            self._upstream_watch = asyncio.create_task(self._watch_upstreams())
        # Everything loaded so far (mitmproxy, DuckDB, the MCP SDK, config) lives as long as the process: move
        # it out of the collector's reach, so full collections under load scan only per-request objects.
        gc.collect()
        gc.freeze()
        direct = [h for h in logging.getLogger().handlers if not isinstance(h, LegacyLogEvents)]
        if direct:
            interception_log.handlers, interception_log.propagate = direct, False
        if self.mcp is not None and self.loop is None:
            verify: bool | str = ctx.options.ssl_verify_upstream_trusted_ca or True
            if ctx.options.ssl_insecure:
                verify = False
            self.loop = LoopServer(self.mcp, verify)
            await self.loop.start()
        addrs = []
        try:
            addrs = ctx.master.addons.get("proxyserver").listen_addrs()
        except Exception:
            pass
        host, port = (addrs[0][0], addrs[0][1]) if addrs else (ctx.options.listen_host, ctx.options.listen_port)
        self._own_addresses.update(local_addresses(host.strip("[]")))
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        self._control_secret = write_runtime_file(self.store.path, f"http://{host}:{port}")

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
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            lag = loop.time() - start - interval
            if lag > self.loop_lag_max:
                self.loop_lag_max = lag
                self.metrics.loop_lag_max.set(lag)

    async def _watch_upstreams(self) -> None:
        """Timeouts for provider connections (mitmproxy itself only times out idle client connections)."""
        while True:
            await asyncio.sleep(self.watch.interval())
            if self.live:
                self.watch.check([(ic.flow, ic.forwarded_at, ic.tap) for ic in self.live.values()
                                  if ic.flow is not None and not ic.via_loop])

    def _client_ending(self, flow: http.HTTPFlow, message: str) -> ClientEnding | None:
        """The provider failed this exchange: what its client should get (None: mitmproxy's default)."""
        ic = self.live.get(flow.id)
        if ic is None:
            return None
        reason = self.watch.reasons.get(flow.id) if self.watch else None
        text = reason or f"the provider's connection failed: {message}"
        resp = flow.response
        if resp is not None and resp.stream:  # the client has the headers: end its stream the API's way
            if not isinstance(ic.tap, StreamTap):
                return None
            return ClientEnding(text, stream_tail=ic.tap.upstream_failed(text))
        return ClientEnding(text, response=error_response(ic.provider_type, 504 if reason else 502, f"aibridge: {text}"))

    async def _prune_periodically(self) -> None:
        """Retention: delete records older than retention_days, at start-up and then hourly."""
        while True:
            days = self.config.retention_days
            if days and self.store is not None:
                try:
                    result = await asyncio.wrap_future(self.store.call(functools.partial(ops.prune, days=days)))
                    if result["deleted"]:
                        log.info("aibridge: retention removed %d interception(s) older than %d days",
                                 result["deleted"], days)
                except Exception as e:
                    log.warning("aibridge: retention job failed: %s", e)
            await asyncio.sleep(3600)

    def done(self) -> None:
        """Graceful shutdown: every queued record reaches DuckDB before the file closes."""
        if self._gc_timer in gc.callbacks:
            gc.callbacks.remove(self._gc_timer)
        for task in (self._retention, self._lag_watch, self._upstream_watch):
            if task is not None:
                task.cancel()
        self._retention = self._lag_watch = self._upstream_watch = None
        if self.json_log is not None:
            self.json_log.close()
        for ic in list(self.live.values()):
            summary = ic.tap.summary if ic.tap else ResponseSummary()
            self.recorder.ended(ic, summary, None, "gateway shut down", at(None))
        self.live.clear()
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self.archive is not None:
            self.archive.close()
            self.archive = None
        if self.store is not None:
            remove_runtime_file(self.store.path, self._control_secret)
            self.store.close()
            log.info("aibridge: %d records written, %d failed", self.store.written, self.store.failed)
            self.store = None

    # --- proxy mode: tunnels, proxy credentials, egress policy, which hosts are decrypted ----------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT: take the user's identity from proxy credentials; apply the egress policy."""
        if self.router is None:
            return
        self._tunnels.add(flow.client_conn.id)
        req = flow.request
        actor = await self._admit_proxied(flow, req.host, req.port, self.router.is_ai_host(req.host))
        if actor is not None and flow.response is None:
            self.proxy_actors[flow.client_conn.id] = actor

    async def _admit_proxied(self, flow: http.HTTPFlow, host: str, port: int, ai: bool,
                             check_address: bool = True) -> Actor | None:
        """The egress policy for a CONNECT or a plain-HTTP proxy request: non-AI hosts need proxy credentials
        (unless the admin chose an open relay) and never resolve to the gateway's own machine. Returns the user
        named by proxy credentials; a refusal is left on the flow."""
        policy = self.config.proxy
        if not ai and policy.egress == "ai-only":
            flow.response = http.Response.make(403, b"aibridge: egress to non-AI hosts is disabled\n")
            return None
        actor = self._proxy_actor(flow)
        if flow.response is not None:
            return None
        if actor is None and (policy.require_auth is True or (not ai and policy.require_auth is None)):
            what = "proxy credentials required" if ai else "proxy credentials required to reach non-AI hosts"
            flow.response = http.Response.make(407, f"aibridge: {what}\n".encode(), PROXY_AUTH_REQUIRED)
            return None
        if not ai and check_address:
            why, _ = await self.egress.check(host, port)
            if why:
                log.warning("aibridge: refused proxying to %s:%s: %s", printable(host), port, printable(why))
                flow.response = http.Response.make(403, f"aibridge: egress refused: {why}\n".encode())
        return actor

    async def server_connect(self, data) -> None:
        """Last line of the egress policy: every upstream connection the gateway did not choose itself goes to
        an address checked here, pinned so a DNS answer cannot change between the check and the connect."""
        if self.egress is None or data.server.address is None:
            return
        host, port = data.server.address[0], data.server.address[1]
        if self._chosen_upstream(host, port) or self.router.is_ai_host(host):
            return
        why, ip = await self.egress.check(host, port)
        if why:
            log.warning("aibridge: refused upstream connection to %s:%s: %s", printable(host), port, printable(why))
            data.server.error = f"aibridge: egress refused: {why}"
        elif ip is not None and ip != host:
            if data.server.sni is None and data.server.tls:
                data.server.sni = host
            data.server.address = (ip, port)

    def _chosen_upstream(self, host: str, port: int) -> bool:
        """A provider's base_url or the injected-tool loop: addresses the gateway itself sends requests to."""
        if self.loop is not None and (host, port) == ("127.0.0.1", self.loop.port):
            return True
        return any((p.host, p.port) == (host, port) for p in self.config.providers)

    def client_disconnected(self, client: connection.Client) -> None:
        self.proxy_actors.pop(client.id, None)
        self._tunnels.discard(client.id)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self.router is not None and not self.router.is_ai_host(data.client_hello.sni):
            data.ignore_connection = True  # never decrypt what is not an AI API

    # --- request -----------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse oversized bodies before reading them."""
        if self.router is None or not flow.live:
            return
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.config.max_request_body_bytes:
            flow.response = error_response(
                self._provider_type(flow), 413,
                f"aibridge: request body of {int(length)} bytes exceeds the {self.config.max_request_body_bytes} byte limit")

    def _provider_type(self, flow: http.HTTPFlow) -> str | None:
        req = flow.request
        try:
            if self._is_ours(flow):
                route = self.router.match_prefix(req.path, req.method)
            else:
                host = self._ai_host(flow)
                route = self.router.match_host(host, req.path, req.method) if host else None
        except BadPath:
            prov = self.router.by_prefix.get(req.path.lstrip("/").split("/")[0]) or self.router.by_host.get(
                (req.host or "").lower())
            return prov.type if prov else None
        return route.provider.type if route else None

    def _is_ours(self, flow: http.HTTPFlow) -> bool:
        """Requests for the gateway itself (base-URL mode and its own endpoints), whatever their Host header says.
        An origin-form request on the listener always is; an absolute-form one (a plain-HTTP proxy request) only
        when it names the listener's port and one of the gateway's paths. Never a request inside a CONNECT tunnel."""
        if flow.client_conn.id in self._tunnels:
            return False
        req = flow.request
        form = request_form(req)
        if form == ORIGIN:
            return True
        sock = flow.client_conn.sockname
        to_listener = req.scheme == "http" and bool(sock) and req.port == sock[1]
        if form == ABSOLUTE:
            return to_listener and self.router.is_prefixed(req.path)
        return self.router.is_prefixed(req.path) or to_listener  # HTTP/2: no request line to tell by

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self.router is None or not flow.live:
            return
        try:
            await self._request(flow)
        except Exception as e:  # a hostile request must get an answer, never a traceback in a hook
            deep = isinstance(e, RecursionError)
            if not deep:
                log.exception("aibridge: handling a request failed")
            self._abandon(flow)
            try:
                ptype = self._provider_type(flow)
            except Exception:
                ptype = None
            flow.response = error_response(
                ptype, 400 if deep else 500,
                "aibridge: the request body is nested too deeply" if deep else "aibridge: internal error")

    def _abandon(self, flow: http.HTTPFlow) -> None:
        """Forget a flow the pipeline gave up on; an interception already started ends failed."""
        self._passthrough.discard(flow.id)
        self._breaker_keys.pop(flow.id, None)
        ic = self.live.pop(flow.id, None)
        if ic is not None:
            self.recorder.ended(ic, ResponseSummary(), None, "aibridge: internal error", at(None))
            self.metrics.child(self.metrics.inflight, ic.provider_name, self.metrics.model_label(ic.info.model),
                               ic.route).dec()

    async def _request(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if self._is_ours(flow):
            if req.path.startswith("/aibridge/") or req.path.split("?")[0] == "/aibridge":
                await self._control(flow)
                return
            try:
                route = self.router.match_prefix(req.path, req.method)
            except BadPath as e:
                flow.response = error_response(self._provider_type(flow), 400, f"aibridge: bad request path: {e}")
                return
            if route is None:
                flow.response = error_response(
                    None, 404, f"no provider is served at {printable(req.path.split('?')[0])!r}; use /<provider>/… "
                    f"(configured: {', '.join('/' + p.name for p in self.config.providers)})",
                )
                return
        elif ai_host := self._ai_host(flow):
            try:
                route = self.router.match_host(ai_host, req.path, req.method)
            except BadPath as e:
                flow.response = error_response(self._provider_type(flow), 400, f"aibridge: bad request path: {e}")
                return
        else:
            await self._egress(flow)
            return  # proxied traffic to a non-AI host: relayed untouched, or refused by policy

        hv = header_view(req.headers)
        if hv.get("upgrade", "").lower() == "websocket":
            # Codex CLI tries the Responses API over a WebSocket first, and the Realtime API speaks nothing else.
            # Relayed, those model calls would bypass recording, budgets and MCP injection; 426 is the one answer
            # Codex takes as "use HTTP" at once (any other refusal costs five retries first).
            flow.response = error_response(
                route.provider.type, 426,
                "aibridge: the WebSocket transport is not supported here; send the request over HTTP (SSE)")
            return
        ident = self._identify(flow, route, hv)
        if ident is None:
            return
        if len(req.raw_content or b"") > self.config.max_request_body_bytes:  # chunked uploads: no length header
            flow.response = error_response(route.provider.type, 413, "aibridge: request body too large")
            return
        if route.api is None and not route.known and ident.byok_credential is None:
            # Nobody reviewed this endpoint: it may spend money unrecorded, so the central key never goes there.
            flow.response = error_response(
                route.provider.type, 404,
                f"aibridge: {req.method} {printable(route.upstream_path.split('?')[0])} is not an endpoint this "
                f"gateway relays (provider {route.provider.name!r})")
            return
        if ident.byok_credential is None and not route.provider.key:
            flow.response = error_response(
                route.provider.type, 500, f"aibridge: no upstream key configured for provider {route.provider.name!r}"
            )
            return
        adapter = None
        if route.api:
            begun = await self._begin(flow, route, ident, hv)
            if begun is None:
                return
            ic, body = begun
            key = (route.provider.name, route.label, self.metrics.model_label(ic.info.model))
            wait = self.breakers.allow(key)
            if wait is not None:
                msg = f"aibridge: {route.provider.name} {route.label} {key[2]} is failing; circuit open"
                flow.response = error_response(route.provider.type, 503, msg, {"retry-after": str(wait)})
                return
            self._breaker_keys[flow.id] = key
            await self.recorder.link_thread(ic)
            if self.budgets is not None:
                refusal = self.budgets.check(ic.user_id, ic.user_name)
                if refusal is not None:
                    self.recorder.rejected(ic, 429, refusal.message)
                    flow.response = error_response(route.provider.type, 429, refusal.message,
                                                   {"retry-after": str(refusal.retry_after)})
                    log.info("interception %s user=%s rejected: %s", ic.id, ic.user_name, refusal.message)
                    return
            if body is not None and ic.api in MODEL_APIS:
                adapter = await self._injection(flow, ic, body)
            self.recorder.started(ic)
            self.live[flow.id] = ic
            flow.metadata[META_KEY] = ic.to_metadata()
            self.metrics.child(self.metrics.inflight, ic.provider_name, self.metrics.model_label(ic.info.model),
                               ic.route).inc()
        else:
            self._passthrough.add(flow.id)
            self.metrics.child(self.metrics.passthrough, route.provider.name, route.label, req.method).inc()
            if not route.known:
                log.info("aibridge: relaying %s %s unrecorded with the user's own credential (user %s)",
                         req.method, printable(route.upstream_path.split("?")[0]), ident.actor.user_name)
        self._to_upstream(flow, route, ident)
        if adapter is not None:
            self._to_loop(flow, route, ident, adapter)
        ic = self.live.get(flow.id)
        if ic is not None:
            ic.flow, ic.forwarded_at = flow, time.time()

    def _ai_host(self, flow: http.HTTPFlow) -> str | None:
        """The AI host a proxied request is for: its target, or, inside a tunnel opened to a bare IP address, the
        TLS server name the client asked for (the gateway decrypted the tunnel because of that name)."""
        req = flow.request
        if self.router.is_ai_host(req.host):
            return req.host
        sni = flow.client_conn.sni
        if sni and flow.client_conn.id in self._tunnels and self.router.is_ai_host(sni):
            return sni
        return None

    async def _egress(self, flow: http.HTTPFlow) -> None:
        """A proxied request to a non-AI host: relayed untouched if the policy admits it (a tunnel's address was
        checked at CONNECT), but the gateway's credentials never travel on."""
        req = flow.request
        await self._admit_proxied(flow, req.host, req.port, ai=False,
                                  check_address=flow.client_conn.id not in self._tunnels)
        req.headers.pop("proxy-authorization", None)

    def _proxy_actor(self, flow: http.HTTPFlow) -> Actor | None:
        """The user named by proxy credentials (at CONNECT, or on this plain-HTTP request); None without any.
        Invalid credentials leave a 407 (or, past the throttle, a 429) on the flow."""
        actor = self.proxy_actors.get(flow.client_conn.id)
        given = proxy_token(flow.request.headers.get("proxy-authorization")) if actor is None else None
        if given is None:
            return actor
        actor = self._check_token(flow, given)
        if actor is None and flow.response is None:
            flow.response = http.Response.make(407, b"aibridge: invalid proxy credentials\n", PROXY_AUTH_REQUIRED)
        return actor

    def _check_token(self, flow: http.HTTPFlow, token: str | None) -> Actor | None:
        """A gateway token check. A failure counts against the client's address; past the limit, failures are
        answered 429 (set on the flow) instead of 401/407."""
        actor = self.tokens.lookup(token)
        if actor is None:
            self._auth_failed(flow, self._provider_type(flow))
        return actor

    def _auth_failed(self, flow: http.HTTPFlow, provider_type: str | None) -> bool:
        """Count a failed token check; True (and a 429 on the flow) once the address is over its limit. Valid
        tokens from the same address keep working: one broken client behind a NAT never locks out the office."""
        address = (flow.client_conn.peername or ("?",))[0]
        self.throttle.failed(address)
        wait = self.throttle.retry_after(address)
        if wait is None:
            return False
        flow.response = error_response(
            provider_type, 429, f"aibridge: too many failed token checks from {address}; retry in {wait} s",
            {"retry-after": str(wait)})
        return True

    async def _injection(self, flow: http.HTTPFlow, ic: Interception, body: dict):
        """Add the admin's MCP tools to the request; returns the loop adapter, or None if none apply."""
        if self.mcp is None or self.loop is None:
            return None
        tools = await self.mcp.tools_for(ic.user_id)
        if not tools:
            return None
        client_usage = bool((ic.info.raw_stream_options or {}).get("include_usage"))
        adapter = ic.codec.adapter(body, tools, ic.info.stream, max_tools=self.config.mcp.max_tools,
                                   client_wants_usage=client_usage)
        flow.request.content = json.dumps(adapter.inject(), ensure_ascii=False).encode()
        if adapter.trimmed:
            log.warning("interception %s: %d injected tool(s) left out to stay within %d tools",
                        ic.id, adapter.trimmed, self.config.mcp.max_tools)
        return adapter

    def _to_loop(self, flow: http.HTTPFlow, route: Route, ident: Identity, adapter) -> None:
        """Hand the flow to the in-process loop endpoint; mitmproxy relays what it produces."""
        req = flow.request
        job = LoopJob(
            url=req.url, headers=upstream_headers(req.headers), adapter=adapter,
            provider_type=route.provider.type, user_id=ident.actor.user_id,
            max_rounds=self.config.mcp.max_rounds, metadata=flow.metadata[META_KEY],
        )
        path = self.loop.register(flow.id, job)
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.loop.port
        req.host_header = f"127.0.0.1:{self.loop.port}"
        req.path = path
        self.live[flow.id].via_loop = True

    def _identify(self, flow: http.HTTPFlow, route: Route, hv: dict[str, str]) -> Identity | None:
        proxy_actor = self._proxy_actor(flow)
        if flow.response is not None:
            return None
        if proxy_actor is None and self.config.proxy.require_auth is True and not self._is_ours(flow):
            flow.response = http.Response.make(407, b"aibridge: proxy credentials required\n", PROXY_AUTH_REQUIRED)
            return None
        try:
            return identify(hv, proxy_actor, self.tokens, self.config.proxy.byok)
        except AuthRefused as e:
            if not self._auth_failed(flow, route.provider.type):
                flow.response = error_response(route.provider.type, 401, str(e))
            return None

    async def _begin(self, flow: http.HTTPFlow, route: Route, ident: Identity, hv: dict[str, str]
                     ) -> tuple[Interception, dict | None] | None:
        """Read the request (decoded with a cap, off the event loop when large) and open its interception."""
        req = flow.request
        codec = WIRE_APIS[route.api]
        limit = self.config.max_request_body_bytes
        raw = req.raw_content or b""
        encoding = hv.get("content-encoding", "")
        ctype = hv.get("content-type", "").lower()
        multipart = ctype.startswith("multipart/form-data")

        def read():
            data = bodies.decode(raw, encoding, limit) if encoding else raw
            if multipart:
                return data, bodies.form_fields(hv.get("content-type", ""), data)
            if not data.strip() and route.api not in MODEL_APIS:
                return data, {}
            return data, bodies.parse_json(data)

        try:
            # Decompression output is bounded by the limit, not the input: any encoded body goes to a thread.
            data, body = await asyncio.to_thread(read) if encoding or len(raw) > OFF_LOOP_BYTES else read()
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object")
            info = codec.parse_request(body)
            changed = None if multipart else codec.prepare_request(body)
        except bodies.BodyTooLarge as e:
            flow.response = error_response(route.provider.type, 413, f"aibridge: {e}")
            return None
        except (bodies.BadBody, BadRequest) as e:
            flow.response = error_response(route.provider.type, 400, f"aibridge: {e}")
            return None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:  # a field of the wrong type
            flow.response = error_response(route.provider.type, 400,
                                           f"aibridge: the request body has an unexpected shape ({type(e).__name__})")
            return None
        if encoding:  # forward what was parsed: the provider sees exactly the body the gateway recorded
            req.headers.pop("content-encoding", None)
            req.content = data
        if multipart:
            body = None  # forwarded as sent; only its fields were read
        elif changed is not None:
            req.content = json.dumps(changed, ensure_ascii=False).encode()
            body = changed
        byok = ident.byok_credential
        ic = Interception(
            id=flow.id,
            user_id=ident.actor.user_id,
            user_name=ident.actor.user_name,
            provider_type=route.provider.type,
            provider_name=route.provider.name,
            api=route.api,
            client=detect_client(hv),
            user_agent=hv.get("user-agent"),
            session_id=detect_session(hv, info.session_hint),
            credential_kind="byok" if byok else "centralized",
            credential_hint=mask(byok or route.provider.key),
            upstream_path=route.upstream_path.split("?")[0],
            started_at=at(req.timestamp_start),
            route=route.label,
            info=info,
        )
        return ic, body

    def _to_upstream(self, flow: http.HTTPFlow, route: Route, ident: Identity) -> None:
        """Point the request at the provider and swap credentials, in one pass over the raw request data:
        mitmproxy's property setters and Headers API re-derive Host/authority and re-scan headers per call."""
        req, prov = flow.request, route.provider
        host = hostport(prov.scheme, prov.host, prov.port).encode()
        d = req.data
        d.scheme, d.host, d.port = prov.scheme.encode(), prov.host, prov.port
        d.path = route.upstream_path.encode("utf-8", "surrogateescape")
        h2 = req.is_http2 or req.is_http3
        if h2 or d.authority:
            d.authority = host  # HTTP/2's :authority (and absolute-form HTTP/1 targets)
        live = flow.id in self.live
        drop = _DROP_CENTRAL if ident.byok_credential is None else _DROP_BYOK
        fields, had_host = [], False
        for f in d.headers.fields:
            name = f[0].lower()
            if name == b"host":
                fields.append((f[0], host))
                had_host = True
            elif name not in drop and not (live and name == b"accept-encoding"):
                fields.append(f)
        if not had_host and not h2:
            fields.insert(0, (b"host", host))
        if ident.byok_credential is None:
            fields.append(prov.auth_header)
        if live:
            fields.append((b"accept-encoding", b"identity"))  # the stream tap parses bytes as they pass
        d.headers.fields = tuple(fields)

    # --- response ----------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._passthrough:
            flow.response.stream = True
            return
        ic = self.live.get(flow.id)
        if ic is None:
            return
        if not (200 <= flow.response.status_code < 300 and is_sse(flow.response)):
            if ic.api not in MODEL_APIS and not is_json(flow.response):
                flow.response.stream = True  # audio, images as bytes: relayed as they come, nothing to read
            return
        if ic.via_loop:
            flow.response.stream = True  # the loop records every round itself; relay its events as they come
        else:
            ic.tap = StreamTap(ic.codec)
            flow.response.stream = ic.tap

    def response(self, flow: http.HTTPFlow) -> None:
        ic, error = self._finish(flow)
        if (error in (NOT_JSON, NOT_OBJECT) and flow.live and 200 <= flow.response.status_code < 300
                and ic.api in MODEL_APIS):
            # An SDK cannot parse this; say what happened in the provider's format (the record keeps the truth).
            flow.response = error_response(ic.provider_type, 502,
                                           f"aibridge: the provider's {error}")

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> tuple[Interception | None, str | None]:
        """Record how the exchange ended; returns the interception (None if not ours) and its error."""
        if not flow.live:
            if self.recorder is not None:  # mitmdump -nr <saved flows>: rebuild their audit rows
                self.recorder.replay(flow)
            return None, None
        self._passthrough.discard(flow.id)
        key = self._breaker_keys.pop(flow.id, None)
        ic = self.live.pop(flow.id, None)
        if ic is None:
            return None, None
        ic.flow = None
        if self.watch is not None:
            self.watch.reasons.pop(flow.id, None)
        summary, status_code, error, ended_at = conclude(ic, flow)
        if key is not None and not _client_gone(flow):
            self.breakers.record(key, not is_failure(status_code, flow.response is None))
        status = self.recorder.ended(ic, summary, status_code, error, ended_at)
        if self.archive is not None:
            self.archive.add(flow)
        if status:
            if self.budgets is not None:
                self.budgets.record(ic.user_id, ic.started_at, summary.model or ic.info.model, summary.usages)
            self._observe(ic, summary, status, status_code, error, ended_at)
            u = summary.usages
            interception_log.info(
                "interception %s user=%s provider=%s api=%s model=%s client=%s status=%s in=%d out=%d tools=%d%s",
                ic.id, printable(ic.user_name), ic.provider_name, ic.api, printable(ic.info.model),
                printable(ic.client), status, sum(x.input_tokens for x in u), sum(x.output_tokens for x in u),
                len(summary.tool_calls), f" error={printable(error, 500)}" if error else "",
            )
        return ic, error

    def _observe(self, ic: Interception, summary: ResponseSummary, status: str, status_code, error, ended_at) -> None:
        """Metrics and the structured interception log for one finished interception."""
        m = self.metrics
        model = m.model_label(ic.info.model)
        m.child(m.inflight, ic.provider_name, model, ic.route).dec()
        m.child(m.interceptions, ic.provider_name, model, status, ic.route, "POST", ic.user_id, ic.client).inc()
        duration = (ended_at - ic.started_at).total_seconds()
        m.child(m.duration, ic.provider_name, model).observe(max(duration, 0.0))
        if ic.info.prompt:
            m.child(m.prompts, ic.provider_name, model, ic.user_id, ic.client).inc()
        totals = {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0}
        for u in summary.usages:
            totals["input"] += u.input_tokens
            totals["output"] += u.output_tokens
            totals["cache_read"] += u.cache_read_input_tokens
            totals["cache_write"] += u.cache_write_input_tokens
        for kind, n in totals.items():
            if n:
                m.child(m.tokens, ic.provider_name, model, kind, ic.user_id, ic.client).inc(n)
        injected = [t for t in summary.tool_calls if t.injected]
        for t in injected:
            m.child(m.injected_tools, ic.provider_name, model, m.tool_label(t.name), "error" if t.error else "ok").inc()
        for t in summary.tool_calls:
            if not t.injected:
                m.child(m.client_tools, ic.provider_name, model, m.tool_label(t.name)).inc()
        if self.json_log is not None:
            self.json_log.write({
                "msg": "interception log", "interception_id": ic.id, "user": ic.user_name, "user_id": ic.user_id,
                "client": ic.client, "session_id": ic.session_id, "provider": ic.provider_type,
                "provider_name": ic.provider_name, "api": ic.api, "model": ic.info.model,
                "response_model": summary.model,
                "status": status, "http_status": status_code, "error": error,
                "started_at": ic.started_at.isoformat(), "ended_at": ended_at.isoformat(),
                "duration_ms": round(duration * 1000, 1), "credential_kind": ic.credential_kind,
                "input_tokens": totals["input"], "output_tokens": totals["output"],
                "cache_read_input_tokens": totals["cache_read"], "cache_write_input_tokens": totals["cache_write"],
                "tool_calls": len(summary.tool_calls) - len(injected), "injected_tool_calls": len(injected),
                "thread_parent_id": ic.parent_id, "thread_root_id": ic.root_id,
            })

    # --- the gateway's own endpoints ---------------------------------------------------------------

    async def _flushed(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until records queued so far are committed, so a query sees finished interceptions."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.store.flush()), timeout)
        except (asyncio.TimeoutError, Exception) as e:
            log.warning("aibridge: records not flushed before a query (%s); it may miss the newest", type(e).__name__)

    async def _control(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        path = req.path.split("?")[0]
        if path == "/aibridge/healthz":
            if "reset" in req.path.partition("?")[2]:
                # Counters are evidence (stalls, dead letters): only an admin may zero them.
                actor = self._check_token(flow, credential_from_headers(req.headers))
                if flow.response is not None:
                    return
                if actor is None or actor.role != "admin":
                    flow.response = api_error(403 if actor else 401, "resetting health counters needs an admin token")
                    return
            healthy = self.store is not None
            dead = self.store.dead_lettered if self.store else 0
            flow.response = _json(200 if healthy else 503, {
                "status": "ok" if healthy else "unavailable", "inflight": len(self.live),
                "records_written": self.store.written if self.store else 0,
                "records_failed": dead, "records_dead_lettered": dead,
                "stale_interceptions_closed": self.store.stale_closed if self.store else 0,
                "event_loop_lag_max_ms": round(self.loop_lag_max * 1000, 2),
                "gc_pause_max_ms": round(self.gc_pause_max * 1000, 2),
                "connections": len(getattr(ctx.master.addons.get("proxyserver"), "connections", ())),
                "tasks": len(asyncio.all_tasks()),
            })
            if "reset_lag=1" in req.path:
                self.loop_lag_max = self.gc_pause_max = 0.0
            return
        if path in ("/aibridge", "/aibridge/", "/aibridge/dashboard"):
            flow.response = http.Response.make(200, DASHBOARD.read_bytes(), {
                "content-type": "text/html; charset=utf-8", **DASHBOARD_HEADERS})
            return
        if path == "/aibridge/dashboard.js":
            flow.response = http.Response.make(200, DASHBOARD_JS.read_bytes(), {
                "content-type": "text/javascript; charset=utf-8", **DASHBOARD_HEADERS})
            return
        if path == "/aibridge/metrics":
            if self.config.metrics_token is not None:
                given = credential_from_headers(req.headers) or ""
                if not hmac.compare_digest(given.encode(), self.config.metrics_token.encode()):
                    flow.response = http.Response.make(401, b"aibridge: metrics need a bearer token\n",
                                                       {"www-authenticate": 'Bearer realm="aibridge-metrics"'})
                    return
            flow.response = http.Response.make(200, self.metrics.render(), {"content-type": self.metrics.content_type})
            return
        if path.startswith(API_PREFIX) or path == API_PREFIX.rstrip("/"):
            if self.tokens.lookup(credential_from_headers(req.headers)) is None:
                if self._auth_failed(flow, None):
                    return
            else:
                await self._flushed()  # read your writes: what finished before this query is in its answer
            try:
                flow.response = await self.api.handle(flow)
            except Exception as e:
                log.exception("admin API failed")
                flow.response = api_error(500, f"{type(e).__name__}: {e}")
            return
        if path != CONTROL_PATH or req.method != "POST":
            flow.response = error_response(None, 404, f"unknown endpoint {path}")
            return
        given = credential_from_headers(req.headers) or ""
        if not self._control_secret or not hmac.compare_digest(given.encode(), self._control_secret.encode()):
            flow.response = error_response(None, 401, "control endpoint: bad or missing secret")
            return
        try:
            payload = json.loads(req.content or b"")
            fn, writes = ops.OPS[payload["op"]]
            call = functools.partial(fn, **(payload.get("args") or {}))
        except (ValueError, KeyError, TypeError) as e:
            flow.response = error_response(None, 400, f"bad control request: {e}")
            return
        if not writes:
            await self._flushed()
        fut = self.store.call(call) if writes else self.store.read(call)
        try:
            result = await asyncio.wrap_future(fut)
        except (ops.OpError, TypeError) as e:
            flow.response = error_response(None, 400, str(e))
            return
        except Exception as e:
            log.exception("control op failed")
            flow.response = error_response(None, 500, f"{type(e).__name__}: {e}")
            return
        flow.response = _json(200, {"result": result})


_DROP_BYOK = frozenset(h.encode() for h in GATEWAY_TOKEN_HEADERS + ("proxy-authorization",))
_DROP_CENTRAL = _DROP_BYOK | frozenset(h.encode() for h in CREDENTIAL_HEADERS)


def header_view(headers: http.Headers) -> dict[str, str]:
    """The request's headers as a plain dict with lower-case names (repeated ones joined, as Headers does)."""
    out: dict[str, str] = {}
    for k, v in headers.fields:
        name = k.decode("latin-1").lower()
        value = v.decode("utf-8", "surrogateescape")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _client_gone(flow: http.HTTPFlow) -> bool:
    """A client that hung up says nothing about the provider's health."""
    msg = (flow.error.msg if flow.error else "").lower()
    return flow.response is not None and ("client" in msg or "killed" in msg)


def _json(status: int, obj) -> http.Response:
    return http.Response.make(status, json.dumps(obj).encode(), {"content-type": "application/json"})
