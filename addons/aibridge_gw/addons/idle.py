"""The `IdleConnections` addon: connections that carry nothing cannot pile up.

A client connection is *idle* while it has nothing in flight: from the moment it connects until its first request
head is complete, and between the end of one response and the next request head (keep-alive, HTTP/2 with no
stream open). Two rules, both about idle connections only:

- **Request head timeout** (`timeouts.request_head_seconds`, default 10): a connection idle that long is closed.
  It catches connections that never send anything, a TLS handshake that never ends, a request head sent a byte at a
  time (slowloris), and kept-alive connections nobody reuses (SDK pools reconnect; common servers close idle
  keep-alive after 5–75 s).
- **Per-address cap** (`limits.max_idle_connections_per_address`, default 256): when one client address holds
  more idle connections than that, its oldest idle ones are closed. A connection with a request in flight (a
  long blocking call, a stream) is never idle; neither is a tunnel (a CONNECT relayed without decryption, a
  WebSocket), which mitmproxy's own `tcp_timeout` governs.

**Front door.** Accepting a connection costs mitmproxy about half a millisecond (its handler, two hook dispatches
over every addon): a burst of thousands from one address would keep everyone else waiting behind it. So every
accepted connection first passes `admit` (patches.install_listener): an address under its cap goes straight in;
an address already holding its cap of idle connections waits its turn in a queue of its own, and one waiting
connection is let in per event-loop round, while connections from every other address go in at once. Waiting
connections count against the cap (the oldest waiting one is closed first) and the head timeout applies to them.

Closing is what mitmproxy does to a connection its inactivity watchdog gives up on (`ConnectionHandler.on_timeout`:
the connection's reader task is cancelled); nothing in mitmproxy is patched. Bookkeeping is O(1) per event and the
once-a-second sweep looks only at connections whose time is up (idle connections are kept in the order they
became idle), so thousands of idle connections cost nothing while they wait.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import layers

from . import patches
from .runtime import Runtime

log = logging.getLogger("aibridge")

SWEEP_SECONDS = 1.0  # how often idle connections are checked against the request head timeout (at most)
# A connection counts against its address's idle cap only once it has been idle this long (at most a quarter of
# the head timeout): a burst of legitimate connections, or keep-alive ones between two requests, is never taken for
# idle ones and closed (behind a load balancer every client shares one address).
IDLE_GRACE = 1.0
SUMMARY_SECONDS = 10.0  # closures are logged as one line per this long, not one per connection
HEAD_TIMEOUT = "no request head within timeouts.request_head_seconds"
OVER_CAP = "too many idle connections from this address (limits.max_idle_connections_per_address)"


class _Conn:
    __slots__ = ("address", "busy", "tunnel", "idle_since")

    def __init__(self, address: str) -> None:
        self.address = address
        self.busy = 0  # requests in flight (HTTP/2: streams)
        self.tunnel = False  # relayed without requests (TCP passthrough, WebSocket): never idle
        self.idle_since = time.monotonic()


class IdleConnections:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.conns: dict[str, _Conn] = {}  # every open client connection by id
        self.idle: OrderedDict[str, None] = OrderedDict()  # idle connections, longest idle first
        self.by_address: dict[str, OrderedDict[str, None]] = {}  # the same, per client address
        self.closed = {HEAD_TIMEOUT: 0, OVER_CAP: 0}  # since the gateway started
        self._unlogged = {HEAD_TIMEOUT: 0, OVER_CAP: 0}
        self._logged_at = 0.0
        self._task: asyncio.Task | None = None
        # Front door: per address, connections waiting for their turn: (accepted at, writer, future)
        self.waiting: dict[str, deque] = {}
        self._turns: asyncio.Task | None = None

    # --- settings (read on every use: a config reload applies at once) ------------------------------------

    @property
    def head_timeout(self) -> float:
        return self.rt.config.timeouts.request_head if self.rt.config is not None else 10.0

    @property
    def grace(self) -> float:
        return min(IDLE_GRACE, self.head_timeout / 4)

    @property
    def cap(self) -> int:
        return self.rt.config.limits.max_idle_connections_per_address if self.rt.config is not None else 256

    # --- hooks ------------------------------------------------------------------------------------------

    def load(self, loader) -> None:
        patches.set_front_door(self.admit)

    async def running(self) -> None:
        if ctx.options.server and self._task is None:
            self._task = asyncio.create_task(self._sweep())
            try:  # a burst of connections must queue, not be dropped, and pass the front door
                await patches.serve_through_front_door(ctx.master.addons.get("proxyserver"))
            except Exception as e:
                log.warning("aibridge: could not serve the listening socket through the front door: %s", e)

    def done(self) -> None:
        patches.set_front_door(None)
        for task in (self._task, self._turns):
            if task is not None:
                task.cancel()
        self._task = self._turns = None
        for queue in self.waiting.values():
            for _, writer, fut in queue:
                self._refuse(writer, fut)
        self.waiting.clear()

    # --- the front door -------------------------------------------------------------------------------

    async def admit(self, instance, reader, writer) -> None:
        """Hand an accepted connection to mitmproxy: at once, unless its address already holds its cap of idle
        connections; then after the connections of every other address, one per event-loop round."""
        peer = writer.get_extra_info("peername")
        address = peer[0] if peer else "?"
        queue = self.waiting.get(address)
        if queue is None and not self._at_cap(address, time.monotonic()):
            return await instance.handle_stream(reader, writer)
        if queue is None:
            queue = self.waiting[address] = deque()
        fut = asyncio.get_running_loop().create_future()
        queue.append((time.monotonic(), writer, fut))
        if len(queue) > self.cap:  # waiting counts against the cap too: the oldest waiting one goes
            _, old_writer, old_fut = queue.popleft()
            self._refuse(old_writer, old_fut, OVER_CAP)
        if self._turns is None or self._turns.done():
            self._turns = asyncio.create_task(self._take_turns())
        if await fut:
            await instance.handle_stream(reader, writer)

    async def _take_turns(self) -> None:
        """Let waiting connections in, one per event-loop round, taking addresses in turn."""
        while self.waiting:
            for address in list(self.waiting):
                queue = self.waiting.get(address)
                if queue:
                    _, _, fut = queue.popleft()
                    if not fut.done():
                        fut.set_result(True)
                if not queue:
                    self.waiting.pop(address, None)
                await asyncio.sleep(0)

    def _refuse(self, writer, fut, why: str | None = None) -> None:
        if not fut.done():
            fut.set_result(False)
        try:
            writer.close()
        except Exception:
            pass
        if why is not None:
            self.closed[why] += 1
            self._unlogged[why] += 1

    def client_connected(self, client: connection.Client) -> None:
        address = client.peername[0] if client.peername else "?"
        conn = self.conns[client.id] = _Conn(address)
        self._now_idle(client.id, conn)
        self._trim(address, conn.idle_since)

    def client_disconnected(self, client: connection.Client) -> None:
        conn = self.conns.pop(client.id, None)
        if conn is not None:
            self._not_idle(client.id, conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        if conn is not None:
            conn.busy += 1
            self._not_idle(flow.client_conn.id, conn)

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        """A CONNECT was answered 2xx: the tunnel's first request head (or its TLS handshake, then the head) is
        due within the timeout from now; a tunnel relayed without decryption is marked one when mitmproxy decides
        so (`next_layer`, `tls_clienthello`, `tcp_start`)."""
        conn = self.conns.get(flow.client_conn.id)
        if conn is not None and not conn.busy and not conn.tunnel:
            self._now_idle(flow.client_conn.id, conn)

    def next_layer(self, nextlayer) -> None:
        """A connection relayed as raw TCP (or UDP) carries no requests this addon could see: a tunnel. Script
        addons' hooks run before mitmproxy's own next-layer addon decides, so a layer may not be chosen yet here;
        `tcp_start` catches the raw tunnels this misses."""
        if isinstance(nextlayer.layer, (layers.TCPLayer, layers.UDPLayer)):
            self._tunnel(nextlayer.context.client.id)

    def tls_clienthello(self, data) -> None:
        if data.ignore_connection:  # not decrypted (proxy_mode: not an AI host): relayed as it is, a tunnel
            self._tunnel(data.context.client.id)

    def tcp_start(self, flow) -> None:
        self._tunnel(flow.client_conn.id)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self._tunnel(flow.client_conn.id)

    # --- bookkeeping ------------------------------------------------------------------------------------

    def _ended(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        if conn is None or conn.busy == 0:  # a CONNECT, or a request whose head this addon never saw
            return
        conn.busy -= 1
        if conn.busy == 0 and not conn.tunnel:
            self._now_idle(flow.client_conn.id, conn)

    def _tunnel(self, cid: str) -> None:
        conn = self.conns.get(cid)
        if conn is not None:
            conn.tunnel = True
            self._not_idle(cid, conn)

    def _now_idle(self, cid: str, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self.idle[cid] = None
        self.idle.move_to_end(cid)
        per = self.by_address.get(conn.address)
        if per is None:
            per = self.by_address[conn.address] = OrderedDict()
        per[cid] = None
        per.move_to_end(cid)

    def _not_idle(self, cid: str, conn: _Conn) -> None:
        self.idle.pop(cid, None)
        per = self.by_address.get(conn.address)
        if per is not None:
            per.pop(cid, None)
            if not per:
                del self.by_address[conn.address]

    def _at_cap(self, address: str, now: float) -> bool:
        """The address holds its cap of connections idle past the grace (the oldest idle first: the cap-th is)."""
        per, cap = self.by_address.get(address), self.cap
        if per is None or len(per) < cap:
            return False
        nth = next(itertools.islice(per, cap - 1, None), None)
        conn = self.conns.get(nth) if nth is not None else None
        return conn is not None and conn.idle_since <= now - self.grace

    def _trim(self, address: str, now: float) -> None:
        """Close the address's oldest idle connections past the grace while it holds more than its cap."""
        per, cap, stale = self.by_address.get(address), self.cap, now - self.grace
        while per and len(per) > cap:
            oldest = next(iter(per))
            conn = self.conns.get(oldest)
            if conn is not None and conn.idle_since > stale:
                break  # the rest are newer still: not idle long enough to count
            if conn is None:
                per.pop(oldest, None)
                continue
            self._close(oldest, OVER_CAP)
            per = self.by_address.get(address)

    def _close(self, cid: str, why: str) -> None:
        """Close one idle connection: mitmproxy's own way for an inactive one (cancel its reader task)."""
        conn = self.conns.get(cid)
        if conn is not None:
            self._not_idle(cid, conn)  # it no longer counts, whether or not it takes a moment to go
        try:
            handler = ctx.master.addons.get("proxyserver").connections.get(cid)
        except Exception:
            handler = None
        if handler is None:
            return
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None and not io.handler.done() and not io.handler.cancelling():
            io.handler.cancel(why)
            self.closed[why] += 1
            self._unlogged[why] += 1

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_SECONDS, self.head_timeout / 4))
            try:
                self._expire(time.monotonic())
            except Exception:  # never let the sweep die: it is the timeout
                log.exception("aibridge: checking idle connections failed")

    def _expire(self, now: float) -> None:
        deadline = now - self.head_timeout
        for address in list(self.waiting):
            queue = self.waiting[address]
            while queue and queue[0][0] <= deadline:
                _, writer, fut = queue.popleft()
                self._refuse(writer, fut, HEAD_TIMEOUT)
            if not queue:
                del self.waiting[address]
        while self.idle:
            cid = next(iter(self.idle))
            conn = self.conns.get(cid)
            if conn is None:
                self.idle.pop(cid, None)
                continue
            if conn.idle_since > deadline:
                break
            self._close(cid, HEAD_TIMEOUT)
        cap = self.cap
        for address in [a for a, per in self.by_address.items() if len(per) > cap]:
            self._trim(address, now)
        if any(self._unlogged.values()) and now - self._logged_at >= SUMMARY_SECONDS:
            self._logged_at = now
            log.info("aibridge: closed %d connection(s) that sent no request head within %g s and %d idle "
                     "connection(s) over the per-address cap of %d", self._unlogged[HEAD_TIMEOUT], self.head_timeout,
                     self._unlogged[OVER_CAP], self.cap)
            self._unlogged = {HEAD_TIMEOUT: 0, OVER_CAP: 0}
