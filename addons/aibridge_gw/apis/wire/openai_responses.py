"""OpenAI Responses API (POST /v1/responses), as used by Codex CLI."""

from __future__ import annotations

import copy
import json

from ...flow.exchange import BadRequest, RequestInfo, ResponseSummary, Thought, TokenUsage, ToolCall, as_int, json_text
from ...flow.sse import SSEEvent, SSEParser
from ...flow.toolgate import GateCall, Held, StreamGate, ToolGate, check
from ...mcp.tools import Adapter, ToolResult
from ..base import WireFunctions, load_json_event, require_model, require_stream_flag, sse_bytes, text_of

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


def parse_request(body: dict, path: str = "") -> RequestInfo:
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
    # A background response runs on after this call; its usage is recorded when it is retrieved (objects.py).
    return RequestInfo(model, stream, prompt, tool_results, facts={"background": True} if body.get("background") is True
                       else None)


def prepare_request(body: dict) -> dict | None:
    return None


def _usage(u: dict, response_id: str | None) -> TokenUsage:
    """input_tokens includes cached tokens: split them out so input + cache_read = input_tokens."""
    itd = u.get("input_tokens_details") or {}
    cached = as_int(itd.get("cached_tokens"))
    meta = {k: u[k] for k in ("input_tokens_details", "output_tokens_details", "total_tokens") if u.get(k) is not None}
    return TokenUsage.cached_inside(response_id, as_int(u.get("input_tokens")), cached,
                                    as_int(u.get("output_tokens")), meta)


def _call_of(item: dict) -> tuple[str, str, str | None] | None:
    """(name, input, call id) of an output item that is a tool call; None for any other item."""
    t = item.get("type")
    if t == "function_call":
        return item.get("name") or "", item.get("arguments") or "", item.get("call_id")
    if t == "custom_tool_call":
        return item.get("name") or "", item.get("input") or "", item.get("call_id")
    if t == "mcp_call":
        name = f"{item.get('server_label', '')}.{item.get('name', '')}".strip(".")
        return name, item.get("arguments") or "", item.get("id")
    if t in _BUILTIN_CALLS:
        args = {k: v for k, v in item.items() if k in ("action", "query", "queries", "code", "input", "operation")}
        return t, json_text(args), item.get("call_id") or item.get("id")
    return None


def _output_item(item: dict, s: ResponseSummary) -> None:
    t = item.get("type")
    call = _call_of(item)
    if call is not None:
        s.tool_calls.append(ToolCall(s.response_id, call[2], call[0], call[1]))
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
    elif t == "message" and s.keep_text:
        text = text_of(item.get("content"), ("output_text",))
        if text:
            s.output_text.append(text)


def _response_status(resp: dict, s: ResponseSummary) -> None:
    s.response_id = resp.get("id") or s.response_id
    s.model = resp.get("model") or s.model
    if resp.get("status") == "failed" or resp.get("error"):
        err = resp.get("error") or {}
        s.error = f"{err.get('code') or 'failed'}: {err.get('message', '')}"
    if isinstance(resp.get("usage"), dict):
        s.usages.append(_usage(resp["usage"], s.response_id))
    status = resp.get("status")
    if isinstance(status, str) and status != "in_progress":  # incomplete: why (max_output_tokens, content_filter)
        reason = (resp.get("incomplete_details") or {}).get("reason") if status == "incomplete" else None
        s.finish_reasons[:] = [reason if isinstance(reason, str) else status]


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


# --- the injected-tool loop -----------------------------------------------------------------------


class ResponsesAdapter(Adapter):
    """The injected-tool loop for openai.responses."""

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
        return sse_bytes(obj, kind)

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
        obj = load_json_event(ev.data)
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
        """The API's error and response.failed events, numbered in the client's sequence."""
        first = self.final or self.first or {}
        s = ResponseSummary(response_id=first.get("id"), model=first.get("model"), state=self.seq - 1)
        self.seq += 2
        return self.codec.stream_error_event(message, s)


