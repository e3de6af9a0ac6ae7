"""Approved MCP servers, reached with the official MCP client: what each offers, cached, and the calls forwarded to
them. One registry serves both users of central tools: the injected-tool loop (tools injected into model calls) and
the MCP gateway at /aibridge/mcp (tools, resources and prompts for agents).

Kinds of server: `url` servers over Streamable HTTP or the older HTTP+SSE transport (`transport: auto` takes SSE
for a path ending in `/sse`, else tries Streamable HTTP and falls back to SSE, remembered, when the initialize POST
is answered 400, 404 or 405, as the spec's backwards-compatibility section describes), and `command` servers over
stdio: one child process per server in this gateway process, started on first use, with only `env` on top of a
minimal environment (never the gateway's, which holds provider keys), its stderr logged at debug level (its last
lines, redacted, when it dies), restarted with a backoff when it dies, stopped when idle, at a reload that drops or
changes it and at shutdown (`aclose`).

Pooled sessions: one initialized `ClientSession` per (server, credential), kept and shared by listings and calls
(concurrent requests multiplex on it), owned by a background task (the transport's and session's context managers
are entered and left in that one task), closed after `mcp.idle_seconds` unused, at most `mcp.max_sessions` of them
(the least recently used closed first). A broken session (a restarted server's 404 for its session, a dead
process, a dropped connection) is dropped, and the request retried once on a fresh one when it surely did not reach
the server or is a listing or a read; a `tools/call` that may have run is reported failed, never run twice.

A server that is down or slow never fails or delays a request beyond the wait its caller gives (`list_timeout_seconds`
for injection, at most 5 s for the gateway's tools/list): what it offered last is used (nothing, the first time)
and the listing keeps going in the background. A call is bounded by `tool_timeout_seconds`.

Change notices: a server's `notifications/{tools,resources,prompts}/list_changed` makes the registry list it again
at once. After every listing, when what a server offers changed (names and schemas), `version` goes up and waiters
are woken:

    version = registry.version                     # an int, starts at 0
    version = await registry.wait_changed(version, timeout=30)   # returns once it is > the one given (or at timeout)
    async for version in registry.subscribe():     # every change from now on
        ...

While anyone waits (`wait_changed` or `subscribe`), servers are also listed again every `mcp.watch_seconds`.
Versions are this registry's own, counted from 0 in this process (each `--workers` worker has its own): a reload
that changes `mcp_servers` or `mcp` replaces the runtime's registry, and the old one, once closed (`closed`),
ends its waiters at once; a watcher then takes the runtime's new registry (and tells its clients the lists
changed: they may have).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, AsyncIterator, Callable

from ..config import McpServer, McpSettings
from ..logsafe import redact
from .tools import InjectedTool, model_tool_name

log = logging.getLogger("aibridge.mcp")
stderr_log = logging.getLogger("aibridge.mcp.stderr")

PREFIX = "bmcp_"
MAX_PAGES = 20  # pages of one list a server may hand out (a cursor that never ends is cut here)
FALLBACK_STATUS = (400, 404, 405)  # an initialize POST answered so: not Streamable HTTP there, try SSE (auto)
SESSION_TERMINATED = 32600  # the client's error for a 404 to a request in a session (the server forgot it)
CONNECTION_CLOSED = -32000  # the client's error for requests pending when the connection closed
MAX_BACKOFF = 30.0
SHORT_LIFE = 10.0  # a stdio process that dies sooner than this after starting counts as a failure to start
CLOSE_GRACE = 4.0  # seconds aclose() gives sessions to end cleanly (a stdio child: stdin closed, then killed)


class Unavailable(Exception):
    """A server could not be reached, refused, failed or answered too late; the message says which and is safe to
    show the caller (never a header or a token)."""

    def __init__(self, message: str, outcome: str = "unavailable", status: int | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome  # unavailable, timeout, error (a JSON-RPC error), sign_in (an oauth server)
        self.status = status  # the HTTP status the server answered with, when that was the failure


class _Broken(Exception):
    """The pooled session cannot be used any more. `sent`: False when the request surely did not reach the server
    (it refused the session, or the session was gone before the request was written)."""

    def __init__(self, cause: BaseException | None, sent: bool) -> None:
        super().__init__(_describe(cause) if cause is not None else "the session ended")
        self.sent = sent


@dataclass
class Listing:
    """What one server offers (to one user, for a per_user_token server), as the server describes it, and how the
    last attempt to list it went."""

    tools: list = field(default_factory=list)  # mcp.types.Tool
    resources: list = field(default_factory=list)  # mcp.types.Resource
    templates: list = field(default_factory=list)  # mcp.types.ResourceTemplate
    prompts: list = field(default_factory=list)  # mcp.types.Prompt
    injected: list[InjectedTool] = field(default_factory=list)  # the tools as the injected-tool loop offers them
    fetched_at: float = 0.0
    ok_at: float | None = None  # the last listing that worked (monotonic)
    error: str | None = None  # why the last one failed
    task: asyncio.Task | None = None
    user_id: str | None = None  # whose listing (per_user_token servers); None: everyone's
    asked_by: str = ""  # the user who last asked for it: whose credential a re-list in the background uses
    asked_at: float = 0.0  # when (monotonic): listings nobody asked for lately are not re-listed, then forgotten
    fingerprint: str | None = None  # of what it offers (names and schemas), to tell a change
    again: bool = False  # a change notice came while a listing was under way: list once more after it


class _Pooled:
    """One pooled session, owned by its task (`McpRegistry._own`)."""

    def __init__(self, key: tuple, server: McpServer) -> None:
        loop = asyncio.get_running_loop()
        self.key, self.server = key, server
        self.session = None  # mcp.ClientSession, once initialized
        self.init = None  # its InitializeResult
        self.kind = ""  # streamable_http, sse or stdio
        self.ready: asyncio.Future = loop.create_future()  # the session, or Unavailable
        self.ready.add_done_callback(_retrieved)
        self.end: asyncio.Future = loop.create_future()  # None: asked to stop; an exception: it broke
        self.end.add_done_callback(_retrieved)
        self.in_use = 0
        self.last_used = time.monotonic()
        self.started_at = 0.0
        self.retiring = False  # out of the pool (evicted): ends once no request uses it
        self.errlog: _Stderr | None = None  # a stdio server's stderr
        self.task: asyncio.Task | None = None

    def finish(self, cause: BaseException | None) -> None:
        if not self.end.done():
            self.end.set_result(cause)

    @property
    def usable(self) -> bool:
        return not self.end.done() and not self.retiring and not (self.ready.done() and (
            self.ready.cancelled() or self.ready.exception() is not None))


def _retrieved(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()


class _Stderr:
    """A stdio server's stderr: a pipe read by a thread, each line logged at debug level (redacted, the env values
    configured for it masked), the last few kept to say why it died."""

    def __init__(self, server: McpServer) -> None:
        self.name = server.name
        self.secrets = [v for _, v in server.env if len(v) >= 4]
        r, w = os.pipe()
        self.writer = os.fdopen(w, "w")
        self.tail: collections.deque[str] = collections.deque(maxlen=5)
        threading.Thread(target=self._read, args=(r,), daemon=True, name=f"mcp-stderr-{server.name}").start()

    def clean(self, line: str) -> str:
        for secret in self.secrets:
            line = line.replace(secret, "<redacted>")
        return redact(line[:500])

    def _read(self, fd: int) -> None:
        with open(fd, "rb") as f:
            for raw in f:
                line = self.clean(raw.decode("utf-8", "replace").rstrip())
                if line:
                    self.tail.append(line)
                    stderr_log.debug("MCP server %s (stderr): %s", self.name, line)

    def close(self) -> None:
        """This process's end of the pipe (the child keeps its own until it exits)."""
        if not self.writer.closed:
            self.writer.close()


