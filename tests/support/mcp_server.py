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
    """An ASGI app (a FastMCP server's) served by uvicorn on 127.0.0.1 (`port`, or a free one) in a daemon thread,
    at `path`."""

    path = "/mcp"

    def _serve(self, app, port: int = 0, **config) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
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

        self._serve(mcp.streamable_http_app())


LONG_TOOL = "pages.read_page_by_title_and_revision_from_the_archive"  # a dot, and long with its server's name


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

        @mcp.tool(name=LONG_TOOL, description="Read an archived page (a name model APIs would refuse as it is).")
        def read_archived(title: str, ctx: Context) -> str:
            seen(ctx)
            calls.append((LONG_TOOL, {"title": title}))
            return f"the archived page {title}"

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

        self._serve(mcp.streamable_http_app())


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


class OAuthTestServer(_Served):
    """A server that requires OAuth 2.1 (the SDK's own authorization server: metadata, dynamic client registration,
    PKCE), with an in-memory provider that approves every /authorize at once for `subject` (the account the
    "browser" is signed in as), access tokens that live `lifetime` seconds and rotating refresh tokens. Its tool
    `whoami` answers with the subject of the token it was called with."""

    def __init__(self, name: str = "secure", lifetime: int = 3) -> None:
        from mcp.server.auth.middleware.auth_context import get_access_token
        from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions

        from tests.support.gateway import free_port

        self.fixed_port = free_port()
        self.provider = _AutoApprove(lifetime)
        base = f"http://127.0.0.1:{self.fixed_port}"
        mcp = FastMCP(name, stateless_http=True, log_level="WARNING", auth_server_provider=self.provider,
                      auth=AuthSettings(issuer_url=base, resource_server_url=base + "/mcp",
                                        client_registration_options=ClientRegistrationOptions(enabled=True),
                                        validate_token_resource=True))
        self.calls: list[tuple[str, str | None]] = []
        calls = self.calls

        @mcp.tool(description="Who called: the subject of the access token.")
        def whoami() -> str:
            token = get_access_token()
            calls.append(("whoami", token.subject if token else None))
            return f"subject={token.subject if token else None}"

        self._serve(mcp.streamable_http_app(), self.fixed_port)

    @property
    def subject(self) -> str:
        return self.provider.subject

    @subject.setter
    def subject(self, value: str) -> None:
        self.provider.subject = value


class _AutoApprove:
    """OAuthAuthorizationServerProvider, in memory."""

    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime
        self.subject = "nobody"
        self.clients: dict = {}
        self.codes: dict = {}
        self.access: dict = {}
        self.refresh: dict = {}
        self.issued: list[tuple[str, str]] = []  # (grant, subject) of every token issued
        self.registrations = 0
        self.secrets: list[str] = []  # every code, access and refresh token issued (none may leak)

    async def get_client(self, client_id):
        return self.clients.get(client_id)

    async def register_client(self, client_info) -> None:
        self.registrations += 1
        self.clients[client_info.client_id] = client_info
        if client_info.client_secret:
            self.secrets.append(client_info.client_secret)

    async def authorize(self, client, params) -> str:
        import secrets

        from mcp.server.auth.provider import AuthorizationCode, construct_redirect_uri

        code = "code-" + secrets.token_hex(16)
        self.secrets.append(code)
        self.codes[code] = AuthorizationCode(
            code=code, scopes=params.scopes or [], expires_at=time.time() + 300, client_id=client.client_id,
            code_challenge=params.code_challenge, redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly, resource=params.resource,
            subject=self.subject)
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state)

    async def load_authorization_code(self, client, authorization_code):
        return self.codes.get(authorization_code)

    def _issue(self, client_id: str, scopes: list, resource, subject, grant: str):
        import secrets

        from mcp.server.auth.provider import AccessToken, RefreshToken
        from mcp.shared.auth import OAuthToken

        access = "at-" + secrets.token_hex(20)
        refresh = "rt-" + secrets.token_hex(20)
        self.secrets += [access, refresh]
        self.access[access] = AccessToken(token=access, client_id=client_id, scopes=scopes,
                                          expires_at=int(time.time() + self.lifetime), resource=resource,
                                          subject=subject)
        self.refresh[refresh] = RefreshToken(token=refresh, client_id=client_id, scopes=scopes, resource=resource,
                                             subject=subject)
        self.issued.append((grant, subject))
        return OAuthToken(access_token=access, token_type="Bearer", expires_in=self.lifetime, refresh_token=refresh,
                          scope=" ".join(scopes) or None)

    async def exchange_authorization_code(self, client, authorization_code):
        self.codes.pop(authorization_code.code, None)
        return self._issue(client.client_id, authorization_code.scopes, authorization_code.resource,
                           authorization_code.subject, "authorization_code")

    async def load_refresh_token(self, client, refresh_token):
        return self.refresh.get(refresh_token)

    async def exchange_refresh_token(self, client, refresh_token, scopes):
        self.refresh.pop(refresh_token.token, None)  # rotated: each refresh token works once
        return self._issue(client.client_id, scopes or refresh_token.scopes, refresh_token.resource,
                           refresh_token.subject, "refresh_token")

    async def load_access_token(self, token):
        found = self.access.get(token)
        if found is not None and found.expires_at is not None and found.expires_at < time.time():
            return None
        return found

    async def revoke_token(self, token) -> None:
        self.access.pop(token.token, None)
        self.refresh.pop(token.token, None)

    def revoke_refresh_tokens(self, subject: str) -> int:
        """Revoke every refresh token of `subject` (an admin at the authorization server, or a password change)."""
        gone = [k for k, v in self.refresh.items() if v.subject == subject]
        for k in gone:
            del self.refresh[k]
        return len(gone)

    def expire_access_tokens(self, subject: str) -> None:
        for v in self.access.values():
            if v.subject == subject:
                v.expires_at = int(time.time()) - 10
