"""Incremental text/event-stream parser: bytes in as they arrive, complete events out.

Chunks may split an event, a line or a CRLF pair anywhere; the parser keeps only the unfinished tail. A line longer
than MAX_PENDING is not buffered: it is skipped (its event with it, up to the blank line that ends the event) and
parsing resumes with the next event, so a provider's final usage after a huge event is still read.

A parser made with `keep_raw=True` (the tool gate's: it relays events one by one, so it needs each one's bytes) also
gives every event the exact bytes it came in (`SSEEvent.raw`), and returns what carries no event (comments,
keep-alives, stray blank lines) as an event named "" holding only those bytes: the concatenation of every returned
`raw` is the input, byte for byte, in order. Keeping the bytes rather than re-serialising keeps what the client gets
identical to what the provider sent (CRLF or LF, `data:` spacing, comments, field order). An event skipped for its
length has no bytes to give: `skipped` counts it (the gate fails closed on it).
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
    raw: bytes | None = None  # the event's bytes as they came (a parser made with keep_raw)


class SSEParser:
    __slots__ = ("_buf", "_event", "_data", "_id", "_saw_cr", "_skipping", "_drop", "skipped", "keep_raw", "_raw")

    def __init__(self, keep_raw: bool = False) -> None:
        self._buf = bytearray()
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._saw_cr = False  # last chunk ended in CR: a leading LF in the next one belongs to it
        self._skipping = False  # inside a line too long to keep: its bytes are dropped until it ends
        self._drop = False  # the event being read lost a line: it is dropped at its blank line
        self.skipped = 0  # lines skipped for their length
        self.keep_raw = keep_raw
        self._raw = bytearray()  # keep_raw: the bytes of the event being read that left the line buffer

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
            if self.keep_raw:
                self._raw += self._buf
            if self._buf:
                self._line(bytes(self._buf), out)
                self._buf.clear()
            self._dispatch(out)
            if self.keep_raw:
                self._segment(out, 0)
            return out
        if self._saw_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
            if self.keep_raw:
                self._raw += b"\n"  # the LF of a CRLF split across chunks: still the client's byte
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
        keep_raw = self.keep_raw
        seg = 0  # keep_raw: where the event being read starts in buf (earlier bytes of it are in _raw)
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
                if keep_raw:
                    self._raw.clear()
                    seg = nxt
            elif keep_raw and end == start:  # a blank line: the event ends with it
                before = len(out)
                self._dispatch(out)
                self._raw += buf[seg:nxt]
                seg = nxt
                self._segment(out, before)
            else:
                self._line(bytes(buf[start:end]), out)
            start = nxt
        if keep_raw:
            self._raw += buf[seg:start]
        del buf[:start]
        self._check_length()
        return out

    def _segment(self, out: list[SSEEvent], before: int) -> None:
        """keep_raw: give the bytes read since the last event to the event just dispatched, or as an event of its
        own ("") when they carried none."""
        if not self._raw:
            return
        raw = bytes(self._raw)
        self._raw.clear()
        if len(out) > before:
            out[-1].raw = raw
        else:
            out.append(SSEEvent("", "", None, raw))

    def _check_length(self) -> None:
        if len(self._buf) > MAX_PENDING:
            self._buf.clear()
            self._raw.clear()
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
