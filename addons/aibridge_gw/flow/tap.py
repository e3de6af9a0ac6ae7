"""The stream tap: relays a provider's server-sent events unchanged and reads them on the way; with a tool gate,
relays what the gate lets through instead."""

from __future__ import annotations

import logging
import time

from ..apis.base import WireApi
from .exchange import ResponseSummary
from .sse import SSEParser
from .toolgate import StreamGate

log = logging.getLogger(__name__)


class StreamTap:
    """A ``flow.response.stream`` callable: passes every chunk on unchanged and parses it on the way.

    Runs on mitmproxy's event loop, so it only parses; a parse failure stops parsing, never the stream. When the
    stream ends without the API's final event (or with output that could not be parsed), it appends the API's
    own error event so SDKs raise an error instead of returning a silently truncated answer.

    With a `gate` (flow/toolgate.py) the tap parses each event once, with its bytes: the provider's event is folded
    into the summary (recording reads what the provider sent, usage included), and the client gets what the gate
    returns for it: whole events only, text at once, a tool call once it is decided. A gated stream fails closed: an
    event the tap cannot read (malformed, or too long to buffer) ends the client's stream with the API's error event,
    and nothing after it is relayed (it could carry a tool call nobody decided). Without a gate, nothing changes:
    chunks pass as they came.
    """

    __slots__ = ("codec", "framing", "parser", "summary", "broken", "bytes_seen", "last_activity", "closed", "gate")

    def __init__(self, codec: WireApi, framing=None, gate: StreamGate | None = None) -> None:
        self.codec = codec
        # A provider that streams another framing (Bedrock's binary event stream): `framing.decode` turns its
        # bytes into the API's server-sent events; the client gets those (`converts`) or the original bytes.
        self.framing = framing
        # A gated stream relays the gate's events: in the framing the client reads (converted SSE as they are; a
        # framing the client reads natively must re-frame them, `framing.encode`).
        if gate is not None and framing is not None and not framing.converts and not hasattr(framing, "encode"):
            raise TypeError(f"{type(framing).__name__} cannot re-frame gated events: this stream cannot be gated")
        self.gate = gate
        self.parser = SSEParser(keep_raw=gate is not None)
        self.summary = ResponseSummary()
        self.broken: str | None = None
        self.bytes_seen = 0
        self.last_activity = time.time()  # for the stream idle timeout (epoch seconds, as the watch reads it)
        self.closed = False  # the client got the end of the stream (normal or gateway-made)

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self.gate is not None:
            return self._gated(chunk)
        self.last_activity = time.time()
        if not chunk:
            return self._end()
        self.bytes_seen += len(chunk)
        events = chunk
        if self.broken is None:
            try:
                if self.framing is not None:
                    events = self.framing.decode(chunk)
                for ev in self.parser.feed(events):
                    self.codec.on_event(ev, self.summary)
            except Exception as e:  # malformed provider output must not cut the client's stream
                self.broken = f"{type(e).__name__}: {e}"
                log.warning("stream parse stopped: %s", self.broken)
                events = b""
        elif self.framing is not None:
            events = b""  # undecodable frames: nothing the client's API could read
        if self.framing is not None and self.framing.converts:
            # Nothing yet (a frame split across reads): no chunk at all, since an empty one would end the
            # client's chunked body.
            return events or []
        return chunk

    def _gated(self, chunk: bytes) -> bytes | list[bytes]:
        self.last_activity = time.time()
        if not chunk:
            return self._end()
        self.bytes_seen += len(chunk)
        if self.broken is not None:
            return []  # the client's stream has ended (fail closed): nothing more is relayed
        out: list[bytes] = []
        try:
            self._pass(self.parser.feed(self.framing.decode(chunk) if self.framing is not None else chunk), out)
        except Exception as e:
            self.broken = f"{type(e).__name__}: {e}"
            log.warning("gated stream parse stopped: %s", self.broken)
            return self._framed(b"".join(out)) + self._end()
        # Never an empty chunk: it would end the client's chunked body.
        return self._framed(b"".join(out)) if out else []

    def _pass(self, events, out: list[bytes]) -> None:
        """Fold each provider event into the summary and hand it to the gate; what the gate releases, in order."""
        codec, summary, gate = self.codec, self.summary, self.gate
        for ev in events:
            if ev.event:
                codec.on_event(ev, summary)
            data = gate.feed(ev)
            if data:
                out.append(data)
        if self.parser.skipped:
            raise ValueError("a server-sent event too long to read")

    def _framed(self, sse: bytes) -> bytes:
        """Gated output in the framing the client reads."""
        if sse and self.framing is not None and not self.framing.converts:
            return self.framing.encode(sse)
        return sse

    def _end(self) -> bytes:
        if self.closed:
            return b""
        self.closed = True
        gate = self.gate
        out: list[bytes] = []
        if self.broken is None:
            try:
                if gate is None:
                    for ev in self.parser.feed(b""):
                        self.codec.on_event(ev, self.summary)
                else:
                    self._pass(self.parser.feed(b""), out)
            except Exception as e:
                self.broken = f"{type(e).__name__}: {e}"
        released = b""
        if gate is not None:
            out.append(gate.finish())  # what is still held is decided (the client gets whole events only)
            released = self._framed(b"".join(out))
        s = self.summary
        if self.codec.ends_at_eof and not s.error:
            s.complete = True  # no final event in these APIs: a stream that ends normally is complete
        if s.error or (s.complete and self.broken is None):
            return released
        why = f"unparseable event ({self.broken})" if self.broken else "the stream ended before its final event"
        return released + self._tail(f"aibridge: upstream {why}", b"")

    def upstream_failed(self, message: str) -> bytes:
        """The provider's connection died (or timed out) mid-stream: the error event that ends the client's."""
        if self.closed:
            return b""
        self.closed = True
        # Gated: what is still held is decided; the client has whole events only, so no partial one to end first.
        released = b"" if self.gate is None else self._framed(self.gate.finish())
        if self.summary.complete and not self.summary.error:
            return released  # the client has the final event: only the chunk terminator was missing
        p = self.parser
        lead = b"" if self.gate is not None else (
            b"\n\n" if p.pending_line else (b"\n" if p.pending_event else b""))
        return released + self._tail(f"aibridge: {message}", lead)

    def _tail(self, message: str, lead: bytes) -> bytes:
        """The API's error event that ends the client's stream, in the framing the client reads."""
        sse = lead + self.codec.stream_error_event(message, self.summary)
        if self.gate is not None:
            sse = self.gate.tail(sse)
        return sse if self.framing is None else self.framing.error_tail(sse, message)
