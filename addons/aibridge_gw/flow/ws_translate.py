"""Translation mode of the Responses API over a WebSocket (docs/responses-websocket.md): for a provider instance that
serves no WebSocket (`websocket: false`), the gateway answers the client's WebSocket itself, at the loopback server,
and sends each `response.create` upstream as an HTTP streaming request; each server-sent event's JSON goes back as
one WebSocket text frame, as it arrives.

mitmproxy carries the WebSocket between the client and this server like any upstream's, so the pipeline governs
and records every turn in its `websocket_message` hook exactly as in relay mode; this module only speaks the two
protocols. What it sends upstream for each turn (URL, headers with the instance's key, the body as the pipeline
left it) is handed over by the hook (`SocketJob.pending`), never read from the client's frame.

The Responses WebSocket keeps the last response of the connection for the next `response.create` to continue with
`previous_response_id` (so clients send only the new items); HTTP upstreams hold no such cache, so the translator
keeps the last response's whole input and output and sends the expanded input instead (one conversation per socket,
replaced at each turn). A `generate: false` warm-up is answered here (no upstream call) and only primes that cache,
with the input the pipeline admitted (policed), never the client's frame.

Each turn's events also go to its `TurnSpec.sink` as the translator gets them (whether or not the client can still
be sent them), and the sink is told once when the spec is over: the pipeline records the turn from that, however
the client's close and the events race through mitmproxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import wsproto
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from ..loopback import ClientGone, Responder
from .keypool import Exhausted
from .relay import send_with_failover
from .sse import SSEParser

log = logging.getLogger("aibridge.ws")

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ_SIZE = 64 * 1024
MAX_MESSAGE = 64 * 1024 * 1024  # a client frame larger than this closes the socket (1009)
ERROR_BODY_MAX = 64 * 1024


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept answer to a client's Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip().encode() + WS_GUID).digest()).decode()


@dataclass(slots=True)
class TurnSpec:
    """One `response.create` as the pipeline admitted it: where and how it goes upstream (`warmup`: answered here).
    With central MCP tools, `loop` is the injected-tool loop's job (mcp/loop.py), run here in place of one request;
    `done` is called once it has ended (the pipeline records the turn from the loop's summary then)."""

    url: str
    headers: list[tuple[str, str]]
    body: dict | None
    loop: Any = None
    done: Callable[[], None] | None = None
    # An instance with a key pool (flow/keypool.py): sent with each usable key in turn, as the relay does; `state`
    # (the turn's FlowState) notes the key that answered.
    pool: Any = None
    auth_header: Any = None
    state: Any = None
    warmup: bool = False
    # Each event's JSON the provider (or the translator) gave for this turn, then None once when the spec is over.
    sink: Callable[[str | None], None] | None = None
    ended: bool = False

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.sink is not None:
                self.sink(None)


class WsResponder:
    """The loopback `Responder`'s interface (loopback.py) over a WebSocket, for the injected-tool loop: its SSE answer
    goes out one text frame per event (each event's JSON), as produced; an error answered whole becomes the API's
    `error` event. `deliver` sends one frame (raises `ClientGone` when the client left)."""

    def __init__(self, deliver) -> None:
        self.deliver = deliver
        self.parser = SSEParser()
        self.started = False
        self.ended = False

    async def start(self, status: int, headers=(), reason=None) -> None:
        self.started = True

    async def send(self, data: bytes) -> None:
        for ev in self.parser.feed(data) if data else ():
            if ev.data and ev.data.strip() != "[DONE]":
                await self.deliver(ev.data)

    async def end(self) -> None:
        for ev in self.parser.feed(b""):
            if ev.data and ev.data.strip() != "[DONE]":
                await self.deliver(ev.data)
        self.ended = True

    async def respond(self, status: int, headers, body: bytes, reason=None) -> None:
        self.started = self.ended = True
        await self.deliver(_error_event(status if status >= 300 else 502, body.decode("utf-8", "replace")))


@dataclass(eq=False)
class SocketJob:
    """One client WebSocket answered by the translator (registered with the loopback server by the pipeline)."""

    ws_key: str
    client: httpx.AsyncClient | None = None
    pending: deque = field(default_factory=deque)  # TurnSpec per forwarded response.create, in order
    drain_seconds: float = 60.0
    last: tuple[str, list] | None = None  # the last response's id and its whole conversation (input + output)
    closed: bool = False  # the client side of this socket is gone
    current: asyncio.Task | None = None  # the turn being streamed (the pipeline cancels it when the provider times out)
    turning: bool = False  # a turn's upstream stream is being read


class Translator:
    """The loopback handler for `SocketJob`s."""

    def __init__(self, client: httpx.AsyncClient, tool_loop=None) -> None:
        self.client = client
        self.tool_loop = tool_loop  # mcp/loop.py's ToolLoop: turns with central MCP tools
        self._tasks: set[asyncio.Task] = set()  # turns still running (a turn outlives a client that left)

    async def serve(self, job: SocketJob, out: Responder) -> None:
        reader, writer, rest = await out.switch([
            ("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept_key(job.ws_key))])
        ws = wsproto.Connection(wsproto.ConnectionType.SERVER)
        lock = asyncio.Lock()

        async def send(event) -> None:
            async with lock:
                if job.closed:
                    raise ClientGone()
                try:
                    writer.write(ws.send(event))
                    await writer.drain()
                except (ConnectionError, RuntimeError, wsproto.utilities.LocalProtocolError) as e:
                    job.closed = True
                    raise ClientGone() from e

        turns: asyncio.Task | None = None
        parts: list[str] = []
        size = 0
        try:
            if rest:
                ws.receive_data(rest)
            while True:
                for ev in ws.events():
                    if isinstance(ev, TextMessage):
                        parts.append(ev.data)
                        size += len(ev.data)
                        if size > MAX_MESSAGE:
                            await send(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG, reason="message too big"))
                            return
                        if ev.message_finished:
                            text, parts, size = "".join(parts), [], 0
                            turns = asyncio.create_task(self._after(turns, job, text, send))
                            self._tasks.add(turns)
                            turns.add_done_callback(self._tasks.discard)
                    elif isinstance(ev, Message):  # binary: not this API's
                        if ev.message_finished:
                            await send(TextMessage(data=_error_event(400, "aibridge: binary frames are not part of "
                                                                          "the Responses API")))
                    elif isinstance(ev, Ping):
                        await send(ev.response())
                    elif isinstance(ev, CloseConnection):
                        try:
                            await send(ev.response())
                        except ClientGone:
                            pass
                        return
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                ws.receive_data(data)
        except ClientGone:
            pass
        finally:
            job.closed = True
            try:
                writer.close()
            except Exception:
                pass
            # A turn being streamed goes on without the client (to its end, bounded): its usage is still recorded.
            # Specs whose message never arrived are over too (after the turns before them).
            task = asyncio.ensure_future(self._flush(turns, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, previous: asyncio.Task | None, job: SocketJob) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        while job.pending:
            job.pending.popleft().end()

    async def _after(self, previous: asyncio.Task | None, job: SocketJob, text: str, send) -> None:
        """Turns run one after another, in the order their messages came."""
        if previous is not None:
            await asyncio.wait([previous])  # however it ended (a turn timed out is cancelled)
        job.current = asyncio.current_task()
        try:
            await self._turn(job, text, send)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            if job.current is not asyncio.current_task():
                raise
        except Exception:
            log.exception("aibridge: a translated WebSocket turn failed")
        finally:
            if job.current is asyncio.current_task():
                job.current = None

    async def _turn(self, job: SocketJob, text: str, send) -> None:
        if not job.pending:  # the pipeline forwards only what it admitted, one spec each
            await send(TextMessage(data=_error_event(400, "aibridge: unexpected message")))
            return
        spec: TurnSpec = job.pending.popleft()
        try:
            await self._spec_turn(job, spec, send)
        finally:
            if spec.done is not None:
                spec.done()
            spec.end()

    async def _spec_turn(self, job: SocketJob, spec: TurnSpec, send) -> None:
        if spec.warmup:
            await self._warm_up(job, spec, send)
            return
        if job.closed and spec.loop is None:
            return  # the client left before its turn was sent: nothing goes upstream (recorded as such)
        body = {k: v for k, v in spec.body.items() if k not in ("type", "generate")}
        body["stream"] = True
        conversation = _items(body.get("input"))
        prev = body.get("previous_response_id")
        if job.last is not None and prev and prev == job.last[0]:
            conversation = job.last[1] + conversation  # the connection's cache, as the provider's WebSocket keeps it
            body["input"] = conversation
            body.pop("previous_response_id", None)
        job.last = None
        job.turning = True
        try:
            if spec.loop is not None:
                await self._loop(job, spec, body, conversation, send)
            else:
                await self._stream(job, spec, body, conversation, send)
        finally:
            job.turning = False

    async def _loop(self, job: SocketJob, spec: TurnSpec, body: dict, conversation: list, send) -> None:
        """A turn with central MCP tools: the injected-tool loop runs it (rounds over HTTP, tools run here), and
        the client gets its events (its own tools only) as frames. The conversation it continues is expanded as for
        one request."""
        adapter = spec.loop.adapter
        adapter.body = {**{k: v for k, v in adapter.body.items() if k not in ("type", "generate",
                                                                              "previous_response_id")},
                        "input": body.get("input", adapter.body.get("input")), "stream": True}
        if "previous_response_id" in body:
            adapter.body["previous_response_id"] = body["previous_response_id"]
        deliver = _Deliver(job, send, spec)

        async def tracked(data: str) -> None:
            _keep(job, data, conversation)
            await deliver(data)

        try:
            await self.tool_loop.serve(spec.loop, WsResponder(tracked))
        except ClientGone:
            pass

    async def _stream(self, job: SocketJob, spec: TurnSpec, body: dict, conversation: list, send) -> None:
        deliver = _Deliver(job, send, spec)
        # (a conversation expanded from the socket's cache can be large: serialised off the event loop)
        content = await asyncio.to_thread(lambda: json.dumps(body, ensure_ascii=False).encode())
        try:
            async with asyncio.timeout(None) as deadline:
                async with self._send(spec, content) as resp:
                    if isinstance(resp, Exhausted):
                        await deliver(_error_event(resp.status, resp.message))
                        return
                    if resp.status_code >= 300:
                        raw = b""
                        async for chunk in resp.aiter_raw():
                            raw += chunk
                            if len(raw) > ERROR_BODY_MAX:
                                break
                        await deliver(_error_event(resp.status_code, raw.decode("utf-8", "replace")))
                        return
                    parser = SSEParser()
                    async for chunk in resp.aiter_raw():
                        for ev in parser.feed(chunk):
                            if ev.data and ev.data.strip() != "[DONE]":
                                await _keep_async(job, ev.data, conversation)
                                await deliver(ev.data)
                        if deliver.late and deadline.when() is None:  # the client left: read on, bounded
                            deadline.reschedule(asyncio.get_running_loop().time() + job.drain_seconds)
                    for ev in parser.feed(b""):
                        if ev.data and ev.data.strip() != "[DONE]":
                            await _keep_async(job, ev.data, conversation)
                            await deliver(ev.data)
        except (httpx.HTTPError, TimeoutError) as e:
            await deliver(_error_event(502, f"aibridge: the provider's connection failed: {type(e).__name__}"))

    @contextlib.asynccontextmanager
    async def _send(self, spec: TurnSpec, content: bytes):
        """The turn's upstream response (streamed), with the pool's next usable key when the instance has a pool."""
        if spec.pool is None:
            async with self.client.stream("POST", spec.url, headers=spec.headers, content=content) as resp:
                yield resp
            return
        got = await send_with_failover(self.client, spec.pool, spec.auth_header, "POST", spec.url, spec.headers,
                                       content, spec.state)
        try:
            yield got
        finally:
            if not isinstance(got, Exhausted):
                await got.aclose()

    async def _warm_up(self, job: SocketJob, spec: TurnSpec, send) -> None:
        """`generate: false`: nothing is generated and nothing goes upstream; the response primes the connection's
        cache for the next turn's `previous_response_id` with the input as the pipeline admitted it (policed)."""
        sent = spec.body if isinstance(spec.body, dict) else {}
        deliver = _Deliver(job, send, spec)
        rid = f"resp_aibridge_{uuid.uuid4().hex}"
        conversation = _items(sent.get("input"))
        if job.last is not None and sent.get("previous_response_id") == job.last[0]:
            conversation = job.last[1] + conversation
        job.last = (rid, conversation)
        resp = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "model": sent.get("model"), "output": [], "usage": None}
        await deliver(json.dumps({"type": "response.created", "sequence_number": 0, "response": resp}))
        resp = {**resp, "status": "completed"}
        await deliver(json.dumps({"type": "response.completed", "sequence_number": 1, "response": resp}))


class _Deliver:
    """Each event to the turn's sink (the pipeline's record of it), and to the client while it is there."""

    __slots__ = ("job", "send", "spec", "late")

    def __init__(self, job: SocketJob, send, spec: TurnSpec) -> None:
        self.job, self.send, self.spec, self.late = job, send, spec, job.closed

    async def __call__(self, data: str) -> None:
        if self.spec.sink is not None and not self.spec.ended:
            self.spec.sink(data)
        if not self.late:
            try:
                await self.send(TextMessage(data=data))
            except ClientGone:
                self.late = True


def _items(value: Any) -> list:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return list(value) if isinstance(value, list) else []


OFF_LOOP_CHARS = 256 * 1024  # a final event larger than this is parsed on a worker thread


async def _keep_async(job: SocketJob, data: str, conversation: list) -> None:
    if '"response.completed"' in data[:200] and len(data) > OFF_LOOP_CHARS:
        await asyncio.to_thread(_keep, job, data, conversation)
    else:
        _keep(job, data, conversation)


def _keep(job: SocketJob, data: str, conversation: list) -> None:
    """The completed response (id, output) is the connection's cache for the next turn."""
    if '"response.completed"' not in data:
        return
    try:
        obj = json.loads(data)
    except ValueError:
        return
    resp = obj.get("response") if isinstance(obj, dict) and obj.get("type") == "response.completed" else None
    if isinstance(resp, dict) and isinstance(resp.get("id"), str):
        output = [i for i in resp.get("output") or [] if isinstance(i, dict)]
        job.last = (resp["id"], conversation + output)


def _error_event(status: int, message: str) -> str:
    """The Responses WebSocket's `error` event. A provider's JSON error body is passed on as its `error`."""
    error: dict = {"type": "invalid_request_error" if status < 500 else "server_error", "message": message}
    try:
        parsed = json.loads(message)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
    except ValueError:
        pass
    return json.dumps({"type": "error", "status": status, "error": error})
