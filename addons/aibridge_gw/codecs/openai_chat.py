"""OpenAI Chat Completions API (POST /v1/chat/completions), also spoken by OpenAI-compatible servers."""

from __future__ import annotations

from ..records import BadRequest, RequestInfo, ResponseSummary, Thought, TokenUsage, ToolCall, as_int
from ..sse import SSEEvent
from .common import load_json_event, require_model, require_stream_flag, sse_bytes, text_of


def parse_request(body: dict) -> RequestInfo:
    model = require_model(body)
    stream = require_stream_flag(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages: a list of message objects is required")
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
    return TokenUsage(
        response_id,
        input_tokens=max(as_int(u.get("prompt_tokens")) - cached, 0),
        output_tokens=as_int(u.get("completion_tokens")),
        cache_read_input_tokens=cached,
        metadata=meta,
    )


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
