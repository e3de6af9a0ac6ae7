"""Configuration: one YAML file shared by the gateway addon and the CLI."""

from __future__ import annotations

import dataclasses
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

from .apis import PROVIDERS
from .apis.base import BadSettings
from .keypool import MAX_KEYS

DEFAULT_CONFIG = Path("config") / "aibridge.yaml"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# The gateway serves these itself; no provider instance may take the prefix.
RESERVED_PREFIXES = frozenset({"aibridge"})


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
    """An admin-approved MCP server whose tools are injected as bmcp_<name>_<tool>."""

    name: str
    url: str
    headers: dict = field(default_factory=dict, hash=False, compare=False, repr=False)
    per_user_token: bool = False
    allow: re.Pattern | None = None
    deny: re.Pattern | None = None

    def permits(self, tool: str) -> bool:
        """Neither regex: all; deny wins; only deny: all but denied."""
        if self.deny is not None and self.deny.search(tool):
            return False
        return self.allow is None or bool(self.allow.search(tool))


@dataclass(frozen=True)
class McpSettings:
    max_rounds: int = 10
    tool_timeout_seconds: float = 30.0
    list_timeout_seconds: float = 2.0
    refresh_seconds: float = 300.0
    max_tools: int = 128  # providers cap tools per request (OpenAI: 128); injected tools are trimmed to fit


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0  # TCP connect to the provider
    response: float = 600.0  # request sent → response headers, and for blocking calls → whole body
    stream_idle: float = 300.0  # longest silence between two chunks of a stream
    # SIGTERM: how long calls in flight may finish before they are ended (keep it below systemd's TimeoutStopSec)
    shutdown_grace: float = 60.0
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
class BreakerSettings:
    failures: int = 5
    open_seconds: float = 30.0
    half_open_requests: int = 3


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    usd_per_month: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_day, self.usd_per_month))


@dataclass(frozen=True)
class BudgetSettings:
    default: Limits = Limits()
    users: dict[str, Limits] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Config:
    """The parsed config file; each attribute is the YAML section of the same name."""

    path: Path | None
    providers: tuple[ProviderInstance, ...]
    storage: StorageSettings
    proxy: ProxyPolicy = ProxyPolicy()
    capture: CaptureSettings = CaptureSettings()
    mcp_servers: tuple[McpServer, ...] = ()
    mcp: McpSettings = McpSettings()
    retention_days: int = 60  # 0 keeps records forever
    pricing: Path | None = None  # a price table replacing the shipped one
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    circuit_breaker: BreakerSettings = BreakerSettings()
    limits: LimitSettings = LimitSettings()
    timeouts: Timeouts = Timeouts()
    budgets: BudgetSettings = BudgetSettings()
    public_host_notes: tuple[str, ...] = ()  # start-up log lines: which instance takes each public host

    @property
    def duckdb_path(self) -> Path:
        return self.storage.duckdb


