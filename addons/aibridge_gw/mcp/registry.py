"""Approved MCP servers' tools, listed with the official MCP client (Streamable HTTP) and cached.

A server that is down or slow never fails or delays a request beyond `list_timeout_seconds`: its tools are
left out (or the last good list is used) and a warning is logged; the listing keeps going in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from ..config import McpServer, McpSettings
from .tools import InjectedTool

log = logging.getLogger("aibridge.mcp")

PREFIX = "bmcp_"


@dataclass
class _Listing:
    tools: list[InjectedTool]
    fetched_at: float
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
        self._listings: dict[tuple[str, str | None], _Listing] = {}

    def _headers(self, server: McpServer, user_id: str) -> dict[str, str] | None:
        headers = dict(server.headers)
        if server.per_user_token:
            token = self.user_token(user_id, server.name)
            if not token:
                return None  # users without their own token get none of this server's tools
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def tools_for(self, user_id: str) -> dict[str, InjectedTool]:
        """Injected tools available to this user, by injected name."""
        if not self.servers:
            return {}
        results = await asyncio.gather(*(self._server_tools(s, user_id) for s in self.servers))
        tools = [t for r in results for t in r]
        if len(tools) > self.settings.max_tools:
            log.warning("%d MCP tools exceed mcp.max_tools=%d; injecting the first %d",
                        len(tools), self.settings.max_tools, self.settings.max_tools)
            tools = tools[: self.settings.max_tools]
        return {t.name: t for t in tools}

    async def _server_tools(self, server: McpServer, user_id: str) -> list[InjectedTool]:
        headers = self._headers(server, user_id)
        if headers is None:
            return []
        key = (server.name, user_id if server.per_user_token else None)
        listing = self._listings.get(key)
        now = time.monotonic()
        if listing is not None and now - listing.fetched_at < self.settings.refresh_seconds:
            return listing.tools
        if listing is None:
            listing = self._listings[key] = _Listing([], 0.0)
        if listing.task is None or listing.task.done():
            listing.task = asyncio.create_task(self._refresh(server, headers, listing))
        try:
            await asyncio.wait_for(asyncio.shield(listing.task), self.settings.list_timeout_seconds)
        except (asyncio.TimeoutError, Exception):
            if not listing.tools:
                log.warning("MCP server %s: tools not available yet (listing is slow or failing)", server.name)
        return listing.tools

    async def _refresh(self, server: McpServer, headers: dict[str, str], listing: _Listing) -> None:
        from mcp import ClientSession

        try:
            async with _session(server, headers, max(self.settings.list_timeout_seconds * 5, 10)) as (r, w, _):
                async with ClientSession(r, w) as session:
                    await session.initialize()
                    result = await session.list_tools()
            tools = [
                InjectedTool(f"{PREFIX}{server.name}_{t.name}", server, t.name, t.description or "",
                             t.inputSchema or {"type": "object", "properties": {}})
                for t in result.tools
                if server.permits(t.name)
            ]
            listing.tools, listing.fetched_at = tools, time.monotonic()
            log.info("MCP server %s: %d tool(s) injected", server.name, len(tools))
        except BaseException as e:  # keep the last good list; retry after a short pause, not every request
            listing.fetched_at = time.monotonic() - self.settings.refresh_seconds + 10
            log.warning("MCP server %s: listing tools failed: %s", server.name, _describe(e))
            if isinstance(e, asyncio.CancelledError):
                raise

    async def call(self, tool: InjectedTool, arguments: Any, user_id: str) -> tuple[str, bool]:
        """Run the tool; returns (result text, is_error). Failures are results, never exceptions."""
        from mcp import ClientSession

        if not isinstance(arguments, dict):
            return f"invalid arguments for {tool.name}: expected a JSON object", True
        headers = self._headers(tool.server, user_id) or {}
        timeout = self.settings.tool_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                async with _session(tool.server, headers, timeout) as (r, w, _):
                    async with ClientSession(r, w) as session:
                        await session.initialize()
                        result = await session.call_tool(tool.tool, arguments,
                                                         read_timeout_seconds=timedelta(seconds=timeout))
        except TimeoutError:
            return f"MCP tool {tool.tool} on {tool.server.name} timed out after {timeout:g}s", True
        except Exception as e:
            return f"MCP tool {tool.tool} on {tool.server.name} failed: {_describe(e)}", True
        return _result_text(result), bool(result.isError)


def _result_text(result) -> str:
    parts = []
    for c in result.content or []:
        if getattr(c, "type", None) == "text":
            parts.append(c.text)
        else:
            parts.append(json.dumps(c.model_dump(mode="json", exclude_none=True)))
    if not parts and getattr(result, "structuredContent", None) is not None:
        parts.append(json.dumps(result.structuredContent))
    return "\n".join(parts)


def _describe(e: BaseException) -> str:
    # anyio wraps failures in exception groups; show the innermost cause.
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"
