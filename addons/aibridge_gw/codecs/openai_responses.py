"""OpenAI Responses API (POST /v1/responses), as used by Codex CLI."""

from __future__ import annotations

from ..records import (
    BadRequest,
    RequestInfo,
    ResponseSummary,
    Thought,
    TokenUsage,
    ToolCall,
    as_int,
    json_text,
)
from ..sse import SSEEvent
from .common import load_json_event, require_model, require_stream_flag, sse_bytes, text_of

# Output items that are tool calls run by the provider itself; recorded under their type.
_BUILTIN_CALLS = (
    "web_search_call",
    "file_search_call",
    "code_interpreter_call",
    "image_generation_call",
    "computer_call",
    "local_shell_call",
    "shell_call",
    "apply_patch_call",
)
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def parse_request(body: dict) -> RequestInfo:
    model = require_model(body)
    stream = require_stream_flag(body)
    inp = body.get("input")
    prompt = None
    tool_results: list[str] = []
    if isinstance(inp, str):
        prompt = inp
    elif isinstance(inp, list):
        if not all(isinstance(i, dict) for i in inp):
            raise BadRequest("input: items must be objects")
        for item in reversed(inp):
            if str(item.get("type", "")).endswith("_call_output"):
                break  # a tool round continues the turn: the user's prompt was recorded with its start
            if item.get("role") == "user" and item.get("type", "message") == "message":
                prompt = text_of(item.get("content"), ("input_text", "text"))
                break
        # Tool outputs answering the latest model turn: the trailing run of *_call_output items.
        for item in reversed(inp):
            if not str(item.get("type", "")).endswith("_call_output"):
                break
            if isinstance(item.get("call_id"), str):
                tool_results.append(item["call_id"])
        tool_results.reverse()
    elif inp is not None:
        raise BadRequest("input: must be a string or a list of items")
    elif not body.get("previous_response_id") and not body.get("prompt") and not body.get("conversation"):
        raise BadRequest("input: required")
    return RequestInfo(model, stream, prompt, tool_results)


def prepare_request(body: dict) -> dict | None:
    return None


def _usage(u: dict, response_id: str | None) -> TokenUsage:
    """input_tokens includes cached tokens: split them out so input + cache_read = input_tokens."""
    itd = u.get("input_tokens_details") or {}
    cached = as_int(itd.get("cached_tokens"))
    meta = {k: u[k] for k in ("input_tokens_details", "output_tokens_details", "total_tokens") if u.get(k) is not None}
    return TokenUsage(
        response_id,
        input_tokens=max(as_int(u.get("input_tokens")) - cached, 0),
        output_tokens=as_int(u.get("output_tokens")),
        cache_read_input_tokens=cached,
        metadata=meta,
    )


def _output_item(item: dict, s: ResponseSummary) -> None:
    t = item.get("type")
    rid = s.response_id
    if t == "function_call":
        s.tool_calls.append(ToolCall(rid, item.get("call_id"), item.get("name") or "", item.get("arguments") or ""))
    elif t == "custom_tool_call":
        s.tool_calls.append(ToolCall(rid, item.get("call_id"), item.get("name") or "", item.get("input") or ""))
    elif t == "mcp_call":
        name = f"{item.get('server_label', '')}.{item.get('name', '')}".strip(".")
        s.tool_calls.append(ToolCall(rid, item.get("id"), name, item.get("arguments") or ""))
    elif t in _BUILTIN_CALLS:
        args = {k: v for k, v in item.items() if k in ("action", "query", "queries", "code", "input", "operation")}
        s.tool_calls.append(ToolCall(rid, item.get("call_id") or item.get("id"), t, json_text(args)))
    elif t == "reasoning":
        for part in item.get("summary") or []:
            if isinstance(part, dict) and part.get("text"):
                s.thoughts.append(Thought("reasoning_summary", part["text"]))
        for part in item.get("content") or []:
            if isinstance(part, dict) and part.get("type") == "reasoning_text" and part.get("text"):
                s.thoughts.append(Thought("thinking", part["text"]))
    elif t == "message" and item.get("phase") == "commentary":
        text = text_of(item.get("content"), ("output_text",))
        if text:
            s.thoughts.append(Thought("commentary", text))


def _response_status(resp: dict, s: ResponseSummary) -> None:
    s.response_id = resp.get("id") or s.response_id
    s.model = resp.get("model") or s.model
    if resp.get("status") == "failed" or resp.get("error"):
        err = resp.get("error") or {}
        s.error = f"{err.get('code') or 'failed'}: {err.get('message', '')}"
    if isinstance(resp.get("usage"), dict):
        s.usages.append(_usage(resp["usage"], s.response_id))


def on_event(ev: SSEEvent, s: ResponseSummary) -> None:
    obj = load_json_event(ev.data)
    if obj is None:
        return
    kind = obj.get("type") or ev.event
    seq = obj.get("sequence_number")
    if isinstance(seq, int):
        s.state = seq  # the last sequence number, so an event the gateway adds continues the count
    if kind in ("response.created", "response.in_progress"):
        resp = obj.get("response") or {}
        s.response_id = resp.get("id") or s.response_id
        s.model = resp.get("model") or s.model
    elif kind == "response.output_item.done":
        if isinstance(obj.get("item"), dict):
            _output_item(obj["item"], s)
    elif kind in _TERMINAL:
        _response_status(obj.get("response") or {}, s)
        s.complete = True
    elif kind == "error":
        err = obj["error"] if isinstance(obj.get("error"), dict) else obj  # both shapes are seen live
        s.error = f"{err.get('code') or err.get('type') or 'error'}: {err.get('message', '')}"


def finish_stream(s: ResponseSummary) -> None:
    return None


def summarize(body: dict) -> ResponseSummary:
    s = ResponseSummary(complete=True)
    if isinstance(body.get("error"), dict) and not body.get("object"):
        err = body["error"]
        s.error = f"{err.get('type') or err.get('code') or 'error'}: {err.get('message', '')}"
        return s
    s.response_id = body.get("id")
    for item in body.get("output") or []:
        if isinstance(item, dict):
            _output_item(item, s)
    _response_status(body, s)
    return s


def stream_error_event(message: str, s: ResponseSummary) -> bytes:
    """An `error` event, then `response.failed`: the SDK raises on the first, Codex ends its turn on the second."""
    seq = (s.state if isinstance(s.state, int) else 0) + 1
    err = {"type": "error", "code": "server_error", "message": message, "param": None, "sequence_number": seq}
    failed = {
        "type": "response.failed", "sequence_number": seq + 1,
        "response": {"id": s.response_id, "object": "response", "status": "failed", "model": s.model,
                     "error": {"code": "server_error", "message": message}, "output": [], "usage": None},
    }
    return sse_bytes(err, "error") + sse_bytes(failed, "response.failed")
