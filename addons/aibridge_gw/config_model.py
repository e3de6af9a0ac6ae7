"""The configuration file as typed models: what `aibridge config check` validates and `aibridge config schema` prints.

Every key the gateway reads is declared here once, with its type, default, range and a one-line description; an
unknown key is refused with the closest valid one ("did you mean `retention_days`?"), a value out of range with
its key path. `config.parse_config` turns a validated file into the runtime `Config` the addons read.

Each provider type may add keys of its own (`settings_model` on its class in `apis/<provider>/`), validated only
for instances of that type.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import cel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .apis import PROVIDERS

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
SERVER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Section(BaseModel):
    """A mapping in the file: unknown keys refused, values checked, nothing coerced beyond YAML's own types and
    numbers written as strings (environment references expand to strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class KeyEntry(Section):
    key: str | None = Field(None, description="an upstream key, literally")
    key_env: str | None = Field(None, description="the environment variable holding an upstream key")


class ProviderBase(Section):
    name: str = Field(pattern=NAME_PATTERN, description="instance name; also the URL prefix /<name>")
    base_url: str | None = Field(None, description="the provider's base URL (default: the type's public one)")
    key: str | None = Field(None, description="the upstream key, literally (prefer key_env)")
    key_env: str | None = Field(None, description="the environment variable holding the upstream key")
    keys: list[Any] | None = Field(
        None, description="a failover pool of upstream keys (literals, {key: …} or {key_env: NAME})")
    hosts: list[str] | None = Field(
        None, description="hosts intercepted in proxy mode (default: the base_url host; [] opts out)")
    passthrough_paths: list[Annotated[str, Field(pattern=r"^/")]] = Field(
        default_factory=list, description="extra read-only endpoints relayed unrecorded (paths starting with /)")
    allow_realtime: bool = Field(
        False, description="permit OpenAI's realtime session endpoints (they hand the client a credential billed to "
                           "the central key that bypasses the gateway; recorded when permitted)")
    websocket: bool | None = Field(
        None, description="relay the Responses API's WebSocket transport to the provider over a WebSocket (true) or "
                          "answer it in the gateway, each turn sent as an HTTP streaming request (false); default true "
                          "for api.openai.com and chatgpt.com, false elsewhere (see responses-websocket.md)")

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: list | None) -> list | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must be a non-empty list of keys (or {key_env: NAME} entries)")
        out = []
        for n, entry in enumerate(v):
            if isinstance(entry, str) and entry.strip():
                out.append(entry)
            elif isinstance(entry, dict) and len(entry) == 1 and set(entry) <= {"key", "key_env"} \
                    and isinstance(next(iter(entry.values())), str):
                out.append(KeyEntry(**entry))
            else:
                raise ValueError(f"[{n}] must be a key, {{key: …}} or {{key_env: NAME}}")
        return out


def _provider_models() -> tuple:
    """One model per provider type: the common keys plus the type's own (`settings_model`), tagged by `type`."""
    models = []
    for ptype, provider in PROVIDERS.items():
        extra = getattr(provider, "settings_model", None)
        bases = (ProviderBase,) if extra is None else (extra, ProviderBase)
        models.append(create_model(
            f"Provider_{ptype}", __base__=bases,
            type=(Literal[ptype], Field(description=f"provider type {ptype}")),
        ))
    return tuple(models)


ProviderFile = Annotated[Union[_provider_models()], Field(discriminator="type")]  # noqa: UP007


class StorageFile(Section):
    duckdb: str = Field("data/aibridge.duckdb", description="the DuckDB file (relative to the config file)")
    postgres: str | None = Field(
        None, pattern=r"^postgres(ql)?://",
        description="PostgreSQL URL (fleet mode): every gateway records into it; may carry a password")
    backlog_max_mb: int = Field(512, ge=1, description="records held in memory while the store is down, at most")
    on_failure: Literal["serve", "refuse"] = Field(
        "serve", description="serve: keep answering and hold records; refuse: 503 for model calls once the store "
                             "has been unwritable for refuse_after_seconds")
    refuse_after_seconds: float = Field(10.0, ge=0, description="see on_failure")


