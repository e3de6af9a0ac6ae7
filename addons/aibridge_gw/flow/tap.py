"""The stream tap: relays a provider's server-sent events unchanged and reads them on the way."""

from __future__ import annotations

import logging
import time

from ..apis.base import WireApi
from .exchange import ResponseSummary
from .sse import SSEParser

log = logging.getLogger(__name__)


class StreamTap:
    """A ``flow.response.stream`` callable: passes every chunk on unchanged and parses it on the way.

    Runs on mitmproxy's event loop, so it only parses; a parse failure stops parsing, never the stream. When the
    stream ends without the API's final event (or with output that could not be parsed), it appends the API's
    own error event so SDKs raise an error instead of returning a silently truncated answer.
    """

    __slots__ = ("codec", "framing", "parser", "summary", "broken", "bytes_seen", "last_activity", "closed")

    def __init__(self, codec: WireApi, framing=None) -> None:
        self.codec = codec
        # A provider that streams another framing (Bedrock's binary event stream): `framing.decode` turns its
        # bytes into the API's server-sent events; the client gets those (`converts`) or the original bytes.
        self.framing = framing
        self.parser = SSEParser()
        self.summary = ResponseSummary()
        self.broken: str | None = None
        self.bytes_seen = 0
        self.last_activity = time.time()  # for the stream idle timeout (epoch seconds, as the watch reads it)
        self.closed = False  # the client got the end of the stream (normal or gateway-made)

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
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

    def _end(self) -> bytes:
        if self.closed:
            return b""
        self.closed = True
        if self.broken is None:
            try:
                for ev in self.parser.feed(b""):
                    self.codec.on_event(ev, self.summary)
            except Exception as e:
                self.broken = f"{type(e).__name__}: {e}"
        s = self.summary
        if self.codec.ends_at_eof and not s.error:
            s.complete = True  # no final event in these APIs: a stream that ends normally is complete
        if s.error or (s.complete and self.broken is None):
            return b""
        why = f"unparseable event ({self.broken})" if self.broken else "the stream ended before its final event"
        return self._tail(f"aibridge: upstream {why}", b"")

    def upstream_failed(self, message: str) -> bytes:
        """The provider's connection died (or timed out) mid-stream: the error event that ends the client's."""
        if self.closed:
            return b""
        self.closed = True
        if self.summary.complete and not self.summary.error:
            return b""  # the client has the final event: only the chunk terminator was missing
        p = self.parser
        lead = b"\n\n" if p.pending_line else (b"\n" if p.pending_event else b"")
        return self._tail(f"aibridge: {message}", lead)

    def _tail(self, message: str, lead: bytes) -> bytes:
        """The API's error event that ends the client's stream, in the framing the client reads."""
        sse = lead + self.codec.stream_error_event(message, self.summary)
        return sse if self.framing is None else self.framing.error_tail(sse, message)
