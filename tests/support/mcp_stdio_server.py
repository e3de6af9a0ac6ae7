"""A stdio MCP server (the official SDK's FastMCP) for tests, started by the gateway with `command`. It notes its pid
and each call in the files its environment names (MCP_PID_FILE, MCP_CALLS_FILE), and writes a line to stderr with
the secret its environment holds (MCP_SECRET), which the gateway must never log."""

from __future__ import annotations

import os
import sys

from mcp.server.fastmcp import FastMCP

mcp = FastMCP("local", log_level="WARNING")


def _note(var: str, line: str) -> None:
    path = os.environ.get(var)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@mcp.tool(description="Echo a text back, with this process's id.")
def echo(text: str) -> str:
    _note("MCP_CALLS_FILE", text)
    return f"{text} (pid {os.getpid()})"


@mcp.tool(description="Note the call, then die mid-call (a tool that may have run when its answer is lost).")
def crash(text: str) -> str:
    _note("MCP_CALLS_FILE", text)
    os._exit(3)


@mcp.tool(description="Whether a variable is in this process's environment.")
def has_env(name: str) -> str:
    return "yes" if name in os.environ else "no"


if __name__ == "__main__":
    _note("MCP_PID_FILE", str(os.getpid()))
    print(f"local test server starting with secret {os.environ.get('MCP_SECRET', '')}", file=sys.stderr, flush=True)
    mcp.run("stdio")
