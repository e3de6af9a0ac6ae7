"""Incremental text/event-stream parser: bytes in as they arrive, complete events out.

Chunks may split an event, a line or a CRLF pair anywhere; the parser keeps only the unfinished tail.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PENDING = 16 * 1024 * 1024  # one event larger than this is not parsed (bytes still flow)


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None


class SSEParser:
    __slots__ = ("_buf", "_event", "_data", "_id", "_saw_cr", "overflowed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._saw_cr = False  # last chunk ended in CR: a leading LF in the next one belongs to it
        self.overflowed = False

    @property
    def pending_line(self) -> bool:
        """Bytes of an unfinished line are buffered (the client has them too)."""
        return bool(self._buf)

    @property
    def pending_event(self) -> bool:
        """Fields of an event whose terminating blank line has not come yet."""
        return bool(self._data or self._event)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse a chunk; b"" marks the end of the stream and flushes a trailing event."""
        if self.overflowed:
            return []
        if not chunk:
            out: list[SSEEvent] = []
            if self._buf:
                self._line(bytes(self._buf), out)
                self._buf.clear()
            self._dispatch(out)
            return out
        if self._saw_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._saw_cr = chunk[-1:] == b"\r"
        self._buf += chunk
        out = []
        buf = self._buf
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf >= 0 else n)
            if cr >= 0:
                end, nxt = cr, cr + 2 if cr + 1 < n and buf[cr + 1] == 0x0A else cr + 1
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(bytes(buf[start:end]), out)
            start = nxt
        del buf[:start]
        if len(buf) > MAX_PENDING:
            self.overflowed = True
            buf.clear()
        return out

    def _line(self, raw: bytes, out: list[SSEEvent]) -> None:
        if not raw:
            self._dispatch(out)
            return
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":
            return
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value

    def _dispatch(self, out: list[SSEEvent]) -> None:
        if self._data:
            out.append(SSEEvent(self._event or "message", "\n".join(self._data), self._id))
        self._event = ""
        self._data = []
