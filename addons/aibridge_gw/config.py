"""Configuration: one YAML file shared by the gateway addon and the CLI."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import config_model
from .apis import PROVIDERS
from .apis.base import BadSettings
from .flow.keypool import MAX_KEYS

DEFAULT_CONFIG = Path("config") / "aibridge.yaml"
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# The gateway serves these itself; no provider instance may take the prefix.
RESERVED_PREFIXES = frozenset({"aibridge"})
# Providers that serve the Responses API over a WebSocket themselves: `websocket` defaults to true there.
WEBSOCKET_HOSTS = frozenset({"api.openai.com", "chatgpt.com"})


class ConfigError(Exception):
    """The configuration is unusable; the message says which key and why."""


@dataclass(frozen=True)
class ProviderInstance:
    name: str
    type: str
    base_url: str
    scheme: str
    host: str
    port: int
    base_path: str  # without trailing slash, e.g. "/v1" or ""
    key: str | None = field(repr=False)  # the first of `keys`
    key_source: str
    hosts: tuple[str, ...]
    passthrough_paths: tuple[str, ...] = ()  # extra read-only endpoints an admin allows (relayed unrecorded)
    # How requests reach a provider that needs more than a key header (Bedrock's signing); see apis/base.Transport.
    transport: Any = field(default=None, repr=False, compare=False)
    keys: tuple[str, ...] = field(default=(), repr=False)  # a failover pool when more than one (see keypool.py)
    # OpenAI's realtime session endpoints hand the client a provider credential billed to the central key that then
    # bypasses the gateway: refused (403) unless the admin allows them here (then recorded like other spend).
    allow_realtime: bool = False
    # The Responses API over a WebSocket (docs/responses-websocket.md): relayed to the provider over a WebSocket
    # (True) or answered by the gateway, each `response.create` sent upstream as an HTTP streaming request (False).
    websocket: bool = False

    @functools.cached_property
    def auth_header(self) -> tuple[bytes, bytes]:
        """The upstream credential as a raw header field, in this provider type's scheme."""
        return PROVIDERS[self.type].auth_header(self.key or "")


@dataclass(frozen=True)
class ProxyPolicy:
    """Proxy-mode (HTTPS_PROXY) behaviour."""

    # None (default): non-AI egress needs proxy credentials, AI hosts take the gateway token as the API key too.
    # True: every proxied request needs proxy credentials (407). False: nothing does (with egress "all": an open
    # relay, an explicit choice that is logged at start-up).
    require_auth: bool | None = None
    egress: str = "all"  # "all": other hosts tunnelled untouched; "ai-only": refused
    byok: bool = True  # keep a user's own provider key when their identity comes from elsewhere
    # Loopback, link-local (cloud metadata), unspecified and the gateway's own addresses are refused as egress
    # targets unless listed here (IP addresses, CIDR ranges or host names).
    allow_addresses: tuple[str, ...] = ()
    # Subscription logins (Claude Code's Claude account, Codex's ChatGPT account) with the user's own login:
    # "allow" (recorded as credential_kind subscription) or "refuse" (403).
    subscriptions: str = "allow"

    @property
    def open_relay(self) -> bool:
        return self.require_auth is False and self.egress == "all"


@dataclass(frozen=True)
class CaptureSettings:
    """Forensic flow capture (also settable with --set aibridge_flows=<dir>)."""

    directory: Path | None = None
    max_bytes: int = 100 * 1024 * 1024
    max_age_seconds: int = 3600


@dataclass(frozen=True)
class McpServer:
    """An admin-approved MCP server whose tools are injected as bmcp_<name>_<tool>: reached by `url` (Streamable
    HTTP or SSE, `transport`) or a stdio child process started with `command`."""

    name: str
    url: str | None = None
    headers: dict = field(default_factory=dict, hash=False, compare=False, repr=False)
    per_user_token: bool = False
    allow: re.Pattern | None = None
    deny: re.Pattern | None = None
    oauth: bool = False  # each user signs in with OAuth 2.1 (mcp/oauth.py)
    oauth_client_id: str | None = None
    oauth_client_secret: str | None = field(default=None, repr=False)
    oauth_scopes: tuple[str, ...] | None = None

    @property
    def per_user(self) -> bool:
        """Each user reaches it with a credential of their own (a stored token or an OAuth sign-in)."""
        return self.per_user_token or self.oauth
    transport: str = "auto"  # url servers: auto, streamable_http, sse; "stdio" for command servers
    command: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # values may be secrets: never shown
    cwd: str | None = None

    @property
    def stdio(self) -> bool:
        return self.command is not None

    @property
    def where(self) -> str:
        """What the server is, safe to show (no header or env value): its URL, or its command line."""
        if self.command is not None:
            return " ".join([self.command, *self.args])
        return self.url or ""

    def permits(self, tool: str) -> bool:
        """Neither regex: all; deny wins; only deny: all but denied."""
        if self.deny is not None and self.deny.search(tool):
            return False
        return self.allow is None or bool(self.allow.search(tool))


