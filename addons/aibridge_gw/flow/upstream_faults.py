"""How an exchange ends for the client when the provider fails it: refused, reset, died mid-stream, timed out.

mitmproxy answers such failures itself, inside its HTTP layer and after the `error` hook: with an HTML page
before the response started, and by closing the client's connection after. Neither is something an SDK can
read. `patches.install` wraps that one step (`HttpStream.handle_protocol_error`) so that, for flows the gateway
intercepts, the client instead gets the provider's own JSON error (before the response started) or the API's
error event followed by a clean end of the stream (after) — and keeps its connection. Everything else about
the failure (hooks, connection teardown, flow state) stays mitmproxy's.

`UpstreamWatch` enforces timeouts mitmproxy lacks (it only closes idle *client* connections): connect,
time to response headers and body, and silence within a stream. It aborts the upstream connection, which
enters the same path with the timeout as the error message. It also bounds a stream read on after its client
went away (`timeouts.drain_after_disconnect_seconds`, and `limits.max_request_body_mb` more bytes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mitmproxy import ctx, http

from ..config import Timeouts

log = logging.getLogger(__name__)


@dataclass
class ClientEnding:
    """What the client gets instead of mitmproxy's answer to an upstream failure."""

    message: str  # becomes flow.error.msg, so the audit record carries it
    response: http.Response | None = None  # the response has not started: send this whole
    stream_tail: bytes = b""  # the response is streaming: send these bytes, then end the stream


class UpstreamWatch:
    """Aborts upstream connections that exceed the timeouts; checked a few times per second from one task."""

    def __init__(self, timeouts: Timeouts, drain_bytes: int = 32 * 1024 * 1024) -> None:
        self.timeouts = timeouts
        self.drain_bytes = drain_bytes  # stream bytes read on at most after the client left

    def interval(self) -> float:
        t = self.timeouts
        return max(0.05, min(0.5, t.connect / 4, t.response / 4, t.stream_idle / 4,
                             (t.drain_after_disconnect or 2.0) / 4))

    def check(self, states: list) -> None:
        """states: the `FlowState`s of exchanges in flight (flow, forwarded_at, tap; the reason for an abort is
        left in `abort_reason`). Cheap for flows within bounds."""
        now = time.time()
        t = self.timeouts
        server = ctx.master.addons.get("proxyserver")
        connections = getattr(server, "connections", {})
        for state in states:
            flow, forwarded_at, tap = state.flow, state.forwarded_at, state.tap
            if state.abort_reason is not None or not forwarded_at:
                continue
            if state.client_gone is not None:  # read on after the client left: within its bounds only
                if now > state.drain_until or (tap is not None and tap.bytes_seen - state.drain_bytes > self.drain_bytes):
                    self.end_drain(state, connections)
                    continue
                if state.via_loop:  # the loop keeps its own time
                    continue
            age = now - forwarded_at
            resp = flow.response
            if resp is None:
                if age <= t.connect and age <= t.response:
                    continue
                transports = _transports(connections, flow)
                pending = _pending_connect(transports, flow, now - t.connect) if age > t.connect else None
                if pending is not None:
                    self._abort(state, transports, pending, f"could not connect to the provider within {t.connect:g} s")
                elif age > t.response and flow.server_conn.timestamp_tcp_setup:
                    self._abort(state, transports, flow.server_conn, f"the provider did not answer within {t.response:g} s")
            elif tap is not None:
                if not tap.closed and now - max(tap.last_activity, resp.timestamp_start or 0) > t.stream_idle:
                    self._abort(state, _transports(connections, flow), flow.server_conn,
                                f"the provider's stream was silent for more than {t.stream_idle:g} s")
            elif not resp.stream and resp.timestamp_end is None and age > t.response:
                self._abort(state, _transports(connections, flow), flow.server_conn,
                            f"the provider did not finish its response within {t.response:g} s")

    def end_drain(self, state, connections: dict | None = None) -> None:
        """Stop reading a stream whose client left: past its deadline or its byte bound. Its record ends failed with
        the usage seen so far, marked estimated."""
        if state.abort_reason is not None:
            return
        if connections is None:
            connections = getattr(ctx.master.addons.get("proxyserver"), "connections", {})
        t = self.timeouts
        tap = state.tap
        if tap is not None and tap.bytes_seen - state.drain_bytes > self.drain_bytes:
            why = f"read on past {self.drain_bytes} bytes"
        else:
            why = f"not finished within {t.drain_after_disconnect:g} s"
        self._abort(state, _transports(connections, state.flow), state.flow.server_conn,
                    f"the client went away mid-stream and the provider's answer was {why}; usage estimated")

    def _abort(self, state, transports: dict, conn, reason: str) -> None:
        io = transports.get(conn)
        if io is None or io.handler is None:
            return
        state.abort_reason = reason
        log.warning("aibridge: aborting upstream of %s: %s", state.flow.id, reason)
        io.handler.cancel(reason)


def _transports(connections: dict, flow: http.HTTPFlow) -> dict:
    """mitmproxy's open connections for this flow's client connection (the handler owns their tasks)."""
    handler = connections.get(flow.client_conn.id)
    return handler.transports if handler is not None else {}


def _pending_connect(transports: dict, flow: http.HTTPFlow, started_before: float):
    """The upstream connection this flow is waiting for, if it has been connecting since before the bound."""
    addr = (flow.request.host, flow.request.port)
    for conn in transports:
        if (getattr(conn, "address", None) == addr and conn is not flow.client_conn and conn.timestamp_start
                and not conn.timestamp_tcp_setup and conn.timestamp_start < started_before):
            return conn
    return None
