"""What the gateway learns about one provider exchange, independent of the wire format."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

BIGINT_MAX = 2**63 - 1  # the token columns' type (BIGINT in DuckDB and PostgreSQL)
TOKEN_COUNTS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens")
CLAMPED = "usage_clamped"  # usage metadata: the counts the provider sent beyond BIGINT_MAX, clamped to it


@dataclass(slots=True)
class TokenUsage:
    provider_response_id: str | None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    # Not the provider's final figure: the stream ended (client gone past the drain, upstream cut) before it came,
    # so this is the best the stream gave (Anthropic: message_start's input, the last message_delta's output).
    estimated: bool = False

    @property
    def clamped(self) -> bool:
        """A count was beyond what the store holds: recorded clamped, charged to no budget."""
        return bool(self.metadata.get(CLAMPED))

    def bound(self) -> bool:
        """Make every count one the store holds (0..BIGINT_MAX); a count beyond BIGINT_MAX is clamped and named in
        metadata["usage_clamped"]. Returns whether any was clamped (idempotent)."""
        over = []
        for name in TOKEN_COUNTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                setattr(self, name, as_int(v))
                v = getattr(self, name)
            if v > BIGINT_MAX:
                setattr(self, name, BIGINT_MAX)
                over.append(name)
        if over:
            self.metadata[CLAMPED] = sorted(set(over) | set(self.metadata.get(CLAMPED) or ()))
        return self.clamped

    @classmethod
    def cached_inside(cls, response_id: str | None, input_with_cached: int, cached: int, output: int,
                      metadata: dict[str, Any]) -> "TokenUsage":
        """For providers whose input count includes the cached tokens (OpenAI): split them out, so input +
        cache_read is what the provider reported and nothing is counted (or priced) twice."""
        return cls(response_id, input_tokens=max(input_with_cached - cached, 0), output_tokens=output,
                   cache_read_input_tokens=cached, metadata=metadata)


@dataclass(slots=True)
class TokenTotals:
    """The sum of a call's usages (one per upstream round)."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0

    @classmethod
    def of(cls, usages: "list[TokenUsage]") -> "TokenTotals":
        i = o = r = w = 0
        for u in usages:
            i += u.input_tokens
            o += u.output_tokens
            r += u.cache_read_input_tokens
            w += u.cache_write_input_tokens
        return cls(i, o, r, w)

    @property
    def all(self) -> int:
        return self.input + self.output + self.cache_read + self.cache_write


@dataclass(slots=True)
class ToolCall:
    provider_response_id: str | None
    call_id: str | None
    name: str
    input: str  # JSON text (or raw text for custom tools) exactly as the model produced it
    injected: bool = False  # a gateway-run MCP tool
    server_url: str | None = None
    error: str | None = None  # why an injected call failed or was not run


@dataclass(slots=True)
class Thought:
    source: str  # thinking | reasoning_summary | commentary
    content: str


@dataclass(slots=True)
class RequestInfo:
    """What a codec reads from a request body."""

    model: str
    stream: bool
    prompt: str | None
    tool_result_ids: list[str]
    session_hint: str | None = None
    raw_stream_options: dict | None = None  # as the client sent them (the gateway may add include_usage)
    facts: dict | None = None  # more the record keeps in its metadata (a batch's request count, `background`)


@dataclass
class ResponseSummary:
    """What a codec reads from a response, streamed or whole; filled in progressively."""

    response_id: str | None = None
    model: str | None = None
    usages: list[TokenUsage] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    thoughts: list[Thought] = field(default_factory=list)
    error: str | None = None  # provider-reported failure (error event, failed status)
    complete: bool = False  # saw the API's terminal event / a whole body
    finish_reasons: list[str] = field(default_factory=list)  # why the model stopped (per choice), as the API says
    output_text: list[str] = field(default_factory=list)  # the model's text, in pieces, when `keep_text`
    # Whether codecs gather the model's text into `output_text`: only telemetry's content needs it (set by
    # telemetry.Telemetry.configure), so without it no stream's text is held.
    keep_text: ClassVar[bool] = False
    state: Any = field(default=None, repr=False)  # a codec's private streaming state


class BadRequest(Exception):
    """The client's body is not the API's shape; answered with a provider-format 400."""


def as_int(v: Any) -> int:
    """A token count as providers send it: an int, or a float with an integral value (1000.0); a fraction rounds to
    the nearest count. Negative, NaN and anything else count 0; +inf and huge values stay above BIGINT_MAX, for
    `TokenUsage.bound` to clamp and flag."""
    if isinstance(v, bool):
        return 0
    if isinstance(v, int):
        return v if v > 0 else 0
    if isinstance(v, float):
        if math.isnan(v) or v <= 0:
            return 0
        if math.isinf(v):
            return BIGINT_MAX + 1
        return int(v) if v.is_integer() else int(round(v))
    return 0


def json_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def summary_to_dict(s: ResponseSummary) -> dict:
    """A summary as plain data, kept on the flow so replay can rebuild what the live run recorded."""
    from dataclasses import asdict

    d = {k: v for k, v in asdict(s).items() if k not in ("state", "output_text")}
    return d


def summary_from_dict(d: dict) -> ResponseSummary:
    return ResponseSummary(
        response_id=d.get("response_id"),
        model=d.get("model"),
        usages=[TokenUsage(**u) for u in d.get("usages", [])],
        tool_calls=[ToolCall(**t) for t in d.get("tool_calls", [])],
        thoughts=[Thought(**t) for t in d.get("thoughts", [])],
        error=d.get("error"),
        complete=d.get("complete", False),
        finish_reasons=list(d.get("finish_reasons") or ()),
    )
