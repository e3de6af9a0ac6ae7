"""The `Runtime` addon: reads the config and owns what the other addons share — the store and its writer, the
token directory, budgets, circuit breakers, metrics, the MCP registry and tool loop, and the set of flows in
flight. It is listed first, so every other addon's `configure` sees the config it loaded, and its `done` runs
the shutdown that must happen in order (end in-flight records, then close the store)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import signal
import time

import httpx
from mitmproxy import ctx, exceptions, http
from mitmproxy.log import LegacyLogEvents

from ..admin.api import AdminApi
from ..admin.gateway_client import remove_runtime_file, write_runtime_file
from ..apis import PROVIDERS
from ..apis.base import BadSettings
from ..config import Config, ConfigError, load_config, postgres_label, postgres_tag
from ..flow.errors import error_response
from ..flow.exchange import ResponseSummary
from ..flow.keypool import KeyPool
from ..flow.recorder import STORE_WAIT, Recorder, at
from ..flow.relay import Relay, RelayJob, upstream_client
from ..flow.routing import Router
from ..flow.state import FlowState
from ..flow.upstream_faults import UpstreamWatch
from ..flow.ws_translate import SocketJob, Translator
from ..logsafe import RedactingStream, install_log_redaction
from ..loopback import LoopbackServer
from ..mcp.access import McpAccess
from ..mcp.gateway import McpCaller, McpGateway, McpJob
from ..mcp.loop import LoopJob, ToolLoop
from ..mcp.oauth import CALLBACK_PATH as OAUTH_CALLBACK_PATH
from ..mcp.oauth import McpOAuth
from ..mcp.registry import McpRegistry
from ..metrics import Metrics
from ..policy.auth import SECRET_HEADERS, Actor, TokenDirectory, mask
from ..policy.breaker import CircuitBreakers
from ..policy.budgets import Budgets, McpCallLimit, Refusal, budget_report
from ..policy.egress import EgressPolicy, local_addresses
from ..policy.notices import BudgetNotices
from ..policy.policing import Policing, mask_stored
from ..policy.rules import Decision, policy_version
from ..policy.throttle import AuthThrottle
from ..pricing import Price, PriceTable
from ..store.process import WriterProcess
from ..telemetry import Telemetry
from ..workers import KeyBoard, control_secret, store_socket, worker_number, workers_dir

KEY_STATES = {"ready": 0, "cooling": 1, "disabled": 2}
# Fleet mode: tokens revoked anywhere stop working here within this (and the time to read them), well inside the
# second the audit promises; the budget totals, a heavier query, are read every other round.
DIRECTORY_REFRESH_SECONDS = 0.5


def store_target(config: Config | None) -> tuple:
    return (config.duckdb_path.resolve(), config.storage.postgres) if config is not None else ()


def describe_store(config: Config) -> str:
    """Where the audit goes, for logs and errors (never a password)."""
    return postgres_label(config.storage.postgres) if config.storage.postgres else str(config.duckdb_path)


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
    # No credential reaches a log line, whoever logs it: mitmproxy logs the raw head of a request a client
    # abandoned (gateway tokens, proxy credentials), exceptions may quote headers.
    install_log_redaction(SECRET_HEADERS)


def raise_open_files_limit() -> None:
    """Every client connection is a descriptor: take the whole hard limit the process is allowed (Python keeps the
    soft one, often 1024), so thousands of connections do not make accepting new ones fail and pause."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as e:
        log.debug("aibridge: could not raise the open files limit: %s", e)


def quiet_legacy_log_events() -> None:
    """mitmproxy turns every log record into a deprecated `add_log` hook call (a cross-thread call, then a dispatch
    over every addon: about a third of the cost of accepting a connection, which logs two lines). None of the
    gateway's or mitmproxy's addons implements it; while no loaded addon does, records skip it."""
    def listeners() -> bool:
        try:
            from mitmproxy.addonmanager import traverse

            return any(hasattr(a, "add_log") for a in traverse(ctx.master.addons.chain))
        except Exception:
            return True

    for handler in logging.getLogger().handlers:
        if isinstance(handler, LegacyLogEvents) and not getattr(handler, "aibridge_quiet", False):
            state = {"listeners": listeners(), "at": time.monotonic()}

            def wanted(record, state=state) -> bool:
                if time.monotonic() - state["at"] > 5.0:  # a script loaded later may implement it
                    state["listeners"], state["at"] = listeners(), time.monotonic()
                return state["listeners"]

            handler.addFilter(wanted)
            handler.aibridge_quiet = True


def redact_flow_dumps() -> None:
    """mitmproxy's flow dumper (`flow_detail` 1+) prints flows to stdout itself, not through logging: redact it."""
    try:
        dumper = ctx.master.addons.get("dumper")
    except Exception:
        return
    if dumper is not None and not isinstance(dumper.outfp, RedactingStream):
        dumper.outfp = RedactingStream(dumper.outfp)


