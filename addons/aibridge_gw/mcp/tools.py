"""What the injected-tool loop works with: the tools it injects, the calls a round produced, and the base
of the per-API adapters (each lives in its wire API's module, `apis/…`).

An adapter injects tools, hides injected tool use from the client's stream while keeping indices/ids
consistent, builds the continuation request and emits one final usage. Each upstream round is also folded into
a ResponseSummary by the API's codec, so recording sees every round.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..flow.exchange import ResponseSummary, ToolCall
from ..flow.sse import SSEEvent

MAX_TOOL_NAME = 64  # what model APIs accept in a tool name (Anthropic, OpenAI, Gemini): ^[a-zA-Z0-9_-]{1,64}$
_TOOL_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def model_tool_name(name: str, limit: int = MAX_TOOL_NAME) -> str:
    """`name` as model APIs accept it, in at most `limit` characters: unchanged when it fits; otherwise its other
    characters made `_` and cut to fit, ending in `_` and 8 hex digits of the whole name's hash (two long names
    sharing a beginning stay apart, and the same name always becomes the same)."""
    if len(name) <= limit and _TOOL_CHARS.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return _BAD_CHARS.sub("_", name)[: limit - 9] + "_" + digest


@dataclass(frozen=True)
class InjectedTool:
    name: str  # bmcp_<server>_<tool>, what the model sees
    server: Any  # config.McpServer
    tool: str  # the server's own tool name
    description: str
    input_schema: dict = field(hash=False, compare=False)


@dataclass
class PendingCall:
    call_id: str
    name: str
    arguments: str  # JSON text as the model produced it


@dataclass
class RoundEnd:
    summary: ResponseSummary
    injected: list[PendingCall]
    client_calls: bool


@dataclass
class ToolResult:
    call: PendingCall
    text: str
    is_error: bool



@dataclass
class Adapter:
    body: dict
    tools: dict[str, InjectedTool]
    stream: bool
    max_tools: int = 128
    client_wants_usage: bool = True
    round_no: int = 0
    summary: ResponseSummary = field(default_factory=ResponseSummary)
    trimmed: int = 0

    codec: ClassVar[Any]  # the API's WireApi, set when the API registers its adapter

    def __post_init__(self) -> None:
        """Subclasses set up their per-API state here."""

    def begin_round(self) -> None:
        self.round_no += 1
        self.summary = ResponseSummary()

    def fold(self, ev: SSEEvent) -> None:
        self.codec.on_event(ev, self.summary)

    def fold_body(self, obj: dict) -> None:
        self.summary = self.codec.summarize(obj)

    def round_end(self) -> RoundEnd:
        self.codec.finish_stream(self.summary)
        injected = [c for c in self._round_calls() if c.name in self.tools]
        client = any(t.name not in self.tools for t in self.summary.tool_calls)
        return RoundEnd(self.summary, injected, client)

    def _room(self, existing: int) -> list[InjectedTool]:
        """Injected tools that fit beside the client's own under the provider's tool-count limit."""
        room = max(self.max_tools - existing, 0)
        tools = list(self.tools.values())
        self.trimmed = max(len(tools) - room, 0)
        kept = tools[:room]
        self.tools = {t.name: t for t in kept}
        return kept

    def error_event(self, message: str) -> bytes:
        """The API's own mid-stream error event (the same bytes a failed relayed stream ends with)."""
        return self.codec.stream_error_event(message, self.summary)

    def _round_calls(self) -> list[PendingCall]:
        return [PendingCall(t.call_id or "", t.name, t.input) for t in self.summary.tool_calls]


def injected_call_record(call: PendingCall, tool: InjectedTool, response_id: str | None,
                         error: str | None) -> ToolCall:
    return ToolCall(response_id, call.call_id, call.name, call.arguments, injected=True,
                    server_url=tool.server.url or f"stdio:{tool.server.command}", error=error)