class ProxyFile(Section):
    require_auth: bool | None = Field(
        None, description="unset: non-AI egress needs proxy credentials; true: every proxied request does; "
                          "false: none does")
    egress: Literal["all", "ai-only"] = Field("all", description="where proxied non-AI traffic may go")
    byok: bool = Field(True, description="keep a user's own provider key when their identity comes from elsewhere")
    allow_addresses: list[str] = Field(
        default_factory=list, description="loopback/link-local/own addresses allowed as egress targets (IPs, CIDRs, "
                                          "host names)")
    subscriptions: Literal["allow", "refuse"] = Field(
        "allow", description="subscription logins (Claude account, ChatGPT account) through the gateway")


class CaptureFile(Section):
    directory: str | None = Field(None, description="where captured flows are written (unset: no capture)")
    max_mb: float = Field(100.0, gt=0, description="captured flows kept, at most")
    max_age_minutes: float = Field(60.0, gt=0, description="captured flows kept this long")


class McpServerFile(Section):
    """One MCP server: reached over HTTP by `url` (Streamable HTTP or the older HTTP+SSE transport) or started as a
    child process by `command` (stdio; one process per gateway process, restarted when it dies)."""

    name: str = Field(pattern=SERVER_NAME_PATTERN, max_length=32,
                      description="server id (at most 32 characters: tool names keep it whole); tools appear as "
                                  "bmcp_<name>_<tool> in model calls and <name>__<tool> at /aibridge/mcp")
    url: str | None = Field(None, pattern=r"^https?://", description="the MCP server's HTTP URL (or set command)")
    transport: Literal["auto", "streamable_http", "sse"] = Field(
        "auto", description="for url servers: streamable_http, sse (the 2024-11-05 HTTP+SSE transport), or auto: "
                            "sse when the path ends in /sse, else Streamable HTTP, falling back to SSE when the "
                            "server answers its initialize POST with 400, 404 or 405 (remembered)")
    command: str | None = Field(None, min_length=1, description="a stdio server: the program to start (or set url)")
    args: list[str] = Field(default_factory=list, description="its arguments (stdio servers)")
    env: dict[str, str] = Field(default_factory=dict, description="its environment (stdio servers), on top of PATH, "
                                                                  "HOME, USER, LOGNAME, SHELL and TERM only")
    cwd: str | None = Field(None, description="its working directory (stdio servers; relative to the config file; "
                                             "unset: the gateway's)")
    headers: dict[str, str] = Field(default_factory=dict, description="headers sent to the server (url servers)")
    per_user_token: bool = Field(False, description="each user's own token (aibridge mcp-token set; url servers)")
    tool_allow_regex: str | None = Field(None, description="only tools matching this are offered (injected, or at "
                                                           "/aibridge/mcp)")
    tool_deny_regex: str | None = Field(None, description="tools matching this are never offered")
    oauth: bool = Field(False, description="each user signs in to the server with OAuth 2.1 (aibridge mcp login); "
                                           "the gateway keeps and refreshes their tokens, encrypted")
    oauth_client_id: str | None = Field(None, description="the gateway's client id at the server's authorization "
                                                          "server, for one without dynamic client registration")
    oauth_client_secret: str | None = Field(None, description="that client's secret (none: a public client)")
    oauth_scopes: list[str] | None = Field(None, description="scopes to ask for (unset: what the server's metadata "
                                                             "lists)")

    @model_validator(mode="after")
    def _oauth(self):
        if self.oauth and self.per_user_token:
            raise ValueError("oauth and per_user_token exclude each other: a server takes one kind of user "
                             "credential")
        if not self.oauth and (self.oauth_client_id or self.oauth_client_secret or self.oauth_scopes):
            raise ValueError("oauth_client_id, oauth_client_secret and oauth_scopes need oauth: true")
        if self.oauth_client_secret and not self.oauth_client_id:
            raise ValueError("oauth_client_secret needs oauth_client_id")
        return self

    @model_validator(mode="after")
    def _one_kind(self) -> "McpServerFile":
        if self.url is not None and self.command is not None:
            raise ValueError("set url (an HTTP server) or command (a stdio server), not both")
        if self.url is None and self.command is None:
            raise ValueError("set url (an HTTP server) or command (a stdio server)")
        if self.command is not None:
            if self.headers or self.per_user_token:
                raise ValueError("headers and per_user_token are for url servers: a stdio server has no HTTP "
                                 "requests to carry them, and its one process serves every user (put what it "
                                 "needs in env)")
            if self.transport != "auto":
                raise ValueError("transport is for url servers (a command server speaks stdio)")
        elif self.args or self.env or self.cwd is not None:
            raise ValueError("args, env and cwd are for command (stdio) servers")
        return self


