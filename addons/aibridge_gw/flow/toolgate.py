"""The tool gate: every tool call a model emits for the client to run is shown to a policy's `decide` before the
client sees it; a refused call is replaced by a text saying why, and the turn ends cleanly in the API's own format.

This module is the API-independent part. Each wire API (`apis/wire/…`) brings its own `ToolGate` (its `gate`
attribute): a `StreamGate` subclass for its server-sent events and a function that rewrites a whole JSON response.
The callers (the pipeline, the injected-tool loop) only use what is here:

- `stream_gate(codec, decide)` → a `StreamGate` for one streamed response (None: the API has no tool calls to gate);
  `StreamTap(codec, framing, gate=…)` drives it. Without a tap, `SSEGate` gates a byte stream by itself.
- `gate_body(codec, body, decide)` → the rewritten blocking response, or None when nothing was refused.
- `check(decide, call)` → one decision, failing closed (the loop asks it before running an injected call).

`decide` is the caller's: it evaluates the rules (synchronously, in microseconds) and records the decision itself. The
gate calls it exactly once per complete tool call, in stream order, with the arguments exactly as the model produced
them (the text the client would have received; a blocking response's parsed input re-encoded as compact JSON).

A stream gate holds only the events of a tool call until its arguments are complete; everything else passes the
moment it is parsed, unchanged (the event's own bytes). Nothing is reordered: an event that arrives while a call is
held waits behind it (in practice only keep-alives and pings: the APIs stream one block at a time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .sse import SSEEvent, SSEParser

log = logging.getLogger(__name__)

PREFIX = "aibridge policy"


@dataclass(frozen=True, slots=True)
class GateCall:
    """One complete tool call, as the client would receive it."""

    name: str
    input: str  # the arguments' JSON text exactly as the model produced it (raw text for custom tools)
    call_id: str | None
    api: str  # the wire API's name (anthropic.messages, openai.chat, openai.responses, gemini.generate_content, …)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A policy rule's no: the client sees `text` instead of the call."""

    rule: str
    message: str

    @property
    def text(self) -> str:
        return f"{PREFIX} {self.rule}: {self.message}"


Decide = Callable[[GateCall], "Refusal | None"]

# What a failing `decide` means: the call is refused (the gate fails closed), the error is logged.
POLICY_ERROR = Refusal("error", "the tool policy could not be evaluated; the call was not passed on")


def check(decide: Decide, call: GateCall) -> Refusal | None:
    """`decide(call)`, failing closed: an exception (a bug in a rule) refuses the call instead of passing it."""
    try:
        verdict = decide(call)
    except Exception:
        log.exception("aibridge: the tool policy failed on %s (%s); the call is refused", call.name, call.api)
        return POLICY_ERROR
    if verdict is not None and not isinstance(verdict, Refusal):
        log.error("aibridge: the tool policy answered %r for %s; the call is refused", verdict, call.name)
        return POLICY_ERROR
    return verdict


class Held:
    """One tool call's events, held until it is decided. `out` is what replaces them once it is (None: undecided).

    Events that are not the call's but arrive while it is the last one held (a ping, a keep-alive) join it in
    `parts`, in stream order, and in `others`: an allowed call is released exactly as the bytes came; a refused one's
    replacement is followed by those others."""

    __slots__ = ("parts", "others", "out", "info")

    def __init__(self, info: Any = None) -> None:
        self.parts: list[Any] = []  # everything held, in stream order (bytes, or what the API's gate renders later)
        self.others: list[Any] = []  # the parts that are not the call's
        self.out: list[Any] | None = None
        self.info = info  # the API's own facts about the call

    def release(self) -> None:
        self.out = self.parts

    def replace(self, replacement: list[Any]) -> None:
        self.out = replacement + self.others


