"""The MCP gateway's front door, for `ControlPlane`: `/aibridge/mcp` and its protected-resource metadata.

It authenticates the gateway token (Authorization: Bearer, X-AIBridge-Token, or proxy credentials), then points the
flow at the loopback server with an `McpJob` that holds who called (mcp/gateway.py serves it there); mitmproxy
relays the answer. A caller without a valid token gets 401 with a `WWW-Authenticate` naming the metadata document
(RFC 9728), which clients read to tell their user what the server wants. Nothing here waits on an MCP server.
"""

from __future__ import annotations

import json
import logging
import re

from mitmproxy import http

from ..flow.state import HANDED_OFF
from ..mcp.gateway import MCP_PATH, TRANSPORT_HEADERS, McpCaller, McpJob, SessionId, jsonrpc_error
from ..mcp.oauth import CALLBACK_PATH as OAUTH_CALLBACK_PATH
from ..mcp.oauth import page as oauth_page
from ..policy.auth import GATEWAY_TOKEN_HEADERS, SECRET_HEADERS, acting_for, credential_from_headers, proxy_token
from ..policy.policing import variable_headers
from .proxy_mode import ProxyMode
from .runtime import Runtime

log = logging.getLogger("aibridge")

METADATA_PATH = "/.well-known/oauth-protected-resource" + MCP_PATH
METADATA_PATHS = (METADATA_PATH, "/.well-known/oauth-protected-resource")  # the root one too: clients try it
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
JSON = {"content-type": "application/json", "cache-control": "no-store"}
OAUTH_PAGE_HEADERS = {"content-type": "text/html; charset=utf-8", "cache-control": "no-store",
                      "referrer-policy": "no-referrer", "x-content-type-options": "nosniff",
                      "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                 "frame-ancestors 'none'"}


def base_url(flow: http.HTTPFlow) -> str:
    """The gateway as this client reached it (scheme and Host), for the URLs it is told; a Host that is not a plain
    host[:port] is replaced by the listener's address."""
    req = flow.request
    host = req.host_header or ""
    if not _HOST.match(host):
        sock = flow.client_conn.sockname or ("127.0.0.1", 0)
        host = f"{sock[0]}:{sock[1]}" if ":" not in sock[0] else f"[{sock[0]}]:{sock[1]}"
    scheme = "https" if req.scheme == "https" else "http"
    return f"{scheme}://{host}"


class McpFront:
    def __init__(self, runtime: Runtime, proxy: ProxyMode) -> None:
        self.rt = runtime
        self.proxy = proxy

    def metadata(self, flow: http.HTTPFlow) -> None:
        """The protected resource's metadata (RFC 9728): what it is and how to present a token. The gateway issues
        its tokens itself (`aibridge tokens create`), so it names no authorization server."""
        base = base_url(flow)
        flow.response = http.Response.make(200, json.dumps({
            "resource": base + MCP_PATH,
            "resource_name": "aibridge MCP gateway",
            "bearer_methods_supported": ["header"],
            "authorization_servers": [],
            "aibridge_token_help": "send your aibridge gateway token as Authorization: Bearer <token> (an admin "
                                   "creates one with: aibridge tokens create --user <you>)",
        }).encode(), JSON)

    async def answer(self, flow: http.HTTPFlow) -> None:
        rt, req = self.rt, flow.request
        if rt.mcp is None or rt.mcp_gateway is None or rt.loopback is None:
            flow.response = http.Response.make(404, jsonrpc_error(-32601, "aibridge: no MCP servers are configured "
                                                                  "on this gateway (mcp_servers)"), JSON)
            return
        hv = {k.lower(): v for k, v in req.headers.items()}
        origin = hv.get("origin")
        if origin and origin.split("://", 1)[-1].rstrip("/") != (req.host_header or ""):
            # A browser page of another site (DNS rebinding): never served, token or not.
            flow.response = http.Response.make(403, jsonrpc_error(-32600, "aibridge: cross-origin requests to the "
                                                                  "MCP gateway are refused"), JSON)
            return
        caller = self._authenticate(flow, hv)
        if caller is None:
            return
        if req.method == "GET":  # the notification stream (list_changed), for clients that listen
            if "text/event-stream" not in hv.get("accept", ""):
                flow.response = http.Response.make(406, jsonrpc_error(-32600, "aibridge: GET opens the notification "
                                                                      "stream: send Accept: text/event-stream"),
                                                   JSON)
                return
        if req.method == "DELETE":  # stateless: there is nothing to end
            flow.response = http.Response.make(200, b"", {"cache-control": "no-store"})
            return
        if req.method not in ("POST", "GET"):
            flow.response = http.Response.make(405, jsonrpc_error(-32600, f"aibridge: {req.method} is not "
                                                                  "supported here"),
                                               {**JSON, "allow": "GET, POST, DELETE"})
            return
        body = (req.raw_content or b"") if req.method == "POST" else b""
        try:
            message = json.loads(body) if body else None
        except (ValueError, RecursionError):
            flow.response = http.Response.make(400, jsonrpc_error(-32700, "aibridge: the body is not JSON"), JSON)
            return
        session_out = None
        if req.method == "GET":
            message = None
        if isinstance(message, dict) and message.get("method") == "initialize":
            info = (message.get("params") or {}).get("clientInfo") if isinstance(message.get("params"), dict) else None
            info = info if isinstance(info, dict) else {}
            name, version = info.get("name"), info.get("version")
            session_out = SessionId.mint(name if isinstance(name, str) else None,
                                         version if isinstance(version, str) else None)
            caller = _with_session(caller, SessionId.read(session_out))
        headers = [(k.encode(), v.encode("latin-1", "replace")) for k, v in hv.items() if k in TRANSPORT_HEADERS]
        job = McpJob(caller, req.method, headers, body, session_out, self._recheck(flow, hv, caller))
        for name in SECRET_HEADERS:  # the gateway token goes no further (nor into a capture of this flow)
            req.headers.pop(name, None)
        flow.metadata[HANDED_OFF] = "mcp"
        path = rt.loopback.register(flow.id, job)
        req.scheme, req.host, req.port = "http", "127.0.0.1", rt.loopback.port
        req.host_header = f"127.0.0.1:{rt.loopback.port}"
        req.path = path

    def _recheck(self, flow: http.HTTPFlow, hv: dict[str, str], caller: McpCaller):
        """The caller as the same credential names them now, for a long notification stream (None: revoked)."""
        rt = self.rt
        digest = self.proxy.proxy_tokens.get(flow.client_conn.id)
        token = proxy_token(hv.get("proxy-authorization")) \
            or next((hv[h].strip() for h in GATEWAY_TOKEN_HEADERS if hv.get(h, "").strip()), None) \
            or credential_from_headers(hv)

        def again() -> McpCaller | None:
            actor = rt.tokens.lookup_hash(digest) if digest is not None else rt.tokens.lookup(token)
            if actor is None or actor.user_id != caller.user_id:
                return None
            return McpCaller(actor.user_id, actor.user_name, actor.role, actor.groups, caller.on_behalf_of,
                             headers=caller.headers)
        return again

    async def oauth_callback(self, flow: http.HTTPFlow) -> None:
        """GET /aibridge/mcp/oauth/callback?code&state: a user's browser back from signing in to an oauth MCP server
        (mcp/oauth.py). No gateway token: the one-time `state` is the credential. The query (code, state) is taken
        off the flow at once, so no log line or later addon sees it."""
        req, rt = flow.request, self.rt
        query = {k: v for k, v in req.query.items()}
        req.path = OAUTH_CALLBACK_PATH  # the code and state go no further than this handler
        if req.method != "GET":
            status, body = 405, oauth_page("Sign-in failed", "The sign-in callback takes GET requests only.")
        elif rt.mcp is None:
            status, body = 404, oauth_page("Sign-in failed", "No MCP servers are configured on this gateway.")
        else:
            try:
                status, body = await rt.mcp_oauth.callback(query, {s.name: s for s in rt.mcp.servers})
            except Exception as e:  # the store away, a broken key: a clean page, never the exception's text
                log.warning("mcp oauth: a sign-in callback failed (%s)", type(e).__name__)
                status, body = 503, oauth_page("Sign-in failed", "The gateway could not complete the sign-in; "
                                                                 "try again in a moment.")
        flow.response = http.Response.make(status, body.encode(), OAUTH_PAGE_HEADERS)

    def _authenticate(self, flow: http.HTTPFlow, hv: dict[str, str]) -> McpCaller | None:
        """The caller, or None with the flow answered: 401 (with where to read what is wanted), 407 or 429."""
        rt = self.rt
        proxy_actor = self.proxy.actor(flow)
        if flow.response is not None:
            return None
        token = next((hv[h].strip() for h in GATEWAY_TOKEN_HEADERS if hv.get(h, "").strip()), None) \
            or credential_from_headers(hv)
        actor = proxy_actor or rt.tokens.lookup(token)
        if actor is None:
            if rt.auth_failed(flow, None):
                return None
            given = token is not None
            challenge = f'Bearer resource_metadata="{base_url(flow)}{METADATA_PATH}"'
            if given:
                challenge += ', error="invalid_token", error_description="invalid or revoked aibridge token"'
            flow.response = http.Response.make(401, jsonrpc_error(-32001, (
                "aibridge: invalid or revoked gateway token" if given else
                "aibridge: a gateway token is required (Authorization: Bearer <your aibridge token>)")),
                {**JSON, "www-authenticate": challenge})
            return None
        person, _ = acting_for(actor, hv, rt.users)
        caller = McpCaller(actor.user_id, actor.user_name, actor.role, actor.groups, person,
                           headers=variable_headers(hv))
        return _with_session(caller, SessionId.read(hv.get("mcp-session-id")))


def _with_session(caller: McpCaller, session: tuple | None) -> McpCaller:
    if session is None:
        return caller
    client, version, sid = session
    return McpCaller(caller.user_id, caller.user_name, caller.role, caller.groups, caller.on_behalf_of, client,
                     version, sid, caller.headers)