class McpAccessRuleFile(Section):
    """One access rule of the MCP gateway (issue #25): who may see and call which servers' tools. With no rules at
    all every user may call every tool (as before); with rules, a tool is allowed when an allow rule matches the user,
    server and tool and no deny rule does (deny wins, whatever the order)."""

    servers: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="server names or glob patterns (unset: every server)")
    tools: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="glob patterns on the server's own tool names (unset: every tool)")
    users: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="user names it applies to")
    groups: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="groups it applies to (aibridge users groups set); neither users nor "
                                          "groups: every user")
    deny: bool = Field(False, description="true: refuse what it matches (a deny wins over every allow)")


class McpFile(Section):
    max_rounds: int = Field(10, ge=1, description="model rounds of the injected-tool loop per request")
    tool_timeout_seconds: Seconds = Field(30.0, description="one tool call")
    list_timeout_seconds: Seconds = Field(2.0, description="listing a server's tools")
    refresh_seconds: Seconds = Field(300.0, description="how often tool lists are refreshed")
    idle_seconds: Seconds = Field(300.0, description="a pooled session to a server unused this long is closed (a "
                                                     "stdio server's process stops; started again when needed)")
    max_sessions: int = Field(64, ge=1, description="pooled sessions (per server and credential) kept open, at most; "
                                                    "the least recently used is closed first")
    watch_seconds: Seconds = Field(30.0, description="while a client waits for list changes, servers are listed "
                                                     "again this often (besides their own list_changed notices)")
    max_tools: int = Field(128, ge=1, description="tools per request, at most (injected tools are trimmed to fit)")
    tool_name_max_length: int = Field(
        49, ge=24, le=64, description="tool names at /aibridge/mcp, at most: longer ones are shortened with a hash; "
                                      "model APIs take 64 characters and clients prefix the server's (Claude Code: "
                                      "mcp__aibridge__, 15)")
    oauth_callback_url: str | None = Field(
        None, pattern=r"^https?://", description="where a user's browser comes back after signing in to an oauth "
                                                 "server (unset: <the gateway's URL>/aibridge/mcp/oauth/callback)")


class MetricsFile(Section):
    prefix: str = Field("aibridge_", pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", description="metric name prefix")
    token: str | None = Field(None, description="bearer token /aibridge/metrics requires")


class TelemetryFile(Section):
    otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description="an OTLP/HTTP collector's base URL (http://collector:4318): spans go to /v1/traces, metrics to "
                    "/v1/metrics (unset: nothing is exported)")
    content: bool = Field(False, description="spans carry the prompt and the model's output (off: counts and names "
                                             "only)")
    service_name: str = Field("aibridge", min_length=1, description="the service.name resource attribute")
    headers: dict[str, str] = Field(default_factory=dict, description="headers sent to the collector (its "
                                                                      "authorization: kept out of logs)")
    export_interval_seconds: float = Field(30.0, ge=0.1, le=3600, description="how often metrics are exported")
    timeout_seconds: float = Field(10.0, gt=0, le=300, description="one export to the collector, at most")


class LoggingFile(Section):
    interceptions_json: str | None = Field(None, description="one JSON line per interception: a path, or - for stdout")