class _Watched:
    """A transport's read stream that says when it ends (a stdio server's stdout closed: its process died; an SSE
    stream ended), so the session is known broken at once, not at the next request."""

    def __init__(self, stream, on_end: Callable[[], None]) -> None:
        self.stream, self.on_end = stream, on_end

    async def __aenter__(self):
        await self.stream.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self.stream.__aexit__(*exc)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.stream.__anext__()
        except StopAsyncIteration:
            self.on_end()
            raise

    async def receive(self):
        import anyio

        try:
            return await self.stream.receive()
        except anyio.EndOfStream:
            self.on_end()
            raise

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _credential_key(headers: dict[str, str]) -> str:
    """Which pooled session a request may use: the same server and the same headers (no secret kept in the key)."""
    return hashlib.sha256(json.dumps(sorted(headers.items())).encode()).hexdigest()[:32]


def _fingerprint(listing: Listing) -> str:
    """Names and schemas of what a server offers: a change of it is a change clients are told about."""
    def dump(items) -> list:
        return sorted(json.dumps(i.model_dump(mode="json", exclude_none=True), sort_keys=True) for i in items)
    data = [dump(listing.tools), dump(listing.resources), dump(listing.templates), dump(listing.prompts)]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


class McpRegistry:
    def __init__(self, servers: tuple[McpServer, ...], settings: McpSettings,
                 user_token: Callable[[str, str], str | None]) -> None:
        self.servers = servers
        self.settings = settings
        self.user_token = user_token  # (user id, server name) -> that user's token for the server
        self.oauth = None  # mcp.oauth.McpOAuth: each user's tokens for `oauth: true` servers (set by the runtime)
        self._listings: dict[tuple[str, str | None], Listing] = {}
        self._pool: collections.OrderedDict[tuple, _Pooled] = collections.OrderedDict()  # least recently used first
        self._owners: set[asyncio.Task] = set()  # every session's task, pooled or ending
        self._kinds: dict[str, str] = {}  # url servers: the transport found to work (auto)
        self._failures: dict[tuple, tuple[int, float, str]] = {}  # session key -> (failures in a row, retry at, why)
        self._timers: set[asyncio.TimerHandle] = set()
        self._changed: asyncio.Event | None = None
        self._watchers = 0
        self._watch_task: asyncio.Task | None = None
        self.version = 0  # goes up each time what some server offers changes
        self._evicted_at = 0.0
        self.closed = False
        self.initializes = 0  # sessions initialized, for tests and status

    def server(self, name: str) -> McpServer | None:
        return next((s for s in self.servers if s.name == name), None)

    async def _headers(self, server: McpServer, user_id: str) -> dict[str, str] | None:
        """The headers this user's requests to the server carry (the credential included); None when the server
        takes each user's own credential and this user has none (or must sign in to it first)."""
        headers = dict(server.headers)
        if server.oauth:
            token = await self.oauth.token(server, user_id) if self.oauth is not None else None
            if not token:
                return None
            headers["Authorization"] = f"Bearer {token}"
        elif server.per_user_token:
            token = self.user_token(user_id, server.name)
            if not token:
                return None  # users without their own token get none of this server's tools
            headers["Authorization"] = f"Bearer {token}"
        return headers

    # --- what servers offer -------------------------------------------------------------------------------

    async def tools_for(self, user_id: str, allowed: Callable[[McpServer, str], bool] | None = None
                        ) -> dict[str, InjectedTool]:
        """Injected tools available to this user, by injected name (`allowed`: the access rules' say on each)."""
        if not self.servers:
            return {}
        wait = self.settings.list_timeout_seconds
        results = await asyncio.gather(*(self.listing(s, user_id, wait) for s in self.servers))
        tools = [t for r in results if r is not None for t in r.injected
                 if allowed is None or allowed(t.server, t.tool)]
        if len(tools) > self.settings.max_tools:
            log.warning("%d MCP tools exceed mcp.max_tools=%d; injecting the first %d",
                        len(tools), self.settings.max_tools, self.settings.max_tools)
            tools = tools[: self.settings.max_tools]
        return {t.name: t for t in tools}

    async def listing(self, server: McpServer, user_id: str, wait: float) -> Listing | None:
        """What the server offers this user, waiting at most `wait` seconds for a listing under way (none at all when
        the last one failed); None when the server takes each user's own token and this user has none. A user who
        must sign in to an oauth server first gets what another user's listing of it found (so the agent sees its
        tools, and calling one tells them to sign in), None when there is none."""
        key = (server.name, user_id if server.per_user else None)
        try:  # an oauth token being refreshed holds a listing no longer than its wait
            headers = await (asyncio.wait_for(self._headers(server, user_id), max(wait, 1.0)) if server.oauth
                             else self._headers(server, user_id))
        except (Unavailable, TimeoutError):
            return self._listings.get(key) or self._known(server)
        if headers is None:
            return self._known(server) if server.oauth else None
        listing = self._listings.get(key)
        now = time.monotonic()
        if listing is not None and now - listing.fetched_at < self.settings.refresh_seconds:
            return listing
        if listing is None:
            listing = self._listings[key] = Listing(user_id=key[1])
        listing.asked_by, listing.asked_at = user_id, now
        self._evict(now)
        self._relist(server, listing)
        if listing.task is None:  # closed (a reload replaced this registry): what it had
            return listing
        if listing.error is not None:
            wait = 0  # it failed last time: its retry goes on in the background, nobody waits for it
        try:
            await asyncio.wait_for(asyncio.shield(listing.task), wait)
        except (asyncio.TimeoutError, Exception):
            if listing.ok_at is None:
                log.warning("MCP server %s: tools not available yet (listing is slow or failing)", server.name)
        return listing

    def _relist(self, server: McpServer, listing: Listing) -> None:
        """List the server (for this listing's user) again now, unless a listing is under way."""
        if self.closed:
            return
        if listing.task is None or listing.task.done():
            listing.task = asyncio.create_task(self._refresh(server, listing))
        else:
            listing.again = True  # what it is listing may be from before the change: once more after it

    async def _refresh(self, server: McpServer, listing: Listing) -> None:
        try:
            for attempt in (1, 2):  # an oauth server that refuses the access token: refreshed once
                headers = await self._headers(server, listing.asked_by)
                if headers is None:
                    raise Unavailable(f"MCP server {server.name}: no token for this user any more")
                try:
                    async with asyncio.timeout(max(self.settings.list_timeout_seconds * 5, 10)):
                        tools, resources, templates, prompts = await self._use(server, headers, self._list_all,
                                                                               True)
                    break
                except Unavailable as e:
                    if e.status != 401 or not server.oauth or self.oauth is None or attempt == 2:
                        raise
                    self.oauth.rejected(server, listing.asked_by)
            # Every tool as listed (the access rules say which are offered, the server's regexes first); the
            # injected ones are those its regexes permit.
            listing.tools = tools
            listing.resources, listing.templates, listing.prompts = resources, templates, prompts
            listing.injected = [
                InjectedTool(model_tool_name(f"{PREFIX}{server.name}_{t.name}"), server, t.name,
                             t.description or "", t.inputSchema or {"type": "object", "properties": {}})
                for t in tools if server.permits(t.name)
            ]
            listing.fetched_at = listing.ok_at = time.monotonic()
            listing.error = None
            fingerprint = _fingerprint(listing)
            if fingerprint != listing.fingerprint:
                first = listing.fingerprint is None
                listing.fingerprint = fingerprint
                if not (first and not (tools or resources or templates or prompts)):
                    self._bump()
                log.info("MCP server %s: %d tool(s), %d resource(s), %d prompt(s)%s", server.name,
                         len(listing.tools), len(resources) + len(templates), len(prompts),
                         "" if first else " (changed)")
        except BaseException as e:  # keep the last good list; retry after a short pause, not every request
            if isinstance(e, asyncio.CancelledError) and self.closed:
                raise
            listing.fetched_at = time.monotonic() - self.settings.refresh_seconds + 10
            listing.error = str(e) if isinstance(e, Unavailable) else _describe(e)
            if isinstance(e, TimeoutError):
                listing.error = f"MCP server {server.name} did not answer the listing in time"
            log.warning("MCP server %s: listing failed: %s", server.name, listing.error)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            if listing.again and not self.closed:
                listing.again = False
                listing.task = asyncio.get_running_loop().create_task(self._refresh(server, listing))

    async def _list_all(self, pooled: _Pooled) -> tuple[list, list, list, list]:
        session, caps = pooled.session, pooled.init.capabilities

        def paged(method):
            return lambda params=None: self._race(pooled, method(params=params))

        tools = await _pages(paged(session.list_tools), "tools") if caps.tools is not None else []
        resources, templates, prompts = [], [], []
        if caps.resources is not None:
            resources = await _pages(paged(session.list_resources), "resources")
            templates = await _pages(paged(session.list_resource_templates), "resourceTemplates")
        if caps.prompts is not None:
            prompts = await _pages(paged(session.list_prompts), "prompts")
        return tools, resources, templates, prompts

    # --- change notices -----------------------------------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _server_changed(self, server: McpServer) -> None:
        """A server said its lists changed: every listing of it is made again now."""
        for (name, _), listing in list(self._listings.items()):
            if name == server.name:
                listing.fetched_at = 0.0
                self._relist(server, listing)

    async def wait_changed(self, since: int, timeout: float | None = None) -> int:
        """The version once it is past `since` (at once if it already is); at `timeout` the current one. While
        anyone waits, servers are also listed every `mcp.watch_seconds`."""
        self._watch(+1)
        try:
            async with asyncio.timeout(timeout):
                while self.version <= since and not self.closed:
                    if self._changed is None:
                        self._changed = asyncio.Event()
                    await self._changed.wait()
        except TimeoutError:
            pass
        finally:
            self._watch(-1)
        return self.version

    async def subscribe(self) -> AsyncIterator[int]:
        """Every version from now on, as it changes (changes close together may be seen as one)."""
        seen = self.version
        while not self.closed:
            seen = await self.wait_changed(seen)
            if self.closed:
                return
            yield seen

    def _watch(self, delta: int) -> None:
        self._watchers += delta
        if self._watchers > 0 and (self._watch_task is None or self._watch_task.done()) and not self.closed:
            self._watch_task = asyncio.create_task(self._watching())

    async def _watching(self) -> None:
        """While anyone waits for changes: the listings someone asked for lately (within `refresh_seconds`) are
        made again every `watch_seconds` — never every user's ever listed (each with their own credential)."""
        while self._watchers > 0 and not self.closed:
            await asyncio.sleep(self.settings.watch_seconds)
            recent = time.monotonic() - self.settings.refresh_seconds
            for (name, _), listing in list(self._listings.items()):
                server = self.server(name)
                if server is not None and self._watchers > 0 and listing.asked_at >= recent:
                    self._relist(server, listing)

    def _evict(self, now: float) -> None:
        """Forget per-user listings nobody asked for in four refresh periods (checked at most once a minute): a
        gateway that saw thousands of users once keeps none of their listings."""
        if now - self._evicted_at < 60:
            return
        self._evicted_at = now
        stale = now - 4 * self.settings.refresh_seconds
        for key, listing in list(self._listings.items()):
            if key[1] is not None and listing.asked_at < stale and (listing.task is None or listing.task.done()):
                del self._listings[key]

    def _known(self, server: McpServer) -> Listing | None:
        """The newest listing of the server that worked, whoever it was for (an oauth server's tools for a user who
        has not signed in)."""
        ok = [v for (name, _), v in self._listings.items() if name == server.name and v.ok_at is not None]
        return max(ok, key=lambda v: v.ok_at) if ok else None

    def status(self) -> list[dict]:
        """Each server as the dashboard shows it: reachable at its last listing or not (and why), what it offers,
        how it is reached (URL and transport, or the command line: never env values or headers). Per-user listings
        count once per server (the best of them)."""
        out = []
        now = time.monotonic()
        for s in self.servers:
            mine = [v for (name, _), v in self._listings.items() if name == s.name]
            ok = [v for v in mine if v.ok_at is not None and v.error is None]
            best = max(ok, key=lambda v: v.ok_at) if ok else (mine[0] if mine else None)
            sessions = [p for p in self._pool.values() if p.server.name == s.name]
            out.append({
                "server": s.name, "url": s.url, "per_user_token": s.per_user_token, "oauth": s.oauth,
                "transport": self._kinds.get(s.name) or s.transport,
                "command": s.where if s.stdio else None,
                "available": bool(ok) if mine else None,  # None: not listed yet
                "error": (None if ok or best is None else best.error or (
                    "no answer yet" if best.task is not None and not best.task.done() else None))
                if mine or not s.oauth else "sign-in needed: nobody has signed in to it yet (aibridge mcp login)",
                "tools": len(best.tools) if best else 0,
                "resources": len(best.resources) + len(best.templates) if best else 0,
                "prompts": len(best.prompts) if best else 0,
                "listed_seconds_ago": round(now - best.ok_at, 1) if best and best.ok_at else None,
                "sessions": sum(1 for p in sessions if p.session is not None and p.usable),
            })
        return out

    # --- pooled sessions ------------------------------------------------------------------------------------

    def _kind(self, server: McpServer) -> str:
        if server.stdio:
            return "stdio"
        if server.transport != "auto":
            return server.transport
        if server.name in self._kinds:
            return self._kinds[server.name]
        path = (server.url or "").split("?", 1)[0].rstrip("/")
        return "sse" if path.endswith("/sse") else "streamable_http"

    def _transport(self, server: McpServer, kind: str, headers: dict[str, str], stack: contextlib.AsyncExitStack,
                   errlog: _Stderr | None):
        timeout = max(self.settings.tool_timeout_seconds, self.settings.list_timeout_seconds * 5, 10)
        read = max(self.settings.idle_seconds, timeout) + 60  # an idle stream is not a dead one
        if kind == "stdio":
            from mcp.client.stdio import StdioServerParameters, stdio_client

            return stdio_client(StdioServerParameters(command=server.command, args=list(server.args),
                                                      env=dict(server.env), cwd=server.cwd), errlog=errlog.writer)
        if kind == "sse":
            from mcp.client.sse import sse_client

            return sse_client(server.url, headers=headers, timeout=timeout, sse_read_timeout=read)
        import httpx
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        client = create_mcp_http_client(headers=headers, timeout=httpx.Timeout(timeout, read=read))
        stack.push_async_callback(client.aclose)
        return streamable_http_client(server.url, http_client=client)

    def _acquire(self, server: McpServer, headers: dict[str, str]) -> _Pooled:
        """The pooled session for this server and credential, started if there is none (or the last one broke)."""
        if self.closed:
            raise Unavailable(f"MCP server {server.name}: the gateway is stopping")
        key = (server.name, _credential_key(headers))
        pooled = self._pool.get(key)
        if pooled is not None and not pooled.usable:
            self._pool.pop(key, None)
            pooled = None
        if pooled is None:
            failures, retry_at, why = self._failures.get(key, (0, 0.0, ""))
            wait = retry_at - time.monotonic()
            if wait > 0:
                raise Unavailable(f"{why} (next try in {wait:.0f}s)")
            while len(self._pool) >= self.settings.max_sessions:
                _, oldest = self._pool.popitem(last=False)
                oldest.retiring = True  # its requests finish; then it ends
            pooled = self._pool[key] = _Pooled(key, server)
            task = pooled.task = asyncio.create_task(self._own(pooled, headers))
            self._owners.add(task)
            task.add_done_callback(self._owners.discard)
        else:
            self._pool.move_to_end(key)
        pooled.last_used = time.monotonic()
        return pooled

    async def _own(self, pooled: _Pooled, headers: dict[str, str]) -> None:
        """The pooled session's life: open, initialize, serve until idle, asked to stop or broken, close."""
        server = pooled.server
        cause: BaseException | None = None
        try:
            kinds = [self._kind(server)]
            if server.transport == "auto" and kinds[0] == "streamable_http" and server.name not in self._kinds:
                kinds.append("sse")
            for n, kind in enumerate(kinds):
                try:
                    cause = await self._open(pooled, kind, headers)
                    break
                except BaseException as e:
                    status = _http_status(e)
                    if pooled.ready.done() or n + 1 == len(kinds) or status not in FALLBACK_STATUS:
                        raise
                    log.info("MCP server %s: its initialize over Streamable HTTP was answered %s: using SSE",
                             server.name, status)
                    pooled.end = asyncio.get_running_loop().create_future()
                    pooled.end.add_done_callback(_retrieved)
        except BaseException as e:
            cause = e
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            pooled.finish(cause)
            if self._pool.get(pooled.key) is pooled:
                del self._pool[pooled.key]
            if pooled.errlog is not None:
                pooled.errlog.close()
            self._ended(pooled, cause, pooled.errlog)

    async def _open(self, pooled: _Pooled, kind: str, headers: dict[str, str]) -> BaseException | None:
        """Open the transport and the session, initialize, serve (`_serve`); what broke it, if anything. A transport
        failure surfaces here too: the SDK's transports end their task group (and so this) when a request fails."""
        from mcp import ClientSession

        server = pooled.server
        async with contextlib.AsyncExitStack() as stack:
            errlog = None
            if kind == "stdio":
                errlog = pooled.errlog = _Stderr(server)
                stack.callback(errlog.close)
            streams = await stack.enter_async_context(self._transport(server, kind, headers, stack, errlog))
            if errlog is not None:
                errlog.close()  # the child holds its own end now: EOF once it exits
            read = _Watched(streams[0], lambda: pooled.finish(ConnectionError("the server closed the connection")))
            session = await stack.enter_async_context(ClientSession(
                read, streams[1], message_handler=lambda m: self._on_message(pooled, m)))
            pooled.kind, pooled.started_at = kind, time.monotonic()
            init = await self._race(pooled, session.initialize(), max(self.settings.list_timeout_seconds * 5, 10))
            if server.transport == "auto" and not server.stdio:
                self._kinds[server.name] = kind
            pooled.session, pooled.init = session, init
            self.initializes += 1
            log.info("MCP server %s: session open (%s)", server.name, kind)
            pooled.ready.set_result(session)
            return await self._serve(pooled)

    async def _serve(self, pooled: _Pooled) -> BaseException | None:
        """Wait until the session is idle, asked to stop, evicted or broken; what broke it, if anything."""
        idle = self.settings.idle_seconds
        while True:
            if pooled.end.done():
                return pooled.end.result()
            unused = time.monotonic() - pooled.last_used
            if pooled.in_use == 0 and (pooled.retiring or unused >= idle):
                return None
            wait = 0.5 if pooled.retiring else (idle - unused if pooled.in_use == 0 else idle)
            await asyncio.wait([pooled.end], timeout=max(wait, 0.5))

    def _ended(self, pooled: _Pooled, cause: BaseException | None, errlog: _Stderr | None) -> None:
        server = pooled.server
        if not pooled.ready.done():  # it never worked: say why, and wait a while before the next try
            failures = self._failures.get(pooled.key, (0, 0.0, ""))[0] + 1
            why = self._unavailable(server, cause).args[0] if cause is not None else \
                f"MCP server {server.name}: the session ended before it was ready"
            if errlog is not None and errlog.tail:
                why += f" (stderr: {errlog.tail[-1][:200]})"
            self._failures[pooled.key] = (failures, time.monotonic() + min(MAX_BACKOFF, 0.5 * 2 ** failures), why)
            pooled.ready.set_exception(Unavailable(why, status=_http_status(cause)))
            return
        lived = time.monotonic() - pooled.started_at
        if cause is None or lived >= SHORT_LIFE:
            self._failures.pop(pooled.key, None)  # it worked a while: a failure now is not a crash loop
        if cause is None or self.closed or isinstance(cause, asyncio.CancelledError):
            log.info("MCP server %s: session closed", server.name)
            return
        tail = "; last stderr: " + " | ".join(errlog.tail) if errlog is not None and errlog.tail else ""
        log.warning("MCP server %s: session broke (%s)%s", server.name, _describe(cause), tail)
        if not server.stdio or self.server(server.name) is not server:
            return  # an HTTP session is opened again by the next request
        # A stdio server's process died: started again (its listing made again) at once; when it keeps dying soon
        # after starting, after a pause that doubles each time (1, 2, 4 … 30 s).
        delay = 0.0
        if lived < SHORT_LIFE:
            failures = self._failures.get(pooled.key, (0, 0.0, ""))[0] + 1
            delay = 0.0 if failures == 1 else min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
            self._failures[pooled.key] = (failures, time.monotonic() + delay,
                                           f"MCP server {server.name} failed: its process exited{tail}")
        loop = asyncio.get_running_loop()
        handle = loop.call_later(delay + 0.01, self._restart, server)
        self._timers.add(handle)

    def _restart(self, server: McpServer) -> None:
        self._timers = {t for t in self._timers if not t.cancelled() and t.when() > asyncio.get_running_loop().time()}
        if self.closed or self.server(server.name) is not server:
            return
        listings = [v for (name, _), v in self._listings.items() if name == server.name]
        for listing in listings or [self._listings.setdefault((server.name, None), Listing())]:
            listing.fetched_at = 0.0
            self._relist(server, listing)

    async def _on_message(self, pooled: _Pooled, message) -> None:
        """What the server sends unasked: list changes (listed again at once); a transport failure (the session is
        broken: its pending requests end now rather than at their timeout)."""
        from mcp import types

        if isinstance(message, Exception):
            import httpx

            if isinstance(message, (httpx.HTTPError, OSError)):  # the connection or the server failed
                pooled.finish(message)
            else:  # a line that is not JSON-RPC, a late answer to a request given up on: the session still works
                log.debug("MCP server %s: %s", pooled.server.name, _describe(message))
            return
        if isinstance(message, types.ServerNotification) and isinstance(message.root, (
                types.ToolListChangedNotification, types.ResourceListChangedNotification,
                types.PromptListChangedNotification)):
            log.info("MCP server %s: %s", pooled.server.name, message.root.method)
            if self.server(pooled.server.name) is pooled.server:
                self._server_changed(pooled.server)

    async def _race(self, pooled: _Pooled, coro, timeout: float | None = None):
        """A request on the pooled session, ended early when the session breaks (`_Broken`)."""
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait([task, pooled.end], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        task.add_done_callback(_retrieved)
        if pooled.end.done():
            cause = pooled.end.result()
            raise _Broken(cause, sent=True) from cause
        raise TimeoutError

    async def _use(self, server: McpServer, headers: dict[str, str], op, idempotent: bool):
        """`op(pooled)` on the pooled session; a broken session is dropped and `op` tried once more on a fresh one
        when it surely did not reach the server, or is `idempotent` (listings, reads). Errors become `Unavailable`
        (TimeoutError passes through: the caller knows its bound)."""
        import anyio
        from mcp.shared.exceptions import McpError

        for attempt in (1, 2):
            pooled = self._acquire(server, headers)
            pooled.in_use += 1
            try:
                await asyncio.shield(pooled.ready)
                return await op(pooled)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream) as e:
                broken = _Broken(e, sent=False)
            except _Broken as e:
                broken = e
            except McpError as e:
                if e.error.code == SESSION_TERMINATED:
                    broken = _Broken(e, sent=False)  # the server refused the session: it did not run the request
                elif e.error.code == CONNECTION_CLOSED and e.error.message == "Connection closed":
                    broken = _Broken(e, sent=True)
                elif e.error.code == 408:  # the client's own read timeout
                    raise TimeoutError from None
                else:
                    raise Unavailable(f"MCP server {server.name} answered with an error: {e.error.message}",
                                      "error") from None
            except (Unavailable, TimeoutError, asyncio.CancelledError):
                raise
            except Exception as e:
                raise self._unavailable(server, e) from None
            finally:
                pooled.in_use -= 1
                pooled.last_used = time.monotonic()
            pooled.finish(broken)
            if self._pool.get(pooled.key) is pooled:
                del self._pool[pooled.key]
            if attempt == 1 and (not broken.sent or idempotent):
                log.info("MCP server %s: session broken (%s); trying once more on a new one", server.name, broken)
                continue
            if _http_status(broken) == 401:  # the token was refused: nothing ran (the caller may refresh it)
                raise Unavailable(f"MCP server {server.name} refused the credential", status=401)
            if broken.sent and not idempotent:
                raise Unavailable(f"MCP server {server.name} failed: the connection broke during the call "
                                  f"({broken}); it may have run, so it was not run again")
            raise Unavailable(f"MCP server {server.name} failed: {broken}")

    def _unavailable(self, server: McpServer, e: BaseException) -> Unavailable:
        from mcp.shared.exceptions import McpError

        inner = _innermost(e)
        if isinstance(inner, _Broken) and inner.__cause__ is not None:
            inner = _innermost(inner.__cause__)
        if isinstance(inner, Unavailable):
            return inner
        if isinstance(inner, TimeoutError):
            return Unavailable(f"MCP server {server.name} did not answer in time", "timeout")
        if isinstance(inner, McpError):
            return Unavailable(f"MCP server {server.name} answered with an error: {inner.error.message}", "error")
        return Unavailable(f"MCP server {server.name} failed: {_describe(inner)}", status=_http_status(e))

    async def aclose(self) -> None:
        """Close every session (a stdio server's process ends: stdin closed, then terminated, then killed) and
        stop listing; called at shutdown and when a reload replaces the registry. Waits at most a few seconds."""
        self.closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._changed is not None:
            self._changed.set()
        for listing in self._listings.values():
            if listing.task is not None and not listing.task.done():
                listing.task.cancel()
        for pooled in list(self._pool.values()):
            pooled.finish(None)
        self._pool.clear()
        owners = list(self._owners)
        if not owners:
            return
        _, pending = await asyncio.wait(owners, timeout=CLOSE_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)

    # --- calls ----------------------------------------------------------------------------------------------

    async def _request(self, server: McpServer, user_id: str, op, idempotent: bool):
        """A request as this user (their own token where the server takes one), within `tool_timeout_seconds`;
        every failure, the timeout included, becomes `Unavailable`."""
        timeout = self.settings.tool_timeout_seconds
        for attempt in (1, 2):  # an oauth server that refuses the access token: refreshed once, then sign-in
            headers = await self._headers(server, user_id)
            if headers is None and server.oauth:
                raise Unavailable(self.oauth.sign_in_message(server, user_id) if self.oauth is not None else
                                  f"MCP server {server.name} needs a sign-in", "sign_in")
            if headers is None:
                raise Unavailable(f"MCP server {server.name} takes each user's own token, and this user has none "
                                  f"(aibridge mcp-token set --server {server.name})")
            try:
                async with asyncio.timeout(timeout):
                    return await self._use(server, headers, op, idempotent)
            except TimeoutError:
                raise Unavailable(f"MCP server {server.name} did not answer within {timeout:g}s", "timeout") from None
            except Unavailable as e:
                # 401: the server refused the token (so it ran nothing): refreshed once, then sign-in needed.
                if e.status != 401 or not server.oauth or self.oauth is None:
                    raise
                self.oauth.rejected(server, user_id)
                if attempt == 2:
                    raise Unavailable(self.oauth.sign_in_message(server, user_id), "sign_in") from None

    async def call_tool(self, server: McpServer, tool: str, arguments: dict, user_id: str):
        """The server's `CallToolResult` for the call, as it answered (not validated again: the agent does); raises
        `Unavailable` when there is none. Never sent twice when it may have run."""
        from mcp import types

        timeout = self.settings.tool_timeout_seconds

        def op(pooled: _Pooled):
            return self._race(pooled, pooled.session.send_request(
                types.ClientRequest(types.CallToolRequest(
                    params=types.CallToolRequestParams(name=tool, arguments=arguments))),
                types.CallToolResult, request_read_timeout_seconds=timedelta(seconds=timeout)))

        return await self._request(server, user_id, op, False)

    async def read_resource(self, server: McpServer, uri: str, user_id: str):
        from pydantic import AnyUrl

        return await self._request(
            server, user_id, lambda pooled: self._race(pooled, pooled.session.read_resource(AnyUrl(uri))), True)

    async def get_prompt(self, server: McpServer, name: str, arguments: dict | None, user_id: str):
        return await self._request(
            server, user_id, lambda pooled: self._race(pooled, pooled.session.get_prompt(name, arguments)), True)

    async def call(self, tool: InjectedTool, arguments: Any, user_id: str) -> tuple[str, bool]:
        """The injected-tool loop's call: (result text, is_error). Failures are results, never exceptions."""
        if not isinstance(arguments, dict):
            return f"invalid arguments for {tool.name}: expected a JSON object", True
        try:
            result = await self.call_tool(tool.server, tool.tool, arguments, user_id)
        except Unavailable as e:
            if e.outcome == "timeout":
                return (f"MCP tool {tool.tool} on {tool.server.name} timed out after "
                        f"{self.settings.tool_timeout_seconds:g}s"), True
            return f"MCP tool {tool.tool} on {tool.server.name} failed: {e}", True
        return result_text(result), bool(result.isError)


