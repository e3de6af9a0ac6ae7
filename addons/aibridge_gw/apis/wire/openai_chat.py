"""OpenAI Chat Completions API (POST /v1/chat/completions), also spoken by OpenAI-compatible servers."""

from __future__ import annotations

import copy
import json
import logging

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

log = logging.getLogger(__name__)

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
        if s.keep_text and isinstance(delta.get("content"), str) and delta["content"]:
            s.output_text.append(delta["content"])
        if isinstance(choice.get("finish_reason"), str):
            s.finish_reasons.append(choice["finish_reason"])
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
        if s.keep_text and isinstance(msg.get("content"), str) and msg["content"]:
            s.output_text.append(msg["content"])
        if isinstance(choice.get("finish_reason"), str):
            s.finish_reasons.append(choice["finish_reason"])
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


# --- the tool gate --------------------------------------------------------------------------------

# Arguments are checked for completeness (a whole JSON object) when a delta ends with "}": always while they are
# short, then at doubling lengths, so a long argument costs O(n) parsing in all (its finish_reason completes it).
_EARLY_ALWAYS = 4096


def _call_parts(tc: dict) -> tuple[str, str]:
    """(name, arguments) of a tool call or its delta: a function call, or a custom tool's raw input."""
    fn = tc.get("function") if isinstance(tc.get("function"), dict) else tc.get("custom")
    fn = fn if isinstance(fn, dict) else {}
    args = fn.get("arguments") if "arguments" in fn else fn.get("input")
    return fn.get("name") or "", args if isinstance(args, str) else ""


def _trivial(delta: dict, choice: dict) -> bool:
    """A choice that carries nothing but tool calls (a role, nulls): its chunk can be held whole."""
    return (choice.get("finish_reason") is None and choice.get("logprobs") is None
            and all(k == "tool_calls" or k == "role" or v is None or v == "" for k, v in delta.items()))


class _Call:
    __slots__ = ("index", "id", "name", "args", "size", "next_try", "custom", "held", "verdict", "role")

    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.name = ""
        self.args: list[str] = []
        self.size = 0  # len("".join(args))
        self.next_try = 0  # the length from which completeness is checked again
        self.custom = False
        self.held: Held | None = None
        self.verdict: bool | None = None  # True: released, False: refused, None: held
        self.role: str | None = None  # a held chunk carried the message's role: a refusal keeps it


class _Choice:
    __slots__ = ("calls", "open", "released", "refused", "text")

    def __init__(self) -> None:
        self.calls: dict[int, _Call] = {}
        self.open: list[_Call] = []
        self.released = 0
        self.refused: list[int] = []  # the refused calls' indices
        self.text = False  # content came before: a refusal starts a paragraph of its own