class ReloadFile(Section):
    watch: bool = Field(False, description="reload when the config file (or a file it names) changes, as on SIGHUP")
    watch_interval_seconds: float = Field(2.0, ge=0.1, le=3600, description="how often watched files are checked")


class BreakerFile(Section):
    failures: int = Field(5, ge=1, description="consecutive provider failures that open the circuit")
    open_seconds: Seconds = Field(30.0, description="how long an open circuit refuses")
    half_open_requests: int = Field(3, ge=1, description="trial requests while half open")


class LimitsFile(Section):
    max_request_body_mb: float = Field(32.0, gt=0, description="request bodies, after decompression")
    auth_failures_per_minute: int = Field(30, ge=1, description="failed token checks per client address before 429")
    max_idle_connections_per_address: int = Field(
        256, ge=1, description="client connections from one address with nothing in flight; beyond it, its oldest "
                               "idle ones are closed")


class TimeoutsFile(Section):
    connect_seconds: Seconds = Field(10.0, description="TCP connect to the provider")
    response_seconds: Seconds = Field(600.0, description="request sent → response headers (blocking calls: whole body)")
    stream_idle_seconds: Seconds = Field(300.0, description="longest silence between two chunks of a stream")
    shutdown_grace_seconds: Seconds = Field(60.0, description="SIGTERM: how long calls in flight may finish")
    drain_after_disconnect_seconds: float = Field(
        120.0, ge=0, allow_inf_nan=False,
        description="a client gone mid-stream: the provider's answer is read to its end this long at most, so its "
                    "usage is recorded (0: cut at once, usage estimated)")
    request_head_seconds: Seconds = Field(
        10.0, description="a client connection without a complete request head this long after connecting (or after "
                          "its last response) is closed")


class LimitValues(Section):
    requests_per_minute: int | None = Field(None, ge=0, description="model calls per minute (unset: no limit)")
    tokens_per_day: int | None = Field(None, ge=0, description="tokens per UTC day, all kinds summed (unset: no limit)")
    usd_per_day: float | None = Field(None, ge=0, description="spend per UTC day at list prices (unset: no limit)")
    usd_per_week: float | None = Field(None, ge=0, description="spend per ISO week (Monday to Sunday, UTC) at list "
                                                                "prices (unset: no limit)")
    usd_per_month: float | None = Field(None, ge=0, description="spend per calendar month at list prices (unset: "
                                                                 "no limit)")
    mcp_calls_per_minute: int | None = Field(None, ge=0, description="MCP gateway tool calls per minute (unset: no "
                                                                      "limit)")


class BudgetsFile(Section):
    """Per-person limits. A user's own entry (`users`) replaces everything; else their groups' entries apply in
    place of `default`, the highest of them per limit (a limit none of their groups sets comes from `default`);
    `default` covers users in neither (docs/budgets.md)."""

    default: LimitValues = Field(default_factory=LimitValues, description="every user's limits")
    groups: dict[str, LimitValues] = Field(default_factory=dict, description="limits of each member of a group "
                                                                             "(aibridge users groups set)")
    users: dict[str, LimitValues] = Field(default_factory=dict, description="limits of named users")


class NotificationsFile(Section):
    webhook: str | None = Field(None, pattern=r"^https?://", description="POSTed a JSON body with a `text` field "
                                                                         "when a budget threshold is crossed")
    thresholds: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.85, 1.0], description="shares of a budget that are noticed, once per person, "
                                                         "limit and period")
    timeout_seconds: Seconds = Field(5.0, description="one webhook POST")


# Policy rule conditions (CEL): the vocabulary is declared here, with the keys, so `config check` refuses a rule
# that names a variable or function the engine (policy.rules) does not provide.