@dataclass(frozen=True)
class McpAccessRule:
    """One `mcp_access` rule as written (mcp/access.py applies them): glob patterns on server and tool names
    (None: all), whom it applies to (neither users nor groups: everyone), and whether it denies."""

    index: int  # its place in the file, to name it: mcp_access[index]
    servers: tuple[str, ...] | None = None
    tools: tuple[str, ...] | None = None
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # lower-case, as groups are stored
    deny: bool = False


@dataclass(frozen=True)
class McpSettings:
    max_rounds: int = 10
    tool_timeout_seconds: float = 30.0
    list_timeout_seconds: float = 2.0
    refresh_seconds: float = 300.0
    idle_seconds: float = 300.0  # a pooled session unused this long is closed
    max_sessions: int = 64  # pooled sessions kept, at most (LRU)
    watch_seconds: float = 30.0  # re-listing period while someone waits for list changes
    max_tools: int = 128  # providers cap tools per request (OpenAI: 128); injected tools are trimmed to fit
    tool_name_max_length: int = 49  # /aibridge/mcp's tool names, at most (64 less Claude Code's `mcp__aibridge__`)
    oauth_callback_url: str | None = None  # None: <gateway URL>/aibridge/mcp/oauth/callback


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0  # TCP connect to the provider
    response: float = 600.0  # request sent → response headers, and for blocking calls → whole body
    stream_idle: float = 300.0  # longest silence between two chunks of a stream
    # SIGTERM: how long calls in flight may finish before they are ended (keep it below systemd's TimeoutStopSec)
    shutdown_grace: float = 60.0
    # A client that goes away mid-stream: the provider's answer is still read to its end for at most this long, so
    # its final usage is recorded and charged (0: cut it at once; the row then says its usage is estimated)
    drain_after_disconnect: float = 120.0
    # A client connection that has sent no complete request head this long after it connected (or after its last
    # response ended, between requests) is closed: slow or silent connections cannot pile up.
    request_head: float = 10.0


@dataclass(frozen=True)
class StorageSettings:
    duckdb: Path
    # PostgreSQL (fleet mode): every gateway process records into it and reads users and tokens from it; the
    # DuckDB path's directory then holds each process's spool. May carry a password: never logged.
    postgres: str | None = field(default=None, repr=False)
    # While the store cannot take records they are held (the spool, and memory up to this bound) and retried.
    backlog_max_mb: int = 512
    # serve: keep answering model calls and hold their records; refuse: answer them 503 once the store has been
    # unwritable for refuse_after_seconds or the backlog passed its bound (no call may go unrecorded).
    on_failure: str = "serve"
    refuse_after_seconds: float = 10.0


@dataclass(frozen=True)
class LimitSettings:
    max_request_body_bytes: int = 32 * 1024 * 1024  # limits.max_request_body_mb, after decompression
    auth_failures_per_minute: int = 30  # failed token checks per client address before 429
    # Client connections from one address with nothing in flight; past it the oldest of them is closed.
    max_idle_connections_per_address: int = 256


@dataclass(frozen=True)
class MetricsSettings:
    prefix: str = "aibridge_"
    token: str | None = field(default=None, repr=False)  # /aibridge/metrics needs this bearer token if set


@dataclass(frozen=True)
class LoggingSettings:
    interceptions_json: str | None = None  # path, or "-" for stdout: one JSON line per interception


