"""MCP servers of the other kinds, for tests/test_mcp_transports.py: an SSE one (the 2024-11-05 HTTP+SSE transport,
at a path not ending in /sse, so `transport: auto` must fall back to it), a stateful Streamable HTTP one that counts
the sessions initialized on it and can add a tool at run time (telling its clients with list_changed), and the
stdio script's path."""

from __future__ import annotations

import json
from pathlib import Path

from mcp.server.fastmcp import Context, FastMCP

from tests.support.mcp_server import _Served

STDIO_SCRIPT = Path(__file__).with_name("mcp_stdio_server.py")


class SseTestServer(_Served):
    path = "/events"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        mcp = FastMCP("olddocs", log_level="WARNING", sse_path="/events", message_path="/messages/")
        calls = self.calls

        @mcp.tool(description="Search the old docs.")
        def search(query: str) -> str:
            calls.append(("search", {"query": query}))
            return json.dumps([{"title": f"about {query}"}])

        self._serve(mcp.sse_app(), timeout_graceful_shutdown=1)


class LiveTestServer(_Served):
    """Stateful Streamable HTTP: sessions, a standalone GET stream; `initializes` counts the sessions begun."""

    def __init__(self, port: int = 0) -> None:
        self.initializes = 0
        self.calls: list[tuple[str, dict]] = []
        mcp = FastMCP("live", log_level="WARNING")
        calls = self.calls

        @mcp.tool(description="Count a call; says which session it came in.")
        def count(ctx: Context) -> str:
            request = ctx.request_context.request
            calls.append(("count", {}))
            return request.headers.get("mcp-session-id", "") if request is not None else ""

        @mcp.tool(description="Add a tool, then tell the clients their tool list changed.")
        async def add_tool(name: str, ctx: Context) -> str:
            def added() -> str:
                return f"{name} here"

            mcp.add_tool(added, name=name, description="added at run time")
            await ctx.session.send_tool_list_changed()
            return f"added {name}"

        @mcp.tool(description="Add a tool without telling anyone (found by listing again).")
        def add_tool_quietly(name: str) -> str:
            def added() -> str:
                return f"{name} here"

            mcp.add_tool(added, name=name, description="added at run time, quietly")
            return f"added {name}"

        inner = mcp.streamable_http_app()

        async def app(scope, receive, send):
            if scope["type"] == "http" and scope["method"] == "POST" and not any(
                    k == b"mcp-session-id" for k, _ in scope["headers"]):
                self.initializes += 1  # in a stateful server only initialize comes without a session
            await inner(scope, receive, send)

        self._serve(app, port, timeout_graceful_shutdown=1)