CONDITION_VARIABLES: dict[str, Any] = {
    "user": {"name": "", "id": "", "role": "", "groups": []},
    "client": "",
    "session": "",
    "provider": "",
    "api": "",
    "model": "",
    "prompt": "",  # the last user text
    "messages": [],
    "tools": [],  # names of the tools the request offers
    "headers": {},  # lower-case names
    "tool": {"name": "", "input": {}, "injected": False},
    "usage": {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_write_input_tokens": 0},
}
"""Every variable a condition may use, with the value it has when the caller does not know it (a map's missing
fields too), so a condition never meets an undefined variable."""

CEL_FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string", "bytes", "type",
    "dyn", "timestamp", "duration", "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate",
    "getDayOfWeek", "getHours", "getMinutes", "getSeconds", "getMilliseconds", "of", "none", "hasValue", "value",
    "orValue", "or",
})
"""The standard functions of the cel library's runtime (its operators and macros aside)."""
CEL_NAMES = frozenset({"int", "uint", "double", "string", "bytes", "bool", "list", "map", "null_type", "type",
                       "optional"})
DETECTOR_FUNCTIONS = ("secrets", "pii")
"""Functions a condition may call that return the finding types of a text (policy.detectors implements them)."""
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")


@lru_cache(maxsize=4096)
def compile_condition(source: str) -> cel.Program:
    return cel.compile(source)


def check_condition(source: str) -> str | None:
    """Why a condition cannot be used (it does not compile, or names an unknown variable or function), or None."""
    try:
        program = compile_condition(source)
    except ValueError as e:
        return f"CEL does not compile: {_syntax_error(str(e))}"
    bound = set(_BOUND.findall(source))
    for name in program.variables():
        if name not in CONDITION_VARIABLES and name not in bound and name not in CEL_NAMES:
            return f"unknown variable `{name}`{_hint(name, CONDITION_VARIABLES)}"
    for name in program.functions():
        if name[0] not in "_@!-" and name not in CEL_FUNCTIONS and name not in DETECTOR_FUNCTIONS:
            return f"unknown function `{name}`{_hint(name, [*DETECTOR_FUNCTIONS, *CEL_FUNCTIONS])}"
    return None


def _syntax_error(text: str) -> str:
    """The cel library's parse error without its echo of the source: `1:14: Syntax error: …`."""
    first = text.split("\n", 1)[0]
    first = first.split("ERROR: <input>:", 1)[-1]
    return first.split(" expecting ", 1)[0].strip()


def _hint(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(sorted(known))})"


Hook = Literal["request", "tool", "response"]
Mode = Literal["enforce", "monitor"]
Fail = Literal["open", "closed"]


class PolicyRuleFile(Section):
    """One policy rule. `fail` defaults to closed: a rule is a security control, and a condition that cannot be
    evaluated (a missing field, a wrong type) must not let through what it was written to stop; write `fail: open`
    for rules whose failure should cost nothing, like tagging."""

    name: str = Field(pattern=NAME_PATTERN, description="rule name, unique; decisions are recorded under it")
    hook: Hook = Field(description="when it is evaluated: request (before the call), tool (each tool call), "
                                   "response (after the answer)")
    when: str = Field(description="CEL condition over the request (user, model, prompt, tool, usage, …; "
                                  "secrets(text) and pii(text) list finding types); compiled when the config loads")
    action: Literal["allow", "deny", "route", "redact", "tag"] = Field(
        description="allow: stop evaluating; deny: refuse (first deny wins; not on response); route: rewrite the "
                    "model or provider (request only; first route wins); redact: mask what the condition's "
                    "detectors find, upstream and in the record; tag: label the record")
    message: str | None = Field(None, description="shown to the client on deny, recorded with the decision")
    model: str | None = Field(None, description="route: the model to use instead")
    provider: str | None = Field(None, pattern=NAME_PATTERN, description="route: the provider instance to use instead")
    tags: dict[str, str] = Field(default_factory=dict, description="tag: labels recorded with the interception "
                                                                   "(name: value; the first rule to set a name wins)")
    mode: Mode | None = Field(None, description="this rule's mode (unset: the policies' mode)")
    fail: Fail = Field("closed", description="a condition that errors: closed acts as a deny, open as no match")

    @field_validator("when")
    @classmethod
    def _compiles(cls, v: str, info) -> str:
        problem = check_condition(v)
        if problem:
            raise ValueError(f"rule `{info.data.get('name', '?')}`: {problem}")
        return v

    @model_validator(mode="after")
    def _action_keys(self) -> PolicyRuleFile:
        if self.action == "route" and not (self.model or self.provider):
            raise ValueError(f"rule `{self.name}`: route needs a model or a provider")
        if self.action != "route" and (self.model or self.provider):
            raise ValueError(f"rule `{self.name}`: model and provider are route targets (action is {self.action})")
        if self.action == "tag" and not self.tags:
            raise ValueError(f"rule `{self.name}`: tag needs tags (a mapping of name: value)")
        if self.action != "tag" and self.tags:
            raise ValueError(f"rule `{self.name}`: tags belong to action tag (action is {self.action})")
        if self.hook == "response" and self.action in ("deny", "route"):
            raise ValueError(f"rule `{self.name}`: {self.action} cannot act on a response (the answer exists, and "
                             "may have been streamed); use it on hook request or tool")
        if self.hook == "tool" and self.action == "route":
            raise ValueError(f"rule `{self.name}`: route rewrites a request; use it on hook request")
        return self