@dataclass(frozen=True)
class TelemetrySettings:
    """`telemetry:` OpenTelemetry export over OTLP/HTTP (telemetry.py); off while `otlp_endpoint` is unset."""

    otlp_endpoint: str | None = None  # the collector's base URL: /v1/traces and /v1/metrics are appended
    content: bool = False  # prompts and outputs on spans
    service_name: str = "aibridge"
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # the collector's auth: a secret
    export_interval_seconds: float = 30.0
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class ReloadSettings:
    watch: bool = False  # reload when a watched file changes (SIGHUP always reloads)
    watch_interval_seconds: float = 2.0


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = 5
    open_seconds: float = 30.0
    half_open_requests: int = 3


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    usd_per_month: float | None = None
    mcp_calls_per_minute: int | None = None  # MCP gateway tool calls (policy/budgets.McpCallLimit): not in `any`
    usd_per_day: float | None = None
    usd_per_week: float | None = None

    @property
    def any(self) -> bool:
        """Whether any model-call limit is set."""
        return any(getattr(self, k) is not None for k in MODEL_LIMITS)


MODEL_LIMITS = ("requests_per_minute", "tokens_per_day", "usd_per_day", "usd_per_week", "usd_per_month")
LIMIT_KEYS = (*MODEL_LIMITS, "mcp_calls_per_minute")


@dataclass(frozen=True)
class NotificationSettings:
    webhook: str | None = None
    thresholds: tuple[float, ...] = (0.85, 1.0)
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class BudgetSettings:
    default: Limits = Limits()
    users: dict[str, Limits] = field(default_factory=dict, hash=False, compare=False)
    groups: dict[str, Limits] = field(default_factory=dict, hash=False, compare=False)

    @property
    def any(self) -> bool:
        return any(lim.any for lim in (self.default, *self.users.values(), *self.groups.values()))

    def limits_for(self, user_name: str, groups: tuple[str, ...] = ()) -> Limits:
        return self.explain(user_name, groups)[0]

    def dropped_by_own_entries(self) -> list[str]:
        """Users whose own entry leaves unset a limit `default` sets (an own entry replaces everything: often not
        what was meant), as `name: limit, …` for a warning at load."""
        out = []
        for name, own in self.users.items():
            lost = [k for k in LIMIT_KEYS if getattr(own, k) is None and getattr(self.default, k) is not None]
            if lost:
                out.append(f"{name}: {', '.join(lost)}")
        return out

    def explain(self, user_name: str, groups: tuple[str, ...] = ()) -> tuple[Limits, dict[str, str]]:
        """The limits that apply to a person, and for each limit where it comes from: their own entry (which
        replaces everything), else the highest any of their groups sets (a group without the limit has none to
        give), else `default`."""
        own = self.users.get(user_name)
        if own is not None:
            return own, {k: f"users.{user_name}" if getattr(own, k) is not None else f"no limit (users.{user_name} "
                         "sets none: an own entry replaces the default and the groups)" for k in LIMIT_KEYS}
        mine = [(g, self.groups[g]) for g in sorted(groups) if g in self.groups]
        values, why = {}, {}
        for k in LIMIT_KEYS:
            given = [(getattr(lim, k), g) for g, lim in mine if getattr(lim, k) is not None]
            if given:
                value, group = max(given, key=lambda vg: vg[0])
                values[k], why[k] = value, f"groups.{group}" + (
                    f" (the highest of {', '.join(g for _, g in given)})" if len(given) > 1 else "")
            else:
                values[k], why[k] = getattr(self.default, k), "default"
        return Limits(**values), why


@dataclass(frozen=True)
class Config:
    """The parsed config file; each attribute is the YAML section of the same name."""

    path: Path | None
    providers: tuple[ProviderInstance, ...]
    storage: StorageSettings
    proxy: ProxyPolicy = ProxyPolicy()
    capture: CaptureSettings = CaptureSettings()
    mcp_servers: tuple[McpServer, ...] = ()
    mcp_access: tuple[McpAccessRule, ...] = ()
    mcp: McpSettings = McpSettings()
    retention_days: int = 60  # 0 keeps records forever
    pricing: Path | None = None  # a price table replacing the shipped one
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    circuit_breaker: BreakerSettings = BreakerSettings()
    limits: LimitSettings = LimitSettings()
    timeouts: Timeouts = Timeouts()
    budgets: BudgetSettings = BudgetSettings()
    notifications: NotificationSettings = NotificationSettings()
    reload: ReloadSettings = ReloadSettings()
    # The admin's policy rules and guardrails (the typed model: policy/rules.py compiles it), from `policies:` or
    # the file `policies_file` names.
    policies: config_model.PoliciesFile = field(default_factory=config_model.PoliciesFile)
    policies_file: Path | None = None
    public_host_notes: tuple[str, ...] = ()  # start-up log lines: which instance takes each public host

    @property
    def duckdb_path(self) -> Path:
        return self.storage.duckdb

    @property
    def files(self) -> tuple[Path, ...]:
        """The files a reload reads: the config file and the files it names (watched with `reload.watch`)."""
        return tuple(p for p in (self.path, self.pricing, self.policies_file) if p is not None)


