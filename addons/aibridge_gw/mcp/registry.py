"""Approved MCP servers, reached with the official MCP client (Streamable HTTP): what each offers, cached, and the
calls forwarded to them. One registry serves both users of central tools: the injected-tool loop (tools injected
into model calls) and the MCP gateway at /aibridge/mcp (tools, resources and prompts for agents).

A server that is down or slow never fails or delays a request beyond the wait its caller gives (`list_timeout_seconds`
for injection, at most 5 s for the gateway's tools/list): what it offered last is used (nothing, the first time)
and the listing keeps going in the background. A call is bounded by `tool_timeout_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from ..config import McpServer, McpSettings
from .tools import InjectedTool

log = logging.getLogger("aibridge.mcp")

PREFIX = "bmcp_"
MAX_PAGES = 20  # pages of one list a server may hand out (a cursor that never ends is cut here)


class Unavailable(Exception):
    """A server could not be reached, refused, failed or answered too late; the message says which and is safe to
    show the caller (never a header or a token)."""

    def __init__(self, message: str, outcome: str = "unavailable") -> None:
        super().__init__(message)
        self.outcome = outcome  # unavailable, timeout, error (the server answered with a JSON-RPC error)


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


def _session(server: McpServer, headers: dict[str, str], timeout: float):
    from mcp.client.streamable_http import streamablehttp_client

    return streamablehttp_client(server.url, headers=headers, timeout=timeout, sse_read_timeout=timeout)


class McpRegistry:
    def __init__(self, servers: tuple[McpServer, ...], settings: McpSettings,
                 user_token: Callable[[str, str], str | None]) -> None:
        self.servers = servers
        self.settings = settings
        self.user_token = user_token  # (user id, server name) -> that user's token for the server
        self.oauth = None  # mcp.oauth.McpOAuth: each user's tokens for `oauth: true` servers (set by the runtime)
        self._listings: dict[tuple[str, str | None], Listing] = {}

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
            listing = self._listings[key] = Listing()
        if listing.task is None or listing.task.done():
            listing.task = asyncio.create_task(self._refresh(server, headers, listing))
        if listing.error is not None:
            wait = 0  # it failed last time: its retry goes on in the background, nobody waits for it
        try:
            await asyncio.wait_for(asyncio.shield(listing.task), wait)
        except (asyncio.TimeoutError, Exception):
            if listing.ok_at is None:
                log.warning("MCP server %s: tools not available yet (listing is slow or failing)", server.name)
        return listing

    async def _refresh(self, server: McpServer, headers: dict[str, str], listing: Listing) -> None:
        from mcp import ClientSession

        try:
            async with _session(server, headers, max(self.settings.list_timeout_seconds * 5, 10)) as (r, w, _):
                async with ClientSession(r, w) as session:
                    init = await session.initialize()
                    caps = init.capabilities
                    tools = await _pages(session.list_tools, "tools") if caps.tools is not None else []
                    resources, templates, prompts = [], [], []
                    if caps.resources is not None:
                        resources = await _pages(session.list_resources, "resources")
                        templates = await _pages(session.list_resource_templates, "resourceTemplates")
                    if caps.prompts is not None:
                        prompts = await _pages(session.list_prompts, "prompts")
            # Every tool as listed (the access rules say which are offered, the server's regexes first); the
            # injected ones are those its regexes permit.
            listing.tools = tools
            listing.resources, listing.templates, listing.prompts = resources, templates, prompts
            listing.injected = [
                InjectedTool(f"{PREFIX}{server.name}_{t.name}", server, t.name, t.description or "",
                             t.inputSchema or {"type": "object", "properties": {}})
                for t in tools if server.permits(t.name)
            ]
            listing.fetched_at = listing.ok_at = time.monotonic()
            listing.error = None
            log.info("MCP server %s: %d tool(s), %d resource(s), %d prompt(s)", server.name, len(listing.tools),
                     len(resources) + len(templates), len(prompts))
        except BaseException as e:  # keep the last good list; retry after a short pause, not every request
            listing.fetched_at = time.monotonic() - self.settings.refresh_seconds + 10
            listing.error = _describe(e)
            log.warning("MCP server %s: listing failed: %s", server.name, listing.error)
            if isinstance(e, asyncio.CancelledError):
                raise

    def _known(self, server: McpServer) -> Listing | None:
        """The newest listing of the server that worked, whoever it was for (an oauth server's tools for a user who
        has not signed in)."""
        ok = [v for (name, _), v in self._listings.items() if name == server.name and v.ok_at is not None]
        return max(ok, key=lambda v: v.ok_at) if ok else None

    def status(self) -> list[dict]:
        """Each server as the dashboard shows it: reachable at its last listing or not (and why), what it offers.
        Per-user listings count once per server (the best of them)."""
        out = []
        now = time.monotonic()
        for s in self.servers:
            mine = [v for (name, _), v in self._listings.items() if name == s.name]
            ok = [v for v in mine if v.ok_at is not None and v.error is None]
            best = max(ok, key=lambda v: v.ok_at) if ok else (mine[0] if mine else None)
            out.append({
                "server": s.name, "url": s.url, "per_user_token": s.per_user_token, "oauth": s.oauth,
                "available": bool(ok) if mine else None,  # None: not listed yet
                "error": (None if ok or best is None else best.error) if mine or not s.oauth else
                "sign-in needed: nobody has signed in to it yet (aibridge mcp login)",
                "tools": len(best.tools) if best else 0,
                "resources": len(best.resources) + len(best.templates) if best else 0,
                "prompts": len(best.prompts) if best else 0,
                "listed_seconds_ago": round(now - best.ok_at, 1) if best and best.ok_at else None,
            })
        return out

    # --- calls ----------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connected(self, server: McpServer, user_id: str, timeout: float):
        """An initialized client session with the server, as this user (their own token where the server takes
        one); every failure, the timeout included, becomes `Unavailable`."""
        from mcp import ClientSession

        for attempt in (1, 2):  # an oauth server that refuses the access token: refreshed once, then sign-in
            headers = await self._headers(server, user_id)
            if headers is None and server.oauth:
                raise Unavailable(self.oauth.sign_in_message(server, user_id) if self.oauth is not None else
                                  f"MCP server {server.name} needs a sign-in", "sign_in")
            if headers is None:
                raise Unavailable(f"MCP server {server.name} takes each user's own token, and this user has none "
                                  f"(aibridge mcp-token set --server {server.name})")
            entered = False
            try:
                async with asyncio.timeout(timeout):
                    async with _session(server, headers, timeout) as (r, w, _):
                        async with ClientSession(r, w) as session:
                            await session.initialize()
                            entered = True
                            yield session
                return
            except Exception as e:
                if not entered and server.oauth and self.oauth is not None and _unauthorized(e):
                    self.oauth.rejected(server, user_id)
                    if attempt == 1:
                        continue
                    raise Unavailable(self.oauth.sign_in_message(server, user_id), "sign_in") from None
                _unavailable(server, e, timeout)

    async def call_tool(self, server: McpServer, tool: str, arguments: dict, user_id: str):
        """The server's `CallToolResult` for the call, as it answered (not validated again: the agent does); raises
        `Unavailable` when there is none."""
        from mcp import types

        timeout = self.settings.tool_timeout_seconds
        async with self._connected(server, user_id, timeout) as session:
            return await session.send_request(
                types.ClientRequest(types.CallToolRequest(
                    params=types.CallToolRequestParams(name=tool, arguments=arguments))),
                types.CallToolResult, request_read_timeout_seconds=timedelta(seconds=timeout))

    async def read_resource(self, server: McpServer, uri: str, user_id: str):
        from pydantic import AnyUrl

        async with self._connected(server, user_id, self.settings.tool_timeout_seconds) as session:
            return await session.read_resource(AnyUrl(uri))

    async def get_prompt(self, server: McpServer, name: str, arguments: dict | None, user_id: str):
        async with self._connected(server, user_id, self.settings.tool_timeout_seconds) as session:
            return await session.get_prompt(name, arguments)

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


def _unavailable(server: McpServer, e: BaseException, timeout: float):
    """Any failure of a session with the server, as the `Unavailable` it is."""
    from mcp.shared.exceptions import McpError

    inner = _innermost(e)
    if isinstance(inner, Unavailable):
        raise inner from None
    if isinstance(inner, TimeoutError):
        raise Unavailable(f"MCP server {server.name} did not answer within {timeout:g}s", "timeout") from None
    if isinstance(inner, McpError):
        raise Unavailable(f"MCP server {server.name} answered with an error: {inner.error.message}",
                          "error") from None
    raise Unavailable(f"MCP server {server.name} failed: {_describe(inner)}") from None


def _unauthorized(e: BaseException) -> bool:
    """Whether the server answered 401 (somewhere in anyio's exception groups)."""
    if isinstance(e, BaseExceptionGroup):
        return any(_unauthorized(x) for x in e.exceptions)
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None) == 401


def _innermost(e: BaseException) -> BaseException:
    """anyio wraps failures in exception groups: the first real one."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _describe(e: BaseException) -> str:
    e = _innermost(e)
    return f"{type(e).__name__}: {e}"