class ChatGate(StreamGate):
    """Holds each tool call's deltas (by choice and `index`) until the call is complete: its arguments are a whole
    JSON object (no valid continuation exists), another index starts, the choice's `finish_reason` comes, or the
    stream ends. An allowed call is released byte for byte (renumbered only after a refused one of the same choice,
    so indices stay dense as SDKs index them); a refused one becomes a content delta with the refusal. A chunk that
    carries a held call's delta and anything else (text, a finish, usage) is split: the rest goes at once. Usage
    chunks pass unchanged; `finish_reason` `tool_calls` becomes `stop` when the choice released no call."""

    def __init__(self, api: str, decide) -> None:
        super().__init__(api, decide)
        self.choices: dict[int, _Choice] = {}
        self.env: dict = {}  # the last chunk's envelope (id, object, created, model, …) for chunks the gate writes

    def _choice(self, cidx: int) -> _Choice:
        ch = self.choices.get(cidx)
        if ch is None:
            ch = self.choices[cidx] = _Choice()
        return ch

    def on_event(self, ev: SSEEvent) -> None:
        raw = self.raw_of(ev)
        obj = load_json_event(ev.data)
        if obj is None or not isinstance(obj.get("choices"), list):  # [DONE], an error, junk: the calls are done
            if obj is None and ev.data.strip() == "[DONE]" or obj is not None and "error" in obj:
                self.on_end()
            self.emit(raw)
            return
        self.env = {k: v for k, v in obj.items() if k not in ("choices", "usage", "obfuscation")}
        choices = [c for c in obj["choices"] if isinstance(c, dict)]
        calls = [(as_int(c.get("index")), c, [tc for tc in (c.get("delta") or {}).get("tool_calls") or []
                                              if isinstance(tc, dict)]) for c in choices]
        if not any(tcs for _, _, tcs in calls):
            self._rest(obj, raw, calls)
            return
        if (len(choices) == 1 and len(calls[0][2]) == 1 and obj.get("usage") is None
                and _trivial(calls[0][1].get("delta") or {}, calls[0][1])):
            cidx, choice, (tc,) = calls[0]
            self._fragment(cidx, tc, raw, (choice.get("delta") or {}).get("role"))
            return
        # Tool call deltas beside other things: the other things go now, each call's delta with its call.
        rest = {**obj, "choices": []}
        for cidx, choice, tcs in calls:
            delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "tool_calls"}
            if tcs and _trivial(delta, choice):
                continue  # nothing but the calls (and maybe a role, which the first call's delta carries)
            rest["choices"].append({**choice, "delta": delta})
        finishing = any(c.get("finish_reason") for c in rest["choices"])
        if not finishing and (rest["choices"] or rest.get("usage") is not None):
            self._rest(rest, None, [(as_int(c.get("index")), c, []) for c in rest["choices"]])
        for cidx, choice, tcs in calls:
            delta = choice.get("delta") or {}
            role = delta.get("role") if not any(c.get("index") == choice.get("index") for c in rest["choices"]) else None
            for tc in tcs:
                self._fragment(cidx, tc, None, role)
                role = None
        if finishing:
            self._rest(rest, None, [(as_int(c.get("index")), c, []) for c in rest["choices"]])

    def _rest(self, obj: dict, raw: bytes | None, calls) -> None:
        """A chunk without tool call deltas: a finish decides its choice's calls first (and may become `stop`)."""
        changed = raw is None
        for cidx, choice, _ in calls:
            ch = self._choice(cidx)
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str) and content:
                ch.text = True
            if choice.get("finish_reason"):
                for call in list(ch.open):
                    self._decide(cidx, call)
                if choice["finish_reason"] == "tool_calls" and ch.refused and not ch.released:
                    choice["finish_reason"] = "stop"  # `calls` holds the chunk's own choice objects
                    changed = True
        self.emit(sse_bytes(obj) if changed else raw)

    def _fragment(self, cidx: int, tc: dict, raw: bytes | None, role: str | None) -> None:
        ch = self._choice(cidx)
        i = as_int(tc.get("index"))
        call = ch.calls.get(i)
        if call is None:
            for other in list(ch.open):  # a new index: the calls before it are complete
                self._decide(cidx, other)
            call = ch.calls[i] = _Call(i)
            call.held = self.hold()
            ch.open.append(call)
        name, args = _call_parts(tc)
        call.id = tc.get("id") or call.id
        call.name = name or call.name
        call.custom = call.custom or tc.get("type") == "custom" or "custom" in tc
        call.role = call.role or role
        part = (raw, cidx, tc, role)
        if call.verdict is not None:  # decided early (its arguments were whole JSON): only blanks may follow
            if args.strip():
                log.warning("aibridge: tool call %s got arguments after they were complete; dropped", call.name)
            elif call.verdict:
                self.emit(self._render(part, ch, call))
            return
        if args:
            call.args.append(args)
            call.size += len(args)
        call.held.parts.append(part)
        if not call.custom and call.size >= call.next_try and args.rstrip().endswith("}"):
            if _whole_object("".join(call.args)):
                self._decide(cidx, call)
            elif call.size > _EARLY_ALWAYS:
                call.next_try = 2 * call.size

    def _decide(self, cidx: int, call: _Call) -> None:
        ch = self._choice(cidx)
        ch.open.remove(call)
        refusal = self.ask(GateCall(call.name, "".join(call.args), call.id, self.api))
        if refusal is None:
            call.verdict = True
            ch.released += 1
            # The call's own parts are tuples (rendered now, renumbered if need be); others are bytes, kept as they are.
            call.held.out = [self._render(p, ch, call) if isinstance(p, tuple) else p for p in call.held.parts]
            return
        call.verdict = False
        ch.refused.append(call.index)
        delta = {"content": ("\n\n" if ch.text else "") + refusal.text}
        if call.role:
            delta = {"role": call.role, **delta}
        ch.text = True
        call.held.replace([sse_bytes({**self.env, "choices": [{"index": cidx, "delta": delta, "finish_reason": None}]})])

    def _render(self, part, ch: _Choice, call: _Call) -> bytes:
        raw, cidx, tc, role = part
        shift = sum(1 for i in ch.refused if i < call.index)
        if raw is not None and not shift:
            return raw
        delta = {"tool_calls": [{**tc, "index": as_int(tc.get("index")) - shift}]}
        if role:
            delta = {"role": role, **delta}
        return sse_bytes({**self.env, "choices": [{"index": cidx, "delta": delta, "finish_reason": None}]})

    def on_end(self) -> None:
        for cidx, ch in self.choices.items():
            for call in list(ch.open):
                self._decide(cidx, call)


def _whole_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def gate_body(body, api: str, decide):
    """A whole completion: refused calls leave `message.tool_calls` and their refusals join `message.content`;
    `finish_reason` `tool_calls` becomes `stop` when a choice keeps no call. None: nothing refused."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return None
    choices, refused_any = [], False
    for choice in body["choices"]:
        msg = choice.get("message") if isinstance(choice, dict) else None
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        if not isinstance(calls, list) or not calls:
            choices.append(choice)
            continue
        kept, refusals = [], []
        for tc in calls:
            if not isinstance(tc, dict):
                kept.append(tc)
                continue
            name, args = _call_parts(tc)
            refusal = check(decide, GateCall(name, args, tc.get("id"), api))
            if refusal is None:
                kept.append(tc)
            else:
                refusals.append(refusal.text)
        if not refusals:
            choices.append(choice)
            continue
        refused_any = True
        msg = dict(msg)
        content = msg.get("content")
        text = "\n\n".join(refusals)
        msg["content"] = f"{content}\n\n{text}" if isinstance(content, str) and content else text
        if kept:
            msg["tool_calls"] = kept
        else:
            msg.pop("tool_calls", None)
        choice = {**choice, "message": msg}
        if not kept and choice.get("finish_reason") == "tool_calls":
            choice["finish_reason"] = "stop"
        choices.append(choice)
    return {**body, "choices": choices} if refused_any else None


GATE = ToolGate(stream=ChatGate, body=gate_body)


API = WireFunctions(
    name="openai.chat", model_api=True, parse_request=parse_request, prepare_request=prepare_request,
    on_event=on_event, finish_stream=finish_stream, summarize=summarize, stream_error_event=stream_error_event,
    adapter=ChatAdapter, gate=GATE,
)
