"""Per-API knowledge for the injected-tool loop: inject tools, hide injected tool use from the client's
stream while keeping indices/ids consistent, build the continuation request, and emit one final usage.

Each upstream round is also folded into a ResponseSummary by the API's codec, so recording sees every round.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from ..codecs import BY_API
from ..records import ResponseSummary, ToolCall
from ..sse import SSEEvent
from .registry import InjectedTool


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


def sse(obj: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _json_or_none(data: str) -> dict | None:
    if not data or data[0] != "{":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


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

    api = ""

    def __post_init__(self) -> None:
        """Subclasses set up their per-API state here."""

    @property
    def codec(self):
        return BY_API[self.api]

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

    def _round_calls(self) -> list[PendingCall]:
        return [PendingCall(t.call_id or "", t.name, t.input) for t in self.summary.tool_calls]


# --- Anthropic Messages ---------------------------------------------------------------------------


class AnthropicAdapter(Adapter):
    api = "anthropic.messages"

    def __post_init__(self) -> None:
        self.first: dict | None = None  # the first round's message (id, model, usage)
        self.next_index = 0
        self.index_map: dict[int, int | None] = {}
        self.blocks: dict[int, dict] = {}
        self.round_blocks: list[dict] = []
        self.client_blocks: list[dict] = []  # blocking: what the client sees, all rounds
        self.stop_reason: str | None = None
        self.stop_sequence = None
        self.usage = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}

    def inject(self) -> dict:
        own = self.body.get("tools") or []
        extra = [{"name": t.name, "description": t.description, "input_schema": t.input_schema}
                 for t in self._room(len(own))]
        self.body = {**self.body, "tools": own + extra}
        return self.body

    def _add_usage(self) -> None:
        for u in self.summary.usages:
            self.usage["input_tokens"] += u.input_tokens
            self.usage["output_tokens"] += u.output_tokens
            self.usage["cache_read_input_tokens"] += u.cache_read_input_tokens
            self.usage["cache_creation_input_tokens"] += u.cache_write_input_tokens

    def on_event(self, ev: SSEEvent) -> list[bytes]:
        self.fold(ev)
        obj = _json_or_none(ev.data)
        if obj is None:
            return []
        kind = obj.get("type") or ev.event
        if kind == "message_start":
            self.index_map, self.blocks, self.round_blocks = {}, {}, []
            if self.first is None:
                self.first = obj.get("message") or {}
                return [sse(obj, "message_start")]
            return []
        if kind == "content_block_start":
            idx, block = obj.get("index"), dict(obj.get("content_block") or {})
            self.blocks[idx] = block
            if block.get("type") == "tool_use" and block.get("name") in self.tools:
                self.index_map[idx] = None
                return []
            self.index_map[idx] = self.next_index
            self.next_index += 1
            return [sse({**obj, "index": self.index_map[idx]}, "content_block_start")]
        if kind == "content_block_delta":
            idx, delta = obj.get("index"), obj.get("delta") or {}
            b = self.blocks.get(idx)
            if b is not None:
                dt = delta.get("type")
                if dt == "text_delta":
                    b["text"] = b.get("text", "") + delta.get("text", "")
                elif dt == "thinking_delta":
                    b["thinking"] = b.get("thinking", "") + delta.get("thinking", "")
                elif dt == "signature_delta":
                    b["signature"] = delta.get("signature")
                elif dt == "input_json_delta":
                    b["_json"] = b.get("_json", "") + delta.get("partial_json", "")
                elif dt == "citations_delta":
                    b.setdefault("citations", []).append(delta.get("citation"))
            mapped = self.index_map.get(idx)
            return [] if mapped is None else [sse({**obj, "index": mapped}, "content_block_delta")]
        if kind == "content_block_stop":
            idx = obj.get("index")
            b = self.blocks.get(idx)
            if b is not None:
                if "_json" in b:
                    raw = b.pop("_json")
                    try:
                        b["input"] = json.loads(raw) if raw else (b.get("input") or {})
                    except ValueError:
                        b["input"] = {}
                self.round_blocks.append(b)
            mapped = self.index_map.get(idx)
            return [] if mapped is None else [sse({**obj, "index": mapped}, "content_block_stop")]
        if kind == "message_delta":
            delta = obj.get("delta") or {}
            self.stop_reason = delta.get("stop_reason") or self.stop_reason
            self.stop_sequence = delta.get("stop_sequence")
            return []
        if kind == "message_stop":
            self._add_usage()
            return []
        if kind == "error":
            return [sse(obj, "error")]
        return [sse(obj, kind)]  # ping and anything new: pass on

    def on_body(self, obj: dict) -> None:
        self.fold_body(obj)
        if self.first is None:
            self.first = obj
        self.round_blocks = list(obj.get("content") or [])
        self.client_blocks += [b for b in self.round_blocks
                               if not (b.get("type") == "tool_use" and b.get("name") in self.tools)]
        self.stop_reason = obj.get("stop_reason")
        self.stop_sequence = obj.get("stop_sequence")
        self._add_usage()

    def continuation(self, results: list[ToolResult]) -> dict:
        assistant = [{k: v for k, v in b.items() if not k.startswith("_")} for b in self.round_blocks]
        tool_results = [
            {"type": "tool_result", "tool_use_id": r.call.call_id, "content": r.text, **({"is_error": True} if r.is_error else {})}
            for r in results
        ]
        messages = list(self.body.get("messages") or [])
        messages += [{"role": "assistant", "content": assistant}, {"role": "user", "content": tool_results}]
        self.body = {**self.body, "messages": messages}
        return self.body

    def finish_stream(self, note: str | None) -> list[bytes]:
        out = []
        stop = self.stop_reason
        if note:
            i = self.next_index
            out += [sse({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}, "content_block_start"),
                    sse({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": note}}, "content_block_delta"),
                    sse({"type": "content_block_stop", "index": i}, "content_block_stop")]
            stop = "end_turn"
        out.append(sse({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": self.stop_sequence},
                        "usage": dict(self.usage)}, "message_delta"))
        out.append(sse({"type": "message_stop"}, "message_stop"))
        return out

    def finish_body(self, note: str | None) -> bytes:
        msg = dict(self.first or {})
        content = list(self.client_blocks)
        stop = self.stop_reason
        if note:
            content.append({"type": "text", "text": note})
            stop = "end_turn"
        msg.update(content=content, stop_reason=stop, stop_sequence=self.stop_sequence,
                   usage={**(msg.get("usage") or {}), **self.usage})
        return json.dumps(msg).encode()

    def error_event(self, message: str) -> bytes:
        return sse({"type": "error", "error": {"type": "api_error", "message": message}}, "error")


# --- OpenAI Chat Completions ----------------------------------------------------------------------


class ChatAdapter(Adapter):
    api = "openai.chat"

    def __post_init__(self) -> None:
        self.first: dict | None = None
        self.next_index = 0
        self.call_map: dict[tuple[int, int], int | None] = {}
        self.round_text: list[str] = []
        self.round_calls: dict[tuple[int, int], dict] = {}
        self.client_text: list[str] = []
        self.client_calls: list[dict] = []
        self.finish_reason: str | None = None
        self.prompt = self.completion = self.cached = 0

    def inject(self) -> dict:
        own = self.body.get("tools") or []
        extra = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                    "parameters": t.input_schema}}
                 for t in self._room(len(own))]
        self.body = {**self.body, "tools": own + extra}
        return self.body

    def begin_round(self) -> None:
        super().begin_round()
        self.call_map, self.round_text, self.round_calls = {}, [], {}

    def _add_usage(self) -> None:
        for u in self.summary.usages:
            self.prompt += u.input_tokens + u.cache_read_input_tokens
            self.completion += u.output_tokens
            self.cached += u.cache_read_input_tokens

    def on_event(self, ev: SSEEvent) -> list[bytes]:
        self.fold(ev)
        if ev.data.strip() == "[DONE]":
            self._add_usage()
            return []
        obj = _json_or_none(ev.data)
        if obj is None:
            return []
        if "error" in obj and not obj.get("choices"):
            return [sse(obj)]
        if self.first is None:
            self.first = {k: obj.get(k) for k in ("id", "object", "created", "model", "system_fingerprint", "service_tier")}
        obj["id"] = self.first["id"]
        obj.pop("usage", None)
        choices = []
        for choice in obj.get("choices") or []:
            choice = copy.deepcopy(choice)
            delta = choice.get("delta") or {}
            if self.round_no > 1:
                delta.pop("role", None)
            if isinstance(delta.get("content"), str):
                self.round_text.append(delta["content"])
            kept = []
            for tc in delta.get("tool_calls") or []:
                key = (choice.get("index", 0), tc.get("index", 0))
                call = self.round_calls.setdefault(key, {"id": None, "name": "", "args": ""})
                fn = tc.get("function") or {}
                call["id"] = tc.get("id") or call["id"]
                call["name"] = fn.get("name") or call["name"]
                call["args"] += fn.get("arguments") or ""
                if key not in self.call_map:
                    injected = call["name"] in self.tools
                    self.call_map[key] = None if injected else self.next_index
                    if not injected:
                        self.next_index += 1
                if self.call_map[key] is not None:
                    kept.append({**tc, "index": self.call_map[key]})
            if "tool_calls" in delta:
                if kept:
                    delta["tool_calls"] = kept
                else:
                    delta.pop("tool_calls")
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                choice["finish_reason"] = None
            choice["delta"] = delta
            if delta:  # chunks left empty by filtering (injected calls, held finish) are dropped
                choices.append(choice)
        if not choices:
            return []
        obj["choices"] = choices
        return [sse(obj)]

    def on_body(self, obj: dict) -> None:
        self.fold_body(obj)
        if self.first is None:
            self.first = obj
        choice = (obj.get("choices") or [{}])[0]
        msg = choice.get("message") or {}
        self.finish_reason = choice.get("finish_reason")
        self.round_text = [msg["content"]] if isinstance(msg.get("content"), str) else []
        self.round_calls = {(0, i): {"id": tc.get("id"), "name": (tc.get("function") or {}).get("name", ""),
                                     "args": (tc.get("function") or {}).get("arguments", "")}
                            for i, tc in enumerate(msg.get("tool_calls") or [])}
        self.client_text += self.round_text
        self.client_calls += [tc for tc in msg.get("tool_calls") or []
                              if (tc.get("function") or {}).get("name") not in self.tools]
        self._add_usage()

    def continuation(self, results: list[ToolResult]) -> dict:
        calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
                 for c in self.round_calls.values()]
        text = "".join(self.round_text)
        messages = list(self.body.get("messages") or [])
        messages.append({"role": "assistant", "content": text or None, "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": r.call.call_id, "content": r.text} for r in results]
        self.body = {**self.body, "messages": messages}
        return self.body

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion, "prompt_tokens_details": {"cached_tokens": self.cached}}

    def finish_stream(self, note: str | None) -> list[bytes]:
        base = {k: v for k, v in (self.first or {}).items() if v is not None}
        base.setdefault("object", "chat.completion.chunk")
        out = []
        finish = self.finish_reason
        if note:
            out.append(sse({**base, "choices": [{"index": 0, "delta": {"content": note}, "finish_reason": None}]}))
            finish = "stop"
        out.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        if self.client_wants_usage:
            out.append(sse({**base, "choices": [], "usage": self._usage()}))
        out.append(b"data: [DONE]\n\n")
        return out

    def finish_body(self, note: str | None) -> bytes:
        obj = copy.deepcopy(self.first or {})
        choice = (obj.get("choices") or [{"index": 0, "message": {"role": "assistant"}}])[0]
        msg = choice.setdefault("message", {"role": "assistant"})
        text = "".join(self.client_text) + (note or "")
        msg["content"] = text or None
        if self.client_calls:
            msg["tool_calls"] = self.client_calls
        else:
            msg.pop("tool_calls", None)
        choice["finish_reason"] = "stop" if note else self.finish_reason
        obj["choices"] = [choice]
        obj["usage"] = self._usage()
        return json.dumps(obj).encode()

    def error_event(self, message: str) -> bytes:
        return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


# --- OpenAI Responses -----------------------------------------------------------------------------


class ResponsesAdapter(Adapter):
    api = "openai.responses"

    def __post_init__(self) -> None:
        self.first: dict | None = None
        self.seq = 0
        self.next_index = 0
        self.index_map: dict[int, int | None] = {}
        self.injected_items: set[str] = set()
        self.round_items: list[dict] = []
        self.client_items: list[dict] = []
        self.final: dict | None = None
        self.final_kind = "response.completed"
        self.usage = {"input_tokens": 0, "cached": 0, "output_tokens": 0, "reasoning": 0}
        self.client_tool_names: set = set()

    def inject(self) -> dict:
        own = self.body.get("tools") or []
        self.client_tool_names = {t.get("name") for t in own if isinstance(t, dict)}
        extra = [{"type": "function", "name": t.name, "description": t.description,
                  "parameters": t.input_schema, "strict": False}
                 for t in self._room(len(own))]
        self.body = {**self.body, "tools": own + extra}
        return self.body

    def begin_round(self) -> None:
        super().begin_round()
        self.index_map, self.round_items = {}, []

    def _out(self, obj: dict, kind: str) -> bytes:
        obj = {**obj, "sequence_number": self.seq}
        self.seq += 1
        return sse(obj, kind)

    def _add_usage(self, resp: dict) -> None:
        u = resp.get("usage") or {}
        self.usage["input_tokens"] += u.get("input_tokens") or 0
        self.usage["cached"] += (u.get("input_tokens_details") or {}).get("cached_tokens") or 0
        self.usage["output_tokens"] += u.get("output_tokens") or 0
        self.usage["reasoning"] += (u.get("output_tokens_details") or {}).get("reasoning_tokens") or 0

    def _usage(self) -> dict:
        u = self.usage
        return {"input_tokens": u["input_tokens"], "input_tokens_details": {"cached_tokens": u["cached"]},
                "output_tokens": u["output_tokens"], "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                "total_tokens": u["input_tokens"] + u["output_tokens"]}

    def _is_injected(self, item: dict) -> bool:
        return item.get("type") == "function_call" and item.get("name") in self.tools

    def _hide_tools(self, resp: dict) -> dict:
        """Response objects echo the request's tools: the client sees only its own."""
        if isinstance(resp.get("tools"), list):
            own = self.client_tool_names
            resp = {**resp, "tools": [t for t in resp["tools"] if not (
                isinstance(t, dict) and t.get("type") == "function" and t.get("name") not in own)]}
        return resp

    def on_event(self, ev: SSEEvent) -> list[bytes]:
        self.fold(ev)
        obj = _json_or_none(ev.data)
        if obj is None:
            return []
        kind = obj.get("type") or ev.event
        if kind in ("response.created", "response.in_progress", "response.queued"):
            if self.first is None or (self.round_no == 1 and kind != "response.created"):
                if self.first is None:
                    self.first = obj.get("response") or {}
                return [self._out({**obj, "response": self._hide_tools(obj.get("response") or {})}, kind)]
            return []
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.final, self.final_kind = obj.get("response") or {}, kind
            self._add_usage(self.final)
            return []
        if kind == "error":
            return [self._out(obj, kind)]
        if "output_index" in obj:
            oi = obj["output_index"]
            if kind == "response.output_item.added":
                item = obj.get("item") or {}
                if self._is_injected(item):
                    self.index_map[oi] = None
                else:
                    self.index_map[oi] = self.next_index
                    self.next_index += 1
            if kind == "response.output_item.done":
                item = obj.get("item") or {}
                self.round_items.append(item)
                if self.index_map.get(oi) is not None:
                    self.client_items.append(item)
            mapped = self.index_map.get(oi)
            if mapped is None:
                return []
            obj = {**obj, "output_index": mapped}
        return [self._out(obj, kind)]

    def on_body(self, obj: dict) -> None:
        self.fold_body(obj)
        if self.first is None:
            self.first = obj
        self.final, self.final_kind = obj, "response.completed"
        self.round_items = list(obj.get("output") or [])
        self.client_items += [i for i in self.round_items if not self._is_injected(i)]
        self._add_usage(obj)

    def continuation(self, results: list[ToolResult]) -> dict:
        outputs = [{"type": "function_call_output", "call_id": r.call.call_id, "output": r.text} for r in results]
        final = self.final or {}
        if final.get("store") and final.get("id"):
            # The provider kept the conversation: continue from this response, sending only the outputs.
            self.body = {**self.body, "previous_response_id": final["id"], "input": outputs}
        else:
            prior = self.body.get("input")
            if isinstance(prior, str):
                prior = [{"role": "user", "content": prior}]
            self.body = {**self.body, "input": list(prior or []) + self.round_items + outputs}
        return self.body

    def _merged(self, note: str | None) -> dict:
        resp = copy.deepcopy(self.final or self.first or {})
        if self.first and self.first.get("id"):
            resp["id"] = self.first["id"]
        items = list(self.client_items)
        if note:
            items.append({"type": "message", "role": "assistant", "status": "completed", "id": "msg_aibridge_note",
                          "content": [{"type": "output_text", "text": note, "annotations": []}]})
        resp["output"] = items
        resp["usage"] = self._usage()
        return self._hide_tools(resp)

    def finish_stream(self, note: str | None) -> list[bytes]:
        out = []
        if note:
            item = {"type": "message", "role": "assistant", "status": "completed", "id": "msg_aibridge_note",
                    "content": [{"type": "output_text", "text": note, "annotations": []}]}
            out += [self._out({"type": "response.output_item.added", "output_index": self.next_index, "item": item},
                              "response.output_item.added"),
                    self._out({"type": "response.output_item.done", "output_index": self.next_index, "item": item},
                              "response.output_item.done")]
        out.append(self._out({"type": self.final_kind, "response": self._merged(note)}, self.final_kind))
        return out

    def finish_body(self, note: str | None) -> bytes:
        return json.dumps(self._merged(note)).encode()

    def error_event(self, message: str) -> bytes:
        return self._out({"type": "error", "code": "server_error", "message": message, "param": None}, "error")


ADAPTERS: dict[str, type[Adapter]] = {
    "anthropic.messages": AnthropicAdapter,
    "openai.chat": ChatAdapter,
    "openai.responses": ResponsesAdapter,
}


def injected_call_record(call: PendingCall, tool: InjectedTool, response_id: str | None,
                         error: str | None) -> ToolCall:
    return ToolCall(response_id, call.call_id, call.name, call.arguments, injected=True,
                    server_url=tool.server.url, error=error)
