"""The `Drain` addon: SIGTERM (and SIGINT) stop the gateway gracefully.

Why: mitmdump's own handler stops the event loop at once — streams in flight are cut without their API's error
event, open connections' tasks are cancelled (tracebacks in the log), and systemd or `scripts/run --workers N`
(whose supervisor forwards SIGTERM to each worker) can only ever stop the gateway mid-answer. Instead:

1. Stop listening: new connections are refused (with workers, once every worker has closed its socket).
   Connections with nothing in flight are closed.
2. Calls in flight (every live HTTP flow, recorded or relayed, and every open turn of a Responses WebSocket) finish, for up to `timeouts.shutdown_grace_seconds`.
   Responses sent meanwhile carry `Connection: close` (HTTP/1), and a connection is closed as soon as it has
   nothing in flight. A new request on a kept-alive connection is answered 503 in its provider's format, with
   `Retry-After` and `Connection: close`, rather than served: nothing new starts after the signal, so the drain
   is bounded by what was in flight then, and SDKs retry a 503 on a new connection (another worker or gateway).
3. When the grace runs out, what is left is ended as an upstream failure is (upstream_faults.py): a stream gets
   its API's error event, a blocking call a 503, and its record ends `failed` ("gateway shut down") with the
   usage seen so far.
4. With no connection left, mitmproxy's shutdown runs (Runtime.done ends any record still open, closes the store).

A second SIGINT (Ctrl-C twice) goes straight to 3.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from mitmproxy import connection, ctx, http

from ..flow.errors import error_response
from ..flow.state import state_of
from . import patches
from .proxy_mode import ProxyMode
from .runtime import Runtime

log = logging.getLogger("aibridge")

SHUT_DOWN = "gateway shut down"
POLL = 0.05  # seconds between looks at the connections while draining
SETTLE = 0.5  # an HTTP connection with nothing in flight is closed once this long without an event (its last
#              response's final bytes are written after the response hook, when the hook's completion is handled)
QUIET = 2.0  # a connection that carried no HTTP request (a tunnel left encrypted, a TLS handshake) counts as idle
#              after this long without a byte: what it carries cannot be seen
ENDING = 3.0  # after the grace: time for the calls ended to send their ending before connections are closed
CLOSED_WAIT = 2.0  # then: time for connection tasks (and the tool loop's) to finish before mitmproxy stops


class Drain:
    def __init__(self, runtime: Runtime, proxy: ProxyMode) -> None:
        self.rt, self.proxy = runtime, proxy
        self.live: dict[str, set[http.HTTPFlow]] = {}  # client connection id -> its HTTP flows in flight
        self.http: set[str] = set()  # client connections that carried HTTP requests (and no WebSocket)
        self.draining = False
        self._task: asyncio.Task | None = None
        self._hurry = False  # a second SIGINT: end what is in flight now
        self._closed: set[str] = set()  # connections this drain closed

    async def running(self) -> None:
        if not ctx.options.server or self._task is not None:
            return
        loop = asyncio.get_running_loop()
        try:  # replaces mitmdump's handlers, which stop the event loop at once
            loop.add_signal_handler(signal.SIGTERM, self.begin, signal.SIGTERM)
            loop.add_signal_handler(signal.SIGINT, self.begin, signal.SIGINT)
        except (NotImplementedError, RuntimeError):  # no signal handlers on this loop: mitmdump's stop stays
            pass

    def begin(self, sig: int = signal.SIGTERM) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(signal.Signals(sig).name))
        elif sig == signal.SIGINT and not self._hurry:
            log.warning("aibridge: SIGINT again: ending the calls in flight now")
            self._hurry = True

    # --- hooks: which connections have something in flight -------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        cid = flow.client_conn.id
        self.http.add(cid)
        self.live.setdefault(cid, set()).add(flow)
        if self.draining and flow.live and flow.response is None:
            try:
                ptype = self.proxy.provider_type(flow)
            except Exception:
                ptype = None
            flow.response = error_response(
                ptype, 503, "aibridge: the gateway is shutting down; send the request again on a new connection",
                {"retry-after": "1"})
            _close_after(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.draining:
            _close_after(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.draining and not flow.response.stream:  # its headers are still to be sent (an addon's answer
            _close_after(flow)                           # skips `responseheaders`); a stream's were sent
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.http.discard(flow.client_conn.id)  # messages, not requests, from now on: idle only when quiet

    def client_disconnected(self, client: connection.Client) -> None:
        flows = self.live.pop(client.id, None)
        # A stream read on after its client left (Pipeline._client_left) is still in flight: the stop waits for it
        # and ends it like any other call when the grace runs out.
        reading = {f for f in flows or () if (s := state_of(f)) is not None and s.client_gone is not None and f.live}
        if reading:
            self.live[client.id] = reading
        self.http.discard(client.id)
        self._closed.discard(client.id)

    def _ended(self, flow: http.HTTPFlow) -> None:
        flows = self.live.get(flow.client_conn.id)
        if flows is not None:
            flows.discard(flow)
            if not flows:
                del self.live[flow.client_conn.id]

    # --- the drain ----------------------------------------------------------------------------------

    async def _drain(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            self.draining = True
            grace = self.rt.config.timeouts.shutdown_grace if self.rt.config is not None else 60.0
            await self._stop_listening()
            if self.rt.mcp_gateway is not None:
                self.rt.mcp_gateway.end_streams()  # MCP notification streams never end by themselves
            calls = sum(len(f) for f in self.live.values())
            log.info("aibridge: %s: stopped listening; %s", name,
                     f"{calls} call(s) in flight may finish within {grace:g} s" if calls else "nothing in flight")
            deadline = started + grace
            while self._close_idle() and loop.time() < deadline and not self._hurry:
                await asyncio.sleep(min(POLL, max(0.0, deadline - loop.time())))
            left = [f for flows in self.live.values() for f in flows]
            if left:
                log.warning("aibridge: %sending %d call(s) still in flight",
                            "" if self._hurry else f"shutdown grace of {grace:g} s ran out; ", len(left))
                if self.rt.tool_loop is not None:
                    self.rt.tool_loop.end_all(SHUT_DOWN)  # calls the injected-tool loop runs: it ends them itself
                for flow in left:
                    self._end(flow)
            until = loop.time() + ENDING
            while self._close_idle() and loop.time() < until:  # the endings are sent, connections settle
                await asyncio.sleep(POLL)
            self._close_idle(everything=True)
            until = loop.time() + CLOSED_WAIT
            loopback = self.rt.loopback
            while (self._connections() or (loopback is not None and loopback.active)) and loop.time() < until:
                await asyncio.sleep(POLL)
            log.info("aibridge: drained in %.1f s; shutting down", loop.time() - started)
        except Exception:
            log.exception("aibridge: draining failed; shutting down")
        finally:
            ctx.master.shutdown()

    async def _stop_listening(self) -> None:
        """Close the listening sockets; connections already accepted stay open (asyncio.Server.close)."""
        for instance in list(ctx.master.addons.get("proxyserver").servers):
            if instance.is_running:
                try:
                    await instance.stop()
                except Exception as e:
                    log.warning("aibridge: could not stop listening (%s): %s", instance.mode.description, e)

    def _connections(self) -> dict:
        return ctx.master.addons.get("proxyserver").connections

    def _close_idle(self, everything: bool = False) -> int:
        """Close the client connections with nothing in flight (all, with `everything`); how many are left busy."""
        now = time.time()
        busy = 0
        for handler in list(self._connections().values()):
            cid = handler.client.id
            if not everything and (self.live.get(cid) or self._socket_turn(cid) or self._recent(handler, cid, now)):
                busy += 1
            elif cid not in self._closed:
                self._close(handler)
        return busy

    @staticmethod
    def _socket_turn(cid: str) -> bool:
        """A Responses WebSocket of this connection has a turn open (its provider may be quiet for long stretches,
        a reasoning model's): it is in flight like an HTTP call, and the socket is closed once the turn ended."""
        pipeline = ctx.master.addons.get("pipeline")
        sockets = getattr(pipeline, "sockets", None)
        try:
            return sockets is not None and sockets.busy(cid)
        except Exception:
            return False

    def _recent(self, handler, cid: str, now: float) -> bool:
        watchdog = handler.timeout_watchdog  # every event on the connection counts as activity
        if watchdog.blocker:  # a hook is running: its flow's answer may not be written yet
            return True
        return now - watchdog.last_activity < (SETTLE if cid in self.http else QUIET)

    def _close(self, handler) -> None:
        """What mitmproxy does to an inactive connection (ConnectionHandler.on_timeout): cancel its reader, which
        ends the connection's layers and closes the socket once what is queued is written."""
        self._closed.add(handler.client.id)
        sockets = getattr(ctx.master.addons.get("pipeline"), "sockets", None)
        flows = [s.flow for s in list(getattr(sockets, "open", ())) if s.flow is not None
                 and s.flow.client_conn.id == handler.client.id and s.flow.live]
        if flows:  # a Responses WebSocket: closed the WebSocket way (1001, going away), its turn already ended
            for flow in flows:
                try:
                    patches.close_websocket(flow)
                except Exception:
                    log.exception("aibridge: closing a WebSocket at shutdown failed")
            return
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None and not io.handler.done() and not io.handler.cancelling():
            io.handler.cancel(SHUT_DOWN)

    def _end(self, flow: http.HTTPFlow) -> None:
        """End one call the grace could not wait for, as a failed upstream is: abort its provider connection, and
        the pipeline's ending (upstream_faults.ClientEnding) gives the client its API's error event or a 503."""
        handler = self._connections().get(flow.client_conn.id)
        if handler is None:
            return
        state = state_of(flow)
        if state is not None and state.via_loop and flow.response is not None:
            return  # the tool loop is sending its ending (ToolLoop.end_all)
        if state is not None and state.abort_reason is None:
            state.abort_reason = SHUT_DOWN
            state.abort_status = 503
        io = handler.transports.get(flow.server_conn)
        if io is not None and io.handler is not None and not io.handler.done():
            if not io.handler.cancelling():
                io.handler.cancel(SHUT_DOWN)
        elif handler.client.id not in self._closed:  # not at the provider yet (or no longer): nothing to abort
            self._close(handler)


def _close_after(flow: http.HTTPFlow) -> None:
    """HTTP/1: the client's connection closes once this response is sent (HTTP/2 forbids the header; those
    connections are closed when idle)."""
    if flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
        flow.response.headers["connection"] = "close"
