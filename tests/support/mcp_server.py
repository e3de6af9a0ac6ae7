"""A real MCP server (the official SDK's FastMCP, Streamable HTTP) on a loopback port, in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from mcp.server.fastmcp import FastMCP


class McpTestServer:
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
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> "McpTestServer":
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
