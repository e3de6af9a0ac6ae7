"""OpenAI Chat Completions API (POST /v1/chat/completions), also spoken by OpenAI-compatible servers."""

from __future__ import annotations

import copy
import json

from ...flow.exchange import (
    BadRequest,
    RequestInfo,
    ResponseSummary,
    Thought,
    TokenTotals,
    TokenUsage,
    ToolCall,
    as_int,
)
from ...flow.sse import SSEEvent
from ...mcp.tools import Adapter, ToolResult
from ..base import (
    WireFunctions,
    load_json_event,
    require_model,
    require_objects,
    require_stream_flag,
    sse_bytes,
    text_of,
)


def parse_request(body: dict, path: str = "") -> RequestInfo:
    model = require_model(body)
    stream = require_stream_flag(body)
    messages = require_objects(body, "messages")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("stream_options: must be an object")
    prompt = None
    for msg in reversed(messages):
        if msg.get("role") == "tool":
            break  # a tool round continues the turn: the user's prompt was recorded with its start
        if msg.get("role") == "user":
            prompt = text_of(msg.get("content"), ("text",))
            break
    # Tool results answering the latest assistant turn: the trailing run of role=tool messages.
    tool_results: list[str] = []
    for msg in reversed(messages):
        if msg.get("role") != "tool":
            break
        if isinstance(msg.get("tool_call_id"), str):
            tool_results.append(msg["tool_call_id"])
    tool_results.reverse()
    return RequestInfo(model, stream, prompt, tool_results, raw_stream_options=so)


def prepare_request(body: dict) -> dict | None:
    """Streams carry usage only when asked: ask, so every streamed call is metered."""
    if not body.get("stream"):
        return None
    so = body.get("stream_options") or {}
    if so.get("include_usage") is True:
        return None
    return {**body, "stream_options": {**so, "include_usage": True}}


def _usage(u: dict, response_id: str | None) -> TokenUsage:
    """prompt_tokens includes cached tokens: split them out so input + cache_read = prompt."""
    ptd = u.get("prompt_tokens_details") or {}
    cached = as_int(ptd.get("cached_tokens"))
    meta = {}
    for k in ("completion_tokens_details", "prompt_tokens_details", "total_tokens"):
        if u.get(k) is not None:
            meta[k] = u[k]
    return TokenUsage.cached_inside(response_id, as_int(u.get("prompt_tokens")), cached,
                                    as_int(u.get("completion_tokens")), meta)


class _StreamState:
    __slots__ = ("calls", "reasoning")

    def __init__(self) -> None:
        self.calls: dict[tuple[int, int], dict] = {}
        self.reasoning: list[str] = []


def on_event(ev: SSEEvent, s: ResponseSummary) -> None:
    if ev.data.strip() == "[DONE]":
        _finish(s)
        s.complete = True
        return
    obj = load_json_event(ev.data)
    if obj is None:
        return
    if s.state is None:
        s.state = _StreamState()
    st: _StreamState = s.state
    if isinstance(obj.get("error"), dict):
        err = obj["error"]
        s.error = f"{err.get('type') or err.get('code') or 'error'}: {err.get('message', '')}"
        return
    s.response_id = obj.get("id") or s.response_id
    s.model = obj.get("model") or s.model
    for choice in obj.get("choices") or []:
        delta = (choice or {}).get("delta") or {}
        cidx = as_int(choice.get("index"))
        for r in (delta.get("reasoning_content"), delta.get("reasoning")):
            if isinstance(r, str) and r:
                st.reasoning.append(r)
        for tc in delta.get("tool_calls") or []:
            key = (cidx, as_int(tc.get("index")))
            call = st.calls.get(key)
            if call is None:
                call = st.calls[key] = {"id": None, "name": "", "args": []}
            if tc.get("id"):
                call["id"] = tc["id"]
            fn = tc.get("function") or {}
            if fn.get("name"):
                call["name"] = fn["name"]
            if fn.get("arguments"):
                call["args"].append(fn["arguments"])
    if isinstance(obj.get("usage"), dict):
        s.usages.append(_usage(obj["usage"], s.response_id))


def _finish(s: ResponseSummary) -> None:
    st: _StreamState | None = s.state
    if st is None:
        return
    for key in sorted(st.calls):
        c = st.calls[key]
        s.tool_calls.append(ToolCall(s.response_id, c["id"], c["name"], "".join(c["args"])))
    st.calls.clear()
    if st.reasoning:
        s.thoughts.append(Thought("thinking", "".join(st.reasoning)))
        st.reasoning.clear()


def finish_stream(s: ResponseSummary) -> None:
    """Streams that end without [DONE] (errors, cut connections) still yield the calls seen so far."""
    _finish(s)


def summarize(body: dict) -> ResponseSummary:
    s = ResponseSummary(response_id=body.get("id"), model=body.get("model"), complete=True)
    if isinstance(body.get("error"), dict):
        err = body["error"]
        s.error = f"{err.get('type') or err.get('code') or 'error'}: {err.get('message', '')}"
        return s
    for choice in body.get("choices") or []:
        msg = (choice or {}).get("message") or {}
        for r in (msg.get("reasoning_content"), msg.get("reasoning")):
            if isinstance(r, str) and r:
                s.thoughts.append(Thought("thinking", r))
        for tc in msg.get("tool_calls") or []:
            fn = tc.get("function") or {}
            s.tool_calls.append(ToolCall(s.response_id, tc.get("id"), fn.get("name") or "", fn.get("arguments") or ""))
    if isinstance(body.get("usage"), dict):
        s.usages.append(_usage(body["usage"], s.response_id))
    return s


def stream_error_event(message: str, s: ResponseSummary) -> bytes:
    """Chat Completions reports a failure mid-stream as a data line holding an `error` object."""
    return sse_bytes({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


# --- the injected-tool loop -----------------------------------------------------------------------


class ChatAdapter(Adapter):
    """The injected-tool loop for openai.chat."""

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
        t = TokenTotals.of(self.summary.usages)
        self.prompt += t.input + t.cache_read
        self.completion += t.output
        self.cached += t.cache_read

    def on_event(self, ev: SSEEvent) -> list[bytes]:
        self.fold(ev)
        if ev.data.strip() == "[DONE]":
            self._add_usage()
            return []
        obj = load_json_event(ev.data)
        if obj is None:
            return []
        if "error" in obj and not obj.get("choices"):
            return [sse_bytes(obj)]
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
        return [sse_bytes(obj)]

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
            out.append(sse_bytes({**base, "choices": [{"index": 0, "delta": {"content": note}, "finish_reason": None}]}))
            finish = "stop"
        out.append(sse_bytes({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        if self.client_wants_usage:
            out.append(sse_bytes({**base, "choices": [], "usage": self._usage()}))
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


API = WireFunctions(
    name="openai.chat", model_api=True, parse_request=parse_request, prepare_request=prepare_request,
    on_event=on_event, finish_stream=finish_stream, summarize=summarize, stream_error_event=stream_error_event,
    adapter=ChatAdapter,
)