def parse_limits(d: dict | None, where: str) -> Limits:
    d = d or {}
    unknown = set(d) - {"requests_per_minute", "tokens_per_day", "usd_per_month"}
    if unknown:
        raise ConfigError(f"{where}: unknown limit {sorted(unknown)[0]!r}")
    try:
        return Limits(
            int(d["requests_per_minute"]) if d.get("requests_per_minute") is not None else None,
            int(d["tokens_per_day"]) if d.get("tokens_per_day") is not None else None,
            float(d["usd_per_month"]) if d.get("usd_per_month") is not None else None,
        )
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: limits must be numbers") from None


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
    raw = expand_env(raw)
    base = path.parent if path is not None else Path.cwd()

    def local(p) -> Path:
        """Relative paths in the config are relative to the config file, so the CLI and the gateway open the
        same files from any working directory."""
        p = Path(str(p)).expanduser()
        return p if p.is_absolute() else (base / p)

    providers = []
    seen_hosts: dict[str, str] = {}
    opted_out: set[str] = set()
    for i, item in enumerate(raw.get("providers") or []):
        prov = _parse_provider(item, f"providers[{i}]")
        if any(p.name == prov.name for p in providers):
            raise ConfigError(f"providers[{i}]: duplicate provider name {prov.name!r}")
        explicit = isinstance(item, dict) and item.get("hosts") is not None
        if explicit and not item["hosts"]:
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
    storage = raw.get("storage") or {}
    if not isinstance(storage, dict):
        raise ConfigError("storage: must be a mapping")
    db = storage.get("duckdb") or "data/aibridge.duckdb"
    postgres = storage.get("postgres") or None
    if postgres is not None and not (isinstance(postgres, str) and postgres.startswith(("postgresql://",
                                                                                         "postgres://"))):
        raise ConfigError("storage.postgres: must be a postgresql://user@host:port/database URL")
    if postgres is not None:
        try:
            from psycopg.conninfo import conninfo_to_dict

            conninfo_to_dict(postgres)
        except Exception as e:  # malformed: refuse now, in words that never repeat the URL (it may hold a password)
            raise ConfigError(f"storage.postgres: not a valid URL ({postgres_error(e, postgres)})") from None
    unknown = set(storage) - {"duckdb", "postgres", "backlog_max_mb", "on_failure", "refuse_after_seconds"}
    if unknown:
        raise ConfigError(f"storage: unknown key(s) {', '.join(sorted(unknown))}")
    on_failure = storage.get("on_failure", "serve")
    if on_failure not in ("serve", "refuse"):
        raise ConfigError(f"storage.on_failure: must be serve or refuse, not {on_failure!r}")
    try:
        backlog_max_mb = int(storage.get("backlog_max_mb", 512))
        refuse_after = float(storage.get("refuse_after_seconds", 10))
    except (TypeError, ValueError):
        raise ConfigError("storage: backlog_max_mb and refuse_after_seconds must be numbers") from None
    if backlog_max_mb < 1:
        raise ConfigError(f"storage.backlog_max_mb: must be 1 or more, not {backlog_max_mb}")
    if refuse_after < 0:
        raise ConfigError(f"storage.refuse_after_seconds: must be 0 or more, not {refuse_after}")
    metrics = raw.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ConfigError("metrics: must be a mapping")
    limits = raw.get("limits") or {}
    if not isinstance(limits, dict):
        raise ConfigError("limits: must be a mapping")
    json_log = (raw.get("logging") or {}).get("interceptions_json") or None
    try:
        max_body = int(float(limits.get("max_request_body_mb", 32)) * 1024 * 1024)
        auth_failures = int(limits.get("auth_failures_per_minute", 30))
        max_idle = int(limits.get("max_idle_connections_per_address", 256))
    except (TypeError, ValueError):
        raise ConfigError("limits: max_request_body_mb, auth_failures_per_minute and "
                          "max_idle_connections_per_address must be numbers") from None
    if max_idle < 1:
        raise ConfigError(f"limits.max_idle_connections_per_address: must be 1 or more, not {max_idle}")
    capture = _parse_capture(raw.get("capture") or {})
    if capture.directory is not None:
        capture = dataclasses.replace(capture, directory=local(capture.directory))
    return Config(
        path=path,
        providers=tuple(providers),
        storage=StorageSettings(local(db), postgres, backlog_max_mb, on_failure, refuse_after),
        proxy=_parse_proxy(raw.get("proxy") or {}),
        capture=capture,
        mcp_servers=_parse_mcp_servers(raw.get("mcp_servers") or []),
        mcp=_parse_mcp_settings(raw.get("mcp") or {}),
        retention_days=_int(raw, "retention_days", 60),
        pricing=local(raw["pricing"]) if raw.get("pricing") else None,
        metrics=MetricsSettings(str(metrics.get("prefix", "aibridge_")),
                                str(metrics["token"]) if metrics.get("token") else None),
        logging=LoggingSettings(json_log if json_log in (None, "-") else str(local(json_log))),
        budgets=_parse_budgets(raw.get("budgets") or {}),
        circuit_breaker=_parse_breaker(raw.get("circuit_breaker") or {}),
        limits=LimitSettings(max_body, auth_failures, max_idle),
        timeouts=_parse_timeouts(raw.get("timeouts") or {}),
        public_host_notes=tuple(notes),
    )


def _parse_timeouts(d) -> Timeouts:
    if not isinstance(d, dict):
        raise ConfigError("timeouts: must be a mapping")
    names = {"connect_seconds": "connect", "response_seconds": "response", "stream_idle_seconds": "stream_idle",
             "shutdown_grace_seconds": "shutdown_grace", "request_head_seconds": "request_head"}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(f"timeouts: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(names)}")
    values = {}
    for key, attr in names.items():
        if key in d:
            try:
                values[attr] = float(d[key])
            except (TypeError, ValueError):
                raise ConfigError(f"timeouts.{key}: must be a number of seconds") from None
            if values[attr] <= 0:
                raise ConfigError(f"timeouts.{key}: must be positive")
    return Timeouts(**values)


