"""Every patch the gateway makes to mitmproxy's internals, in one place. Each wraps one function of mitmproxy
12.2 and marks it; `tests/test_patches.py` checks that the targets still exist with the shape assumed here and
that each patch took, so a mitmproxy upgrade that moves them fails loudly instead of silently losing behaviour.

- HTTP/1 request reading (`http1.read_request_head`): the request line's form is noted, because mitmproxy fills an
  origin-form request's host from its `Host:` header, and the `Host:` header must never decide where a request
  addressed to the gateway goes.
- Error pages (`_http1.make_error_response`): mitmproxy answers connection failures itself, before any addon can;
  the answer is JSON both SDK families read as an API error instead of an HTML page.
- Upstream failures (`HttpStream.handle_protocol_error`): for intercepted flows the client gets the provider's own
  JSON error (before the response started) or the API's error event and a clean end of the stream (after) —
  see upstream_faults.py. The same step sees a client that goes away mid-stream (HTTP/1: "Client disconnected.";
  HTTP/2: its stream reset or its connection closed): for a recorded stream the gateway reads to its end (`keep`
  says so), the error is neither sent upstream nor made the flow's, and the stream stays alive; what it sends to
  the gone client mitmproxy drops (the connection is no longer among its transports; an HTTP/2 stream that is
  closed takes no data).
- WebSocket closes (`WebsocketLayer.relay_messages`): a client that closes a relayed Responses WebSocket mid-turn
  (sockets.py) has its close answered at once, but the provider's side is kept open (`hold` says so) and its
  events still read (the gateway drops them), until the turn's final event has been recorded (the gateway injects
  `RELEASE_MARK`): then the client's close goes to the provider, as mitmproxy would have sent it at once. The
  provider's final usage is recorded, as for an HTTP stream whose client left. The same patch bounds what a message
  may buffer before it is complete (mitmproxy concatenates its frames without limit, and the hook sees it only
  whole): past `limit(flow, from_client)` bytes the socket is closed `1009` (message too big); the message's data
  is appended in place (a bytearray), not copied anew for every chunk. And a gateway's `CLOSE_MARK` (drain.py, at
  shutdown) closes the socket `1001` (going away) on both sides.
- Listening (`ServerInstance.listen` of TCP modes): a deep listen backlog, so a burst of connections does not make
  the kernel drop new ones, and a front door every accepted connection passes before mitmproxy's handler is made
  (idle.py: an address flooding the gateway waits its turn behind the others); in `scripts/run --workers N`'s
  workers (workers.worker installs it before mitmdump starts) also SO_REUSEPORT: each binds the one port, so the
  kernel spreads connections over the workers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from mitmproxy import http
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import (
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)

from ..flow.upstream_faults import ClientEnding

log = logging.getLogger(__name__)
ORIGIN, ABSOLUTE = "origin", "absolute"


def install(decide: "Decide", keep: "Keep | None" = None, hold: "Hold | None" = None,
            limit: "Limit | None" = None) -> None:
    """All of them (idempotent)."""
    install_request_form_marker()
    install_json_error_pages()
    install_client_endings(decide, keep)
    install_websocket_holds(hold, limit)
    install_listener()


Hold = Callable[[http.HTTPFlow], bool]
_hold: list[Hold] = []
RELEASE_MARK = b"\x00aibridge:release"  # injected into a held WebSocket: its provider side may close now
CLOSE_MARK = b"\x00aibridge:close"  # injected into a WebSocket: close it (1001, going away) on both sides
# The most a message of this WebSocket may buffer (bytes) from the client (True) or the server (False); None: no cap.
Limit = Callable[[http.HTTPFlow, bool], "int | None"]
_limit: list[Limit] = []


def close_websocket(flow: http.HTTPFlow) -> None:
    """Close a WebSocket on both sides with 1001 (going away): the gateway shuts down."""
    from mitmproxy import ctx

    ctx.master.commands.call("inject.websocket", flow, False, CLOSE_MARK, False)


def release_websocket(flow: http.HTTPFlow) -> None:
    """A held WebSocket's turn is recorded: close its provider side now (install_websocket_holds)."""
    from mitmproxy import ctx

    ctx.master.commands.call("inject.websocket", flow, False, RELEASE_MARK, False)