class Runtime:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.router: Router | None = None
        self.store: WriterProcess | None = None
        self.recorder: Recorder | None = None
        self.tokens = TokenDirectory()
        self.mcp_tokens: dict[tuple[str, str], str] = {}
        self.user_groups: dict[str, tuple[str, ...]] = {}
        self.prices: PriceTable | None = None  # the price book (budgets, the recorder's costs, the admin API)
        self.price_overrides: dict = {}  # the database's prices (aibridge prices set)
        self.mcp: McpRegistry | None = None
        # OAuth sign-in to `oauth: true` MCP servers: the users' tokens, in the shared store (mcp/oauth.py)
        self.mcp_oauth = McpOAuth(lambda: self.store, self._oauth_callback_url, self._user_name)
        self.own_url: str | None = None  # http://host:port of the listener, once it listens
        self._retiring: set[asyncio.Task] = set()  # registries a reload replaced, closing
        self.loopback: LoopbackServer | None = None  # where the tool loop's and the key pools' flows are answered
        self.tool_loop: ToolLoop | None = None
        self.mcp_gateway: McpGateway | None = None  # /aibridge/mcp's server side (at the loopback server)
        self.mcp_access = McpAccess(())  # who may use which central MCP tools (mcp_access)
        self.mcp_limit: McpCallLimit | None = None  # budgets.*.mcp_calls_per_minute
        self.metrics: Metrics | None = None
        self.api: AdminApi | None = None
        self.budgets: Budgets | None = None
        self.notices: BudgetNotices | None = None  # budget thresholds crossed: said once (log, webhook)
        self.breakers: CircuitBreakers | None = None
        self.egress: EgressPolicy | None = None
        self.throttle: AuthThrottle | None = None
        self.watch: UpstreamWatch | None = None
        self.own_addresses: set = set()  # the listener's addresses, found once it listens (egress never goes there)
        self.control_secret: str | None = None
        self.inflight: set[FlowState] = set()  # recorded exchanges between their request and their end
        self._budgets_degraded = False  # the store was too slow for the fleet's rate counter: counting locally
        self._refusing = False  # storage.on_failure: refuse, and the store cannot record
        self.pools: dict[str, KeyPool] = {}
        self.users: dict[str, tuple[str, str]] = {}  # user id and user name -> (id, name)
        self._refresher: asyncio.Task | None = None  # shared store: reloads users and tokens others changed
        self.worker = worker_number()  # with `scripts/run --workers N`: this process's number
        # With workers: every worker's key pools, for `aibridge keys` whichever worker answers.
        self.keyboard = KeyBoard(workers_dir(), self.worker) if self.worker and workers_dir() else None
        self.on_reload: list = []  # addons whose settings come from the config: called after a reload
        self._reload_lock = asyncio.Lock()
        self._reloads: set = set()
        self._watcher: asyncio.Task | None = None  # reload.watch: reloads when a file the config reads changes
        self.policing: Policing | None = None  # the admin's policies and guardrails (None: there are none)
        self._guardrail_client: httpx.AsyncClient | None = None  # shared by every configuration's guardrails
        self.telemetry = Telemetry()  # OpenTelemetry export (`telemetry:`; off unless an endpoint is set)

    def load(self, loader) -> None:
        # Everything the gateway writes (DuckDB, WAL, spool, dead letters, flow captures, JSON log) is private.
        os.umask(0o077)
        tune_logging()
        redact_flow_dumps()
        raise_open_files_limit()
        loader.add_option(
            "aibridge_config", str, "",
            "aibridge YAML config (default: $AIBRIDGE_CONFIG, else config/aibridge.yaml).",
        )

    def configure(self, updated: set[str]) -> None:
        if ctx.options.connection_strategy != "lazy":
            # Eager connects to the CONNECT target before any hook runs; AI hosts are re-routed to their
            # configured base_url, which only works when the upstream connection waits for the request.
            log.info("aibridge: setting connection_strategy=lazy (required to route intercepted hosts)")
            ctx.options.update(connection_strategy="lazy")
        if self.config is None or "aibridge_config" in updated:
            self._load_config()

    def _load_config(self) -> None:
        """At start-up (and on `--set aibridge_config=…`): a config that cannot be used stops the gateway."""
        try:
            config = load_config(ctx.options.aibridge_config or None)
            if self.store is not None:
                self._check_reloadable(config)
            self._start_transports(config)
            prices = PriceTable.load(config.pricing)
        except (ConfigError, BadSettings) as e:
            raise exceptions.OptionsError(f"aibridge: {e}") from None
        self._apply_config(config)
        if self.store is None:
            self._open_store(config)
        pending = self._budget_rows(config)  # start-up: waited for (the listener is not open yet)
        self._apply_budgets(config, prices, pending.result() if pending is not None else None)

    async def reload(self, why: str = "SIGHUP") -> bool:
        """Read the config file again and apply it without dropping a connection: providers, MCP servers,
        budgets, limits, timeouts and the proxy policy. A file that cannot be used is refused whole and the
        running configuration kept (logged); nothing is half-applied. Runs on the event loop; file reads,
        credential checks and the store's budget rows are awaited off it."""
        path = ctx.options.aibridge_config or None
        try:
            config = await asyncio.to_thread(load_config, path)
            self._check_reloadable(config)
            await asyncio.to_thread(self._start_transports, config)
            prices = await asyncio.to_thread(PriceTable.load, config.pricing)
            await asyncio.to_thread(Telemetry.prepare, config.telemetry)
            pending = self._budget_rows(config)
            rows = await asyncio.wait_for(asyncio.wrap_future(pending), 10) if pending is not None else None
        except Exception as e:  # an unusable file, credentials not found, the store's budget rows: refused whole
            self.metrics.reloads.labels("refused").inc()
            log.error("aibridge: configuration reload (%s) refused; the running configuration stays: %s", why,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
            return False
        self._apply_config(config)
        self._apply_budgets(config, prices, rows)
        if (self.mcp is not None or self.pools or self._translates()) and self.loopback is None and ctx.options.server:
            await self._start_loopback()
        for listener in self.on_reload:
            try:
                listener()
            except Exception:
                log.exception("aibridge: applying the reloaded configuration failed in part")
        self.metrics.reloads.labels("applied").inc()
        self._watch_if_asked()  # `reload.watch` turned on by this reload
        log.info("aibridge: configuration reloaded (%s) from %s: %d provider(s) [%s]", why, config.path,
                 len(config.providers), ", ".join(p.name for p in config.providers))
        return True

    def _check_reloadable(self, config: Config) -> None:
        if store_target(config) != store_target(self.config):
            raise ConfigError("storage.duckdb and storage.postgres cannot change while the gateway runs (restart it)")
        if self.metrics is not None and config.metrics.prefix != self.config.metrics.prefix:
            raise ConfigError("metrics.prefix cannot change while the gateway runs (restart it)")

    @staticmethod
    def _start_transports(config: Config) -> None:
        """Providers with credentials of their own (Bedrock): none at all is refused now, not on every request."""
        for p in config.providers:
            if p.transport is not None:
                try:
                    p.transport.start()
                except BadSettings as e:
                    raise BadSettings(f"providers {p.name!r}: {e}") from None

    def _apply_config(self, config: Config) -> None:
        """Swap in a validated config: everything derived from it is built first, then assigned."""
        old = self.config
        router = Router(config)
        throttle = self.throttle if (self.throttle is not None and old is not None and
                                     old.limits.auth_failures_per_minute == config.limits.auth_failures_per_minute
                                     ) else AuthThrottle(config.limits.auth_failures_per_minute)
        egress = EgressPolicy(config.proxy.allow_addresses, self.own_addresses)
        same_mcp = old is not None and (old.mcp_servers, old.mcp) == (config.mcp_servers, config.mcp)
        mcp = self.mcp if same_mcp else (
            McpRegistry(config.mcp_servers, config.mcp, lambda uid, srv: self.mcp_tokens.get((uid, srv)))
            if config.mcp_servers else None)
        same_breakers = old is not None and old.circuit_breaker == config.circuit_breaker
        breakers = self.breakers if same_breakers and self.breakers is not None else CircuitBreakers(
            config.circuit_breaker.failures, config.circuit_breaker.open_seconds,
            config.circuit_breaker.half_open_requests, self._breaker_changed)
        if self.metrics is None:
            self.metrics = Metrics(config.metrics.prefix)
        policing = self._policing_for(config)
        access = self.mcp_access if old is not None and old.mcp_access == config.mcp_access else McpAccess(
            config.mcp_access)
        if self.mcp is not None and mcp is not self.mcp:  # its sessions and stdio processes end
            self._retire_registry(self.mcp)
        self.config, self.router, self.throttle, self.egress, self.mcp, self.breakers, self.policing = (
            config, router, throttle, egress, mcp, breakers, policing)
        self.mcp_access = access
        if self.mcp_limit is None:
            self.mcp_limit = McpCallLimit(config.budgets.default, config.budgets.users, config.budgets.groups)
        else:  # a reload: the counts so far stay, the limits change
            self.mcp_limit.settings = config.budgets
        if self.mcp_gateway is not None:
            self._configure_gateway(self.mcp_gateway)
        for note in config.public_host_notes:
            log.info("aibridge: %s", note)
        if config.proxy.open_relay:
            log.warning("aibridge: running as an OPEN RELAY (proxy.require_auth: false, proxy.egress: all): anyone "
                        "who can reach this listener can use it as a proxy to any non-AI host")
        if self.mcp is not None:
            self.mcp.oauth = self.mcp_oauth
        if self.tool_loop is not None:
            self.tool_loop.registry = self.mcp
        if self.watch is None:
            self.watch = UpstreamWatch(config.timeouts)
        else:
            self.watch.timeouts = config.timeouts
        self.watch.drain_bytes = config.limits.max_request_body_bytes
        for p in config.providers:
            if p.transport is None and not p.key and not PROVIDERS[p.type].own_credentials_only:
                log.warning("provider %s has no upstream key (%s is empty); only BYOK calls can succeed",
                            p.name, p.key_source)
        self._build_pools(config)
        self.telemetry.configure(config.telemetry, config.providers)

    def _retire_registry(self, registry: McpRegistry) -> None:
        """A registry a reload replaced: closed (its sessions, its stdio servers' processes) once the calls it may
        be serving had their time (`tool_timeout_seconds`, at most 30 s)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # start-up, no loop yet: nothing was opened
            return

        async def close() -> None:
            try:
                await asyncio.sleep(min(registry.settings.tool_timeout_seconds, 30))
            finally:
                await registry.aclose()

        task = loop.create_task(close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _policing_for(self, config: Config) -> Policing | None:
        """The config's policies, compiled; the running ones kept when a reload leaves them unchanged (their
        version is their content's hash), so rule contexts stay warm."""
        policies = config.policies
        if not (policies.rules or policies.guardrails or policies.redact_stored):
            return None
        if self.policing is not None and self.policing.version == policy_version(policies):
            return self.policing
        if self._guardrail_client is None:
            self._guardrail_client = httpx.AsyncClient(trust_env=False)
        return Policing(policies, self._policy_decision, self._guardrail_client)

    def _policy_decision(self, decision: Decision, version: str, interception_id: str, user_id: str | None,
                         tool: str | None, tool_call_id: str | None, ordinal: int = 0) -> None:
        """A policy decision: its audit row and its count."""
        self.recorder.policy_decision(
            interception_id, rule=decision.rule, policy_version=version, hook=decision.hook, action=decision.action,
            enforced=decision.enforced, detectors=list(decision.detectors), message=decision.message,
            user_id=user_id, tool=tool, tool_call_id=tool_call_id, ordinal=ordinal)
        self.metrics.policy_decision(decision.rule, decision.action)

    def _needs_budget_rows(self, config: Config) -> bool:
        return self.budgets is None and config.budgets.any

    def _budget_rows(self, config: Config):
        """The store's answer (a future) of what new budget counters start from; None when none are needed."""
        if not self._needs_budget_rows(config):
            return None
        return self.store.run("budget_totals" if self.shared_store else "budget_usage")

    def _apply_budgets(self, config: Config, prices: PriceTable, rows) -> None:
        prices.set_overrides(self.price_overrides)
        self.prices = prices
        if self.recorder is not None:
            self.recorder.prices = prices
        self.api = AdminApi(self.store, self.tokens, prices, config.pricing)
        self.api.mcp_status = lambda: self.mcp.status() if self.mcp is not None else []
        self.api.budget_report = self.budget_report
        self.api.mcp_oauth = self.mcp_oauth
        self.api.mcp_registry = lambda: self.mcp
        settings = config.budgets
        dropped = settings.dropped_by_own_entries()
        if dropped:
            log.warning("aibridge: budgets.users entries replace the default's limits: these have none of them now "
                        "(set them in the entry to keep them): %s", "; ".join(dropped))
        if not settings.any:
            self.budgets = None
        elif self.budgets is not None:  # a reload: the counters stay, the limits and prices change
            self.budgets.settings, self.budgets.prices = settings, prices
        else:
            budgets = Budgets(settings.default, settings.users, prices, fleet=self.shared_store, groups=settings.groups)
            if self.shared_store:  # every gateway's usage, refreshed each second (see _refresh_directory)
                budgets.replace_totals(rows)
            else:
                budgets.load_rows(rows)  # counters survive restarts
            self.budgets = budgets
        if self.budgets is None:
            self.notices = None
        elif self.notices is None:
            self.notices = BudgetNotices(config.notifications, self.store)
        else:
            self.notices.settings = config.notifications

    @property
    def shared_store(self) -> bool:
        """Other gateway processes record into the same store (PostgreSQL, or this machine's other workers):
        budgets are counted there and the token directory is reloaded from it every second."""
        return bool(self.config and self.config.storage.postgres) or self.worker is not None

    def _build_pools(self, config: Config) -> None:
        """One KeyPool per instance with several keys; a reload keeps the state of keys it still lists."""
        old = {(name, k.key): k for name, pool in self.pools.items() for k in pool.keys}
        pools = {}
        for p in config.providers:
            if len(p.keys) < 2:
                continue
            pool = KeyPool(p.name, [(k, mask(k)) for k in p.keys], self._key_changed)
            for n, k in enumerate(pool.keys):
                prev = old.get((p.name, k.key))
                if prev is not None:
                    pool.keys[n] = prev
                self.metrics.gauge_function(self.metrics.child(self.metrics.key_state, p.name, k.hint),
                                            lambda k=pool.keys[n]: KEY_STATES[k.state(time.monotonic())])
            pools[p.name] = pool
        self.pools = pools

    def _key_changed(self, pool: KeyPool, key, reason: str) -> None:
        if reason != "reset":
            self.metrics.child(self.metrics.key_failovers, pool.provider, reason).inc()
        log.warning("provider %s: upstream key %s %s", pool.provider, key.hint,
                    {"rate_limited": "rate limited; cooling down", "refused": f"refused ({key.disabled}); disabled "
                     "until restart or `aibridge keys reset`", "reset": "usable again (reset)"}[reason])

    def _open_store(self, config: Config) -> None:
        pg = config.storage.postgres
        worker = f"-w{self.worker}" if self.worker else ""
        if pg:  # fleet mode: other gateways' in-progress rows are live, so none is closed as stale here
            name = f"postgres-{postgres_tag(pg)}-{ctx.options.listen_host or 'any'}-{ctx.options.listen_port}"
            spool = config.duckdb_path.parent / (name + worker)
            store = WriterProcess(spool, postgres=pg, journal=spool.with_name(spool.name + ".journal"),
                                  backlog_max_mb=config.storage.backlog_max_mb)
        elif store_socket():  # this machine's workers share one writer (the supervisor started it)
            db = config.duckdb_path
            store = WriterProcess(db, shared=store_socket(), journal=db.with_name(f"{db.name}{worker}.journal"))
        else:
            db = config.duckdb_path
            store = WriterProcess(db, close_stale=True, journal=db.with_name(db.name + ".journal"),
                                  backlog_max_mb=config.storage.backlog_max_mb)
        try:
            store.open()
        except Exception as e:
            raise exceptions.OptionsError(f"aibridge: cannot open {describe_store(config)}: {e}") from None
        self.store = store
        self.metrics.gauge_function(self.metrics.store_up, lambda: 1 if self.store and self.store_health()["up"] else 0)
        self.metrics.gauge_function(self.metrics.records_backlog,
                                    lambda: int(self.store.state.get("backlog") or 0) if self.store else 0)
        # The writer's dead-letter total, as a counter: counted by one process (a shared writer reports the same
        # total to every worker), from what it had when this process started.
        self._dead_seen = store.dead_lettered
        if self.worker in (None, 1) or config.storage.postgres:  # PostgreSQL: each worker has a writer of its own
            self.metrics.before_render(self._count_dead_letters)
        self._apply_directory(store.run("directory").result(), store.run("mcp_tokens").result(),
                              store.run("users").result(), store.run("prices").result())
        self.recorder = Recorder(store)
        self.recorder.unpriced = self.metrics.unpriced_usage
        self.recorder.telemetry = self.telemetry
        log.info(
            "aibridge: %d provider(s) [%s], database %s, %d active token(s)",
            len(config.providers), ", ".join(p.name for p in config.providers),
            describe_store(config), len(self.tokens),
        )

    def _count_dead_letters(self) -> None:
        if self.store is not None and self.store.dead_lettered > self._dead_seen:
            self.metrics.dead_lettered_total.inc(self.store.dead_lettered - self._dead_seen)
            self._dead_seen = self.store.dead_lettered

    def _breaker_changed(self, key: tuple, state: int, tripped: bool) -> None:
        self.metrics.child(self.metrics.breaker_state, *key).set(state)
        if tripped:
            self.metrics.child(self.metrics.breaker_trips, *key).inc()
            log.warning("circuit breaker opened for %s %s %s", *key)

    async def _refresh_directory(self) -> None:
        """Fleet mode: tokens created or revoked anywhere (the CLI writes PostgreSQL directly, other gateways too)
        take effect here within a second (DIRECTORY_REFRESH_SECONDS)."""
        rounds = 0
        failing: str | None = None
        while self.store is not None:
            await asyncio.sleep(DIRECTORY_REFRESH_SECONDS)
            rounds += 1
            try:
                if self.keyboard is not None:
                    self._share_keys()
                await self.reload_directory()
                if self.budgets is not None and rounds % 2 == 1:
                    rows = await asyncio.wrap_future(self.store.run("budget_totals"))
                    budgets = self.budgets
                    totals = await asyncio.to_thread(budgets.totals_from, rows)  # off the event loop
                    budgets.install_totals(totals)
                    if self.notices is not None:  # crossings by other processes' calls are noticed here too
                        self.notices.sweep(self.budgets, self._people_with_usage())
                if rounds % 1200 == 1:  # at start, then every ten minutes
                    await asyncio.wrap_future(self.store.run("prune_request_counts"))  # older than an hour
                    closed = await asyncio.wrap_future(self.store.run("close_abandoned", True))
                    if closed:
                        log.warning("aibridge: ended %d interception(s) a stopped gateway left in progress for "
                                    "hours as failed", closed)
                if failing:
                    failing = None
                    log.warning("aibridge: users, tokens and budgets are reloaded from the store again")
            except Exception as e:  # the store is away: keep the last directory and totals; say so once
                why = str(e).split(";")[0]
                if failing != why:
                    failing = why
                    log.warning("aibridge: reloading users, tokens and budgets failed (%s); the last ones stay in "
                                "force until the store is back", why)

    def _share_keys(self) -> None:
        """Workers: publish this worker's key pools, apply resets other workers were asked for."""
        for provider in self.keyboard.pending_resets():
            for name, pool in self.pools.items():
                if provider in (None, name):
                    pool.reset()
        self.keyboard.publish([row for pool in self.pools.values() for row in pool.status()])

    async def fleet_rate_refusal(self, user_id: str, user_name: str):
        """Fleet mode: count this request in the shared per-minute counter; the refusal if over the limit. A store
        that is slow or away is waited on for STORE_WAIT at most: then this process counts on its own (logged
        once per change), and no request waits for, or fails with, the database."""
        limits = self.budgets.limits_for(user_name, self.groups_of(user_id))
        if limits.requests_per_minute is None:
            return None
        window = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        if self.store.state.get("up", True):
            try:
                count = await asyncio.wait_for(asyncio.wrap_future(self.store.run(
                    "count_request", user_id=user_id, window_start=window.isoformat())), STORE_WAIT)
                if self._budgets_degraded:
                    self._budgets_degraded = False
                    log.warning("aibridge: budgets are counted across the fleet again")
                return self.budgets.fleet_refusal(count, limits)
            except Exception as e:  # a timeout, or the store's failure
                reason = type(e).__name__ if isinstance(e, asyncio.TimeoutError) else str(e).splitlines()[0][:200]
            else:
                reason = ""
        else:
            reason = self.store.state.get("reason") or "store unavailable"
        if not self._budgets_degraded:
            self._budgets_degraded = True
            log.warning("aibridge: budgets degraded: the store is slow or away (%s); requests per minute are counted "
                        "by this process alone and tokens and spend use the last totals until it is back", reason)
        return self.budgets.local_rate_refusal(user_id, limits)

    # --- the store's health ---------------------------------------------------------------------------

    def store_health(self) -> dict:
        """What /aibridge/healthz says of recording: whether the store takes records, why not, since when, what
        is held, and whether model calls are refused for it (storage.on_failure: refuse)."""
        store, cfg = self.store, self.config.storage
        st = dict(store.state) if store is not None else {}
        up = store is not None and store.alive and st.get("up", True)
        reasons = []
        if store is None or not store.alive:
            reasons.append(f"store process gone ({store._dead if store is not None else 'not open'})")
        since = st.get("since")
        since_text = dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="seconds") if since else None
        if st.get("reason") and not st.get("up", True):
            reasons.append(f"{'store unreachable' if st['reason'] == 'store unreachable' else st['reason']}"
                           f"{f' since {since_text}' if since_text else ''}")
        backlog = int(st.get("backlog") or 0)
        if backlog:
            reasons.append(f"backlog {backlog} records")
        if st.get("spool"):
            reasons.append(f"spool not writable ({st['spool']})")
        if store is not None and store.journal_trouble():
            reasons.append(f"journal not writable ({store.journal_error})")
        if st.get("lost"):
            reasons.append(f"{st['lost']} records lost (store, spool and memory full)")
        over_bound = int(st.get("backlog_bytes") or 0) >= cfg.backlog_max_mb * 1024 * 1024 * 0.95
        down_for = time.time() - since if since and not st.get("up", True) else 0.0
        # Records kept only in memory (neither the spool nor the journal can be written) die with the process.
        memory_only = bool(st.get("spool")) and store is not None and bool(store.journal_error)
        refusing = cfg.on_failure == "refuse" and (
            store is None or not store.alive or (not st.get("up", True) and down_for >= cfg.refuse_after_seconds)
            or over_bound or memory_only)
        if refusing != self._refusing:
            self._refusing = refusing
            (log.error if refusing else log.warning)(
                "aibridge: %s", "refusing model calls: the store cannot record them (storage.on_failure: refuse)"
                if refusing else "model calls are served again: the store records them")
        return {"up": up, "reason": st.get("reason") if not st.get("up", True) else None, "since": since_text,
                "backlog": backlog, "refusing": refusing, "reasons": reasons}

    async def reload_directory(self) -> None:
        """After an admin operation: new or revoked tokens take effect for the next request."""
        directory, mcp_tokens, users, prices = await asyncio.gather(
            asyncio.wrap_future(self.store.run("directory")), asyncio.wrap_future(self.store.run("mcp_tokens")),
            asyncio.wrap_future(self.store.run("users")), asyncio.wrap_future(self.store.run("prices")))
        self._apply_directory(directory, mcp_tokens, users, prices)

    def _apply_directory(self, directory: list, mcp_tokens: list, users: list, prices: list | None = None) -> None:
        self.tokens.replace({row[0]: Actor(*row[1:]) for row in directory})
        # Whom a service account may act for, by id or by name; each user's groups (budgets follow them).
        self.users = {key: (uid, name) for uid, name, *_ in users for key in (uid, name)}
        self.user_groups = {uid: tuple(g[0]) if g else () for uid, _, *g in users}
        self.mcp_tokens = {(uid, server): token for uid, server, token in mcp_tokens}
        if prices is not None:  # the database's prices (aibridge prices set), over the file's and the package's
            self.price_overrides = {m: Price(i, o, r, w, "database") for m, i, o, r, w in prices}
            if self.prices is not None:
                self.prices.set_overrides(self.price_overrides)

    def budget_report(self, user_id: str | None = None) -> dict:
        """Budget use in the current periods (admin API `budgets`): everyone's, or one user's (their groups' rows
        then cover only them)."""
        if self.budgets is None:
            return {"users": [], "groups": []}
        people = {uid: name for uid, name in self.users.values()}
        chosen = [(uid, name, self.groups_of(uid)) for uid, name in sorted(people.items(), key=lambda p: p[1])
                  if user_id is None or uid == user_id]
        return budget_report(self.budgets, chosen)

    def _people_with_usage(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(id, name, groups) of everyone the budgets counted usage for in the current periods."""
        names = {uid: name for uid, name in self.users.values()}
        return [(uid, names[uid], self.groups_of(uid)) for uid in self.budgets.people() if uid in names]

    def groups_of(self, user_id: str) -> tuple[str, ...]:
        """A user's groups as the directory last loaded them (budgets per group follow them)."""
        return self.user_groups.get(user_id, ())

    def _oauth_callback_url(self) -> str:
        """Where a user's browser comes back after signing in to an oauth MCP server: `mcp.oauth_callback_url`,
        else this gateway's own address (the one the CLI reaches it at)."""
        configured = self.config.mcp.oauth_callback_url if self.config is not None else None
        return configured or (self.own_url or "http://127.0.0.1:8080") + OAUTH_CALLBACK_PATH

    def _user_name(self, user_id: str) -> str | None:
        found = self.users.get(user_id)
        return found[1] if found else None

    def chosen_upstream(self, host: str, port: int) -> bool:
        """A provider's base_url or the injected-tool loop: addresses the gateway itself sends requests to."""
        if self.loopback is not None and (host, port) == ("127.0.0.1", self.loopback.port):
            return True
        return any((p.host, p.port) == (host, port) for p in self.config.providers)

    def _translates(self) -> bool:
        """An instance answers the Responses WebSocket in the gateway (flow/ws_translate.py): the loopback serves it."""
        return any(not p.websocket and "openai.responses" in PROVIDERS[p.type].apis for p in self.config.providers)

    async def _start_loopback(self) -> None:
        """The in-process endpoint the injected-tool loop and the key-pool relay answer their flows from, with the
        gateway's own upstream client."""
        verify: bool | str = ctx.options.ssl_verify_upstream_trusted_ca or True
        if ctx.options.ssl_insecure:
            verify = False
        client = upstream_client(verify)
        tool_loop = ToolLoop(self.mcp, client)
        tool_loop.telemetry = self.telemetry
        gateway = McpGateway(self.recorder, self.metrics)
        self._configure_gateway(gateway)
        await gateway.start()
        loopback = LoopbackServer({LoopJob: tool_loop, RelayJob: Relay(client), McpJob: gateway,
                                   SocketJob: Translator(client, tool_loop)})
        await loopback.start()
        self.loopback, self.tool_loop, self.mcp_gateway = loopback, tool_loop, gateway

    def _configure_gateway(self, gateway: McpGateway) -> None:
        """The MCP gateway follows the configuration: servers, access rules, policies, rate limits."""
        gateway.registry, gateway.access, gateway.policing = self.mcp, self.mcp_access, self.policing
        gateway.rate = self.mcp_rate_refusal
        gateway.changed()  # notification streams look again (rules or servers may differ)

    async def mcp_rate_refusal(self, caller: McpCaller) -> Refusal | None:
        """`mcp_calls_per_minute` for the person a call is for (acted-for, else the caller): counted in the
        shared store when processes share one (waited on for STORE_WAIT at most), else in this process."""
        person_id, person_name = caller.on_behalf_of or (caller.user_id, caller.user_name)
        limit = self.mcp_limit.limit_for(person_name, self.groups_of(person_id)) if self.mcp_limit is not None else None
        if limit is None:
            return None
        if self.shared_store and self.store is not None and self.store.state.get("up", True):
            window = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
            try:
                count = await asyncio.wait_for(asyncio.wrap_future(self.store.run(
                    "count_request", user_id=McpCallLimit.counter_id(person_id), window_start=window.isoformat())),
                    STORE_WAIT)
                return McpCallLimit.fleet(count, limit)
            except Exception:  # slow or away: this process counts alone (budgets log when that happens)
                pass
        return self.mcp_limit.local(person_id, limit)

    def _listen_for_reload(self) -> None:
        """SIGHUP reloads the configuration (systemd's ExecReload; the --workers supervisor forwards it)."""
        try:
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: self._reloads.add(asyncio.ensure_future(self._reload_once("SIGHUP"))))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests): no signal
            pass

    async def _watch_files(self) -> None:
        """`reload.watch`: a changed config file (or a file it names: the price table) is reloaded as on SIGHUP,
        once the change has held still for one interval (an editor's partial write is not read). A file that
        changes to something unusable is refused like a bad SIGHUP, once: the next change is tried again. The
        files and the interval follow the running config, so turning `watch` off in the file stops the watch."""
        seen = await asyncio.to_thread(_file_marks, self.config.files)
        while self.config.reload.watch:
            await asyncio.sleep(self.config.reload.watch_interval_seconds)
            now = await asyncio.to_thread(_file_marks, self.config.files)
            if now == seen:
                continue
            await asyncio.sleep(self.config.reload.watch_interval_seconds)
            settled = await asyncio.to_thread(_file_marks, self.config.files)
            if settled != now:
                continue  # still being written: looked at again next round
            await self._reload_once("file changed")
            seen = await asyncio.to_thread(_file_marks, self.config.files)
        self._watcher = None

    def _watch_if_asked(self) -> None:
        if self.config is not None and self.config.reload.watch and self._watcher is None and ctx.options.server:
            self._watcher = asyncio.create_task(self._watch_files())

    async def _reload_once(self, why: str) -> None:
        """One reload at a time: a second SIGHUP while one runs reloads again after it (the file may have changed
        since the first read)."""
        try:
            async with self._reload_lock:
                await self.reload(why)
        except Exception:  # a signal's task: nobody awaits it, so say it here (and keep the gateway serving)
            log.exception("aibridge: configuration reload (%s) failed", why)
        finally:
            self._reloads.discard(asyncio.current_task())

    async def running(self) -> None:
        if self.store is None or not ctx.options.server:
            return
        # Everything loaded so far (mitmproxy, DuckDB, the MCP SDK, config) lives as long as the process: move
        # it out of the collector's reach, so full collections under load scan only per-request objects.
        gc.collect()
        gc.freeze()
        quiet_legacy_log_events()
        direct = [h for h in logging.getLogger().handlers if not isinstance(h, LegacyLogEvents)]
        if direct:
            interception_log.handlers, interception_log.propagate = direct, False
        if self.shared_store and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_directory())
        if (self.mcp is not None or self.pools or self._translates()) and self.loopback is None:
            await self._start_loopback()
        self._listen_for_reload()
        self._watch_if_asked()
        addrs = []
        try:
            addrs = ctx.master.addons.get("proxyserver").listen_addrs()
        except Exception:
            pass
        host, port = (addrs[0][0], addrs[0][1]) if addrs else (ctx.options.listen_host, ctx.options.listen_port)
        self.own_addresses.update(local_addresses(host.strip("[]")))
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        self.own_url = f"http://{host}:{port}"
        if self.worker is not None:  # the supervisor wrote the runtime file; every worker takes its secret
            self.control_secret = control_secret()
        else:
            self.control_secret = write_runtime_file(self.store.path, f"http://{host}:{port}")

    async def done(self) -> None:
        """Graceful shutdown: every exchange in flight is recorded as ended and every queued record reaches
        DuckDB before the file closes; MCP sessions are closed and stdio servers' processes stopped."""
        for state in list(self.inflight):
            ic = state.interception
            summary = state.tap.summary if state.tap else ResponseSummary()
            call = state.police
            redactor = call.policing.stored_redactor(call.facts, call.stored) if call is not None else None
            if redactor is not None:  # what the call stores is masked, as on any other ending
                mask_stored(redactor, summary)
            self.recorder.ended(ic, summary, None, "gateway shut down", at(None))
        self.inflight.clear()
        if self.notices is not None:  # budget notices under way are said (bounded by their timeouts)
            await self.notices.aclose()
        if self.loopback is not None:
            self.loopback.close()
            self.loopback = self.tool_loop = None
        if self.mcp_gateway is not None:
            self.mcp_gateway.stop()
            self.mcp_gateway = None
        registries = [self.mcp] if self.mcp is not None else []
        for task in list(self._retiring):  # replaced by reloads, not closed yet: now
            task.cancel()
        try:
            await asyncio.wait_for(asyncio.gather(*(r.aclose() for r in registries), *self._retiring,
                                                  return_exceptions=True), 10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("aibridge: MCP sessions did not all close in time")
        # What telemetry queued is sent (bounded by telemetry.timeout_seconds), on a thread: the event loop goes on.
        await asyncio.to_thread(self.telemetry.shutdown)
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.store is not None:
            if self.worker is None:
                remove_runtime_file(self.store.path, self.control_secret)
            self.store.close()
            log.info("aibridge: %d records written, %d failed", self.store.written, self.store.failed)
            self.store = None

    # --- gateway tokens, shared by every way in ------------------------------------------------------

    def check_token(self, flow: http.HTTPFlow, token: str | None, provider_type: str | None) -> Actor | None:
        """A gateway token check. A failure counts against the client's address; past the limit, failures are
        answered 429 (set on the flow) instead of 401/407."""
        actor = self.tokens.lookup(token)
        if actor is None:
            self.auth_failed(flow, provider_type)
        return actor

    def auth_failed(self, flow: http.HTTPFlow, provider_type: str | None) -> bool:
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


def _file_marks(paths) -> tuple:
    """What tells a file changed: its inode (an editor's rename), size and modification time; None if absent."""
    marks = []
    for path in paths:
        try:
            st = os.stat(path)
            marks.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            marks.append(None)
    return tuple(marks)