def _parse_breaker(d) -> BreakerSettings:
    if not isinstance(d, dict):
        raise ConfigError("circuit_breaker: must be a mapping")
    try:
        return BreakerSettings(int(d.get("failures", 5)), float(d.get("open_seconds", 30)),
                               int(d.get("half_open_requests", 3)))
    except (TypeError, ValueError):
        raise ConfigError("circuit_breaker: failures, open_seconds and half_open_requests must be numbers") from None


def _parse_budgets(d) -> BudgetSettings:
    if not isinstance(d, dict):
        raise ConfigError("budgets: must be a mapping")
    users = d.get("users") or {}
    if not isinstance(users, dict):
        raise ConfigError("budgets.users: must map user names to limits")
    return BudgetSettings(parse_limits(d.get("default"), "budgets.default"),
                          {str(k): parse_limits(v, f"budgets.users.{k}") for k, v in users.items()})


def _int(d: dict, key: str, default: int) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{key}: must be a non-negative integer")
    return v


def _regex(d: dict, key: str, where: str) -> re.Pattern | None:
    v = d.get(key)
    if v in (None, ""):
        return None
    try:
        return re.compile(str(v))
    except re.error as e:
        raise ConfigError(f"{where}.{key}: invalid regex: {e}") from None


def _parse_mcp_servers(items) -> tuple[McpServer, ...]:
    if not isinstance(items, list):
        raise ConfigError("mcp_servers: must be a list")
    out: list[McpServer] = []
    for i, d in enumerate(items):
        where = f"mcp_servers[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be a mapping")
        name = str(d.get("name") or "")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name):
            raise ConfigError(f"{where}.name: {name!r} is not a valid server id (letters, digits, - _)")
        if any(s.name == name for s in out):
            raise ConfigError(f"{where}.name: duplicate server {name!r}")
        url = str(d.get("url") or "")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"{where}.url: {url!r} is not an http(s) URL")
        headers = d.get("headers") or {}
        if not isinstance(headers, dict):
            raise ConfigError(f"{where}.headers: must be a mapping")
        out.append(
            McpServer(
                name=name, url=url, headers={str(k): str(v) for k, v in headers.items()},
                per_user_token=_bool(d, "per_user_token", False, where),
                allow=_regex(d, "tool_allow_regex", where), deny=_regex(d, "tool_deny_regex", where),
            )
        )
    return tuple(out)


def _parse_mcp_settings(d) -> McpSettings:
    if not isinstance(d, dict):
        raise ConfigError("mcp: must be a mapping")
    try:
        s = McpSettings(
            max_rounds=int(d.get("max_rounds", 10)),
            tool_timeout_seconds=float(d.get("tool_timeout_seconds", 30)),
            list_timeout_seconds=float(d.get("list_timeout_seconds", 2)),
            refresh_seconds=float(d.get("refresh_seconds", 300)),
            max_tools=int(d.get("max_tools", 128)),
        )
    except (TypeError, ValueError):
        raise ConfigError("mcp: max_rounds, max_tools and the *_seconds settings must be numbers") from None
    if s.max_rounds < 1:
        raise ConfigError("mcp.max_rounds: must be at least 1")
    return s


def _bool(d: dict, key: str, default: bool, where: str) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}: must be true or false")
    return v


def _parse_proxy(d) -> ProxyPolicy:
    if not isinstance(d, dict):
        raise ConfigError("proxy: must be a mapping")
    egress = d.get("egress", "all")
    if egress not in ("all", "ai-only"):
        raise ConfigError("proxy.egress: must be 'all' or 'ai-only'")
    require = d.get("require_auth")
    if require is not None and not isinstance(require, bool):
        raise ConfigError("proxy.require_auth: must be true or false")
    allow = d.get("allow_addresses") or []
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise ConfigError("proxy.allow_addresses: must be a list of IP addresses, CIDR ranges or host names")
    for a in allow:
        if "/" in a:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise ConfigError(f"proxy.allow_addresses: {a!r} is not a valid CIDR range") from None
    subscriptions = d.get("subscriptions", "allow")
    if subscriptions not in ("allow", "refuse"):
        raise ConfigError("proxy.subscriptions: must be 'allow' or 'refuse'")
    unknown = set(d) - {"require_auth", "egress", "byok", "allow_addresses", "subscriptions"}
    if unknown:
        raise ConfigError(f"proxy: unknown key(s) {', '.join(sorted(unknown))}")
    return ProxyPolicy(require_auth=require, egress=egress, byok=_bool(d, "byok", True, "proxy"),
                       allow_addresses=tuple(a.lower() for a in allow), subscriptions=subscriptions)