class GuardrailFile(Section):
    """An external check: the gateway POSTs the hook's facts as JSON and applies the decision it answers."""

    name: str = Field(pattern=NAME_PATTERN, description="guardrail name, unique among rules and guardrails")
    hook: Literal["request", "response"] = Field(
        description="when it is called: request (before the call) or response (after it); tool calls are decided "
                    "by rules only, since a held stream cannot wait on an external service")
    url: str = Field(pattern=r"^https?://", description="where the JSON document is POSTed")
    timeout_ms: int = Field(500, ge=1, le=60_000, description="the whole call, at most")
    headers: dict[str, str] = Field(default_factory=dict, description="headers sent with the call (e.g. a token)")
    mode: Mode | None = Field(None, description="this guardrail's mode (unset: the policies' mode)")
    fail: Fail = Field("closed", description="a timeout, error or malformed answer: closed acts as a deny, open as "
                                             "allow")


class PoliciesFile(Section):
    """Policy rules and guardrails (issue #24)."""

    mode: Mode = Field("enforce", description="enforce: apply decisions; monitor: record them and change nothing")
    redact_stored: bool = Field(False, description="mask secrets in what is stored even when no rule redacts")
    rules: list[PolicyRuleFile] = Field(default_factory=list, description="evaluated in order, per hook")
    guardrails: list[GuardrailFile] = Field(default_factory=list, description="external checks")

    @field_validator("rules", "guardrails")
    @classmethod
    def _unique_names(cls, v: list, info) -> list:
        taken = {r.name: f"rules[{n}]" for n, r in enumerate(info.data.get("rules", []))} \
            if info.field_name == "guardrails" else {}
        for n, item in enumerate(v):
            if item.name in taken:
                raise ValueError(f"[{n}] name `{item.name}` is already used by {taken[item.name]}")
            taken[item.name] = f"{info.field_name}[{n}]"
        return v


class ConfigFile(Section):
    """aibridge's configuration file (config/aibridge.yaml)."""

    providers: list[ProviderFile] = Field(default_factory=list, description="provider instances")
    storage: StorageFile = Field(default_factory=StorageFile)
    proxy: ProxyFile = Field(default_factory=ProxyFile)
    capture: CaptureFile = Field(default_factory=CaptureFile)
    mcp_servers: list[McpServerFile] = Field(default_factory=list, description="admin-approved MCP servers")
    mcp_access: list[McpAccessRuleFile] = Field(
        default_factory=list, description="who may see and call which MCP tools ([]: everyone, everything)")
    mcp: McpFile = Field(default_factory=McpFile)
    retention_days: int = Field(60, ge=0, description="records older than this are pruned (0: kept forever)")
    pricing: str | None = Field(None, description="a price table replacing the shipped one")
    metrics: MetricsFile = Field(default_factory=MetricsFile)
    logging: LoggingFile = Field(default_factory=LoggingFile)
    telemetry: TelemetryFile = Field(default_factory=TelemetryFile)
    circuit_breaker: BreakerFile = Field(default_factory=BreakerFile)
    limits: LimitsFile = Field(default_factory=LimitsFile)
    timeouts: TimeoutsFile = Field(default_factory=TimeoutsFile)
    budgets: BudgetsFile = Field(default_factory=BudgetsFile)
    notifications: NotificationsFile = Field(default_factory=NotificationsFile)
    reload: ReloadFile = Field(default_factory=ReloadFile)
    policies: PoliciesFile = Field(default_factory=PoliciesFile)
    policies_file: str | None = Field(
        None, description="a YAML file holding the policies mapping instead (relative to the config file)")

    @field_validator("policies_file")
    @classmethod
    def _one_policy_source(cls, v: str | None, info) -> str | None:
        if v is not None and info.data.get("policies", PoliciesFile()) != PoliciesFile():
            raise ValueError("set policies or policies_file, not both")
        return v