def expand_env(value):
    """Expand ${NAME} / ${NAME:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):
        return _ENV_RE.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def postgres_label(dsn: str) -> str:
    """A PostgreSQL URL for messages and logs: host, port and database, never the password."""
    try:
        parts = urlsplit(dsn)
        return f"PostgreSQL {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
    except ValueError:  # a malformed URL: say nothing of it that could be a secret
        return "PostgreSQL (a malformed URL)"


def postgres_tag(dsn: str) -> str:
    """A short name for one PostgreSQL database (host, port, database; never the user or password), in the names
    of the files each gateway process keeps beside it: files of another database are never taken for its own."""
    import hashlib

    try:
        parts = urlsplit(dsn)
        key = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
    except ValueError:
        key = "malformed"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def postgres_error(error: BaseException | str, dsn: str) -> str:
    """A driver's error as text safe for logs and terminals: libpq quotes a URL it cannot parse whole, password
    included, so the URL and its password are cut out."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    text = text.replace(dsn, postgres_label(dsn))
    if password:
        text = text.replace(password, "***")
    if "@" in text and "://" in text:  # whatever else of a URL with credentials is left
        text = re.sub(r"\b(postgres(?:ql)?://)[^@\s\"']*@", r"\1***@", text)
    return text


def aibridge_home() -> Path:
    """Where the gateway's files live when nothing names them: $AIBRIDGE_HOME, else the checkout whose `.venv`
    runs this interpreter (scripts/run's layout), else the current directory. Never the package's own location:
    installed, that is somewhere in site-packages."""
    env = os.environ.get("AIBRIDGE_HOME")
    if env:
        return Path(env).expanduser()
    prefix = Path(sys.prefix)
    if prefix.name == ".venv" and (prefix.parent / DEFAULT_CONFIG).is_file():
        return prefix.parent
    return Path.cwd()


def resolve_config_path(explicit: str | os.PathLike | None = None) -> Path:
    """Explicit path, else $AIBRIDGE_CONFIG, else ./config/aibridge.yaml, else the one in aibridge_home()."""
    for candidate in (explicit, os.environ.get("AIBRIDGE_CONFIG")):
        if candidate:
            return Path(candidate).expanduser()
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    return aibridge_home() / DEFAULT_CONFIG


def load_config(explicit: str | os.PathLike | None = None) -> Config:
    path = resolve_config_path(explicit)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return parse_config(raw, path)


