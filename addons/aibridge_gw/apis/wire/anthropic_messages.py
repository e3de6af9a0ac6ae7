"""Anthropic Messages API (POST /v1/messages)."""

from __future__ import annotations

import json
import re

from ...flow.exchange import RequestInfo, ResponseSummary, Thought, TokenTotals, TokenUsage, ToolCall, as_int, json_text
from ...flow.sse import SSEEvent
from ...flow.toolgate import GateCall, Held, StreamGate, ToolGate, check
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

TOOL_BLOCKS = ("tool_use", "server_tool_use")
_SESSION_RE = re.compile(r"session_([0-9a-fA-F-]{36})")


def parse_request(body: dict, path: str = "") -> RequestInfo:
    model = require_model(body)
    stream = require_stream_flag(body)
    messages = require_objects(body, "messages")
    prompt = None
    tool_results: list[str] = []
    for msg in reversed(messages):
        if msg.get("role") == "user":
            content = msg.get("content")
            prompt = text_of(content, ("text",))
            if isinstance(content, list):
                tool_results = [
                    b["tool_use_id"]
                    for b in content
                    if isinstance(b, dict) and b.get("type") == "tool_result" and isinstance(b.get("tool_use_id"), str)
                ]
                last_result = max((n for n, b in enumerate(content)
                                   if isinstance(b, dict) and b.get("type") == "tool_result"), default=None)
                if last_result is not None:
                    # A tool round continues the turn (its prompt was recorded with its start) unless the user
                    # wrote something after the results; reminders a client appends are not the user's words.
                    after = [b for b in content[last_result + 1:] if isinstance(b, dict) and b.get("type") == "text"
                             and isinstance(b.get("text"), str) and not b["text"].lstrip().startswith("<system-reminder>")]
                    prompt = text_of(after, ("text",))
            break
    return RequestInfo(model, stream, prompt, tool_results, _session_from_metadata(body.get("metadata")))


def prepare_request(body: dict) -> dict | None:
    return None


def _session_from_metadata(meta) -> str | None:
    """Claude Code puts its session in metadata.user_id: '..._session_<uuid>' or a JSON object."""
    if not isinstance(meta, dict) or not isinstance(meta.get("user_id"), str):
        return None
    uid = meta["user_id"]
    if uid.startswith("{"):
        try:
            sid = json.loads(uid).get("session_id")
            return sid if isinstance(sid, str) else None
        except (ValueError, AttributeError):
            return None
    m = _SESSION_RE.search(uid)
    return m.group(1) if m else None


def _usage(u: dict, response_id: str | None, into: TokenUsage | None = None) -> TokenUsage:
    """Anthropic reports cumulative counts: a later value replaces an earlier one, never adds to it."""
    t = into or TokenUsage(response_id)
    if u.get("input_tokens") is not None:
        t.input_tokens = as_int(u.get("input_tokens"))
    if u.get("output_tokens") is not None:
        t.output_tokens = as_int(u.get("output_tokens"))
    if u.get("cache_read_input_tokens") is not None:
        t.cache_read_input_tokens = as_int(u.get("cache_read_input_tokens"))
    if u.get("cache_creation_input_tokens") is not None:
        t.cache_write_input_tokens = as_int(u.get("cache_creation_input_tokens"))
    for k in ("service_tier", "cache_creation", "server_tool_use"):
        if u.get(k) is not None:
            t.metadata[k] = u[k]
    return t


# --- streaming ------------------------------------------------------------------------------------


class _StreamState:
    __slots__ = ("usage", "blocks")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.blocks: dict[int, dict] = {}


def on_event(ev: SSEEvent, s: ResponseSummary) -> None:
    obj = load_json_event(ev.data)
    if obj is None:
        return
    if s.state is None:
        s.state = _StreamState()
    st: _StreamState = s.state
    kind = obj.get("type") or ev.event
    if kind == "message_start":
        msg = obj.get("message") or {}
        s.response_id = msg.get("id") or s.response_id
        s.model = msg.get("model") or s.model
        st.usage = _usage(msg.get("usage") or {}, s.response_id)
        s.usages.append(st.usage)
    elif kind == "content_block_start":
        block = obj.get("content_block") or {}
        idx = obj.get("index")
        btype = block.get("type")
        if btype in TOOL_BLOCKS:
            st.blocks[idx] = {"type": "tool", "id": block.get("id"), "name": block.get("name") or "",
                              "initial": block.get("input"), "parts": []}
        elif btype == "thinking":
            st.blocks[idx] = {"type": "thinking", "parts": [block.get("thinking") or ""]}
        elif btype == "text" and s.keep_text and block.get("text"):
            s.output_text.append(block["text"])
    elif kind == "content_block_delta":
        b = st.blocks.get(obj.get("index"))
        delta = obj.get("delta") or {}
        if b is None:
            if s.keep_text and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                s.output_text.append(delta["text"])
            return
        if b["type"] == "tool" and delta.get("type") == "input_json_delta":
            b["parts"].append(delta.get("partial_json") or "")
        elif b["type"] == "thinking" and delta.get("type") == "thinking_delta":
            b["parts"].append(delta.get("thinking") or "")
    elif kind == "content_block_stop":
        b = st.blocks.pop(obj.get("index"), None)
        if b is not None:
            _close_block(b, s)
    elif kind == "message_delta":
        reason = (obj.get("delta") or {}).get("stop_reason")
        if isinstance(reason, str):
            s.finish_reasons[:] = [reason]
        u = obj.get("usage")
        if isinstance(u, dict):
            if st.usage is None:
                st.usage = TokenUsage(s.response_id)
                s.usages.append(st.usage)
            _usage(u, s.response_id, st.usage)
    elif kind == "message_stop":
        for idx in list(st.blocks):
            _close_block(st.blocks.pop(idx), s)
        s.complete = True
    elif kind == "error":
        err = obj.get("error") or {}
        s.error = f"{err.get('type', 'error')}: {err.get('message', '')}".strip()


