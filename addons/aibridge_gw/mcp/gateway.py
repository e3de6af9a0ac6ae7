"""The MCP gateway's server side: one MCP server at /aibridge/mcp that aggregates every approved server, for agents.

Built on the official `mcp` package: a low-level `Server` whose handlers list and forward tools
(`<server>__<tool>`, with the server's own schemas and annotations), resources (by their URIs, mapped back to their
server) and prompts (`<server>__<prompt>`), served by `StreamableHTTPSessionManager` in **stateless** mode with JSON
answers. Stateless: every POST is served on its own, by whichever process (`--workers N`, several machines) gets it;
nothing a later request needs is held here. What an MCP session carries across requests — the client's name and
version from `initialize` — travels in the session id the gateway hands out (see `SessionId`), which the client
sends back with every request. JSON rather than SSE: each call has exactly one message to answer with; a whole body
is what every client takes, mitmproxy relays it as is, and its size is the result size recorded.

The one thing the gateway says unasked — that what a user may list changed (`notifications/tools/list_changed`,
resources, prompts) — goes on the standalone stream a client opens with `GET /aibridge/mcp` (`_notices`). Whichever
process serves that stream watches what its user may see there: its own listings of the servers (refreshed when a
server says its list changed), the access rules and policies it runs under (a reload), the user's groups and token
(looked up again every second: a revoked token ends the stream). Nothing is shared between processes: each
computes the same answer from the same configuration and servers.

How a request gets here: the `ControlPlane` addon authenticates the gateway token, then hands the flow to the
loopback server (loopback.py) as an `McpJob` holding who called; the loopback server gives the job to
`McpGateway.serve`, which runs the session manager's ASGI app on it (request in, answer out through the
`Responder`). The caller's identity never travels in a header: it is in the job, in this process, and reaches the
handlers through the ASGI scope. Everything runs on mitmproxy's event loop; every wait is an await.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .. import __version__
from ..config import McpServer
from ..logsafe import printable
from ..loopback import Responder
from ..policy.policing import CallFacts
from ..policy.redact import DEFAULT_DETECTORS, Redactor
from ..telemetry import ToolRun
from .access import Caller, McpAccess
from .registry import Listing, McpRegistry, Unavailable
from .tools import MAX_TOOL_NAME, model_tool_name

log = logging.getLogger("aibridge.mcp")

MCP_PATH = "/aibridge/mcp"
SEPARATOR = "__"  # <server>__<tool>, <server>__<prompt>
LIST_BOUND = 5.0  # seconds tools/list (resources, prompts) waits for servers, at most
SCOPE_KEY = "aibridge.mcp"  # the job, in the ASGI scope the handlers see
# What an MCP call can come to (the metric's `outcome` label and the row's): the server answered (ok, or error: a
# tool error result or a JSON-RPC error), the gateway refused (denied by mcp_access, refused by a policy rule,
# rate_limited, unknown: no such tool here), or the server was not usable (unavailable, timeout; sign_in: the user
# must sign in to an oauth server first).
OUTCOMES = ("ok", "error", "denied", "refused", "rate_limited", "unknown", "unavailable", "timeout", "sign_in")
# Request headers the MCP transport reads; nothing else (no credential) reaches the server side.
TRANSPORT_HEADERS = ("content-type", "accept", "mcp-protocol-version", "mcp-session-id", "last-event-id",
                     "user-agent")
INSTRUCTIONS = ("aibridge MCP gateway: the tools, resources and prompts of the MCP servers your administrator "
                "approved, named <server>__<name>. Every call is checked against the access rules and recorded.")


@dataclass(frozen=True, slots=True)
class McpCaller:
    """Who is calling, as the front authenticated them, and from where."""

    user_id: str
    user_name: str
    role: str = "member"
    groups: tuple[str, ...] = ()
    on_behalf_of: tuple[str, str] | None = None  # (id, name) of the person a service account acts for
    client: str | None = None  # from `initialize`'s clientInfo, carried in the session id
    client_version: str | None = None
    session: str | None = None
    headers: dict = field(default_factory=dict, hash=False, compare=False)  # as policies see them (no credentials)

    @property
    def access(self) -> Caller:
        return Caller(self.user_name, self.groups)


@dataclass(slots=True)
class McpJob:
    """One HTTP request to /aibridge/mcp, for the loopback server to hand to `McpGateway.serve`."""

    caller: McpCaller
    method: str
    headers: list[tuple[bytes, bytes]]  # TRANSPORT_HEADERS only
    body: bytes
    session_out: str | None = None  # an initialize's answer carries this as Mcp-Session-Id
    # The caller as their credential names them now (None: revoked): a notification stream asks every second.
    recheck: Callable[[], McpCaller | None] | None = None


class SessionId:
    """The session id the gateway hands out at `initialize`: `aib1.` and the base64url of {client name, version,
    random}. Any process can read it (nothing is kept anywhere), and it is no credential: the client could say any
    name in `initialize` anyway. Whatever a client sends that is not one of these is ignored."""

    PREFIX = "aib1."
    MAX = 600

    @classmethod
    def mint(cls, client: str | None, version: str | None) -> str:
        payload = {"c": (client or "")[:100], "v": (version or "")[:50], "r": secrets.token_hex(8)}
        raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()
        return cls.PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def read(cls, value: str | None) -> tuple[str | None, str | None, str] | None:
        """(client, version, session) from one of ours; None for anything else."""
        if not value or len(value) > cls.MAX or not value.startswith(cls.PREFIX):
            return None
        data = value[len(cls.PREFIX):]
        try:
            payload = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        except (ValueError, binascii.Error, RecursionError):
            return None
        if not isinstance(payload, dict) or not all(isinstance(payload.get(k), str) for k in ("c", "v", "r")):
            return None
        if not re.fullmatch(r"[0-9a-f]{16}", payload["r"]):
            return None
        return payload["c"] or None, payload["v"] or None, payload["r"]


RateCheck = Callable[[McpCaller], Awaitable[Any]]  # a refusal (budgets.Refusal) or None
STREAMS_PER_USER = 8  # notification streams one user may hold open on one process (an agent opens one a session)
STREAMS_MAX = 2000  # and everyone's together
RECHECK_SECONDS = 1.0  # a notification stream looks up its caller's token (and groups) again this often
KEEPALIVE_SECONDS = 5.0  # an SSE comment on a quiet notification stream (finds clients that went away)
WATCH_SECONDS = 30.0  # a notification stream looks at its servers' listings at least this often
NOTICES = (("tools", "notifications/tools/list_changed"), ("resources", "notifications/resources/list_changed"),
           ("prompts", "notifications/prompts/list_changed"))


class McpGateway:
    """The server side. Its collaborators follow the configuration (set by the runtime on every reload): the
    registry, the access rules, the policies, the rate check; a call keeps the ones it started with."""

    def __init__(self, recorder, metrics) -> None:
        from mcp.server.lowlevel import Server
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

        self.recorder = recorder
        self.metrics = metrics
        self.registry: McpRegistry | None = None
        self.access = McpAccess(())
        self.policing = None  # policy.policing.Policing, or None
        self.rate: RateCheck | None = None
        self.server = Server("aibridge", version=__version__, instructions=INSTRUCTIONS)
        self._handlers()
        self.server.create_initialization_options = self._initialization_options
        self.manager = StreamableHTTPSessionManager(self.server, stateless=True, json_response=True)
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()  # set (and replaced) when what anyone may list may have changed
        self._generation = 0  # counts those changes (a stream busy when one came still sees it)
        self._streams: dict[asyncio.Task, str] = {}  # notification streams open here -> whose
        self.closing = False  # draining: no new notification stream

    def _initialization_options(self, *_a, **_k):
        """`initialize` says the lists may change (clients then open the notification stream and listen)."""
        from mcp.server.lowlevel import NotificationOptions, Server

        return Server.create_initialization_options(self.server, NotificationOptions(
            prompts_changed=True, resources_changed=True, tools_changed=True))

    def changed(self) -> None:
        """What users may list may have changed (a reload, a server's list): every notification stream looks."""
        self._generation += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def end_streams(self) -> None:
        """End every notification stream (the gateway drains: clients reconnect elsewhere); none starts after."""
        self.closing = True
        for task in list(self._streams):
            task.cancel()

    def stream_refusal(self, user_id: str) -> str | None:
        """Why a new notification stream is refused (too many of this user's, or of everyone's, are open here)."""
        if self.closing:
            return "the gateway is shutting down"
        if sum(1 for who in self._streams.values() if who == user_id) >= STREAMS_PER_USER:
            return f"at most {STREAMS_PER_USER} notification streams per user"
        if len(self._streams) >= STREAMS_MAX:
            return f"at most {STREAMS_MAX} notification streams on this gateway process"
        return None

    async def start(self) -> None:
        """The session manager's task group, running until `stop` (stateless: it holds only calls in flight)."""
        ready = asyncio.Event()

        async def run() -> None:
            async with self.manager.run():
                ready.set()
                await asyncio.Event().wait()

        self._task = asyncio.create_task(run())
        await ready.wait()

    def stop(self) -> None:
        self.end_streams()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # --- HTTP: the loopback server's handler --------------------------------------------------------------

    async def serve(self, job: McpJob, out: Responder) -> None:
        """Run the MCP transport's ASGI app on the job: the request body in, the answer out through `out` (a GET:
        the notification stream, served here)."""
        if job.method == "GET":
            refusal = self.stream_refusal(job.caller.user_id)
            if refusal is not None:
                await out.respond(429 if not self.closing else 503, [("content-type", "application/json"),
                                                                   ("retry-after", "5")],
                                  _jsonrpc_error(-32000, f"aibridge: {refusal}"))
                return
            task = asyncio.current_task()
            self._streams[task] = job.caller.user_id
            try:
                await self._notices(job, out)
            except asyncio.CancelledError:
                if not out.ended:
                    with contextlib.suppress(Exception):
                        await out.end()
            finally:
                self._streams.pop(task, None)
            return
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": job.method, "scheme": "http", "path": MCP_PATH, "raw_path": MCP_PATH.encode(),
            "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1"), *job.headers],
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), SCOPE_KEY: job,
        }
        given = False
        finished = asyncio.Event()
        head: list = []

        async def receive() -> dict:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": job.body, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if job.session_out and message["status"] == 200:
                    headers.append((b"mcp-session-id", job.session_out.encode()))
                head[:] = [message["status"], headers]
            elif message["type"] == "http.response.body":
                body, more = message.get("body", b""), message.get("more_body", False)
                if not out.started and not more:
                    await out.respond(head[0], head[1], body)
                    return
                if not out.started:
                    await out.start(head[0], head[1])
                await out.send(body)
                if not more:
                    await out.end()

        try:
            await self.manager.handle_request(scope, receive, send)
        finally:
            finished.set()
        if not out.started:
            await out.respond(500, [("content-type", "application/json")], _jsonrpc_error(
                -32603, "aibridge: the MCP gateway did not answer"))

    async def _notices(self, job: McpJob, out: Responder) -> None:
        """The standalone SSE stream: a `list_changed` notification whenever what this caller may list changes
        (tools, resources, prompts each on its own), an SSE comment every KEEPALIVE_SECONDS when quiet. It ends when
        the client goes, its token is revoked, or the gateway drains."""
        caller = job.caller
        await out.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache, no-store"),
                              ("x-accel-buffering", "no")])
        await out.send(b": aibridge MCP gateway notifications\n\n")
        loop = asyncio.get_running_loop()
        registry = self.registry
        # What was seen is taken before the first look: a change during that look is looked at again.
        version = registry.version if registry is not None else 0
        generation = self._generation
        marks = await self._marks(caller)
        seen = {kind: self._digest(marks, kind, caller) for kind, _ in NOTICES}
        quiet_since = looked_at = loop.time()
        while True:
            changed, registry = self._changed, self.registry
            waits = [asyncio.ensure_future(changed.wait())]
            if registry is not None:  # a server said its lists changed, or a watch found it (mcp.watch_seconds)
                waits.append(asyncio.ensure_future(registry.wait_changed(version, RECHECK_SECONDS)))
            try:
                await asyncio.wait(waits, timeout=RECHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            servers_changed = registry is not None and registry.version != version
            if registry is not None:
                version = registry.version
            reconfigured = self._generation != generation  # never missed: a counter, not the event it woke on
            generation = self._generation
            now = loop.time()
            if job.recheck is not None:
                again = job.recheck()
                if again is None:
                    log.info("mcp notification stream of %s ends: its token is no longer valid", caller.user_name)
                    await out.end()
                    return
                caller = _same_session(again, caller)
            new_marks = await self._marks(caller, listing_wait=0.0) if reconfigured or servers_changed \
                or now - looked_at >= WATCH_SECONDS or marks[2] != caller.groups else marks
            if new_marks is not marks:
                looked_at = now
            if new_marks != marks:
                marks = new_marks
                for kind, method in NOTICES:
                    digest = self._digest(marks, kind, caller)
                    if digest != seen[kind]:
                        seen[kind] = digest
                        await out.send(_sse({"jsonrpc": "2.0", "method": method}))
                        quiet_since = now
            if now - quiet_since >= KEEPALIVE_SECONDS:
                await out.send(b": keep-alive\n\n")
                quiet_since = now

    async def _marks(self, caller: McpCaller, listing_wait: float | None = None) -> tuple:
        """What identifies this caller's view cheaply: the rules, policies and listings it comes from (their
        objects; a refresh or a reload makes new ones) and the caller's groups. Equal marks: nothing to look at."""
        registry = self.registry
        if registry is None:
            return (None, self.access, caller.groups)
        servers = [s for s in registry.servers if self.access.server_visible(s, caller.access)]
        wait = listing_wait if listing_wait is not None else min(registry.settings.list_timeout_seconds, LIST_BOUND)
        listings = await asyncio.gather(*(registry.listing(s, caller.user_id, wait) for s in servers))
        return (registry, self.access, caller.groups,
                tuple((s.name, None if lst is None else lst.fingerprint, lst) for s, lst in zip(servers, listings)))

    def _digest(self, marks: tuple, kind: str, caller: McpCaller) -> str:
        """What the caller may list of one kind, as a digest: names with their schemas and descriptions."""
        import hashlib

        registry, access = marks[0], marks[1]
        h = hashlib.sha256()
        if registry is None:
            return h.hexdigest()
        for name, _, listing in marks[3]:
            if listing is None:
                continue
            server = registry.server(name)
            if kind == "tools":
                items = [t for t in listing.tools if access.decide(server, t.name, caller.access).allowed]
            elif kind == "resources":
                items = [*listing.resources, *listing.templates]
            else:
                items = listing.prompts
            for item in items:
                h.update(name.encode() + b"\0" + item.model_dump_json(exclude_none=True).encode() + b"\0")
        return h.hexdigest()

    # --- MCP: the handlers -------------------------------------------------------------------------------

    def _handlers(self) -> None:
        """Registered directly (the decorators' own table): the decorators' tool cache would be one list shared by
        every user, and their call wrapper would list tools again on every miss."""
        from mcp import types

        h = self.server.request_handlers
        h[types.ListToolsRequest] = self._list_tools
        h[types.CallToolRequest] = self._call_tool
        h[types.ListResourcesRequest] = self._list_resources
        h[types.ListResourceTemplatesRequest] = self._list_templates
        h[types.ReadResourceRequest] = self._read_resource
        h[types.ListPromptsRequest] = self._list_prompts
        h[types.GetPromptRequest] = self._get_prompt

    def _caller(self) -> McpCaller:
        request = self.server.request_context.request
        return request.scope[SCOPE_KEY].caller

    async def _offers(self, caller: McpCaller) -> list[tuple[McpServer, Listing]]:
        """What every server the caller may use offers them, each waited for at most LIST_BOUND seconds (a silent
        server is left out, never waited for longer)."""
        registry = self.registry
        if registry is None:
            return []
        servers = [s for s in registry.servers if self.access.server_visible(s, caller.access)]
        wait = min(registry.settings.list_timeout_seconds, LIST_BOUND)
        listings = await asyncio.gather(*(registry.listing(s, caller.user_id, wait) for s in servers))
        return [(s, lst) for s, lst in zip(servers, listings) if lst is not None]

    async def _list_tools(self, req) -> Any:
        from mcp import types

        caller = self._caller()
        tools = []
        for server, listing in await self._offers(caller):
            for t in listing.tools:
                if self.access.decide(server, t.name, caller.access).allowed:
                    tools.append(t.model_copy(update={"name": self.exposed(server, t.name)}))
        return types.ServerResult(types.ListToolsResult(tools=tools))

    async def _list_resources(self, req) -> Any:
        from mcp import types

        caller = self._caller()
        seen, resources = set(), []
        for _, listing in await self._offers(caller):
            for r in listing.resources:
                if str(r.uri) not in seen:
                    seen.add(str(r.uri))
                    resources.append(r)
        return types.ServerResult(types.ListResourcesResult(resources=resources))

    async def _list_templates(self, req) -> Any:
        from mcp import types

        caller = self._caller()
        templates = [t for _, listing in await self._offers(caller) for t in listing.templates]
        return types.ServerResult(types.ListResourceTemplatesResult(resourceTemplates=templates))

    async def _list_prompts(self, req) -> Any:
        from mcp import types

        caller = self._caller()
        prompts = [p.model_copy(update={"name": f"{s.name}{SEPARATOR}{p.name}"})
                   for s, listing in await self._offers(caller) for p in listing.prompts]
        return types.ServerResult(types.ListPromptsResult(prompts=prompts))

    def resolve(self, name: str) -> tuple[McpServer, str] | None:
        """`<server>__<name>` back to the server and its own name (server names may hold `__` themselves: the
        longest configured name that prefixes it wins)."""
        registry = self.registry
        if registry is None or not isinstance(name, str):
            return None
        best = None
        for s in registry.servers:
            prefix = s.name + SEPARATOR
            if name.startswith(prefix) and len(name) > len(prefix) and (best is None or len(s.name) > len(best.name)):
                best = s
        return (best, name[len(best.name) + len(SEPARATOR):]) if best is not None else None

    async def _call_tool(self, req) -> Any:
        from mcp import types

        caller = self._caller()
        registry, access = self.registry, self.access  # a reload meanwhile changes neither for this call
        call = _Call(self, caller, "tools/call", req.params.name, req.params.arguments or {})
        resolved = await self._tool(caller, req.params.name)
        if resolved is None:
            return call.refuse("unknown", f"aibridge: no tool {req.params.name!r} here (tools/list names them)")
        server, tool = resolved
        call.server, call.tool = server, tool
        verdict = access.decide(server, tool, caller.access)
        if not verdict.allowed:
            return call.refuse("denied", f"aibridge: {req.params.name} is not allowed for {caller.user_name}: "
                                         f"{verdict.why}")
        if self.rate is not None:
            refusal = await self.rate(caller)
            if refusal is not None:
                return call.refuse("rate_limited", f"{refusal.message} (MCP calls; retry in {refusal.retry_after} s)")
        denied = call.police()
        if denied is not None:
            return call.refuse("refused", f"aibridge policy {denied.rule}: {denied.message or 'denied'}")
        try:
            result = await registry.call_tool(server, tool, call.arguments, caller.user_id)
        except Unavailable as e:
            return call.refuse(e.outcome, str(e))
        size = len(result.model_dump_json(by_alias=True, exclude_none=True))
        call.done("error" if result.isError else "ok", bool(result.isError), _error_text(result), size)
        return types.ServerResult(result)

    def exposed(self, server: McpServer, tool: str) -> str:
        """A tool's name here: `<server>__<tool>`, shortened to `mcp.tool_name_max_length` when longer (or when it
        holds characters model APIs refuse in tool names)."""
        limit = self.registry.settings.tool_name_max_length if self.registry is not None else MAX_TOOL_NAME
        return model_tool_name(f"{server.name}{SEPARATOR}{tool}", limit)

    async def _tool(self, caller: McpCaller, name: str) -> tuple[McpServer, str] | None:
        """A listed tool name back to its server and the server's own name: `<server>__<tool>`, or a name shortened
        to fit model APIs (`model_tool_name`), found among what the caller's servers list (the named server's
        listing first); a name no listing gave is taken as `<server>__<the server's own spelling>`."""
        resolved = self.resolve(name)
        if resolved is not None and self.registry is not None:
            listing = await self.registry.listing(resolved[0], caller.user_id, 0.0)
            if listing is not None and any(t.name == resolved[1] for t in listing.tools) \
                    and self.exposed(*resolved) == name:
                return resolved
        for server, listing in await self._offers(caller):
            for t in listing.tools:
                if self.exposed(server, t.name) == name:
                    return server, t.name
        return resolved

    async def _read_resource(self, req) -> Any:
        from mcp import types
        from mcp.shared.exceptions import McpError

        caller = self._caller()
        uri = str(req.params.uri)
        call = _Call(self, caller, "resources/read", uri, None)
        server = self._resource_server(await self._offers(caller), uri)
        if server is None:
            call.done("unknown", True, "no server here offers this resource", None)
            raise McpError(types.ErrorData(code=-32002, message=f"aibridge: no resource {uri!r} here"))
        call.server = server
        try:
            result = await self.registry.read_resource(server, uri, caller.user_id)
        except Unavailable as e:
            call.done(e.outcome, True, str(e), None)
            raise McpError(types.ErrorData(code=types.INTERNAL_ERROR, message=str(e))) from None
        call.done("ok", False, None, len(result.model_dump_json(by_alias=True, exclude_none=True)))
        return types.ServerResult(result)

    @staticmethod
    def _resource_server(offers: list[tuple[McpServer, Listing]], uri: str) -> McpServer | None:
        for server, listing in offers:
            if any(str(r.uri) == uri for r in listing.resources):
                return server
        for server, listing in offers:
            if any(_template_matches(t.uriTemplate, uri) for t in listing.templates):
                return server
        return None

    async def _get_prompt(self, req) -> Any:
        from mcp import types
        from mcp.shared.exceptions import McpError

        caller = self._caller()
        call = _Call(self, caller, "prompts/get", req.params.name, req.params.arguments)
        resolved = self.resolve(req.params.name)
        if resolved is None or not self.access.server_visible(resolved[0], caller.access):
            call.done("unknown", True, "no such prompt here", None)
            raise McpError(types.ErrorData(code=types.INVALID_PARAMS,
                                           message=f"aibridge: no prompt {req.params.name!r} here"))
        server, name = resolved
        call.server, call.tool = server, name
        try:
            result = await self.registry.get_prompt(server, name, req.params.arguments, caller.user_id)
        except Unavailable as e:
            call.done(e.outcome, True, str(e), None)
            raise McpError(types.ErrorData(code=types.INTERNAL_ERROR, message=str(e))) from None
        call.done("ok", False, None, len(result.model_dump_json(by_alias=True, exclude_none=True)))
        return types.ServerResult(result)


class _Call:
    """One tools/call (resources/read, prompts/get) from its arrival to its record: every one is recorded once,
    whatever it came to, and counted."""

    def __init__(self, gateway: McpGateway, caller: McpCaller, method: str, name: str, arguments) -> None:
        self.gateway, self.caller, self.method = gateway, caller, method
        self.id = str(uuid.uuid4())
        self.at = dt.datetime.now(dt.UTC)
        self.t0 = time.monotonic()
        self.server: McpServer | None = None
        self.tool = name
        self.name = name
        self.arguments = arguments
        self.policing = gateway.policing  # the policies this call started under
        self.facts: CallFacts | None = None

    def police(self):
        """The `hook: tool` rules on this call (recorded as decisions on it); the enforced refusal or None."""
        policing = self.policing
        if policing is None or not policing.policy.has_rules("tool"):
            return None
        c = self.caller
        self.facts = CallFacts(
            self.id, {"name": c.user_name, "id": c.user_id, "role": c.role, "groups": list(c.groups)},
            c.client or "", c.session or "", self.server.name, "mcp", "", "", [], [], dict(c.headers))
        text = json.dumps(self.arguments, ensure_ascii=False)
        return policing.tool(self.facts, self.name, text, self.id, injected=True)

    def refuse(self, outcome: str, message: str):
        from mcp import types

        self.done(outcome, True, message, None)
        return types.ServerResult(types.CallToolResult(
            content=[types.TextContent(type="text", text=message)], isError=True))

    def done(self, outcome: str, is_error: bool, error: str | None, size: int | None) -> None:
        seconds = time.monotonic() - self.t0
        gw, c = self.gateway, self.caller
        try:
            gw.recorder.mcp_call(
                self.id, created_at=self.at, user_id=c.user_id, user_name=c.user_name, method=self.method,
                server=self.server.name if self.server else None, tool=self.tool, arguments=self._stored(),
                is_error=is_error, outcome=outcome, error=error, result_bytes=size, duration_ms=round(seconds * 1000),
                client=c.client, client_version=c.client_version, session_id=c.session,
                on_behalf_of_id=c.on_behalf_of[0] if c.on_behalf_of else None,
                on_behalf_of_name=c.on_behalf_of[1] if c.on_behalf_of else None)
        except Exception:  # a record that cannot be queued must not fail the call
            log.exception("aibridge: recording an MCP call failed")
        if self.method == "tools/call":
            gw.metrics.mcp_call(self.server.name if self.server else None, self.tool if self.server else None,
                                outcome, seconds)
        telemetry = getattr(gw.recorder, "telemetry", None)
        if telemetry is not None and self.method == "tools/call":
            telemetry.mcp_call(ToolRun(self.name, None, self.server.name if self.server else None,
                                       int(self.at.timestamp() * 1e9), time.time_ns(), error if is_error else None),
                               headers=c.headers, method=self.method, outcome=outcome, user_name=c.user_name,
                               client=c.client, session=c.session, call_id=self.id)
        log.info("mcp call %s user=%s %s %s/%s: %s (%d ms)", self.id, c.user_name, self.method,
                 self.server.name if self.server else "-", printable(self.tool), outcome, round(seconds * 1000))

    def _stored(self):
        """The arguments as stored: masked with every detector when the policies mask what is stored."""
        policing = self.policing
        if self.arguments is None or policing is None or not policing.redact_stored:
            return self.arguments
        scan = self.facts.scan if self.facts is not None else None
        return Redactor(DEFAULT_DETECTORS, scan).value(self.arguments)


def _same_session(caller: McpCaller, was: McpCaller) -> McpCaller:
    """The caller looked up again (groups may have changed), in the session it was in."""
    return McpCaller(caller.user_id, caller.user_name, caller.role, caller.groups, caller.on_behalf_of, was.client,
                     was.client_version, was.session, was.headers)


def _sse(message: dict) -> bytes:
    return b"event: message\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


def offers_gateway_tools(names: list[str], servers) -> bool:
    """Whether a model request already offers the MCP gateway's tools (its client is connected to /aibridge/mcp):
    a name that is `<server>__<tool>`, or holds `__<server>__` (Claude Code's `mcp__<its name>__<server>__<tool>`),
    for an approved server. Such a request gets no tools injected: the model would see each one twice."""
    marks = [(f"{s.name}{SEPARATOR}", f"{SEPARATOR}{s.name}{SEPARATOR}") for s in servers]
    return any(n.startswith(start) or inner in n for n in names for start, inner in marks)


def _error_text(result) -> str | None:
    if not result.isError:
        return None
    texts = [c.text for c in result.content or [] if getattr(c, "type", None) == "text"]
    return "\n".join(texts)[:2000] or "the tool answered with an error"


def _template_matches(template: str, uri: str) -> bool:
    """Whether `uri` is one the URI template (RFC 6570, simple expressions) makes."""
    pattern, pos = "", 0
    for m in re.finditer(r"\{([+#]?)[^}]*\}", template):
        pattern += re.escape(template[pos:m.start()]) + (".+" if m.group(1) else "[^/?#]+")
        pos = m.end()
    pattern += re.escape(template[pos:])
    return re.fullmatch(pattern, uri) is not None


def _jsonrpc_error(code: int, message: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}).encode()


def jsonrpc_error(code: int, message: str) -> bytes:
    """A JSON-RPC error with no request id, as an HTTP answer's body (the front's 401, 400, 404)."""
    return _jsonrpc_error(code, message)