def parse_config(raw: dict, path: Path | None = None) -> Config:
    """A parsed YAML tree as the runtime `Config`: validated by the typed models (config_model.py) first, so every
    mistake is refused with its key path, then resolved (paths, environment, public hosts)."""
    raw = expand_env(raw)
    try:
        f = config_model.validate(raw)
    except config_model.ConfigProblems as e:
        where = f"{path}: " if path is not None else ""
        if len(e.problems) == 1:
            raise ConfigError(where + e.problems[0]) from None
        raise ConfigError(f"{where}{len(e.problems)} problems:\n  " + "\n  ".join(e.problems)) from None
    base = path.parent if path is not None else Path.cwd()

    def local(p) -> Path:
        """Relative paths in the config are relative to the config file, so the CLI and the gateway open the
        same files from any working directory."""
        p = Path(str(p)).expanduser()
        return p if p.is_absolute() else (base / p)

    providers, notes = _providers(f.providers, raw.get("providers") or [])
    policies, policies_file = _policies(f, local)
    _check_route_targets(policies, providers)
    st = f.storage
    if st.postgres is not None:
        try:
            from psycopg.conninfo import conninfo_to_dict

            conninfo_to_dict(st.postgres)
        except Exception as e:  # malformed: refuse now, in words that never repeat the URL (it may hold a password)
            raise ConfigError(f"storage.postgres: not a valid URL ({postgres_error(e, st.postgres)})") from None
    for a in f.proxy.allow_addresses:
        if "/" in a:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise ConfigError(f"proxy.allow_addresses: {a!r} is not a valid CIDR range") from None
    mcp_servers = tuple(_mcp_server(s, f"mcp_servers[{i}]", local) for i, s in enumerate(f.mcp_servers))
    for i, m in enumerate(mcp_servers):
        if any(o.name == m.name for o in mcp_servers[:i]):
            raise ConfigError(f"mcp_servers[{i}].name: duplicate MCP server name {m.name!r}")
    json_log = f.logging.interceptions_json or None
    t = f.timeouts
    return Config(
        path=path,
        providers=tuple(providers),
        storage=StorageSettings(local(st.duckdb), st.postgres, st.backlog_max_mb, st.on_failure,
                                st.refuse_after_seconds),
        proxy=ProxyPolicy(require_auth=f.proxy.require_auth, egress=f.proxy.egress, byok=f.proxy.byok,
                          allow_addresses=tuple(a.lower() for a in f.proxy.allow_addresses),
                          subscriptions=f.proxy.subscriptions),
        capture=CaptureSettings(directory=local(f.capture.directory) if f.capture.directory else None,
                                max_bytes=int(f.capture.max_mb * 1024 * 1024),
                                max_age_seconds=int(f.capture.max_age_minutes * 60)),
        mcp_servers=mcp_servers,
        mcp_access=_mcp_access(f.mcp_access, mcp_servers),
        mcp=McpSettings(max_rounds=f.mcp.max_rounds, tool_timeout_seconds=f.mcp.tool_timeout_seconds,
                        list_timeout_seconds=f.mcp.list_timeout_seconds, refresh_seconds=f.mcp.refresh_seconds,
                        max_tools=f.mcp.max_tools, tool_name_max_length=f.mcp.tool_name_max_length,
                        oauth_callback_url=f.mcp.oauth_callback_url, idle_seconds=f.mcp.idle_seconds,
                        max_sessions=f.mcp.max_sessions, watch_seconds=f.mcp.watch_seconds),
        retention_days=f.retention_days,
        pricing=local(f.pricing) if f.pricing else None,
        metrics=MetricsSettings(f.metrics.prefix, f.metrics.token or None),
        logging=LoggingSettings(json_log if json_log in (None, "-") else str(local(json_log))),
        telemetry=TelemetrySettings(f.telemetry.otlp_endpoint.rstrip("/") if f.telemetry.otlp_endpoint else None,
                                    f.telemetry.content, f.telemetry.service_name,
                                    tuple(sorted(f.telemetry.headers.items())),
                                    f.telemetry.export_interval_seconds, f.telemetry.timeout_seconds),
        budgets=BudgetSettings(_limits(f.budgets.default),
                               {str(k): _limits(v) for k, v in f.budgets.users.items()},
                               {str(k): _limits(v) for k, v in f.budgets.groups.items()}),
        notifications=NotificationSettings(f.notifications.webhook, tuple(sorted(set(f.notifications.thresholds))),
                                           f.notifications.timeout_seconds),
        circuit_breaker=BreakerSettings(f.circuit_breaker.failures, f.circuit_breaker.open_seconds,
                                        f.circuit_breaker.half_open_requests),
        limits=LimitSettings(int(f.limits.max_request_body_mb * 1024 * 1024), f.limits.auth_failures_per_minute,
                             f.limits.max_idle_connections_per_address),
        timeouts=Timeouts(connect=t.connect_seconds, response=t.response_seconds, stream_idle=t.stream_idle_seconds,
                          shutdown_grace=t.shutdown_grace_seconds,
                          drain_after_disconnect=t.drain_after_disconnect_seconds,
                          request_head=t.request_head_seconds),
        reload=ReloadSettings(f.reload.watch, f.reload.watch_interval_seconds),
        policies=policies,
        policies_file=policies_file,
        public_host_notes=tuple(notes),
    )


def _policies(f: config_model.ConfigFile, local) -> tuple[config_model.PoliciesFile, Path | None]:
    """`policies:` or the file `policies_file` names."""
    if f.policies_file is None:
        return f.policies, None
    path = local(f.policies_file)
    return load_policies(path, "policies_file: "), path