def install_websocket_holds(hold: Hold | None, limit: Limit | None = None) -> None:
    """Keep a relayed WebSocket's provider side open after its client closed, while `hold(flow)` says a turn is
    still to be read; close a socket whose message being received outgrows `limit` (idempotent; the last gateway
    wins)."""
    import time

    import wsproto
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers import websocket as ws_layer
    from wsproto.connection import ConnectionState

    _hold[:] = [hold] if hold is not None else []
    _limit[:] = [limit] if limit is not None else []
    original = ws_layer.WebsocketLayer.relay_messages
    if getattr(original, "aibridge", False):
        return

    def close(self, code: int, reason: str, linger: bool = False):
        """Both sides closed with `code`, and the socket ended (as mitmproxy ends it on a close). `linger`: the
        client may still be sending (a message too big): its connection is closed once it answered the close (what
        it sends meanwhile is read and dropped), so its kernel does not discard the close frame with a reset."""
        ws = self.flow.websocket
        ws.timestamp_end = time.time()
        ws.closed_by_client = False
        ws.close_code, ws.close_reason = code, reason
        for side in (self.server_ws, self.client_ws):
            if side.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                yield side.send2(wsproto.events.CloseConnection(code=code, reason=reason))
            if not (linger and side is self.client_ws):
                yield commands.CloseConnection(side.conn)
        yield ws_layer.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = (lambda event: lingering(self, event)) if linger else self.done

    def lingering(self, event):
        client = self.context.client
        if getattr(event, "connection", None) is not client:
            return
        if isinstance(event, events.DataReceived):
            try:
                self.client_ws.receive_data(event.data)
                closed = any(isinstance(e, wsproto.events.CloseConnection) for e in self.client_ws.events())
            except Exception:
                closed = True
            if not closed:
                return
        elif not isinstance(event, events.ConnectionClosed):
            return
        yield commands.CloseConnection(client)
        self._handle_event = self.done

    def relay_messages(self, event):
        if isinstance(event, ws_layer.WebSocketMessageInjected) and event.message.content == CLOSE_MARK:
            if self.flow.websocket is not None and self.flow.websocket.timestamp_end is None:
                yield from close(self, 1001, "going away")
            return
        src = cap = None
        if _limit and isinstance(event, events.DataReceived):
            from_client = event.connection == self.context.client
            try:
                cap = _limit[0](self.flow, from_client)
            except Exception:
                log.exception("aibridge: the WebSocket message limit failed")
            if cap is not None:
                src = self.client_ws if from_client else self.server_ws
        too_big = False
        gen = _relay(self, event)
        result = None
        while True:
            try:
                cmd = gen.send(result)
            except StopIteration:
                break
            result = None
            if cap is not None and isinstance(cmd, ws_layer.WebsocketMessageHook) and self.flow.websocket.messages \
                    and len(self.flow.websocket.messages[-1].content) > cap:
                # A message that arrived whole within one read (compressed): never handed on.
                self.flow.websocket.messages[-1].drop()
                too_big = True
                continue
            result = yield cmd
        if too_big and self._handle_event == self.relay_messages:
            yield from close(self, 1009, "message too big", linger=True)
            return
        if src is not None and self._handle_event == self.relay_messages:
            # What the message being received has buffered (decompressed, as mitmproxy holds it), counted over the
            # fragments this event added only; a completed message (a new list) starts the count anew.
            buf = src.frame_buf
            seen = getattr(src, "aibridge_seen", None)
            if seen is None or seen[0] is not buf:
                seen = [buf, 0, 0]
            frozen = seen[1] + sum(map(len, buf[seen[2]:-1]))
            seen[1], seen[2] = frozen, len(buf) - 1
            src.aibridge_seen = seen
            if type(buf[-1]) is bytes:  # appended in place from now on, not copied anew for every chunk
                buf[-1] = bytearray(buf[-1])
            if frozen + len(buf[-1]) > cap:
                log.warning("aibridge: a WebSocket message from the %s passed %d bytes: closing the socket (1009)",
                            "client" if src is self.client_ws else "server", cap)
                yield from close(self, 1009, "message too big", linger=True)

    def _relay(self, event):
        server = self.context.server
        deferred = getattr(self, "aibridge_deferred", None)
        if deferred is not None and getattr(event, "connection", None) is self.context.client:
            return  # the client's side has closed (its connection's end, stray bytes): the provider's is being read
        if deferred is not None and isinstance(event, ws_layer.WebSocketMessageInjected) \
                and event.message.content == RELEASE_MARK:
            # The turn is recorded (the gateway injected this, so the close runs in a task of its own, not in the
            # provider connection's handler): the client's close goes to the provider, and the socket ends.
            self.aibridge_deferred = None
            for cmd in deferred:
                yield cmd
            self._handle_event = self.done
            return
        held: list | None = None
        gen = original(self, event)
        result = None
        while True:
            try:
                cmd = gen.send(result)
            except StopIteration:
                break
            result = None
            ws = self.flow.websocket
            if deferred is None and held is None and _hold and ws is not None and ws.closed_by_client \
                    and ws.timestamp_end is not None and getattr(cmd, "connection", None) is server:
                try:
                    held = [] if _hold[0](self.flow) else None
                except Exception:
                    log.exception("aibridge: deciding whether to read a WebSocket turn whose client left failed")
            if held is not None and (getattr(cmd, "connection", None) is server
                                     or isinstance(cmd, ws_layer.WebsocketEndHook)):
                held.append(cmd)  # the close for the provider, and the end of the socket: when the turn is read
                continue
            if deferred is not None and isinstance(cmd, ws_layer.WebsocketEndHook):
                self.aibridge_deferred = deferred = None  # the provider closed first: ended as mitmproxy ends it
            result = yield cmd
        if held is not None:
            self.aibridge_deferred = held
            self._handle_event = self.relay_messages  # the provider's events are still read

    relay_messages.aibridge = True
    relay_messages.aibridge_original = original
    ws_layer.WebsocketLayer.relay_messages = relay_messages


