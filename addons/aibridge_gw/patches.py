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
- Listening (`ServerInstance.listen` of TCP modes), in `scripts/run --workers N`'s workers only (workers.worker
  installs it before mitmdump starts): each binds the one port with SO_REUSEPORT, so the kernel spreads
  connections over the workers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

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

from .upstream_faults import ClientEnding

log = logging.getLogger(__name__)
ORIGIN, ABSOLUTE = "origin", "absolute"


def install(decide: "Decide", keep: "Keep | None" = None) -> None:
    """All of them (idempotent)."""
    install_request_form_marker()
    install_json_error_pages()
    install_client_endings(decide, keep)


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


def install_shared_listener() -> None:
    """For a worker of `scripts/run --workers N` only: bind the listening port with SO_REUSEPORT, so every worker
    listens on the same port and the kernel spreads new connections over them. mitmproxy's own listen binds
    without it; nothing else changes (one TCP server per mode, as mitmproxy starts it). Never installed in a
    plain gateway: two of them must not silently share a port."""
    import asyncio

    from mitmproxy.proxy.mode_servers import AsyncioServerInstance

    original = AsyncioServerInstance.listen
    if getattr(original, "aibridge", False):
        return

    async def listen(self, host: str, port: int):
        if self.mode.transport_protocol != "tcp" or port == 0:
            return await original(self, host, port)
        return [await asyncio.start_server(self.handle_stream, host or None, port, reuse_port=True)]

    listen.aibridge = True
    listen.aibridge_original = original
    AsyncioServerInstance.listen = listen