def load_policies(path: Path, where: str = "") -> config_model.PoliciesFile:
    """A policies file: YAML holding what `policies:` holds (a config file's `policies:` is taken too, so a whole
    config can be checked or replayed). Problems are reported under the file's name."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{where}{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}{path} must hold a mapping (the keys of `policies:`)")
    if isinstance(raw.get("policies"), dict):
        raw = raw["policies"]
    try:
        return config_model.validate_policies(expand_env(raw))
    except config_model.ConfigProblems as e:
        raise ConfigError(f"{where}{path}: " + "\n  ".join(e.problems)) from None


def _check_route_targets(policies: config_model.PoliciesFile, providers) -> None:
    """A route rule's provider must be an instance of this config."""
    names = {p.name for p in providers}
    for n, rule in enumerate(policies.rules):
        if rule.provider is not None and rule.provider not in names:
            near = difflib.get_close_matches(rule.provider, names, 1)
            hint = f" (did you mean `{near[0]}`?)" if near else f" (instances: {', '.join(sorted(names)) or 'none'})"
            raise ConfigError(f"policies.rules[{n}].provider: rule `{rule.name}` routes to `{rule.provider}`, which is "
                              f"not a provider instance here{hint}")


def _limits(v: config_model.LimitValues) -> Limits:
    return Limits(v.requests_per_minute, v.tokens_per_day, v.usd_per_month, v.mcp_calls_per_minute, v.usd_per_day,
                  v.usd_per_week)


_GLOB = frozenset("*?[")


def _mcp_access(rules: list, servers: tuple[McpServer, ...]) -> tuple[McpAccessRule, ...]:
    """The access rules; a server named literally (no glob) must be one of `mcp_servers` (a typo would otherwise
    silently allow or deny nothing)."""
    names = [s.name for s in servers]
    out = []
    for n, r in enumerate(rules):
        for name in r.servers or ():
            if not _GLOB & set(name) and name not in names:
                near = difflib.get_close_matches(name, names, 1)
                hint = f" (did you mean `{near[0]}`?)" if near else f" (servers: {', '.join(names) or 'none'})"
                raise ConfigError(f"mcp_access[{n}].servers: `{name}` is not an MCP server here{hint}")
        out.append(McpAccessRule(n, tuple(r.servers) if r.servers is not None else None,
                                 tuple(r.tools) if r.tools is not None else None, tuple(r.users),
                                 tuple(g.strip().lower() for g in r.groups), r.deny))
    return tuple(out)


def _providers(items: list, raw_items: list) -> tuple[list[ProviderInstance], list[str]]:
    """The provider instances, each public API host given to the first instance of its type (unless opted out)."""
    providers: list[ProviderInstance] = []
    seen_hosts: dict[str, str] = {}
    opted_out: set[str] = set()
    for i, item in enumerate(items):
        prov = _parse_provider(item, raw_items[i], f"providers[{i}]")
        if any(p.name == prov.name for p in providers):
            raise ConfigError(f"providers[{i}]: duplicate provider name {prov.name!r}")
        explicit = item.hosts is not None
        if explicit and not item.hosts:
            opted_out.add(prov.name)
        kept = []
        for n, h in enumerate(prov.hosts):
            if h in seen_hosts:
                if explicit and n > 0:
                    raise ConfigError(
                        f"providers[{i}].hosts: {h!r} is already intercepted by provider {seen_hosts[h]!r}"
                    )
                continue  # a default host shared with an earlier instance stays with that instance
            seen_hosts[h] = prov.name
            kept.append(h)
        providers.append(dataclasses.replace(prov, hosts=tuple(kept)))
    notes = []
    # Each provider type's public API hosts are intercepted in proxy mode by default, so a client calling the
    # provider directly cannot tunnel past the audit when an instance's base_url points elsewhere.
    for ptype, provider in PROVIDERS.items():
        for host in provider.public_hosts:
            if host in seen_hosts:
                continue
            candidates = [p for p in providers if p.type == ptype and p.name not in opted_out]
            if not candidates:
                continue
            target = candidates[0]
            seen_hosts[host] = target.name
            providers[providers.index(target)] = dataclasses.replace(target, hosts=target.hosts + (host,))
            notes.append(f"proxy mode: {host} is intercepted and routed to provider {target.name!r} "
                         f"({target.base_url}); set hosts: [] on it to opt out")
    return providers, notes