def _parse_capture(d) -> CaptureSettings:
    if not isinstance(d, dict):
        raise ConfigError("capture: must be a mapping")
    try:
        max_mb = float(d.get("max_mb", 100))
        max_age = float(d.get("max_age_minutes", 60))
    except (TypeError, ValueError):
        raise ConfigError("capture.max_mb / capture.max_age_minutes: must be numbers") from None
    directory = d.get("directory")
    return CaptureSettings(
        directory=Path(directory).expanduser() if directory else None,
        max_bytes=int(max_mb * 1024 * 1024),
        max_age_seconds=int(max_age * 60),
    )


def _parse_provider(item, where: str) -> ProviderInstance:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a mapping")
    name = str(item.get("name") or "")
    if not _NAME_RE.match(name) or name in RESERVED_PREFIXES:
        raise ConfigError(f"{where}.name: {name!r} is not a valid instance name (lowercase letters, digits, - _)")
    ptype = item.get("type")
    if ptype not in PROVIDERS:
        raise ConfigError(f"{where}.type: must be one of {', '.join(PROVIDERS)}, got {ptype!r}")
    transport = None
    if PROVIDERS[ptype].transport is not None:
        try:
            transport = PROVIDERS[ptype].transport(item, where)
        except BadSettings as e:
            raise ConfigError(str(e)) from None
    base_url = str(item.get("base_url") or PROVIDERS[ptype].default_base_url
                   or (transport.default_base_url if transport else ""))
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.base_url: {base_url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if "key" in item and item["key"]:
        key, source = str(item["key"]), "key"
    elif item.get("key_env"):
        key, source = os.environ.get(str(item["key_env"])) or None, f"${item['key_env']}"
    else:
        key, source = None, "none"
    keys = _parse_keys(item, where, key, ptype)
    if len(keys) > 1:
        key, source = keys[0], f"keys ({len(keys)})"
    hosts = item.get("hosts")
    if hosts is not None and (not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts)):
        raise ConfigError(f"{where}.hosts: must be a list of host names")
    # The base_url host, plus any listed; `hosts: []` opts out of interception entirely.
    hosts = [] if hosts == [] else [parts.hostname, *[h for h in (hosts or []) if h.lower() != parts.hostname]]
    passthrough = item.get("passthrough_paths") or []
    if not isinstance(passthrough, list) or not all(isinstance(x, str) and x.startswith("/") for x in passthrough):
        raise ConfigError(f"{where}.passthrough_paths: must be a list of paths starting with /")
    return ProviderInstance(
        name=name,
        type=ptype,
        base_url=base_url,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        key=key,
        key_source=source,
        hosts=tuple(h.lower() for h in hosts),
        passthrough_paths=tuple(p.rstrip("/") or "/" for p in passthrough),
        transport=transport,
        keys=keys,
    )


def _parse_keys(item: dict, where: str, key: str | None, ptype: str) -> tuple[str, ...]:
    """`key`/`key_env` and the `keys:` list (literals, `{key: …}` or `{key_env: NAME}`), in order, once each."""
    given = item.get("keys")
    if given is None:
        return (key,) if key else ()
    provider = PROVIDERS[ptype]
    if provider.own_credentials_only or provider.transport is not None:
        raise ConfigError(f"{where}.keys: provider type {ptype!r} takes no upstream keys")
    if not isinstance(given, list) or not given:
        raise ConfigError(f"{where}.keys: must be a non-empty list of keys (or {{key_env: NAME}} entries)")
    keys = [key] if key else []
    for n, entry in enumerate(given):
        at = f"{where}.keys[{n}]"
        if isinstance(entry, dict) and set(entry) == {"key_env"}:
            value = os.environ.get(str(entry["key_env"]))
            if not value:  # like an unset key_env: left out, said at start-up (the CLI never needs the keys)
                logging.getLogger("aibridge").warning("%s.key_env: $%s is not set; that key is left out of the pool",
                                                      at, entry["key_env"])
                continue
            entry = value
        elif isinstance(entry, dict) and set(entry) == {"key"}:
            entry = entry["key"]
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{at}: must be a key, {{key: …}} or {{key_env: NAME}}")
        keys.append(entry.strip())
    keys = list(dict.fromkeys(keys))
    if len(keys) > MAX_KEYS:
        raise ConfigError(f"{where}.keys: at most {MAX_KEYS} keys per instance (got {len(keys)})")
    return tuple(keys)