def install_request_form_marker() -> None:
    from mitmproxy.net.http import http1

    original = http1.read_request_head
    if getattr(original, "aibridge", False):
        return

    def read_request_head(lines):
        request = original(lines)
        if request.method != "CONNECT":
            request.aibridge_form = ABSOLUTE if request.authority else ORIGIN
        return request

    read_request_head.aibridge = True
    read_request_head.aibridge_original = original
    http1.read_request_head = read_request_head


def request_form(request: http.Request) -> str | None:
    """ORIGIN or ABSOLUTE for HTTP/1 requests read since the patch; None for HTTP/2 and HTTP/3."""
    return getattr(request, "aibridge_form", None)


def install_json_error_pages() -> None:
    """mitmproxy answers connection failures (upstream refused, reset before headers…) itself, before any addon
    can: make that answer JSON that both SDK families read as an API error, instead of an HTML page."""
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1

    original = _http1.make_error_response
    if getattr(original, "aibridge", False):
        return

    def make_error_response(status_code: int, message: str = "") -> bytes:
        kind = "overloaded_error" if status_code == 529 else ("api_error" if status_code >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": f"aibridge: {message}", "param": None, "code": None}}
        resp = http.Response.make(status_code, json.dumps(body).encode(),
                                  {"content-type": "application/json", "connection": "close"})
        return http1.assemble_response(resp)

    make_error_response.aibridge = True
    make_error_response.aibridge_original = original
    _http1.make_error_response = make_error_response


Decide = Callable[[http.HTTPFlow, str], "ClientEnding | None"]
Keep = Callable[[http.HTTPFlow, str], bool]
_decide: list[Decide] = []
_keep: list[Keep] = []


def install_client_endings(decide: Decide, keep: Keep | None = None) -> None:
    """Route upstream failures of intercepted flows through `decide`, and clients gone mid-stream through `keep`
    (idempotent; the last gateway wins)."""
    _decide[:] = [decide]
    _keep[:] = [keep] if keep is not None else []
    original = http_layer.HttpStream.handle_protocol_error
    if getattr(original, "aibridge", False):
        return

    def handle_protocol_error(self, event):
        if (isinstance(event, RequestProtocolError) and _keep and self.client_state == self.state_done
                and self.server_state == self.state_stream_response_body and self.flow.live):
            # The client went away while the response streams: keep reading it when the gateway says so.
            try:
                kept = _keep[0](self.flow, event.message)
            except Exception:  # never make a failure worse
                log.exception("aibridge: deciding whether to read a stream whose client left failed")
                kept = False
            if kept:
                return
        ending = None
        if isinstance(event, ResponseProtocolError) and _decide and self.flow.live:
            try:
                ending = _decide[0](self.flow, event.message)
            except Exception:  # never make a failure worse
                log.exception("aibridge: deciding how to end a failed upstream exchange failed")
            if ending is not None:
                event = ResponseProtocolError(event.stream_id, ending.message, event.code)
        gen = original(self, event)
        try:
            cmd = next(gen)
            while True:
                if (ending is not None and isinstance(cmd, SendHttp) and cmd.connection is self.context.client
                        and isinstance(cmd.event, ResponseProtocolError)):
                    for ev in _events(self.stream_id, ending):
                        yield SendHttp(ev, self.context.client)
                    cmd = gen.send(None)
                    continue
                cmd = gen.send((yield cmd))
        except StopIteration:
            return

    handle_protocol_error.aibridge = True
    handle_protocol_error.aibridge_original = original
    http_layer.HttpStream.handle_protocol_error = handle_protocol_error


def _events(stream_id: int, ending: ClientEnding) -> list:
    if ending.response is not None:
        body = ending.response.content or b""
        return [ResponseHeaders(stream_id, ending.response, False), ResponseData(stream_id, body),
                ResponseEndOfMessage(stream_id)]
    return [ResponseData(stream_id, ending.stream_tail), ResponseEndOfMessage(stream_id)]


LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
_listener = {"reuse_port": False}
# Every accepted client connection passes here before mitmproxy's handler is made: (instance, reader, writer) ->
# awaitable that hands the connection to `instance.handle_stream` (now, later or never). Set by the
# IdleConnections addon; without it connections go straight to mitmproxy.
FrontDoor = Callable[..., "Awaitable[None]"]
_front_door: list = []


def set_front_door(door: "FrontDoor | None") -> None:
    _front_door[:] = [door] if door is not None else []


def _serve(instance):
    """The connection callback of a listening socket: the front door, else mitmproxy's own."""
    async def accepted(reader, writer):
        if _front_door:
            await _front_door[0](instance, reader, writer)
        else:
            await instance.handle_stream(reader, writer)

    accepted.aibridge = True
    return accepted


def install_listener(reuse_port: bool = False) -> None:
    """mitmproxy listens with asyncio's default backlog of 100: a burst of connections (thousands of idle ones
    opened at once) overflows it, and the kernel then drops new connections' SYNs, so a legitimate client waits for
    its retransmits (1, 3, 7 s). Listen with a deep backlog instead, through the front door (`set_front_door`); with
    `reuse_port` (a worker of `scripts/run --workers N`), also with SO_REUSEPORT, so every worker listens on the
    same port and the kernel spreads new connections over them. Idempotent; reuse_port, once asked for, stays."""
    import asyncio

    from mitmproxy.proxy.mode_servers import AsyncioServerInstance

    if reuse_port:
        _listener["reuse_port"] = True
    original = AsyncioServerInstance.listen
    if getattr(original, "aibridge", False):
        return

    async def listen(self, host: str, port: int):
        if self.mode.transport_protocol != "tcp" or port == 0:  # port 0: mitmproxy picks one, then comes back here
            return await original(self, host, port)
        server = await asyncio.start_server(_serve(self), host or None, port, backlog=LISTEN_BACKLOG,
                                            reuse_port=_listener["reuse_port"] or None)
        server.aibridge = True
        return [server]

    listen.aibridge = True
    listen.aibridge_original = original
    AsyncioServerInstance.listen = listen


async def serve_through_front_door(proxyserver) -> int:
    """Sockets mitmproxy already listens on (mitmdump loads its scripts in a task that races its first listen, so the
    listen patch may come too late for it) get what `install_listener` gives new ones: the deep backlog and the
    front door. The listening socket itself stays (no connection is refused or lost): a new asyncio server serves a
    second descriptor of it, then the old server lets go of its own. Returns how many were switched."""
    import asyncio
    import socket

    switched = 0
    for instance in list(getattr(proxyserver, "servers", ())):
        servers = getattr(instance, "_servers", None)
        if not servers:
            continue
        kept = []
        for server in list(servers):
            sockets = [ts for ts in getattr(server, "sockets", ()) or () if ts.type == socket.SOCK_STREAM]
            if not isinstance(server, asyncio.Server) or getattr(server, "aibridge", False) or not sockets:
                kept.append(server)
                continue
            for ts in sockets:  # one for each address family when listening on every interface
                fresh = await asyncio.start_server(_serve(instance), sock=ts.dup(), backlog=LISTEN_BACKLOG)
                fresh.aibridge = True
                kept.append(fresh)
                switched += 1
            server.close()  # its descriptors only: each socket lives on in its fresh server's
        servers[:] = kept
    return switched


def install_shared_listener() -> None:
    """For a worker of `scripts/run --workers N` only (workers.worker installs it before mitmdump starts): bind the
    listening port with SO_REUSEPORT. Never in a plain gateway: two of them must not silently share a port."""
    install_listener(reuse_port=True)
