"""Real MCP servers (the official SDK's FastMCP, Streamable HTTP) on loopback ports, in threads; and one that
accepts connections and never answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.types import ToolAnnotations


class _Served:
    """A FastMCP app served by uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    app = None

    def _serve(self) -> None:
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("MCP test server did not start")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class McpTestServer(_Served):
    def __init__(self, name: str = "coder") -> None:
        self.calls: list[tuple[str, dict]] = []
        mcp = FastMCP(name, stateless_http=True, log_level="WARNING")
        calls = self.calls

        @mcp.tool(description="List workspaces of an owner.")
        def coder_list_workspaces(owner: str) -> str:
            calls.append(("coder_list_workspaces", {"owner": owner}))
            return json.dumps([{"id": "dd711d5c-83c6-4c08-a0af-b73055906e8c", "name": "bob", "owner": owner}])

        @mcp.tool(description="List templates.")
        def coder_list_templates() -> str:
            calls.append(("coder_list_templates", {}))
            return json.dumps([{"id": "b3a9d9b4-486a-4f21-8884-d81d5dbdd837", "name": "docker"}])

        @mcp.tool(description="Parameters of a template version.")
        def coder_template_version_parameters(template_version_id: str) -> str:
            calls.append(("coder_template_version_parameters", {"template_version_id": template_version_id}))
            return json.dumps([{"name": "cpu", "default": "2"}])

        @mcp.tool(description="Start or stop a workspace.")
        def coder_create_workspace_build(workspace_id: str, transition: str) -> str:
            calls.append(("coder_create_workspace_build", {"workspace_id": workspace_id, "transition": transition}))
            raise ValueError(f"workspace {workspace_id} not found")

        @mcp.tool(description="Delete a template.")
        def coder_delete_template(template_id: str) -> str:
            calls.append(("coder_delete_template", {"template_id": template_id}))
            raise PermissionError("not allowed to delete templates")

        @mcp.tool(description="Create a gist (denied by policy in tests).")
        def create_gist(content: str) -> str:
            calls.append(("create_gist", {"content": content}))
            return "created"

        @mcp.tool(description="Wait, then answer.")
        async def slow_tool(seconds: float) -> str:
            calls.append(("slow_tool", {"seconds": seconds}))
            await asyncio.sleep(seconds)
            return f"waited {seconds}s"

        self.app = mcp.streamable_http_app()
        self._serve()


class DocsTestServer(_Served):
    """A second kind of server: tools with annotations, resources (one fixed, one template) and a prompt; it notes
    the Authorization header each call came with (per-user tokens), never echoing it."""

    def __init__(self, name: str = "docs") -> None:
        self.calls: list[tuple[str, dict]] = []
        self.auth: list[str | None] = []
        mcp = FastMCP(name, stateless_http=True, log_level="WARNING")
        calls, auth = self.calls, self.auth

        def seen(ctx: Context) -> None:
            request = ctx.request_context.request
            auth.append(request.headers.get("authorization") if request is not None else None)

        @mcp.tool(description="Search issues of a project.",
                  annotations=ToolAnnotations(title="Search issues", readOnlyHint=True, openWorldHint=False))
        def search_issues(project: str, query: str, ctx: Context, limit: int = 10) -> str:
            seen(ctx)
            calls.append(("search_issues", {"project": project, "query": query, "limit": limit}))
            return json.dumps([{"key": f"{project}-1", "title": f"about {query}"}])

        @mcp.tool(description="Delete an issue.", annotations=ToolAnnotations(destructiveHint=True))
        def delete_issue(project: str, key: str, ctx: Context) -> str:
            seen(ctx)
            calls.append(("delete_issue", {"project": project, "key": key}))
            return f"deleted {key}"

        @mcp.resource("docs://guide", name="guide", description="The team guide.", mime_type="text/markdown")
        def guide() -> str:
            calls.append(("resource", {"uri": "docs://guide"}))
            return "# Guide\nBe kind."

        @mcp.resource("docs://pages/{page}", name="page", description="A page by name.")
        def page(page: str) -> str:
            calls.append(("resource", {"uri": f"docs://pages/{page}"}))
            return f"page {page}"

        @mcp.prompt(name="summarize", description="Summarize a text.")
        def summarize(text: str) -> str:
            calls.append(("prompt", {"text": text}))
            return f"Summarize this: {text}"

        self.app = mcp.streamable_http_app()
        self._serve()


class HangingServer:
    """Accepts connections, reads what comes and never answers: a server that stays silent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def start(self) -> "HangingServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in its thread (close alone does not)
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(5)