def _close_block(b: dict, s: ResponseSummary) -> None:
    if b["type"] == "tool":
        raw = "".join(b["parts"])
        if not raw:
            raw = json_text(b["initial"] if b["initial"] is not None else {})
        s.tool_calls.append(ToolCall(s.response_id, b["id"], b["name"], raw))
    else:
        text = "".join(b["parts"])
        if text:
            s.thoughts.append(Thought("thinking", text))


# --- blocking -------------------------------------------------------------------------------------


def summarize(body: dict) -> ResponseSummary:
    s = ResponseSummary(response_id=body.get("id"), model=body.get("model"), complete=True)
    if body.get("type") == "error":
        err = body.get("error") or {}
        s.error = f"{err.get('type', 'error')}: {err.get('message', '')}"
        return s
    if isinstance(body.get("usage"), dict):
        s.usages.append(_usage(body["usage"], s.response_id))
    for block in body.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") in TOOL_BLOCKS:
            s.tool_calls.append(
                ToolCall(s.response_id, block.get("id"), block.get("name") or "", json_text(block.get("input", {})))
            )
        elif block.get("type") == "thinking" and block.get("thinking"):
            s.thoughts.append(Thought("thinking", block["thinking"]))
        elif block.get("type") == "text" and s.keep_text and isinstance(block.get("text"), str):
            s.output_text.append(block["text"])
    if isinstance(body.get("stop_reason"), str):
        s.finish_reasons.append(body["stop_reason"])
    return s


def finish_stream(s: ResponseSummary) -> None:
    """A stream cut before message_stop still yields the tool calls and thinking seen so far."""
    st: _StreamState | None = s.state
    if st is not None:
        for idx in list(st.blocks):
            _close_block(st.blocks.pop(idx), s)


def stream_error_event(message: str, s: ResponseSummary) -> bytes:
    """What the API sends when a stream fails after it started (the SDKs raise it as an APIError)."""
    kind = "overloaded_error" if "overloaded" in message.lower() else "api_error"
    return sse_bytes({"type": "error", "error": {"type": kind, "message": message}}, "error")


# --- the injected-tool loop -----------------------------------------------------------------------


