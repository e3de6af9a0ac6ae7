"""The loopback server: where mitmproxy sends a flow the gateway answers through its own upstream client.

Two kinds of exchange need that: a request to an instance with a key pool (`flow/relay.py`: trying the next key
means sending the request again, which mitmproxy cannot do within one flow) and a request with injected MCP tools
(`mcp/loop.py`: the gateway runs the tools and continues the conversation). The pipeline registers the exchange's
job under a one-shot key and points the flow at `http://127.0.0.1:<port>/aibridge-loop/<key>`; mitmproxy relays
the answer to the client like any upstream's, and taps and records it as usual.

This module is the HTTP server only: the listening socket on 127.0.0.1, the job registry, request parsing and
response framing (h11), one exchange per connection. Each job goes to the handler registered for its kind, which
answers through a `Responder`: a streamed answer chunk by chunk as the handler sends it (never buffered), or a
whole one with its length. It runs on mitmproxy's event loop; every wait is an await.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Iterable
from typing import Any, Protocol

import h11

log = logging.getLogger("aibridge.loopback")

PATH = "/aibridge-loop/"
READ_SIZE = 64 * 1024
# The request head mitmproxy sends here carries the client's headers (the pipeline admits up to 64 KiB of them).
MAX_HEAD = 256 * 1024
NOT_FOUND = b'{"error":{"message":"unknown loop job"}}'
# Framing is the server's: a handler's headers never set it (a relayed provider's hop-by-hop headers included).
_FRAMING = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"proxy-connection",
                      b"te", b"trailer", b"upgrade"))

Headers = Iterable[tuple[str | bytes, str | bytes]]


class ClientGone(Exception):
    """The peer (mitmproxy's connection for this flow) went away: nothing more can be sent."""


class Responder:
    """How a handler answers its exchange: `start` + `send`… + `end` for a streamed answer (chunked, each `send`
    written and drained at once), or `respond` for a whole one (content-length). Every answer closes the
    connection. A peer that went away raises `ClientGone`. A handler that returns without `end` leaves the
    streamed answer unterminated: the connection closes without its last chunk, which tells mitmproxy the
    answer broke off."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter, method: bytes = b"",
                 reader: asyncio.StreamReader | None = None) -> None:
        self._conn = conn
        self._writer = writer
        self._reader = reader
        self._head_only = method == b"HEAD"
        self.started = False  # the response head was sent
        self.ended = False  # the whole answer was sent

    async def start(self, status: int, headers: Headers = (), reason: str | bytes | None = None) -> None:
        """Send the head of a streamed answer; its body follows with `send`, then `end`."""
        head = self._head(status, headers, reason, None)
        self.started = True
        await self._write(head)

    async def send(self, data: bytes) -> None:
        """One chunk of a started answer, written as it is (an empty one sends nothing)."""
        if data and not self._head_only:
            await self._write(self._conn.send(h11.Data(data=data)))

    async def end(self) -> None:
        """The end of a started answer (its last chunk)."""
        out = self._conn.send(h11.EndOfMessage())
        self.ended = True
        await self._write(out)

    async def respond(self, status: int, headers: Headers, body: bytes, reason: str | bytes | None = None) -> None:
        """A whole answer: its head with content-length, and the body."""
        out = self._head(status, headers, reason, len(body))
        if body and not self._head_only:
            out += self._conn.send(h11.Data(data=body))
        out += self._conn.send(h11.EndOfMessage())
        self.started = self.ended = True
        await self._write(out)

    async def switch(self, headers: Headers) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Answer an upgrade request `101 Switching Protocols` (the Responses WebSocket's translator): the
        connection is the handler's from then on. Returns its reader, writer and the bytes already read past the
        request."""
        fields = [(_latin1(k), _latin1(v)) for k, v in headers]
        out = self._conn.send(h11.InformationalResponse(status_code=101, headers=fields))
        self.started = self.ended = True
        await self._write(out)
        return self._reader, self._writer, self._conn.trailing_data[0]

    def _head(self, status: int, headers: Headers, reason: str | bytes | None, length: int | None) -> bytes:
        fields = []
        for k, v in headers:
            name = _latin1(k)
            if name.lower() not in _FRAMING:
                fields.append((name, _latin1(v)))
        if length is not None:
            fields.append((b"content-length", b"%d" % length))
        fields.append((b"connection", b"close"))  # h11 frames the body: chunked, or by the length given
        reason = _latin1(reason or _phrase(status))
        return self._conn.send(h11.Response(status_code=status, headers=fields, reason=reason))

    async def _write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as e:
            raise ClientGone() from e


class Handler(Protocol):
    """Serves the jobs of one kind; `serve` returns once its answer is sent (or given up)."""

    async def serve(self, job: Any, out: Responder) -> None: ...


class LoopbackServer:
    """The HTTP/1.1 endpoint on 127.0.0.1:<port>: `register` a job, send its flow to the path returned."""

    def __init__(self, handlers: dict[type, Handler] | None = None) -> None:
        self.handlers: dict[type, Handler] = dict(handlers or {})  # job kind -> who serves it
        self.jobs: dict[str, Any] = {}
        self.port = 0
        self.active = 0  # exchanges being served (drain.py waits for them at shutdown)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening; exchanges being served go on."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def register(self, key: str, job: Any) -> str:
        """Hold `job` for one request to the path returned; a second request to it gets a 404."""
        if type(job) not in self.handlers:
            raise TypeError(f"no loopback handler for {type(job).__name__}")
        self.jobs[key] = job
        return PATH + key

    def forget(self, key: str) -> bool:
        """Drop a job its flow never came for (the flow ended first); whether it was still held."""
        return self.jobs.pop(key, None) is not None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        job = None
        try:
            request = await _read_request(conn, reader, writer)
            if request is None:
                return
            out = Responder(conn, writer, request.method, reader)
            target = request.target.decode("latin-1")
            job = self.jobs.pop(target[len(PATH):], None) if target.startswith(PATH) else None
            if job is None:
                await out.respond(404, [("content-type", "application/json")], NOT_FOUND)
                return
            await self.handlers[type(job)].serve(job, out)
        except (ClientGone, ConnectionError):
            pass
        except Exception:
            log.exception("loopback: serving %s failed", type(job).__name__ if job is not None else "a request")
        finally:
            self.active -= 1
            try:
                writer.close()
            except Exception:
                pass


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> h11.Request | None:
    """The request's head, once its body was read too (the job already holds the body); None when the peer
    closed first or sent something that is not HTTP/1 (answered 400 when possible)."""
    request = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            log.debug("loopback: malformed request: %s", e)
            try:
                writer.write(conn.send(h11.Response(status_code=e.error_status_hint, headers=[
                    (b"content-length", b"0"), (b"connection", b"close")])))
            except (h11.LocalProtocolError, ConnectionError, RuntimeError):  # nothing can be answered: just close
                pass
            return None
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            conn.receive_data(await reader.read(READ_SIZE))  # b"": the peer closed
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: the request's body, already held by the job


def _latin1(v: str | bytes) -> bytes:
    return v if isinstance(v, bytes) else v.encode("latin-1", "replace")


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