def validate(raw: dict) -> ConfigFile:
    """The file as typed models; raises `ConfigProblems` naming every bad key."""
    try:
        return ConfigFile.model_validate(_drop_null_sections(raw))
    except ValidationError as e:
        raise ConfigProblems([describe(err, raw) for err in e.errors()]) from None


def validate_policies(raw: Any) -> PoliciesFile:
    """A policies_file's content, checked as the `policies` section would be (errors name `policies.…`)."""
    return validate({"policies": raw if raw is not None else {}}).policies


def _drop_null_sections(raw: dict) -> dict:
    sections = {name for name, f in ConfigFile.model_fields.items() if name not in ("retention_days", "pricing")}
    return {k: v for k, v in raw.items() if not (k in sections and v is None)}


class ConfigProblems(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def schema() -> dict:
    """JSON Schema of the file, for editors (yaml-language-server: $schema=…)."""
    s = ConfigFile.model_json_schema()
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["title"] = "aibridge configuration"
    return s


def path_of(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def describe(err: dict, raw: dict) -> str:
    """One validation error as a line that names the key path, the value and, for an unknown key, the closest
    valid one."""
    loc = _clean_loc(err["loc"], raw)
    where = path_of(loc) or "the top level"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1], raw)
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        suggestion = f"; did you mean `{path_of(loc[:-1] + (hint[0],))}`?" if hint else (
            f"; known keys here: {', '.join(sorted(known))}" if known else "")
        return f"{where}: unknown key{suggestion}"
    if kind == "union_tag_invalid":
        return f"{where}.type: {value.get('type')!r} is not a provider type (one of {', '.join(PROVIDERS)})" \
            if isinstance(value, dict) else f"{where}: {err['msg']}"
    if kind == "union_tag_not_found":
        return f"{where}.type: required (one of {', '.join(PROVIDERS)})"
    if kind == "missing":
        return f"{where}: required"
    msg = err["msg"].rstrip(".")
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        if msg.startswith("["):  # an item of a list: its index belongs to the path
            index, _, msg = msg.partition(" ")
            where += index
    shown = _shown(value, loc)
    return f"{where}: {msg}" + (f" (got {shown})" if shown is not None and kind != "value_error" else "")


_SECRET_KEYS = ("key", "token", "postgres", "headers", "oauth_client_secret", "access_key", "access_key_secret", "session_token", "keys")


def _shown(value: Any, loc: tuple) -> str | None:
    """The offending value for the message, unless it may be a secret (never echoed) or a whole section."""
    if isinstance(value, (dict, list)):
        return None
    if any(isinstance(p, str) and p in _SECRET_KEYS for p in loc):
        return "a value not shown: it may be a secret"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _clean_loc(loc: tuple, raw: dict) -> tuple:
    """pydantic's location without its internal steps (the union member's tag, `function-after`, …)."""
    out: list = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part not in node and not _is_internal(part, node):
            out.append(part)  # a missing key
            node = None
        elif node is None:
            out.append(part)
        # else: a union member's tag or a validator's name: not a key of the file
    return tuple(out)


