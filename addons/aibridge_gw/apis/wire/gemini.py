"""Gemini's generateContent API (`POST …/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`),
as the google-genai SDK and Gemini CLI speak it. The model and the stream mode are in the path, not the body."""

from __future__ import annotations

import json
import re

from ...flow.exchange import BadRequest, RequestInfo, ResponseSummary, Thought, TokenUsage, ToolCall, as_int, json_text
from ...flow.sse import SSEEvent
from ...flow.toolgate import GateCall, StreamGate, ToolGate, check
from ...mcp.tools import Adapter, ToolResult
from ..base import WireFunctions, load_json_event, model_in_path, require_objects, sse_bytes

_PATH = re.compile(r"/models/([^/:]+):(stream)?[gG]enerateContent$")
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          409: "ABORTED", 413: "INVALID_ARGUMENT", 426: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
          500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def error_body(status: int, message: str) -> dict:
    """Google's error shape; the SDK raises it as ClientError (4xx) or ServerError (5xx)."""
    return {"error": {"code": status, "message": message,
                      "status": STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")}}


def parse_request(body: dict, path: str = "") -> RequestInfo:
    m = _PATH.search(path)
    model = m.group(1) if m else ""
    contents = require_objects(body, "contents", "content")
    prompt, tool_results = None, []
    for content in reversed(contents):
        if content.get("role", "user") != "user":
            continue
        parts = content.get("parts")
        if not isinstance(parts, list):
            raise BadRequest("contents[].parts: must be a list")
        responses = [p["functionResponse"] for p in parts
                     if isinstance(p, dict) and isinstance(p.get("functionResponse"), dict)]
        if responses:  # a tool round continues the turn: its prompt was recorded with its start
            tool_results = [r["id"] for r in responses if isinstance(r.get("id"), str)]
        else:
            texts = [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
            prompt = "\n".join(texts) or None
        break
    return RequestInfo(model, bool(m and m.group(2)), prompt, tool_results)


def prepare_request(body: dict) -> dict | None:
    return None


def _usage(u: dict, response_id: str | None) -> TokenUsage:
    """promptTokenCount includes the cached tokens; thoughts are billed as output."""
    thoughts = as_int(u.get("thoughtsTokenCount"))
    meta = {k: u[k] for k in ("thoughtsTokenCount", "toolUsePromptTokenCount", "totalTokenCount",
                              "promptTokensDetails", "cacheTokensDetails", "candidatesTokensDetails")
            if u.get(k) is not None}
    return TokenUsage.cached_inside(response_id, as_int(u.get("promptTokenCount")),
                                    as_int(u.get("cachedContentTokenCount")),
                                    as_int(u.get("candidatesTokenCount")) + thoughts, meta)


def _fold(obj: dict, s: ResponseSummary) -> None:
    """One response, or one chunk of a stream (usage is cumulative: the last one reported wins)."""
    if isinstance(obj.get("error"), dict):
        err = obj["error"]
        s.error = f"{err.get('status') or err.get('code') or 'error'}: {err.get('message', '')}"
        return
    s.response_id = s.response_id or obj.get("responseId")
    s.model = obj.get("modelVersion") or s.model
    for cand in obj.get("candidates") or []:
        if not isinstance(cand, dict):
            continue
        for part in (cand.get("content") or {}).get("parts") or []:
            if not isinstance(part, dict):
                continue
            call = part.get("functionCall")
            if isinstance(call, dict):
                s.tool_calls.append(ToolCall(s.response_id, call.get("id"), call.get("name") or "",
                                             json_text(call.get("args") or {})))
            elif part.get("thought") and isinstance(part.get("text"), str):
                if s.thoughts and s.state == "thinking":
                    s.thoughts[-1].content += part["text"]  # a streamed summary arrives in pieces
                else:
                    s.thoughts.append(Thought("reasoning_summary", part["text"]))
                s.state = "thinking"
                continue
            elif s.keep_text and isinstance(part.get("text"), str) and part["text"]:
                s.output_text.append(part["text"])
            s.state = None
        if cand.get("finishReason"):
            s.complete = True
            if isinstance(cand["finishReason"], str):
                s.finish_reasons.append(cand["finishReason"])
    usage = obj.get("usageMetadata")
    if isinstance(usage, dict):
        s.usages[:] = [_usage(usage, s.response_id)]
    feedback = obj.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        s.complete = True  # a blocked prompt is a complete (empty) answer


def on_event(ev: SSEEvent, s: ResponseSummary) -> None:
    obj = load_json_event(ev.data)
    if obj is not None:
        _fold(obj, s)


def finish_stream(s: ResponseSummary) -> None:
    return None


def summarize(body: dict | list) -> ResponseSummary:
    s = ResponseSummary()
    for obj in body if isinstance(body, list) else [body]:  # streamGenerateContent without alt=sse: an array
        if isinstance(obj, dict):
            _fold(obj, s)
    s.complete = s.complete or not s.error
    return s


def stream_error_event(message: str, s: ResponseSummary) -> bytes:
    """A chunk holding an `error` object: the google-genai SDK raises it as an APIError."""
    return sse_bytes(error_body(500, message))


# --- the injected-tool loop ---------------------------------------------------------------------------------


class GeminiAdapter(Adapter):
    """The injected-tool loop for gemini.generate_content: tools go in as `functionDeclarations` (with their JSON
    schema as `parametersJsonSchema`), results come back as `functionResponse` parts; the client sees one answer
    without the injected calls, and one usage summed over the rounds."""

    def __post_init__(self) -> None:
        self.base: dict = {}  # modelVersion, responseId of the first round
        self.round_parts: list[dict] = []  # everything the model said this round (for the continuation)
        self.client_parts: list[dict] = []  # blocking: what the client sees, all rounds
        self.finish: str | None = None
        self.round_usage: dict = {}
        self.prompt = self.cached = self.output = self.thoughts = 0

    def inject(self) -> dict:
        own = self.body.get("tools") or []
        declared = sum(len(t.get("functionDeclarations") or []) for t in own if isinstance(t, dict))
        decls = [{"name": t.name, "description": t.description, "parametersJsonSchema": t.input_schema}
                 for t in self._room(declared)]
        self.body = {**self.body, "tools": own + ([{"functionDeclarations": decls}] if decls else [])}
        return self.body

    def begin_round(self) -> None:
        super().begin_round()
        self.round_parts, self.round_usage = [], {}

    def round_end(self):
        u = self.round_usage  # cumulative within a round: the last one counts
        self.prompt += as_int(u.get("promptTokenCount"))
        self.cached += as_int(u.get("cachedContentTokenCount"))
        self.output += as_int(u.get("candidatesTokenCount"))
        self.thoughts += as_int(u.get("thoughtsTokenCount"))
        return super().round_end()

    def _usage(self) -> dict:
        u = {"promptTokenCount": self.prompt, "candidatesTokenCount": self.output,
             "totalTokenCount": self.prompt + self.output + self.thoughts}
        if self.cached:
            u["cachedContentTokenCount"] = self.cached
        if self.thoughts:
            u["thoughtsTokenCount"] = self.thoughts
        return u

    def _visible(self, obj: dict) -> dict | None:
        """A response (or chunk) as the client sees it: injected calls removed, the round's finish and usage held
        back for the end; None when nothing is left."""
        if isinstance(obj.get("usageMetadata"), dict):
            self.round_usage = obj["usageMetadata"]
        if not self.base:
            self.base = {k: obj[k] for k in ("modelVersion", "responseId") if k in obj}
        out = []
        for cand in obj.get("candidates") or []:
            if not isinstance(cand, dict):
                continue
            parts = [p for p in (cand.get("content") or {}).get("parts") or [] if isinstance(p, dict)]
            self.round_parts += parts
            kept = [p for p in parts
                    if not (isinstance(p.get("functionCall"), dict) and p["functionCall"].get("name") in self.tools)]
            if cand.get("finishReason"):
                self.finish = cand["finishReason"]
            if kept:
                rest = {k: v for k, v in cand.items() if k not in ("content", "finishReason")}
                out.append({**rest, "content": {"role": "model", "parts": kept}})
        if not out:
            return None
        return {**self.base, "candidates": out}

    def on_event(self, ev: SSEEvent) -> list[bytes]:
        self.fold(ev)
        obj = load_json_event(ev.data)
        if obj is None:
            return []
        if isinstance(obj.get("error"), dict):
            return [sse_bytes(obj)]
        visible = self._visible(obj)
        return [sse_bytes(visible)] if visible else []

    def on_body(self, obj: dict) -> None:
        self.fold_body(obj)
        visible = self._visible(obj)
        if visible:
            self.client_parts += visible["candidates"][0]["content"]["parts"]

    def continuation(self, results: list[ToolResult]) -> dict:
        answers = []
        for r in results:
            response = {"name": r.call.name, "response": {"error": r.text} if r.is_error else {"result": r.text}}
            if r.call.call_id:
                response["id"] = r.call.call_id
            answers.append({"functionResponse": response})
        contents = list(self.body.get("contents") or [])
        contents += [{"role": "model", "parts": self.round_parts}, {"role": "user", "parts": answers}]
        self.body = {**self.body, "contents": contents}
        return self.body

    def _final(self, parts: list[dict], note: str | None) -> dict:
        parts = parts + ([{"text": note}] if note else [])
        return {**self.base, "candidates": [{"content": {"role": "model", "parts": parts},
                                             "finishReason": "STOP" if note else (self.finish or "STOP"), "index": 0}],
                "usageMetadata": self._usage()}

    def finish_stream(self, note: str | None) -> list[bytes]:
        return [sse_bytes(self._final([], note))]

    def finish_body(self, note: str | None) -> bytes:
        return json.dumps(self._final(self.client_parts, note)).encode()


# --- the tool gate --------------------------------------------------------------------------------


def _gate_response(obj: dict, api: str, ask, text_before: bool) -> tuple[dict | None, bool]:
    """One response (or stream chunk) with each refused `functionCall` part replaced by a text part in its place
    (the other parts, the finishReason and the usage as they were); (None, …) when nothing was refused. Also says
    whether text has been given by now (a refusal after text starts a paragraph of its own)."""
    candidates = obj.get("candidates")
    if not isinstance(candidates, list):
        return None, text_before
    new_candidates, refused = [], False
    for cand in candidates:
        parts = (cand.get("content") or {}).get("parts") if isinstance(cand, dict) else None
        if not isinstance(parts, list):
            new_candidates.append(cand)
            continue
        new_parts = []
        for part in parts:
            call = part.get("functionCall") if isinstance(part, dict) else None
            if isinstance(call, dict):
                refusal = ask(GateCall(call.get("name") or "", json_text(call.get("args") or {}), call.get("id"), api))
                if refusal is not None:
                    refused = True
                    new_parts.append({"text": ("\n\n" if text_before else "") + refusal.text})
                    text_before = True
                    continue
            elif isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"] and not part.get("thought"):
                text_before = True
            new_parts.append(part)
        new_candidates.append({**cand, "content": {**cand["content"], "parts": new_parts}})
    return ({**obj, "candidates": new_candidates} if refused else None), text_before


class GeminiGate(StreamGate):
    """`functionCall` parts come whole within a chunk: nothing is held. A chunk with a refused call is sent with a
    `{"text": …}` part in the call's place (everything else in it unchanged, `finishReason` stays `STOP`); every
    other chunk passes as it came."""

    def __init__(self, api: str, decide) -> None:
        super().__init__(api, decide)
        self.text = False  # text was given: a refusal starts a paragraph of its own

    def on_event(self, ev: SSEEvent) -> None:
        raw = self.raw_of(ev)
        if '"functionCall"' not in ev.data:
            self.text = self.text or '"text"' in ev.data
            self.emit(raw)
            return
        obj = load_json_event(ev.data)
        if obj is None:
            self.emit(raw)
            return
        new, self.text = _gate_response(obj, self.api, self.ask, self.text)
        self.emit(raw if new is None else sse_bytes(new))


def gate_body(body, api: str, decide):
    """A whole response, or streamGenerateContent's JSON array of them (the pipeline reads that whole). None: nothing
    refused."""
    def ask(call: GateCall):
        return check(decide, call)

    if isinstance(body, dict):
        return _gate_response(body, api, ask, False)[0]
    if not isinstance(body, list):
        return None
    out, text, refused = [], False, False
    for obj in body:
        new = None
        if isinstance(obj, dict):
            new, text = _gate_response(obj, api, ask, text)
        refused = refused or new is not None
        out.append(obj if new is None else new)
    return out if refused else None


GATE = ToolGate(stream=GeminiGate, body=gate_body)


API = WireFunctions(
    name="gemini.generate_content", model_api=True, parse_request=parse_request, prepare_request=prepare_request,
    on_event=on_event, finish_stream=finish_stream, summarize=summarize, stream_error_event=stream_error_event,
    array_responses=True, adapter=GeminiAdapter, with_model=model_in_path(_PATH), gate=GATE,
)