class StreamGate:
    """The gate of one streamed response. Subclasses (one per wire API) implement `on_event`; the base keeps the
    order: what an event releases is appended to the output queue, which is flushed up to the first call still held.

    `feed(ev)` takes one parsed event with its bytes (`ev.raw`, from an `SSEParser(keep_raw=True)`) and returns the
    bytes to send now; `finish()` is called once at the end of the stream (decides what is still held: a stream that
    ends early gets the call as far as it came, if allowed, then the tap's error event); `tail(sse)` adapts bytes the
    gateway appends after the stream (an error event) to what the gate already sent (numbering)."""

    def __init__(self, api: str, decide: Decide) -> None:
        self.api = api
        self.decide = decide
        self._queue: list[Any] = []  # bytes or Held, in stream order; starts with a Held whenever it is non-empty
        # Every decision, in order: the refused calls of a response (what a stored Responses response still owes).
        self.decided: list[tuple[GateCall, Refusal | None]] = []

    # --- the interface ---------------------------------------------------------------------------------------

    def feed(self, ev: SSEEvent) -> bytes:
        if not ev.event:  # no event: a comment or a keep-alive
            raw = ev.raw or b""
            if self._queue:
                self.emit(raw)
                return b""
            return raw
        self.on_event(ev)
        return self._flush()

    def finish(self) -> bytes:
        self.on_end()
        for item in self._queue:
            if isinstance(item, Held) and item.out is None:  # a subclass left it undecided: it is not passed on
                log.warning("aibridge: an undecided tool call was dropped at the end of a %s stream", self.api)
                item.replace([])
        return self._flush()

    def tail(self, sse: bytes) -> bytes:
        return sse

    # --- for subclasses --------------------------------------------------------------------------------------

    def on_event(self, ev: SSEEvent) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        """The stream ended: decide every call still held."""

    def emit(self, item: Any) -> None:
        """Send this (bytes, or what `render` turns into bytes) after everything before it."""
        q = self._queue
        if q and isinstance(q[-1], Held) and q[-1].out is None:
            q[-1].parts.append(item)  # inside a held call's events: kept in their order
            q[-1].others.append(item)
        else:
            q.append(item)

    def hold(self, info: Any = None) -> Held:
        h = Held(info)
        self._queue.append(h)
        return h

    def ask(self, call: GateCall) -> Refusal | None:
        verdict = check(self.decide, call)
        self.decided.append((call, verdict))
        return verdict

    @property
    def holding(self) -> bool:
        return bool(self._queue)

    def render(self, item: Any) -> bytes:
        """The bytes of one queued item (subclasses queue parsed events they render late, e.g. to renumber)."""
        return item

    def _flush(self) -> bytes:
        q = self._queue
        if not q:
            return b""
        out: list[bytes] = []
        i = 0
        for i, item in enumerate(q):
            if isinstance(item, Held):
                if item.out is None:
                    break
                out += [self.render(x) for x in item.out]
            else:
                out.append(self.render(item))
        else:
            i = len(q)
        del q[:i]
        return b"".join(out)

    @staticmethod
    def raw_of(ev: SSEEvent) -> bytes:
        """The event's bytes as they came (re-serialised only for an event from a parser that did not keep them)."""
        if ev.raw is not None:
            return ev.raw
        head = f"event: {ev.event}\n" if ev.event and ev.event != "message" else ""
        body = "".join(f"data: {line}\n" for line in ev.data.split("\n"))
        return f"{head}{body}\n".encode()


@dataclass(frozen=True)
class ToolGate:
    """What a wire API brings (its `gate` attribute): the gate of a stream, and the rewrite of a whole response."""

    stream: Callable[[str, Decide], StreamGate]  # (the API's name, decide) → a gate for one response
    body: Callable[[Any, str, Decide], Any]  # (a response body, the API's name, decide) → a new body, or None


def stream_gate(codec: Any, decide: Decide) -> StreamGate | None:
    """A gate for one streamed response of this wire API (None: the API has no tool calls to gate)."""
    spec: ToolGate | None = getattr(codec, "gate", None)
    return None if spec is None else spec.stream(codec.name, decide)


def gate_body(codec: Any, body: Any, decide: Decide) -> Any:
    """A blocking response with every refused tool call replaced (the API's `ToolGate.body`); None when the API has
    no gate, the body is not a response it knows, or no call was refused (the body is then relayed as it came)."""
    spec: ToolGate | None = getattr(codec, "gate", None)
    if spec is None or not isinstance(body, (dict, list)):
        return None
    return spec.body(body, codec.name, decide)


class SSEGate:
    """A stream gate over bytes: parses server-sent events itself (the injected-tool loop's client-visible output,
    which no tap reads). `feed(data)` returns the bytes to send now; `finish()` the rest, once, at the end."""

    def __init__(self, gate: StreamGate) -> None:
        self.gate = gate
        self.parser = SSEParser(keep_raw=True)

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        return b"".join([self.gate.feed(ev) for ev in self.parser.feed(data)])

    def finish(self) -> bytes:
        out = [self.gate.feed(ev) for ev in self.parser.feed(b"")]
        out.append(self.gate.finish())
        return b"".join(out)
