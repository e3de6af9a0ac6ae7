"""The `ProxyMode` addon: proxy-mode (HTTPS_PROXY) policy. Which tunnels are opened and decrypted (only AI
endpoints: an AI host on one of its provider ports), who a tunnel belongs to (proxy credentials, checked again on
every request), what may travel inside a tunnel to an AI endpoint (HTTP only: never raw bytes), where non-AI
traffic may go (the egress policy), and which requests are the gateway's own rather than proxied. The pipeline
asks it the last two questions."""

from __future__ import annotations

import logging

from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy import commands, events, layer, layers

from ..flow.errors import error_response
from ..flow.routing import BadPath
from ..flow.state import TARGET_KEY, Target, state_of, target_of
from ..logsafe import printable
from ..policy.auth import Actor, hash_token, proxy_token
from .patches import ABSOLUTE, ORIGIN, request_form
from .runtime import Runtime

log = logging.getLogger("aibridge")
PROXY_AUTH_REQUIRED = {"proxy-authenticate": 'Basic realm="aibridge"'}


class Refused(layer.Layer):
    """Stands in for a layer that would relay unparsed bytes to an AI endpoint: closes the client connection at
    once, reads nothing, opens nothing upstream."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class ProxyMode:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        # Client connection id -> the hash of the proxy credentials its CONNECT carried. Only the credential is
        # kept, never whom it named: each request looks it up again, so a revoked token or a deleted user stops
        # an open tunnel at its next request.
        self.proxy_tokens: dict[str, str] = {}
        self.tunnels: set[str] = set()  # client connections that went through CONNECT

    # --- hooks ---------------------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """CONNECT: take the user's identity from proxy credentials; apply the egress policy."""
        if self.rt.router is None:
            return
        self.tunnels.add(flow.client_conn.id)
        req = flow.request
        try:
            # An AI host on another port is no AI endpoint: an ordinary egress target (credentials, address policy).
            actor = await self._admit(flow, req.host, req.port, self.rt.router.is_ai_endpoint(req.host, req.port))
            given = proxy_token(req.headers.get("proxy-authorization"))
            if actor is not None and flow.response is None and given is not None:
                self.proxy_tokens.setdefault(flow.client_conn.id, hash_token(given))
        except Exception:  # never a tunnel the policy did not admit
            log.exception("aibridge: handling a CONNECT failed")
            flow.response = http.Response.make(500, b"aibridge: internal error\n")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Decrypt only a tunnel to an AI endpoint: its target, or the server name asked for on a provider port
        (a tunnel to a bare address). Everything else passes through untouched."""
        if self.rt.router is None:
            return
        address = data.context.server.address
        if address is None:  # TLS straight to the listener, not inside a tunnel
            data.ignore_connection = not self.rt.router.is_ai_host(data.client_hello.sni)
        elif not self._ai_target(address, data.client_hello.sni):
            data.ignore_connection = True  # never decrypt what is not an AI API

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Inside a tunnel to an AI endpoint only HTTP is spoken (TLS first, once): a layer that would relay
        anything else (raw TCP, UDP, DNS, a request mitmproxy could not parse as HTTP) is replaced by one that
        closes the connection."""
        if self.rt.router is None or nextlayer.context.server.address is None:
            return
        try:
            self._only_http(nextlayer)
        except Exception:  # fail closed: mitmproxy's own choice, made after this hook, could be a raw relay
            log.exception("aibridge: judging a tunnel's next layer failed; closing the connection")
            nextlayer.layer = Refused(nextlayer.context)

    def _only_http(self, nextlayer: layer.NextLayer) -> None:
        ctx_ = nextlayer.context
        if not self._ai_target(ctx_.server.address, ctx_.client.sni):
            return
        # Read before any layer is built: mitmproxy's TLS layer for TLS nested in TLS resets the client's TLS state.
        decrypted, depth = ctx_.client.tls_established, len(ctx_.layers)
        if nextlayer.layer is None:
            # Script addons' hooks run before mitmproxy's own NextLayer addon: let it choose now (it leaves a
            # choice made here alone when its own hook runs), then judge what it chose.
            decide = ctx.master.addons.get("nextlayer")
            if decide is not None:
                decide.next_layer(nextlayer)
        chosen = nextlayer.layer
        if chosen is None:
            return  # not enough bytes to tell yet: asked again with more
        if isinstance(chosen, layers.HttpLayer):
            return
        if isinstance(chosen, (layers.ServerTLSLayer, layers.ClientTLSLayer)) and not decrypted:
            return  # the tunnel's own TLS, decrypted (tls_clienthello); what it carries is decided next
        host, port = ctx_.server.address[0], ctx_.server.address[1]
        peer = (ctx_.client.peername or ("?",))[0]
        log.warning("aibridge: closed a connection from %s in a tunnel to AI endpoint %s:%s: not HTTP (%s)",
                    printable(str(peer)), printable(str(host)), port, type(chosen).__name__)
        del ctx_.layers[depth:]  # the layers built for the choice refused never run
        nextlayer.layer = Refused(ctx_)

    def _ai_target(self, address, sni: str | None) -> bool:
        """A tunnel whose traffic belongs to the pipeline: its target is an AI endpoint, or the TLS server name
        asked for is an AI host and the target port is one of that host's provider ports."""
        router, (host, port) = self.rt.router, (address[0], address[1])
        return router.is_ai_endpoint(host, port) or bool(sni and router.is_ai_endpoint(sni, port))

    def request(self, flow: http.HTTPFlow):
        """A proxied request to a non-AI host: relayed untouched if the policy admits it (a tunnel's address was
        checked at CONNECT), but the gateway's credentials never travel on. (Sync, returning a coroutine only for
        such requests: this hook runs for every request, and most are the pipeline's.)"""
        if flow.response is not None or self.rt.router is None or not flow.live:
            return None
        if self.is_ours(flow) or self.ai_host(flow):
            return None  # the pipeline's
        return self._egress(flow)

    async def _egress(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        await self._admit(flow, req.host, req.port, ai=False, check_address=flow.client_conn.id not in self.tunnels)
        req.headers.pop("proxy-authorization", None)

    async def server_connect(self, data) -> None:
        """Last line of the egress policy: every upstream connection the gateway did not choose itself goes to
        an address checked here, pinned so a DNS answer cannot change between the check and the connect."""
        if self.rt.egress is None or data.server.address is None:
            return
        host, port = data.server.address[0], data.server.address[1]
        if self.rt.chosen_upstream(host, port) or self.rt.router.is_ai_endpoint(host, port):
            return
        why, ip = await self.rt.egress.check(host, port)
        if why:
            log.warning("aibridge: refused upstream connection to %s:%s: %s", printable(host), port, printable(why))
            data.server.error = f"aibridge: egress refused: {why}"
        elif ip is not None and ip != host:
            if data.server.sni is None and data.server.tls:
                data.server.sni = host
            data.server.address = (ip, port)

    def response(self, flow: http.HTTPFlow) -> None:
        """A provider that switches protocols (101, other than a WebSocket) would have mitmproxy relay raw bytes
        between the client and the provider from then on, unauthenticated and unrecorded: answered 502 instead,
        and the connection closed. (The pipeline sends no Upgrade header upstream; this is for one that answers
        101 all the same.)"""
        resp = flow.response
        if resp is None or resp.status_code != 101 or flow.websocket is not None or self.rt.router is None:
            return
        if state_of(flow) is None and not (self.is_ours(flow) or self.ai_host(flow)):
            return  # egress to other hosts: the admitted client's own business
        log.warning("aibridge: refused a switch to another protocol (101) from the upstream of %s %s",
                    flow.request.method, printable(flow.request.path.split("?")[0][:200]))
        flow.response = error_response(self.provider_type(flow), 502, "aibridge: the upstream switched protocols; "
                                       "only HTTP is relayed to an AI API", {"connection": "close"})

    def client_disconnected(self, client: connection.Client) -> None:
        self.proxy_tokens.pop(client.id, None)
        self.tunnels.discard(client.id)

    # --- questions the pipeline asks -----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.rt.router is not None:
            self.target(flow)  # classified on the head as the client sent it, before any addon changes the flow

    def target(self, flow: http.HTTPFlow) -> Target:
        """What this request is (the gateway's own, an AI endpoint's, or egress) and its route: decided on first
        asking, then kept on the flow."""
        got = target_of(flow)
        if got is None:
            got = self._classify(flow)
            if self.rt.router is not None:  # no config yet: asked again once there is one
                flow.metadata[TARGET_KEY] = got
        return got

    def is_ours(self, flow: http.HTTPFlow) -> bool:
        return self.target(flow).ours

    def ai_host(self, flow: http.HTTPFlow) -> str | None:
        return self.target(flow).ai_host

    def provider_type(self, flow: http.HTTPFlow) -> str | None:
        """The provider type whose error format answers this request (None: the gateway's own)."""
        return self.target(flow).provider_type

    def _classify(self, flow: http.HTTPFlow) -> Target:
        router, req = self.rt.router, flow.request
        if router is None:
            return Target(False, None, None)
        ours = self._ours(flow)
        host = None if ours else self._ai_host(flow)
        try:
            if ours:
                route = router.match_prefix(req.path, req.method)
            else:
                route = router.match_host(host, req.path, req.method) if host else None
        except BadPath as e:
            prov = router.by_prefix.get(req.path.lstrip("/").split("/")[0]) if ours else router.by_host.get(
                (host or req.host or "").lower().rstrip("."))
            return Target(ours, host, None, str(e), prov.type if prov else None)
        return Target(ours, host, route, None, route.provider.type if route else None)

    def _ours(self, flow: http.HTTPFlow) -> bool:
        """Requests for the gateway itself (base-URL mode and its own endpoints), whatever their Host header says.
        An origin-form request on the listener always is; an absolute-form one (a plain-HTTP proxy request) only
        when it names the listener's port and one of the gateway's paths. Never a request inside a CONNECT tunnel."""
        if flow.client_conn.id in self.tunnels:
            return False
        req = flow.request
        form = request_form(req)
        if form == ORIGIN:
            return True
        sock = flow.client_conn.sockname
        to_listener = req.scheme == "http" and bool(sock) and req.port == sock[1]
        if form == ABSOLUTE:
            return to_listener and self.rt.router.is_prefixed(req.path)
        return self.rt.router.is_prefixed(req.path) or to_listener  # HTTP/2: no request line to tell by

    def _ai_host(self, flow: http.HTTPFlow) -> str | None:
        """The AI host a proxied request is for: its target when that is an AI endpoint, or, inside a tunnel opened
        to a bare IP address, the TLS server name the client asked for on a provider port (the gateway decrypted
        the tunnel because of that name)."""
        router, req = self.rt.router, flow.request
        if router.is_ai_endpoint(req.host, req.port):
            return req.host
        sni = flow.client_conn.sni
        if sni and flow.client_conn.id in self.tunnels and router.is_ai_endpoint(sni, req.port):
            return sni
        return None

    def actor(self, flow: http.HTTPFlow) -> Actor | None:
        """The user named by proxy credentials (at CONNECT, or on this plain-HTTP request), looked up now: a token
        revoked (or a user deleted) since the CONNECT names nobody. None without any. Invalid credentials leave a
        407 (or, past the throttle, a 429) on the flow; in a tunnel, one that closes the connection."""
        digest = self.proxy_tokens.get(flow.client_conn.id)
        if digest is not None:
            actor = self.rt.tokens.lookup_hash(digest)
            if actor is None:
                ptype = self.provider_type(flow)
                if not self.rt.auth_failed(flow, ptype):
                    flow.response = error_response(
                        ptype, 407, "aibridge: the proxy credentials of this connection are no longer valid "
                        "(token revoked or user deleted)", {**PROXY_AUTH_REQUIRED, "connection": "close"})
            return actor
        given = proxy_token(flow.request.headers.get("proxy-authorization"))
        if given is None:
            return None
        actor = self.rt.check_token(flow, given, self.provider_type(flow))
        if actor is None and flow.response is None:
            flow.response = http.Response.make(407, b"aibridge: invalid proxy credentials\n", PROXY_AUTH_REQUIRED)
        return actor

    async def _admit(self, flow: http.HTTPFlow, host: str, port: int, ai: bool,
                     check_address: bool = True) -> Actor | None:
        """The egress policy for a CONNECT or a plain-HTTP proxy request: non-AI hosts need proxy credentials
        (unless the admin chose an open relay) and never resolve to the gateway's own machine. Returns the user
        named by proxy credentials; a refusal is left on the flow."""
        policy = self.rt.config.proxy
        if not ai and policy.egress == "ai-only":
            flow.response = http.Response.make(403, b"aibridge: egress to non-AI hosts is disabled\n")
            return None
        actor = self.actor(flow)
        if flow.response is not None:
            return None
        if actor is None and (policy.require_auth is True or (not ai and policy.require_auth is None)):
            what = "proxy credentials required" if ai else "proxy credentials required to reach non-AI hosts"
            flow.response = http.Response.make(407, f"aibridge: {what}\n".encode(), PROXY_AUTH_REQUIRED)
            return None
        if not ai and check_address:
            why, _ = await self.rt.egress.check(host, port)
            if why:
                log.warning("aibridge: refused proxying to %s:%s: %s", printable(host), port, printable(why))
                flow.response = http.Response.make(403, f"aibridge: egress refused: {why}\n".encode())
        return actor
