"""Incremental text/event-stream parser: bytes in as they arrive, complete events out.

Chunks may split an event, a line or a CRLF pair anywhere; the parser keeps only the unfinished tail. A line longer
than MAX_PENDING is not buffered: it is skipped (its event with it, up to the blank line that ends the event) and
parsing resumes with the next event, so a provider's final usage after a huge event is still read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_PENDING = 16 * 1024 * 1024  # one line longer than this is skipped, with its event (bytes still flow)


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None


class SSEParser:
    __slots__ = ("_buf", "_event", "_data", "_id", "_saw_cr", "_skipping", "_drop", "skipped")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._saw_cr = False  # last chunk ended in CR: a leading LF in the next one belongs to it
        self._skipping = False  # inside a line too long to keep: its bytes are dropped until it ends
        self._drop = False  # the event being read lost a line: it is dropped at its blank line
        self.skipped = 0  # lines skipped for their length

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
        if not chunk:
            out: list[SSEEvent] = []
            if self._skipping:
                self._skipping = False
                self._buf.clear()
            if self._buf:
                self._line(bytes(self._buf), out)
                self._buf.clear()
            self._dispatch(out)
            return out
        if self._saw_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._saw_cr = chunk[-1:] == b"\r"
        if self._skipping:  # drop the rest of the long line, up to its end
            lf, cr = chunk.find(b"\n"), chunk.find(b"\r")
            ends = [i for i in (lf, cr) if i >= 0]
            if not ends:
                return []
            self._skipping = False
            end = min(ends)
            chunk = chunk[end + (2 if chunk[end:end + 2] == b"\r\n" else 1):]
        buf = self._buf
        if b"\n" not in chunk and b"\r" not in chunk:  # no line ends here: nothing to scan (a long line stays linear)
            buf += chunk
            self._check_length()
            return []
        buf += chunk
        out = []
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
            if end - start > MAX_PENDING:  # whole in this chunk, but as long as one that is skipped across chunks
                self._skip()
            else:
                self._line(bytes(buf[start:end]), out)
            start = nxt
        del buf[:start]
        self._check_length()
        return out

    def _check_length(self) -> None:
        if len(self._buf) > MAX_PENDING:
            self._buf.clear()
            self._skipping = True
            self._skip()

    def _skip(self) -> None:
        self._drop = True
        self.skipped += 1
        log.warning("aibridge: a server-sent event line longer than %g MiB was skipped (with its event); "
                    "reading goes on with the next event", MAX_PENDING / (1024 * 1024))

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
        if self._drop:
            self._drop = False
        elif self._data:
            out.append(SSEEvent(self._event or "message", "\n".join(self._data), self._id))
        self._event = ""
        self._data = []