def _is_internal(part: str, node: dict) -> bool:
    """A step of pydantic's location that is not a key: a union member's tag or type name, a validator."""
    return (part == node.get("type") or part in PROVIDERS or "[" in part or part[:1].isupper()
            or part in ("str", "int", "float", "bool", "list", "dict", "none") or part.startswith("function-"))


def _known_keys(loc: tuple, raw: dict) -> list[str]:
    """The keys valid at a location of the file (walking the models alongside the data)."""
    return _walk(ConfigFile, raw, loc)


def _walk(ann: Any, node: Any, loc: tuple) -> list[str]:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _walk(args[0], node, loc)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if not loc:
            return list(ann.model_fields)
        field = ann.model_fields.get(loc[0]) if isinstance(loc[0], str) else None
        return _walk(field.annotation, node.get(loc[0]) if isinstance(node, dict) else None, loc[1:]) if field else []
    if origin is not list and origin is not dict and args:  # a union: the provider type's model, else any member
        if isinstance(node, dict) and "type" in node:
            for member in args:
                tf = getattr(member, "model_fields", {}).get("type")
                if tf is not None and get_args(tf.annotation) == (node["type"],):
                    return _walk(member, node, loc)
        for member in args:
            found = _walk(member, node, loc)
            if found:
                return found
        return []
    if not loc:
        return []
    if origin is list and isinstance(loc[0], int):
        item = node[loc[0]] if isinstance(node, list) and loc[0] < len(node) else None
        return _walk(args[0], item, loc[1:])
    if origin is dict and len(args) == 2:
        return _walk(args[1], node.get(loc[0]) if isinstance(node, dict) else None, loc[1:])
    return []


def reference() -> str:
    """Every key as markdown tables, one per section (docs/configuration.md embeds this; a test keeps it current)."""
    out: list[str] = []

    def rows(model: type[BaseModel], prefix: str) -> list:
        nested = []
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, f in model.model_fields.items():
            sub = _section_model(f.annotation)
            if sub is not None and name != "providers":
                nested.append((sub, f"{prefix}{name}" + ("[]" if get_origin(f.annotation) is list else "")))
                continue
            kind = "list of instances (below)" if name == "providers" else _type_name(f.annotation)
            out.append(f"| `{prefix}{name}` | {kind} | {_default_text(f)} | {f.description or ''} |")
        out.append("")
        return nested

    def section(model: type[BaseModel], path: str) -> None:
        out.append(f"### `{path}`\n" if path else "### Top level\n")
        for sub, sub_path in rows(model, path + "." if path else ""):
            section(sub, sub_path)

    section(ConfigFile, "")
    out.append("### `providers[]`\n")
    out.append("Every instance takes these; `type` chooses the provider, and some types take keys of their own (below).\n")
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    out.append(f"| `type` | {' \\| '.join(PROVIDERS)} | required | provider type |")
    for name, f in ProviderBase.model_fields.items():
        out.append(f"| `{name}` | {_type_name(f.annotation)} | {_default_text(f)} | {f.description or ''} |")
    out.append("")
    for ptype, provider in PROVIDERS.items():
        extra = getattr(provider, "settings_model", None)
        if extra is not None:
            out.append(f"#### `type: {ptype}`\n")
            rows(extra, "")
    return "\n".join(out).rstrip() + "\n"


def _default_text(f) -> str:
    if f.is_required():
        return "required"
    if f.default_factory is not None:
        return {list: "`[]`", dict: "`{}`"}.get(f.default_factory, "")
    if f.default is None:
        return "unset"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
    return f"`{f.default}`"


def _section_model(ann: Any):
    origin, args = get_origin(ann), get_args(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args and args[0] is not Any else "list"
    if origin is dict:
        return f"map of {_type_name(args[1])}" if len(args) == 2 else "map"
    if args:  # Optional / Union
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "limits: " + ", ".join(ann.model_fields) if ann is LimitValues else "mapping"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(ann, getattr(ann, "__name__", str(ann)))