class AnthropicAdapter(Adapter):
    """The injected-tool loop for anthropic.messages."""

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
        t = TokenTotals.of(self.summary.usages)
        self.usage["input_tokens"] += t.input
        self.usage["output_tokens"] += t.output
        self.usage["cache_read_input_tokens"] += t.cache_read
        self.usage["cache_creation_input_tokens"] += t.cache_write

    def on_event(self, ev: SSEEvent) -> list[bytes]:
        self.fold(ev)
        obj = load_json_event(ev.data)
        if obj is None:
            return []
        kind = obj.get("type") or ev.event
        if kind == "message_start":
            self.index_map, self.blocks, self.round_blocks = {}, {}, []
            if self.first is None:
                self.first = obj.get("message") or {}
                return [sse_bytes(obj, "message_start")]
            return []
        if kind == "content_block_start":
            idx, block = obj.get("index"), dict(obj.get("content_block") or {})
            self.blocks[idx] = block
            if block.get("type") == "tool_use" and block.get("name") in self.tools:
                self.index_map[idx] = None
                return []
            self.index_map[idx] = self.next_index
            self.next_index += 1
            return [sse_bytes({**obj, "index": self.index_map[idx]}, "content_block_start")]
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
            return [] if mapped is None else [sse_bytes({**obj, "index": mapped}, "content_block_delta")]
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
            return [] if mapped is None else [sse_bytes({**obj, "index": mapped}, "content_block_stop")]
        if kind == "message_delta":
            delta = obj.get("delta") or {}
            self.stop_reason = delta.get("stop_reason") or self.stop_reason
            self.stop_sequence = delta.get("stop_sequence")
            return []
        if kind == "message_stop":
            self._add_usage()
            return []
        if kind == "error":
            return [sse_bytes(obj, "error")]
        return [sse_bytes(obj, kind)]  # ping and anything new: pass on

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
            out += [sse_bytes({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}, "content_block_start"),
                    sse_bytes({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": note}}, "content_block_delta"),
                    sse_bytes({"type": "content_block_stop", "index": i}, "content_block_stop")]
            stop = "end_turn"
        out.append(sse_bytes({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": self.stop_sequence},
                        "usage": dict(self.usage)}, "message_delta"))
        out.append(sse_bytes({"type": "message_stop"}, "message_stop"))
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


# --- the tool gate --------------------------------------------------------------------------------
# Only `tool_use` blocks are the client's to run. A `server_tool_use` block (web search, code execution, …) has already
# run at Anthropic when the client sees it, and its result block follows: refusing it would stop nothing and would
# leave the result block without its call (the client's next request would be rejected). It is recorded, not gated.

_GATE_PASS = frozenset({"content_block_delta", "content_block_stop", "ping"})  # never start a tool block


class MessagesGate(StreamGate):
    """Holds a `tool_use` block from its `content_block_start` through its `input_json_delta`s to its
    `content_block_stop`, then releases it byte for byte, or puts a text block in its place (same index: start,
    one text_delta, stop). `message_delta`'s stop_reason `tool_use` becomes `end_turn` when the message released no
    tool_use block (an allowed call keeps `tool_use`: the client owes its result)."""

    def __init__(self, api: str, decide) -> None:
        super().__init__(api, decide)
        self.open: dict = {}  # index → the Held tool_use block
        self.released = 0
        self.refused = 0

    def on_event(self, ev: SSEEvent) -> None:
        raw = self.raw_of(ev)
        if not self.open and ev.event in _GATE_PASS and '"content_block_start"' not in ev.data:
            self.emit(raw)  # text and thinking: as they came, unparsed
            return
        obj = load_json_event(ev.data)
        if obj is None:
            self.emit(raw)
            return
        kind = obj.get("type") or ev.event
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                idx = obj.get("index")
                h = self.hold({"index": idx, "id": block.get("id"), "name": block.get("name") or "",
                               "initial": block.get("input"), "args": []})
                h.parts.append(raw)
                self.open[idx] = h
                return
        elif kind == "content_block_delta":
            h = self.open.get(obj.get("index"))
            if h is not None:
                delta = obj.get("delta") or {}
                if delta.get("type") == "input_json_delta":
                    h.info["args"].append(delta.get("partial_json") or "")
                h.parts.append(raw)
                return
        elif kind == "content_block_stop":
            h = self.open.pop(obj.get("index"), None)
            if h is not None:
                h.parts.append(raw)
                self._decide(h)
                return
        elif kind == "message_start":
            self.released = self.refused = 0
        elif kind in ("message_delta", "message_stop", "error"):
            self.on_end()  # a block still open here never got its stop: decided as it came
            if kind == "message_delta":
                raw = self._stop_reason(obj, raw, ev.event)
        self.emit(raw)

    def on_end(self) -> None:
        for idx in list(self.open):
            self._decide(self.open.pop(idx))

    def _decide(self, h: Held) -> None:
        b = h.info
        raw_input = "".join(b["args"]) or json_text(b["initial"] if b["initial"] is not None else {})
        refusal = self.ask(GateCall(b["name"], raw_input, b["id"], self.api))
        if refusal is None:
            self.released += 1
            h.release()
            return
        self.refused += 1
        i = b["index"]
        h.replace([sse_bytes({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}},
                           "content_block_start"),
                 sse_bytes({"type": "content_block_delta", "index": i,
                            "delta": {"type": "text_delta", "text": refusal.text}}, "content_block_delta"),
                 sse_bytes({"type": "content_block_stop", "index": i}, "content_block_stop")])

    def _stop_reason(self, obj: dict, raw: bytes, event: str) -> bytes:
        delta = obj.get("delta")
        if (self.refused and not self.released and isinstance(delta, dict)
                and delta.get("stop_reason") == "tool_use"):
            return sse_bytes({**obj, "delta": {**delta, "stop_reason": "end_turn"}},
                             event if event and event != "message" else "message_delta")
        return raw


def gate_body(body, api: str, decide):
    """A whole message: each refused `tool_use` block becomes a text block in its place; stop_reason `tool_use`
    becomes `end_turn` when none was let through. None: nothing refused."""
    if not isinstance(body, dict) or not isinstance(body.get("content"), list) or body.get("type") == "error":
        return None
    content, released, refused = [], 0, 0
    for block in body["content"]:
        if isinstance(block, dict) and block.get("type") == "tool_use":
            refusal = check(decide, GateCall(block.get("name") or "", json_text(block.get("input", {})),
                                             block.get("id"), api))
            if refusal is not None:
                refused += 1
                content.append({"type": "text", "text": refusal.text})
                continue
            released += 1
        content.append(block)
    if not refused:
        return None
    out = {**body, "content": content}
    if not released and body.get("stop_reason") == "tool_use":
        out["stop_reason"] = "end_turn"
    return out


GATE = ToolGate(stream=MessagesGate, body=gate_body)


API = WireFunctions(
    name="anthropic.messages", model_api=True, parse_request=parse_request, prepare_request=prepare_request,
    on_event=on_event, finish_stream=finish_stream, summarize=summarize, stream_error_event=stream_error_event,
    adapter=AnthropicAdapter, gate=GATE,
)
