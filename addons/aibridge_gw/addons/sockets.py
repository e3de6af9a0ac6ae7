"""The Responses API over a WebSocket (issue #26, docs/responses-websocket.md): the pipeline's part.

Codex CLI opens `GET …/responses` with `Upgrade: websocket` and sends one `response.create` message per turn; the
server answers with the same JSON events an HTTP stream carries as `data:` payloads. The pipeline serves it:

- the upgrade: identified like an HTTP call (a refusal is its HTTP status, before any upgrade), then pointed at the
  provider's WebSocket (relay mode, `websocket: true`) or at the loopback server's translator (`websocket: false`,
  flow/ws_translate.py), which sends each turn upstream as an HTTP streaming request. mitmproxy carries the
  WebSocket either way, frame by frame as they arrive (pings and close codes included).
- each `response.create` (`websocket_message`, from the client) is one interception: a request flow is made of the
  message (the upgrade's headers, the message's body) and goes through the pipeline's own steps: the token checked
  again, body limits, policies, circuit breaker, budget, the start record. A refusal drops the message (never
  forwarded) and answers the client with the API's `error` event; the socket stays open.
- each server event (`websocket_message`, from the server) is read by the turn's stream tap, as the SSE stream of an
  HTTP call would be; the turn's final event (`response.completed`, `.failed`, `.incomplete`, `error`) records it
  through the pipeline's own end (`Pipeline._finish`: usage, tool calls, thoughts, budgets, breaker, response
  policies) and observation. Then the turn's state is dropped, and mitmproxy's list of the socket's messages is kept
  at the last one, so a socket open for hours holds no more than one turn.
- `generate: false` warm-ups are turns like the others: the same admission (token, limits, policies) and a record
  of their own (purpose `warmup`, with whatever usage the provider reports). What goes upstream is always the
  re-serialised, policed message, never the client's raw frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from mitmproxy import ctx, http
from mitmproxy.websocket import WebSocketMessage

from ..apis import PROVIDERS
from ..flow.errors import error_body
from ..flow.recorder import META_KEY
from ..flow.routing import BadPath, Route
from ..flow.sse import SSEEvent, SSEParser
from ..flow.state import SOCKET_KEY, STATE_KEY, TARGET_KEY, FlowState, Target
from ..flow.tap import StreamTap
from ..flow.toolgate import StreamGate, stream_gate
from ..flow.ws_translate import SocketJob, TurnSpec
from ..logsafe import printable
from .patches import release_websocket

log = logging.getLogger("aibridge")

OFF_LOOP_BYTES = 256 * 1024  # a message larger than this is parsed on a worker thread (as pipeline.OFF_LOOP_BYTES)
SERVER_MESSAGE_MAX = 256 * 1024 * 1024  # one provider event (a response.completed with a long output) at most
RESPONSES_API = "openai.responses"
TERMINAL = frozenset(("response.completed", "response.failed", "response.incomplete", "error"))
# Never part of a turn's request: the handshake's own headers.
_HANDSHAKE = frozenset(("upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                        "sec-websocket-extensions", "sec-websocket-protocol", "content-length", "transfer-encoding"))


@dataclass(eq=False, slots=True)
class Turn:
    """One `response.create` in flight: its request flow (the interception's) and its state."""

    flow: http.HTTPFlow
    state: FlowState
    socket: "Socket | None" = None
    gate: StreamGate | None = None  # tool rules (`hook: tool`): the client's tool calls are held until decided
    warmup: bool = False  # `generate: false`: a turn too (one at a time), recorded with purpose `warmup`
    # A turn the tool loop answers at the translator: its record is written when the loop ends, and the socket's
    # turn is over once the final event has also passed on to the client (either may come first).
    loop_ended: bool = False
    final_seen: bool = False
    injecting: bool = False  # the gate held or changed an event: from then on the client gets the gate's output
    # Translation mode: the translator feeds the turn's tap itself (its TurnSpec's sink) and says when the spec is
    # over (`spec_done`); the turn is recorded once that and the final event's passing (or the socket's end) are seen.
    spec_done: bool = False
    orphan: bool = False  # the socket ended before the turn did: recorded when the translator is done with it
    recorded: bool = False
    status: int | None = None  # the provider's failure status (its `error` event's, else 502): the record's and breaker's


@dataclass(eq=False)
class Socket:
    """One client WebSocket to the Responses API (in the upgrade flow's metadata, live only)."""

    route: Route  # the POST endpoint every turn is routed to
    target: Target
    headers: http.Headers  # the upgrade request's headers as the client sent them (credentials included)
    url: str
    flow: http.HTTPFlow | None = None  # the upgrade's flow (the socket's)
    job: SocketJob | None = None  # translation mode: the loopback translator's job
    turn: Turn | None = None
    turns: int = 0
    stale: str | None = None  # relay: a turn timed out at the provider; the socket takes no more turns (why)
    # Relay: the client closed mid-turn and the provider's side is kept open to read the turn to its end
    # (patches.install_websocket_holds); set once the turn is recorded.
    held: asyncio.Event | None = None
    released: bool = False

    def __deepcopy__(self, memo) -> None:
        return None


def socket_of(flow: http.HTTPFlow) -> Socket | None:
    return flow.metadata.get(SOCKET_KEY)


class ResponsesSockets:
    """Called by the `Pipeline` addon for WebSocket upgrades and their messages."""

    def __init__(self, pipeline, header_view, tool_decider) -> None:
        self.p = pipeline
        self.rt = pipeline.rt
        # The pipeline's own helpers (its module imports this one): the request's header view, the tool hook.
        self.header_view = header_view
        self.tool_decider = tool_decider
        self.held: dict[str, list[Socket]] = {}  # client connection id -> relayed sockets read on after it left
        self.open: set[Socket] = set()  # sockets open now (their turns are watched for provider timeouts)
        self._watch: asyncio.Task | None = None

    # --- the upgrade ---------------------------------------------------------------------------------

    def post_route(self, flow: http.HTTPFlow) -> tuple[Target, Route] | None:
        """The Responses endpoint this upgrade is for, as a POST would route (None: not the Responses API)."""
        target = self.p.proxy.target(flow)
        router = self.rt.router
        try:
            if target.ours:
                route = router.match_prefix(flow.request.path, "POST")
            elif target.ai_host:
                route = router.match_host(target.ai_host, flow.request.path, "POST")
            else:
                route = None
        except BadPath:
            route = None
        if route is None or route.api != RESPONSES_API:
            return None
        return Target(target.ours, target.ai_host, route, None, route.provider.type), route

    async def upgrade(self, flow: http.HTTPFlow, route: Route, hv: dict[str, str]) -> bool:
        """Serve a WebSocket upgrade to the Responses API; False when this endpoint serves none (the caller
        refuses it). A refusal is left on the flow as an HTTP answer."""
        found = self.post_route(flow)
        if found is None:
            return False
        target, route = found
        ident = self.p._identify(flow, route, hv)
        if ident is None:
            return True
        if not self.p._admissible(flow, route, ident):
            return True
        req = flow.request
        sock = Socket(route=route, target=target, headers=req.headers.copy(), url=req.url, flow=flow)
        scratch = FlowState(flow, route)  # routing only: the upgrade itself is no interception and spends nothing
        if route.provider.websocket:
            self.p._to_upstream(flow, scratch, ident)
            req.headers["upgrade"] = "websocket"  # the upstream path drops protocol switches; this one is wanted
        else:
            if self.rt.loopback is None:
                flow.response = self._refusal(route, 503, "aibridge: the WebSocket translator is not running")
                return True
            key = hv.get("sec-websocket-key", "")
            job = SocketJob(ws_key=key, drain_seconds=self.rt.config.timeouts.drain_after_disconnect or 0.0)
            sock.job = job
            self.p._to_loopback(flow, job)
            # mitmproxy's handshake with the translator: no compression (the translator speaks none).
            req.headers.pop("sec-websocket-extensions", None)
        flow.metadata[SOCKET_KEY] = sock
        self.open.add(sock)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._watch_turns())
        log.info("aibridge: WebSocket to %s %s opened by user %s (%s)", route.provider.name,
                 printable(route.upstream_path.split("?")[0]), ident.actor.user_name,
                 "relayed" if sock.job is None else "translated to HTTP")
        return True

    def upgrade_ended(self, flow: http.HTTPFlow) -> None:
        """The upgrade was answered other than `101` (the provider serves no WebSocket there, an error) or failed
        before any answer: no socket was opened, so nothing of it is kept (its translator job included)."""
        if flow.websocket is not None and flow.response is not None and flow.response.status_code == 101:
            return
        sock = flow.metadata.pop(SOCKET_KEY, None)
        if sock is None:
            return
        self.open.discard(sock)
        sock.flow = None
        if self.rt.loopback is not None:
            self.rt.loopback.forget(flow.id)

    def message_limit(self, flow: http.HTTPFlow, from_client: bool) -> int | None:
        """The most one message of a Responses WebSocket may buffer (patches.install_websocket_holds closes the socket
        1009 past it): the request body limit from the client, a generous cap from the provider."""
        if socket_of(flow) is None or self.rt.config is None:
            return None
        limit = self.rt.config.limits.max_request_body_bytes
        return limit if from_client else max(SERVER_MESSAGE_MAX, limit)

    def busy(self, client_conn_id: str) -> bool:
        """A turn is open on a socket of this client connection (drain.py waits for it at shutdown)."""
        return any(s.flow is not None and s.flow.client_conn.id == client_conn_id
                   and (s.turn is not None or s.held is not None) for s in self.open)

    @staticmethod
    def _refusal(route: Route, status: int, message: str) -> http.Response:
        from ..flow.errors import error_response
        return error_response(route.provider.type, status, message)

    # --- messages ------------------------------------------------------------------------------------

    async def message(self, flow: http.HTTPFlow) -> None:
        sock = socket_of(flow)
        ws = flow.websocket
        if sock is None or ws is None or not ws.messages:
            return
        msg = ws.messages[-1]
        del ws.messages[:-1]  # mitmproxy keeps every message of a socket: only the one at hand is kept
        if msg.injected:
            return  # the gateway's own (a refusal's error event)
        if not msg.from_client and sock.held is not None:
            msg.drop()  # the client has gone: the provider's events are read for the record only
            if sock.turn is not None:
                sock.turn.gate = None  # nothing goes to the client any more
            await self._from_server(flow, sock, msg)
            if sock.turn is None and not sock.released:
                sock.released = True
                release_websocket(flow)  # recorded: the provider's side may close now (then `end` runs)
            return
        if msg.from_client:
            try:
                await self._from_client(flow, sock, msg)
            except Exception:  # fail closed: a turn the gateway could not govern never reaches the provider
                log.exception("aibridge: handling a WebSocket turn failed")
                if not msg.dropped:
                    self._refuse(flow, sock, msg, 500, "aibridge: internal error")
        else:
            await self._from_server(flow, sock, msg)

    async def _from_client(self, flow: http.HTTPFlow, sock: Socket, msg: WebSocketMessage) -> None:
        large = len(msg.content) > OFF_LOOP_BYTES  # parsed (and written) on a worker thread, as HTTP bodies are
        try:
            obj = (await asyncio.to_thread(json.loads, msg.content) if large else json.loads(msg.content)) \
                if msg.is_text else None
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict) or obj.get("type") != "response.create":
            kind = obj.get("type") if isinstance(obj, dict) else None
            self._refuse(flow, sock, msg, 400, f"aibridge: only response.create messages are relayed here "
                                               f"(got {printable(str(kind))[:80] if kind else 'something else'})")
            return
        ending = sock.turn
        if ending is not None and ending.final_seen:  # its final event went out: the tool loop is finishing
            for _ in range(200):
                if sock.turn is not ending:
                    break
                await asyncio.sleep(0.01)
        if sock.stale is not None:
            self._refuse(flow, sock, msg, 503, f"aibridge: this WebSocket's provider stopped answering ({sock.stale}); "
                                               "open a new WebSocket")
            return
        if sock.turn is not None:  # the provider would refuse it too: one response at a time per socket
            self._refuse(flow, sock, msg, 409, "aibridge: a response is already in progress on this WebSocket")
            return
        config = self.rt.config
        current = next((p for p in config.providers if p.name == sock.route.provider.name), None) \
            if config is not None else None
        if current is None or current != sock.route.provider:
            # A configuration reload changed (or removed) this socket's provider instance since it opened: its turns
            # would go by the old settings (key, base URL, transport).
            self._refuse(flow, sock, msg, 503, f"aibridge: provider {sock.route.provider.name!r} was reconfigured "
                                               "since this WebSocket opened; open a new WebSocket")
            return
        body = {k: v for k, v in obj.items() if k != "type"}
        warmup = body.get("generate") is False
        had_stream = "stream" in body
        body["stream"] = True  # the transport streams: recorded as a streamed call
        content = await asyncio.to_thread(_dumps, body) if large else _dumps(body)
        turn_flow = self._turn_flow(flow, sock, content)
        got = await self.p._socket_turn(turn_flow, sock.route, warmup,
                                        None if sock.job is not None else sock.route.provider.name)
        if got is None or turn_flow.response is not None:  # refused: the API's error event, never forwarded
            state = turn_flow.metadata.get(STATE_KEY)
            if state is not None:
                self.rt.inflight.discard(state)
            if turn_flow.response is None:
                self._refuse(flow, sock, msg, 500, "aibridge: internal error")
                return
            resp = turn_flow.response
            try:
                err = json.loads(resp.content or b"{}").get("error")
            except (ValueError, AttributeError):
                err = None
            self._refuse(flow, sock, msg, resp.status_code, None, err)
            return
        state, ident, adapter = got
        try:
            await self._forward(flow, sock, msg, turn_flow, state, ident, adapter, body, content, large, had_stream,
                                warmup)
        except BaseException:
            # The turn's row was started: never left in progress (as an HTTP call the pipeline gave up on).
            if sock.turn is None or sock.turn.flow is not turn_flow:
                self.p._abandon(turn_flow)
            raise

    async def _forward(self, flow, sock: Socket, msg: WebSocketMessage, turn_flow: http.HTTPFlow, state: FlowState,
                       ident, adapter, body: dict, content: bytes, large: bool, had_stream: bool, warmup: bool
                       ) -> None:
        """The admitted turn: what goes upstream (the policed message), its Turn, and the translator's spec."""
        sent = body
        if turn_flow.request.content != content:  # a policy or injection changed it
            sent = await asyncio.to_thread(json.loads, turn_flow.request.content) if large \
                else json.loads(turn_flow.request.content)
        if not had_stream:
            sent.pop("stream", None)
        # The provider gets what the gateway parsed, policed and recorded, re-serialised: never the client's raw frame
        # (a duplicated key could mean one thing to the gateway and another to the provider).
        out = {"type": "response.create", **sent}
        msg.content = await asyncio.to_thread(_dumps, out) if large else _dumps(out)
        loop = pool = None
        if adapter is not None or sock.job is not None:  # sent over HTTP by the gateway: pointed upstream here
            pool = self.rt.pools.get(state.route.provider.name) if ident.byok_credential is None else None
            self.p._to_upstream(turn_flow, state, ident, pooled=pool is not None)
            if adapter is not None:
                loop = self.p._loop_job(turn_flow, state, ident, adapter, self.header_view(sock.headers), pool)
                state.via_loop, state.loop_job = True, loop
        turn = Turn(turn_flow, state, sock, warmup=warmup)
        spec = None
        if sock.job is not None:  # what the translator sends upstream for this message (queued last, once all is set)
            headers = [(k, v) for k, v in turn_flow.request.headers.items(multi=True)
                       if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")]
            headers.append(("accept-encoding", "identity"))
            done = (lambda turn=turn: self._loop_done(turn)) if loop is not None else None
            sink = (lambda data, turn=turn: self._spec_event(turn, data)) if loop is None else None
            spec = TurnSpec(turn_flow.request.url, headers, sent, loop, done, warmup=warmup, sink=sink)
            if pool is not None and loop is None:  # the loop fails over itself
                spec.pool, spec.auth_header, spec.state = pool, PROVIDERS[state.route.provider.type].auth_header, state
        sock.turns += 1
        sock.turn = turn
        state.tap = StreamTap(state.interception.codec)
        if loop is None:
            decide = self.tool_decider(state)
            turn.gate = stream_gate(state.interception.codec, decide) if decide is not None else None
        state.on_socket = True
        state.forwarded_at = time.time()
        obs = ctx.master.addons.get("observation") if ctx.master is not None else None
        if obs is not None:
            obs.request(turn_flow)
        if spec is not None:
            sock.job.pending.append(spec)
        if loop is not None and sock.job is None:
            # Relayed socket: the provider's WebSocket cannot run the gateway's tool loop. The turn is answered here
            # (its rounds over HTTP), its events injected into the client's socket; the provider never sees it.
            msg.drop()
            task = asyncio.ensure_future(self._relay_loop(flow, sock, turn, loop))
            _LATE_TASKS.add(task)
            task.add_done_callback(_LATE_TASKS.discard)

    async def _relay_loop(self, flow: http.HTTPFlow, sock: Socket, turn: Turn, loop) -> None:
        from ..flow.ws_translate import WsResponder
        from ..loopback import ClientGone

        gone = False

        async def deliver(data: str) -> None:
            # A client that left never aborts the round: its events are dropped and the loop reads on to the
            # provider's final usage (as translation's _Deliver does).
            nonlocal gone
            if gone or not flow.live or flow.websocket is None or flow.websocket.timestamp_end is not None:
                if not gone:
                    gone = True
                    turn.state.client_gone = turn.state.client_gone or "client disconnected"
                return
            ctx.master.commands.call("inject.websocket", flow, True, data.encode(), True)

        try:
            await self.rt.tool_loop.serve(loop, WsResponder(deliver))
        except ClientGone:
            pass
        except Exception:
            log.exception("aibridge: the tool loop of a WebSocket turn failed")
        finally:
            self._loop_done(turn)

    def _loop_done(self, turn: Turn) -> None:
        """A turn the injected-tool loop answered has ended: recorded from the loop's summary."""
        turn.loop_ended = True
        sock = turn.socket
        if sock is not None and sock.turn is turn and (sock.job is None or turn.final_seen):
            sock.turn = None  # (translation: else once its final event has passed on, in _from_server)
        task = asyncio.ensure_future(self._end_turn(turn, None))
        _LATE_TASKS.add(task)
        task.add_done_callback(_LATE_TASKS.discard)

    def _turn_flow(self, flow: http.HTTPFlow, sock: Socket, content: bytes) -> http.HTTPFlow:
        """The request flow one turn is governed and recorded as: the upgrade's client and headers, the message's
        body, routed like the upgrade."""
        headers = http.Headers([(k, v) for k, v in sock.headers.fields if k.decode("latin-1").lower() not in _HANDSHAKE])
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(content))
        req = http.Request.make("POST", sock.url, content, headers)
        req.method = "POST"
        req.timestamp_start = time.time()
        turn = http.HTTPFlow(flow.client_conn, flow.server_conn, live=True)
        turn.request = req
        turn.metadata[TARGET_KEY] = sock.target
        return turn

    def _refuse(self, flow: http.HTTPFlow, sock: Socket, msg: WebSocketMessage, status: int, message: str | None,
                err: dict | None = None) -> None:
        """Drop the client's message and answer it with the API's `error` event; the socket stays usable."""
        msg.drop()
        if err is None:
            err = error_body(sock.route.provider.type, status, message or "refused").get("error") or {"message": message}
        event = {"type": "error", "status": status, "error": err}
        ctx.master.commands.call("inject.websocket", flow, True, json.dumps(event).encode(), True)

    async def _from_server(self, flow: http.HTTPFlow, sock: Socket, msg: WebSocketMessage) -> None:
        content = msg.content
        turn = sock.turn
        if turn is None:
            kind = _event_type(content)
            if kind and kind.startswith("response.") and msg.from_client is False:
                # A response event outside any turn would reach the client unrecorded: not relayed.
                msg.drop()
                log.warning("aibridge: dropped a %s event outside any turn of a Responses WebSocket",
                            printable(kind[:80]))
            return  # the provider's own notices (an `error` before it closes the socket) pass
        if turn.state.via_loop:  # the loop's own events (translation mode): recorded from its summary when it ends
            if _event_type(content) in TERMINAL:
                turn.final_seen = True
                if turn.loop_ended:
                    sock.turn = None
            return
        tap = turn.state.tap
        data = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        if sock.job is None:
            self._tapped(turn, data)
        elif _event_type(data) in TERMINAL:
            # Translation: the translator fed the tap (the TurnSpec's sink); the final event has reached the client.
            turn.final_seen = True
        if turn.gate is not None:
            self._gated(flow, turn, msg, data)
        elif turn.injecting:  # the gate failed closed: nothing more of this turn reaches the client
            msg.drop()
        s = tap.summary
        if (s.complete or s.error) if sock.job is None else (turn.final_seen and turn.spec_done):
            await self._close_turn(turn)

    def _tapped(self, turn: Turn, data: str) -> None:
        """One provider event read into the turn's tap (and its failure status, if it is an `error` event)."""
        tap = turn.state.tap
        tap.bytes_seen += len(data)
        tap.last_activity = time.time()
        if _event_type(data) == "error":
            turn.status = _error_status(data)
        if tap.broken is None:
            try:
                _feed(tap, data)
            except Exception as e:  # malformed provider output: the turn is recorded with what was read
                tap.broken = f"{type(e).__name__}: {e}"

    async def _close_turn(self, turn: Turn, error: str | None = None) -> None:
        """The turn's final event has passed (and, translated, the translator is done with it): record it."""
        if turn.recorded:
            return
        sock = turn.socket
        if sock is not None and sock.turn is turn:
            sock.turn = None
        if turn.gate is not None and not turn.orphan and sock is not None and sock.flow is not None:
            try:
                self._inject_sse(sock.flow, turn.gate.finish())
            except Exception:
                log.exception("aibridge: the tool gate of a WebSocket turn failed at its end")
        await self._end_turn(turn, error)

    def _spec_event(self, turn: Turn, data: str | None) -> None:
        """Translation mode: what the translator got from the provider for this turn's TurnSpec (each event's JSON,
        whether or not the client could still be sent it), then None once the translator is done with the spec
        (always: sent, failed, or never sent because the client had left)."""
        if turn.recorded:
            return
        if data is not None:
            self._tapped(turn, data)
            return
        turn.spec_done = True
        sock = turn.socket
        if turn.orphan or sock is None or sock.turn is not turn or turn.final_seen:
            s = turn.state.tap.summary
            error = None if (s.complete or s.error or not turn.orphan) else "client disconnected"
            if sock is not None and sock.turn is turn:
                sock.turn = None  # the client may send its next turn now
            _spawn(self._close_turn(turn, error))

    def _gated(self, flow: http.HTTPFlow, turn: Turn, msg: WebSocketMessage, data: str) -> None:
        """The tool gate over server events: an event it passes unchanged goes on as it came; once it holds or
        changes one, the client gets only what it releases (injected in order; the provider's frames dropped). An
        event it cannot read ends the client's turn with the API's error (fail closed)."""
        ev = SSEEvent(_event_type(data) or "message", data)
        ev.raw = StreamGate.raw_of(ev)
        try:
            out = turn.gate.feed(ev)
        except Exception as e:
            log.warning("gated WebSocket turn: parse stopped: %s", e)
            msg.drop()
            turn.gate = None
            turn.injecting = True
            self._inject_sse(flow, turn.state.interception.codec.stream_error_event(
                "aibridge: unparseable event from the provider", turn.state.tap.summary))
            return
        if not turn.injecting and out == ev.raw:
            return
        turn.injecting = True
        msg.drop()
        self._inject_sse(flow, out)

    @staticmethod
    def _inject_sse(flow: http.HTTPFlow, sse: bytes) -> None:
        """Server-sent events (the gate's output) to the client, one text frame per event, in order."""
        if not sse:
            return
        parser = SSEParser()
        for ev in parser.feed(sse) + parser.feed(b""):
            if ev.data:
                ctx.master.commands.call("inject.websocket", flow, True, ev.data.encode(), True)

    async def _end_turn(self, turn: Turn, error: str | None) -> None:
        """Record the turn through the pipeline's own end, then let go of it. A turn the provider failed (its
        `error` event's status; `response.failed`, a timeout: 502) is recorded with that status, which the circuit
        breaker counts as for an HTTP call; a client that left says nothing about the provider."""
        if turn.recorded:
            return
        turn.recorded = True
        flow, state = turn.flow, turn.state
        tap = state.tap
        if tap is not None:
            tap.closed = True
        status = turn.status
        if status is None and not state.via_loop and tap is not None:
            s = tap.summary
            if s.error or (error is not None and state.client_gone is None) or (
                    not s.complete and state.client_gone is None):
                status = 502
        resp = http.Response.make(status or 200, b"", {"content-type": "text/event-stream"})
        resp.timestamp_start = state.forwarded_at or time.time()
        resp.timestamp_end = time.time()
        flow.response = resp
        if error is not None:
            from mitmproxy.flow import Error
            flow.error = Error(error)
        try:
            done = self.p._finish(flow)
            if done is not None and hasattr(done, "__await__"):
                await done
        except Exception:
            log.exception("aibridge: recording a WebSocket turn failed")
        obs = ctx.master.addons.get("observation") if ctx.master is not None else None
        if obs is not None:
            obs.response(flow)
        flow.metadata.pop(STATE_KEY, None)
        flow.metadata.pop(META_KEY, None)

    # --- provider timeouts ---------------------------------------------------------------------------

    async def _watch_turns(self) -> None:
        """The upstream timeouts of HTTP calls, per turn (`timeouts.response`: no event yet; `timeouts.stream_idle`:
        silence between events). A turn past one ends for the client with the API's error events and is recorded
        failed; the socket stays open (a late event of that response is not relayed: it is outside any turn)."""
        while self.open:
            await asyncio.sleep(1.0)
            t = self.rt.config.timeouts if self.rt.config is not None else None
            if t is None:
                continue
            now = time.time()
            for sock in list(self.open):
                turn = sock.turn
                if turn is None or turn.state.via_loop or sock.held is not None or sock.flow is None:
                    continue
                tap = turn.state.tap
                if tap is None:
                    continue
                if not tap.bytes_seen:
                    why = (f"the provider did not answer within {t.response:g} s"
                           if now - turn.state.forwarded_at > t.response else None)
                else:
                    why = (f"the provider's stream was silent for more than {t.stream_idle:g} s"
                           if now - tap.last_activity > t.stream_idle else None)
                if why is not None:
                    await self._time_out(sock, turn, why)

    async def _time_out(self, sock: Socket, turn: Turn, why: str) -> None:
        log.warning("aibridge: ending WebSocket turn %s: %s", turn.state.interception.id, why)
        sock.turn = None
        turn.status = 502
        if sock.job is None:
            # Relayed: what the provider's socket sends next could still be that response's; this socket takes no
            # more turns (the client opens a new one).
            sock.stale = why
        if sock.job is not None and sock.job.current is not None:
            sock.job.current.cancel()  # the translator stops reading that HTTP stream; the next turn goes on
        tail = turn.state.interception.codec.stream_error_event(f"aibridge: {why}", turn.state.tap.summary)
        if turn.gate is not None:
            tail = turn.gate.finish() + turn.gate.tail(tail)
        try:
            self._inject_sse(sock.flow, tail)
        except Exception:
            pass
        await self._end_turn(turn, why)

    # --- the end -------------------------------------------------------------------------------------

    def hold(self, flow: http.HTTPFlow) -> bool:
        """The client closed a relayed socket: keep the provider's side open while a turn is in flight, so its final
        event (the provider's usage) is read and recorded (patches.install_websocket_holds)."""
        sock = socket_of(flow)
        seconds = self.rt.config.timeouts.drain_after_disconnect if self.rt.config is not None else 0
        if (sock is None or sock.job is not None or sock.turn is None or sock.turn.state.via_loop
                or seconds <= 0 or sock.held is not None):
            return False
        turn = sock.turn
        turn.state.client_gone = "client disconnected"
        turn.state.interception.client_gone = True
        sock.held = asyncio.Event()
        self.held.setdefault(flow.client_conn.id, []).append(sock)
        log.info("interception %s: the client closed its WebSocket mid-turn; reading the provider's answer to its "
                 "end (at most %g s)", turn.state.interception.id, seconds)
        return True

    async def client_disconnected(self, client) -> None:
        """mitmproxy closes the provider's side once this returns: wait (bounded) for held turns to be recorded."""
        socks = self.held.pop(client.id, None)
        if not socks:
            return
        seconds = self.rt.config.timeouts.drain_after_disconnect if self.rt.config is not None else 0
        try:
            await asyncio.wait_for(asyncio.gather(*(s.held.wait() for s in socks)), max(seconds, 0.1))
        except TimeoutError:
            log.warning("aibridge: %d WebSocket turn(s) whose client left did not end in time; closing them",
                        sum(not s.held.is_set() for s in socks))

    async def end(self, flow: http.HTTPFlow) -> None:
        """The socket closed: a turn still open is recorded now (relay mode: with what came; translation mode:
        the translator reads the provider's answer on and records it with its final usage)."""
        sock = flow.metadata.pop(SOCKET_KEY, None)
        if sock is None:
            return
        self.open.discard(sock)
        if flow.websocket is not None:
            flow.websocket.messages.clear()
        turn, sock.turn = sock.turn, None
        if sock.held is not None:
            sock.held.set()
        if turn is None or turn.recorded:
            return
        by_client = flow.websocket is not None and flow.websocket.closed_by_client
        if by_client:
            turn.state.client_gone = "client disconnected"
            turn.state.interception.client_gone = True
            turn.flow.metadata[META_KEY]["client_gone"] = True
        if turn.state.via_loop:
            return  # the loop reads its round to its end and stops; its end records the turn (_loop_done)
        why = "client disconnected" if by_client else "the WebSocket closed before the response completed"
        if sock.job is not None:
            # Translation: the translator feeds the turn's tap itself; while its TurnSpec is queued or running, the
            # turn is recorded when the translator says the spec is over (the provider's final usage, or: never
            # sent upstream). Once over, the tap already holds everything the provider said.
            turn.orphan = True
            if not turn.spec_done:
                return
            s = turn.state.tap.summary
            await self._close_turn(turn, None if (s.complete or s.error) else why)
            return
        await self._end_turn(turn, why)

_LATE_TASKS: set = set()


def _spawn(coro) -> None:
    task = asyncio.ensure_future(coro)
    _LATE_TASKS.add(task)
    task.add_done_callback(_LATE_TASKS.discard)


def _error_status(data: str) -> int:
    """The status of the provider's `error` event (502 when it names none)."""
    try:
        status = json.loads(data).get("status")
    except (ValueError, AttributeError, RecursionError):
        status = None
    return status if isinstance(status, int) and 400 <= status <= 599 else 502


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def _feed(tap: StreamTap, data: str) -> None:
    """One server event, read as the SSE event it is over HTTP."""
    tap.codec.on_event(SSEEvent(_event_type(data) or "", data), tap.summary)


def _event_type(content: bytes | str) -> str | None:
    """The event's `type`, read cheaply (the events are JSON objects whose first key is `type`)."""
    head = content[:200] if isinstance(content, str) else content[:200].decode("utf-8", "replace")
    i = head.find('"type"')
    if i < 0:
        return None
    j = head.find('"', head.find(":", i) + 1)
    k = head.find('"', j + 1)
    return head[j + 1:k] if j >= 0 and k > j else None