def _mcp_server(d: config_model.McpServerFile, where: str, local=lambda p: p) -> McpServer:
    return McpServer(name=d.name, url=d.url, headers=dict(d.headers), per_user_token=d.per_user_token,
                     allow=_regex(d.tool_allow_regex, "tool_allow_regex", where),
                     deny=_regex(d.tool_deny_regex, "tool_deny_regex", where), oauth=d.oauth,
                     oauth_client_id=d.oauth_client_id, oauth_client_secret=d.oauth_client_secret,
                     oauth_scopes=tuple(d.oauth_scopes) if d.oauth_scopes is not None else None,
                     transport="stdio" if d.command is not None else d.transport, command=d.command,
                     args=tuple(d.args), env=tuple(sorted(d.env.items())),
                     cwd=str(local(d.cwd)) if d.cwd is not None else None)


def _regex(v: str | None, key: str, where: str) -> re.Pattern | None:
    if v in (None, ""):
        return None
    try:
        return re.compile(v)
    except re.error as e:
        raise ConfigError(f"{where}.{key}: invalid regex: {e}") from None


def _parse_provider(item, raw: dict, where: str) -> ProviderInstance:
    ptype = item.type
    if item.name in RESERVED_PREFIXES:
        raise ConfigError(f"{where}.name: {item.name!r} is reserved for the gateway's own endpoints")
    transport = None
    if PROVIDERS[ptype].transport is not None:
        try:
            transport = PROVIDERS[ptype].transport(raw, where)
        except BadSettings as e:
            raise ConfigError(str(e)) from None
    base_url = str(item.base_url or PROVIDERS[ptype].default_base_url
                   or (transport.default_base_url if transport else ""))
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.base_url: {base_url!r} is not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{where}.base_url: {base_url!r} has an invalid port") from None
    if item.key:
        key, source = item.key, "key"
    elif item.key_env:
        key, source = os.environ.get(item.key_env) or None, f"${item.key_env}"
    else:
        key, source = None, "none"
    keys = _parse_keys(item, where, key, ptype)
    if len(keys) > 1:
        key, source = keys[0], f"keys ({len(keys)})"
    if item.allow_realtime and not any(e.api == "openai.realtime" for e in PROVIDERS[ptype].endpoints):
        raise ConfigError(f"{where}.allow_realtime: provider type {ptype!r} has no realtime session endpoints")
    # The base_url host, plus any listed; `hosts: []` opts out of interception entirely.
    hosts = [] if item.hosts == [] else [parts.hostname,
                                         *[h for h in (item.hosts or []) if h.lower() != parts.hostname]]
    return ProviderInstance(
        name=item.name,
        type=ptype,
        base_url=base_url,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        key=key,
        key_source=source,
        hosts=tuple(h.lower() for h in hosts),
        passthrough_paths=tuple(p.rstrip("/") or "/" for p in item.passthrough_paths),
        transport=transport,
        keys=keys,
        allow_realtime=item.allow_realtime,
        websocket=item.websocket if item.websocket is not None else parts.hostname in WEBSOCKET_HOSTS,
    )


def _parse_keys(item, where: str, key: str | None, ptype: str) -> tuple[str, ...]:
    """`key`/`key_env` and the `keys:` list (literals, `{key: …}` or `{key_env: NAME}`), in order, once each."""
    given = item.keys
    if given is None:
        return (key,) if key else ()
    provider = PROVIDERS[ptype]
    if provider.own_credentials_only or provider.transport is not None:
        raise ConfigError(f"{where}.keys: provider type {ptype!r} takes no upstream keys")
    keys = [key] if key else []
    for n, entry in enumerate(given):
        at = f"{where}.keys[{n}]"
        if isinstance(entry, config_model.KeyEntry):
            if entry.key_env is not None:
                value = os.environ.get(entry.key_env)
                if not value:  # like an unset key_env: left out, said at start-up (the CLI never needs the keys)
                    logging.getLogger("aibridge").warning(
                        "%s.key_env: $%s is not set; that key is left out of the pool", at, entry.key_env)
                    continue
                entry = value
            else:
                entry = entry.key
        keys.append(entry.strip())
    keys = list(dict.fromkeys(keys))
    if len(keys) > MAX_KEYS:
        raise ConfigError(f"{where}.keys: at most {MAX_KEYS} keys per instance (got {len(keys)})")
    return tuple(keys)
