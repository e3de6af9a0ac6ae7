"""Reading paid work done outside one call as it is fetched: an Anthropic message batch's results and an OpenAI Batch
API output file (JSON Lines, one result per line), and a background response retrieved by id.

Results files can be large (a batch holds up to 100 000 requests): `ResultsTap` relays every chunk unchanged and reads
lines as they pass, never holding more than one line (at most `MAX_LINE` bytes; past that only the line's head and
tail are kept and its usage is read from the tail, where both providers put it). Usage is summed per model, so what a
retrieval keeps and records is bounded by the number of models, not of results. Who is charged is decided when the
retrieval ends (`objects.py`): the creator of the batch, once.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from typing import Callable

from ...flow.exchange import RequestInfo, ResponseSummary, TokenUsage, as_int
from ...flow.sse import SSEEvent
from .spend import usage_from

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a result line up to this is parsed whole
HEAD, TAIL = 4096, 64 * 1024  # of a longer line: kept to find its model (head) and its usage (tail)
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()

# (line as JSON) -> (result type, model, usage) of one result line; usage None when the result carries none
LineReader = Callable[[dict], tuple[str, str | None, TokenUsage | None]]


def anthropic_usage(u: dict, response_id: str | None) -> TokenUsage:
    """A result's usage, its counts read as every usage is (records.as_int: `1000.0` is 1000, a negative count
    is 0 and never offsets the other results summed with it)."""
    t = TokenUsage(response_id)
    for attr, key in (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                      ("cache_read_input_tokens", "cache_read_input_tokens"),
                      ("cache_write_input_tokens", "cache_creation_input_tokens")):
        setattr(t, attr, as_int(u.get(key)))
    return t


def anthropic_line(obj: dict) -> tuple[str, str | None, TokenUsage | None]:
    """`{"custom_id", "result": {"type": "succeeded", "message": {…, "usage": {…}}}}` (errored, canceled and
    expired results carry no message)."""
    result = obj.get("result") if isinstance(obj.get("result"), dict) else {}
    kind = result.get("type") if isinstance(result.get("type"), str) else "unknown"
    msg = result.get("message") if isinstance(result.get("message"), dict) else {}
    usage = msg.get("usage")
    model = msg.get("model") if isinstance(msg.get("model"), str) else None
    mid = msg.get("id") if isinstance(msg.get("id"), str) else None
    return kind, model, anthropic_usage(usage, mid) if isinstance(usage, dict) else None


def openai_line(obj: dict) -> tuple[str, str | None, TokenUsage | None]:
    """`{"id", "custom_id", "response": {"status_code", "request_id", "body": {…, "usage": {…}}}, "error"}`."""
    resp = obj.get("response") if isinstance(obj.get("response"), dict) else None
    body = resp.get("body") if resp is not None and isinstance(resp.get("body"), dict) else {}
    code = resp.get("status_code") if resp is not None else None
    kind = "succeeded" if isinstance(code, int) and 200 <= code < 300 else "errored"
    usage = body.get("usage")
    model = body.get("model") if isinstance(body.get("model"), str) else None
    rid = body.get("id") if isinstance(body.get("id"), str) else None
    return kind, model, usage_from(usage, rid) if isinstance(usage, dict) else None


class Tally:
    """What a results file said: results by type, and usage summed per model (exact sums, bounded memory)."""

    __slots__ = ("read_line", "usage_of", "by_model", "results", "kinds", "unreadable", "long_lines")

    def __init__(self, read_line: LineReader, usage_of: Callable[[dict, str | None], TokenUsage]) -> None:
        self.read_line, self.usage_of = read_line, usage_of
        self.by_model: dict[str, TokenUsage] = {}
        self.results: Counter = Counter()  # model -> results with usage
        self.kinds: Counter = Counter()  # result type -> results
        self.unreadable = 0  # lines that are not a result (not JSON, or too long to find a usage in)
        self.long_lines = 0  # lines past MAX_LINE whose usage was read from their tail

    def line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        if line[:1] != b"{":  # not a result (a CSV line, binary content, junk): not worth decoding
            self.unreadable += 1
            return
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            self.unreadable += 1
            return
        if not isinstance(obj, dict):
            self.unreadable += 1
            return
        kind, model, usage = self.read_line(obj)
        self.add(kind, model, usage)

    def long_line(self, head: bytes, tail: bytes) -> None:
        """A line past MAX_LINE: the last `"usage": {…}` of its tail (the providers put the usage after the content,
        so the last one is the result's own), and the first model named in its head."""
        usage = None
        for m in reversed(list(_USAGE_KEY.finditer(tail))[-3:]):  # a few tries: hostile tails repeat the key
            try:
                obj, _ = _DECODER.raw_decode(tail[m.end() - 1:].decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict):
                usage = self.usage_of(obj, None)
                break
        if usage is None:
            self.unreadable += 1
            return
        m = _MODEL.search(head)
        self.long_lines += 1
        self.add("succeeded", m.group(1).decode("utf-8", "replace") if m else None, usage)

    def add(self, kind: str, model: str | None, usage: TokenUsage | None) -> None:
        self.kinds[kind[:40]] += 1
        if usage is None:
            return
        model = (model or "")[:200]
        if model not in self.by_model and len(self.by_model) >= 1000:
            model = "other"  # hostile input naming a new model on every line stays bounded
        total = self.by_model.get(model)
        if total is None:
            total = self.by_model[model] = TokenUsage(None)
        total.input_tokens += usage.input_tokens
        total.output_tokens += usage.output_tokens
        total.cache_read_input_tokens += usage.cache_read_input_tokens
        total.cache_write_input_tokens += usage.cache_write_input_tokens
        self.results[model] += 1

    def usages(self) -> list[TokenUsage]:
        """One usage per model, the model and its number of results in its metadata."""
        out = []
        for model, u in sorted(self.by_model.items(), key=lambda kv: -self.results[kv[0]]):
            out.append(TokenUsage(None, u.input_tokens, u.output_tokens, u.cache_read_input_tokens,
                                  u.cache_write_input_tokens, {"model": model or None, "results": self.results[model]}))
        return out

    def facts(self) -> dict:
        out = {"results": dict(self.kinds)}
        if self.unreadable:
            out["unreadable_lines"] = self.unreadable
        if self.long_lines:
            out["long_lines"] = self.long_lines
        return out


class ResultsTap:
    """A ``flow.response.stream`` callable for a results file: passes every chunk on unchanged and tallies its lines
    on the way (on the event loop: per chunk the work is one pass over its bytes and the lines it ends)."""

    __slots__ = ("codec", "tally", "buf", "head", "tail", "_summary", "broken", "bytes_seen", "last_activity", "closed")

    def __init__(self, codec: "ResultsCodec") -> None:
        self.codec = codec
        self.tally = Tally(codec.read_line, codec.usage_of)
        self.buf = bytearray()  # the line being read (up to MAX_LINE)
        self.head: bytes | None = None  # a line past MAX_LINE: its first HEAD bytes, and its last TAIL bytes
        self.tail = bytearray()
        self._summary = ResponseSummary()
        self.broken: str | None = None
        self.bytes_seen = 0
        self.last_activity = time.time()  # epoch seconds, as the watch reads it (tap.StreamTap)
        self.closed = False

    @property
    def summary(self) -> ResponseSummary:
        """What the lines read so far said (read once the exchange is over; a download cut short: the results the
        client got, its last line too when it had all of it but the end of the body)."""
        if not self.closed and self.broken is None:
            self.closed = True
            try:
                self._line_done()
            except Exception as e:
                self.broken = f"{type(e).__name__}: {e}"
        s = self._summary
        s.usages[:] = self.tally.usages()
        s.state = self.tally.facts()
        s.model = s.usages[0].metadata["model"] if s.usages else None
        return s

    def __call__(self, chunk: bytes) -> bytes:
        self.last_activity = time.time()  # epoch seconds, as the watch reads it (tap.StreamTap)
        if not chunk:
            self._end()
            return b""
        self.bytes_seen += len(chunk)
        if self.broken is None:
            try:
                self._feed(chunk)
            except Exception as e:  # hostile output must not cut the client's download
                self.broken = f"{type(e).__name__}: {e}"
                log.warning("results parse stopped: %s", self.broken)
        return chunk

    def _feed(self, chunk: bytes) -> None:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            self._add(chunk[start:] if nl < 0 else chunk[start:nl])
            if nl < 0:
                return
            self._line_done()
            start = nl + 1

    def _add(self, piece: bytes) -> None:
        if not piece:
            return
        if self.head is not None:
            self.tail += piece
            if len(self.tail) > TAIL:
                del self.tail[:-TAIL]
        elif len(self.buf) + len(piece) > MAX_LINE:
            self.buf += piece
            self.head, self.tail = bytes(self.buf[:HEAD]), bytearray(self.buf[-TAIL:])
            self.buf = bytearray()
        else:
            self.buf += piece

    def _line_done(self) -> None:
        if self.head is not None:
            head, tail = self.head, bytes(self.tail)
            self.head, self.tail = None, bytearray()
            self.tally.long_line(head, tail)
        elif self.buf:
            line, self.buf = bytes(self.buf), bytearray()
            self.tally.line(line)

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.broken is None:
            try:
                self._line_done()
            except Exception as e:
                self.broken = f"{type(e).__name__}: {e}"
        self._summary.complete = self.broken is None

    def upstream_failed(self, message: str) -> bytes:
        """JSON Lines have no error event: the client sees its download end early (and reports it)."""
        self.closed = True
        return b""


class ResultsCodec:
    """The wire API of a results download: nothing to read in the request; the response is read by `ResultsTap`
    (a JSON error body by `summarize`)."""

    model_api = False
    ends_at_eof = True
    adapter = None
    array_responses = False
    retrieval = "results"

    def __init__(self, name: str, kind: str, read_line: LineReader,
                 usage_of: Callable[[dict, str | None], TokenUsage]) -> None:
        self.name, self.kind, self.read_line, self.usage_of = name, kind, read_line, usage_of

    def parse_request(self, body: dict, path: str = "") -> RequestInfo:
        return RequestInfo("", False, None, [])

    def prepare_request(self, body: dict) -> dict | None:
        return None

    def on_event(self, ev: SSEEvent, s: ResponseSummary) -> None:
        return None

    def finish_stream(self, s: ResponseSummary) -> None:
        return None

    def summarize(self, body: dict) -> ResponseSummary:
        s = ResponseSummary(complete=True)
        err = body.get("error")
        if isinstance(err, dict):
            s.error = f"{err.get('type') or err.get('code') or 'error'}: {err.get('message', '')}"
        return s

    def stream_error_event(self, message: str, s: ResponseSummary) -> bytes:
        return b""


def object_id(path: str, kind: str) -> str | None:
    """The provider object a retrieval path names: the batch of `…/batches/{id}/results`, the file of
    `…/files/{id}/content`, the response of `…/responses/{id}`."""
    parts = path.split("?")[0].rstrip("/").split("/")
    if kind in ("anthropic_batch", "openai_file") and len(parts) >= 2:
        return parts[-2]
    return parts[-1] if parts and parts[-1] else None


class RetrieveCodec:
    """A response created with `background: true`, retrieved by id (`GET /responses/{id}`, JSON or `?stream=true`
    server-sent events): read with the create API's own codec; complete only once the response reached a final
    status (completed, failed, incomplete, cancelled), when its usage is final."""

    model_api = False
    ends_at_eof = False
    adapter = None
    array_responses = False
    retrieval = "response"
    kind = "openai_response"
    FINAL = ("completed", "failed", "incomplete", "cancelled")

    def __init__(self, name: str, base) -> None:
        self.name, self.base = name, base
        self.gate = getattr(base, "gate", None)  # a retrieved response's tool calls are the client's to run too

    def parse_request(self, body: dict, path: str = "") -> RequestInfo:
        return RequestInfo("", False, None, [])

    def prepare_request(self, body: dict) -> dict | None:
        return None

    def on_event(self, ev: SSEEvent, s: ResponseSummary) -> None:
        self.base.on_event(ev, s)

    def finish_stream(self, s: ResponseSummary) -> None:
        self.base.finish_stream(s)

    def summarize(self, body: dict) -> ResponseSummary:
        s = self.base.summarize(body)
        s.complete = s.error is not None or body.get("status") in self.FINAL
        return s

    def stream_error_event(self, message: str, s: ResponseSummary) -> bytes:
        return self.base.stream_error_event(message, s)