async def _pages(fetch, attribute: str) -> list:
    """Every page of a paginated list (at most MAX_PAGES)."""
    from mcp import types

    items, cursor = [], None
    for _ in range(MAX_PAGES):
        page = await fetch(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        items += getattr(page, attribute) or []
        cursor = page.nextCursor
        if not cursor:
            break
    return items


def result_text(result) -> str:
    parts = []
    for c in result.content or []:
        if getattr(c, "type", None) == "text":
            parts.append(c.text)
        else:
            parts.append(json.dumps(c.model_dump(mode="json", exclude_none=True)))
    if not parts and getattr(result, "structuredContent", None) is not None:
        parts.append(json.dumps(result.structuredContent))
    return "\n".join(parts)


def _http_status(e: BaseException | None) -> int | None:
    """The HTTP status an exception (or what it wraps) carries, if any."""
    e = _innermost(e) if e is not None else None
    if isinstance(e, _Broken):
        e = _innermost(e.__cause__) if e.__cause__ is not None else None
    return getattr(getattr(e, "response", None), "status_code", None)


def _innermost(e: BaseException) -> BaseException:
    """anyio wraps failures in exception groups: the first real one."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _describe(e: BaseException) -> str:
    e = _innermost(e)
    return f"{type(e).__name__}: {e}"