# --- the tool gate --------------------------------------------------------------------------------
# The calls the client runs: functions, custom tools, and the built-in tools whose calls come back to the client
# (its shell, its patches, its computer). Calls OpenAI runs itself (web and file search, code interpreter, image
# generation, hosted MCP) have run by the time they stream: they are recorded, not gated.
_CLIENT_CALLS = frozenset({"function_call", "custom_tool_call", "computer_call", "local_shell_call", "shell_call",
                           "apply_patch_call"})


def _refusal_item(item: dict, oi, text: str) -> dict:
    """The message output item that takes a refused call's place."""
    ref = item.get("id") or item.get("call_id") or oi
    return {"id": f"msg_aibridge_{ref}", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


class ResponsesGate(StreamGate):
    """Holds a client tool call's output item from `response.output_item.added` through its argument (or input)
    deltas to `response.output_item.done`, and decides it on the done item (what SDKs and Codex run). An allowed
    item is released byte for byte; a refused one becomes a `message` item at the same `output_index`, with the events
    an SDK expects (output_item.added, content_part.added, output_text.delta, output_text.done, content_part.done,
    output_item.done). The terminal event's `response.output` lists the message instead of the call. Sequence numbers
    stay consecutive: after a refusal, later events are renumbered (and re-serialised) to continue the count."""

    def __init__(self, api: str, decide) -> None:
        super().__init__(api, decide)
        self.items: dict = {}  # output_index → the Held call item
        self.replaced: dict[str, dict] = {}  # a refused call's item id and call id → the message item in its place
        self.passed: set = set()  # allowed calls' item ids and call ids
        self.next_seq: int | None = None  # the number the next event the client gets carries
        self.renumber = False  # events were dropped or added: every later number is the gate's
        self.named = True  # the stream's events have `event:` lines (OpenAI's do)

    def on_event(self, ev: SSEEvent) -> None:
        raw = self.raw_of(ev)
        obj = load_json_event(ev.data)
        if obj is None:
            self.emit((raw, None, ev.event))
            return
        kind = obj.get("type") or ev.event
        if ev.event == "message":
            self.named = False  # the stream names no events: neither do the events the gate writes
        entry = (raw, obj, ev.event if self.named else None)
        oi = obj.get("output_index")
        if kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") in _CLIENT_CALLS:
                h = self.hold({"oi": oi, "item": item, "args": [], "final": None, "done": False})
                h.parts.append(entry)
                self.items[oi] = h
                return
        elif oi is not None and oi in self.items:
            h = self.items[oi]
            h.parts.append(entry)
            info = h.info
            if kind in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
                info["args"].append(obj.get("delta") if isinstance(obj.get("delta"), str) else "")
            elif kind == "response.function_call_arguments.done":
                info["final"] = obj.get("arguments")
            elif kind == "response.custom_tool_call_input.done":
                info["final"] = obj.get("input")
            elif kind == "response.output_item.done":
                if isinstance(obj.get("item"), dict):
                    info["item"], info["done"] = obj["item"], True
                del self.items[oi]
                self._decide(h)
            return
        elif kind == "response.output_item.done" and isinstance(obj.get("item"), dict) \
                and obj["item"].get("type") in _CLIENT_CALLS:
            # A call whose start this stream did not show (a retrieval resumed after it): decided on its done item.
            h = self.hold({"oi": oi, "item": obj["item"], "args": [], "final": None, "done": True})
            h.parts.append(entry)
            self._decide(h)
            return
        elif kind in _TERMINAL:
            self.on_end()
            entry = self._final(entry)
        elif kind == "error":
            self.on_end()
        self.emit(entry)

    def on_end(self) -> None:
        for oi in list(self.items):
            self._decide(self.items.pop(oi))

    def _decide(self, h: Held) -> None:
        info = h.info
        item = info["item"]
        name, given, call_id = _call_of(item)
        if not info["done"] and item.get("type") in ("function_call", "custom_tool_call"):
            # The stream ended before the item was done: the arguments as far as they came.
            final = info["final"]
            given = final if isinstance(final, str) else "".join(info["args"]) or given
        refusal = self.ask(GateCall(name, given, call_id, self.api))
        keys = [k for k in (item.get("id"), call_id) if k]
        if refusal is None:
            self.passed.update(keys)
            h.release()
            return
        oi = info["oi"]
        done = _refusal_item(item, oi, refusal.text)
        for k in keys:
            self.replaced[k] = done
        self.renumber = True
        mid, text = done["id"], refusal.text
        where = {"item_id": mid, "output_index": oi, "content_index": 0}
        events = [
            {"type": "response.output_item.added", "output_index": oi,
             "item": {**done, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **where,
             "part": {"type": "output_text", "text": "", "annotations": []}},
            {"type": "response.output_text.delta", **where, "delta": text, "logprobs": []},
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": done["content"][0]},
            {"type": "response.output_item.done", "output_index": oi, "item": done},
        ]
        h.replace([(None, e, e["type"] if self.named else None) for e in events])

    def _final(self, entry):
        """The terminal event's `response.output`, with each refused call's message in its place (a call the stream
        never showed is decided here)."""
        _, obj, event = entry
        resp = obj.get("response")
        if not isinstance(resp, dict) or not isinstance(resp.get("output"), list):
            return entry
        output, changed = [], False
        for n, item in enumerate(resp["output"]):
            if isinstance(item, dict) and item.get("type") in _CLIENT_CALLS:
                name, given, call_id = _call_of(item)
                keys = [k for k in (item.get("id"), call_id) if k]
                rep = next((self.replaced[k] for k in keys if k in self.replaced), None)
                if rep is None and not any(k in self.passed for k in keys):
                    refusal = self.ask(GateCall(name, given, call_id, self.api))
                    if refusal is None:
                        self.passed.update(keys)
                    else:
                        rep = _refusal_item(item, n, refusal.text)
                if rep is not None:
                    output.append(rep)
                    changed = True
                    continue
            output.append(item)
        if not changed:
            return entry
        return None, {**obj, "response": {**resp, "output": output}}, event

    def render(self, entry) -> bytes:
        raw, obj, event = entry
        if obj is None:
            return raw
        seq = obj.get("sequence_number")
        numbered = isinstance(seq, int)
        if raw is not None and not self.renumber:
            if numbered:
                self.next_seq = seq + 1
            return raw
        if numbered or (raw is None and self.next_seq is not None):
            n = self.next_seq if self.next_seq is not None else seq
            self.next_seq = n + 1
            if raw is not None and seq == n:
                return raw
            obj = {**obj, "sequence_number": n}
        elif raw is not None:
            return raw
        return sse_bytes(obj, event)

    def tail(self, sse: bytes) -> bytes:
        """The gateway's error events, numbered after what the client got."""
        if not self.renumber:
            return sse
        parser = SSEParser()
        events = parser.feed(sse) + parser.feed(b"")
        out = []
        for ev in events:
            obj = load_json_event(ev.data)
            out.append(self.raw_of(ev) if obj is None else self.render((None, obj, ev.event)))
        return b"".join(out)


def gate_body(body, api: str, decide):
    """A whole response: each refused client tool call in `output` becomes a message item in its place. None: nothing
    refused."""
    if not isinstance(body, dict) or not isinstance(body.get("output"), list):
        return None
    output, refused = [], False
    for n, item in enumerate(body["output"]):
        if isinstance(item, dict) and item.get("type") in _CLIENT_CALLS:
            name, given, call_id = _call_of(item)
            refusal = check(decide, GateCall(name, given, call_id, api))
            if refusal is not None:
                refused = True
                output.append(_refusal_item(item, n, refusal.text))
                continue
        output.append(item)
    return {**body, "output": output} if refused else None


GATE = ToolGate(stream=ResponsesGate, body=gate_body)


API = WireFunctions(
    name="openai.responses", model_api=True, parse_request=parse_request, prepare_request=prepare_request,
    on_event=on_event, finish_stream=finish_stream, summarize=summarize, stream_error_event=stream_error_event,
    adapter=ResponsesAdapter, gate=GATE,
)
