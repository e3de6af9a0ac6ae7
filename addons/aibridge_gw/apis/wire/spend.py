"""Spend-bearing endpoints besides the chat APIs: embeddings, legacy completions, images, audio, moderations,
batches, realtime sessions, …. They are authenticated, budget-checked and recorded like model calls, with the
usage their response reports; their bodies may be JSON, multipart forms or binary audio.

One `SpendCodec` (a WireApi) per api name; each provider module lists its own.
"""

from __future__ import annotations

from typing import Any

from ...flow.exchange import BadRequest, RequestInfo, ResponseSummary, TokenUsage, as_int
from ...flow.sse import SSEEvent
from ..base import load_json_event, require_stream_flag


def usage_from(u: dict, response_id: str | None) -> TokenUsage:
    """OpenAI's usage shapes (prompt/completion or input/output tokens); cached tokens split out of the input."""
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    given = as_int(u.get("prompt_tokens")) or as_int(u.get("input_tokens"))
    output = as_int(u.get("completion_tokens")) or as_int(u.get("output_tokens"))
    meta = {k: v for k, v in u.items()
            if k not in ("prompt_tokens", "input_tokens", "completion_tokens", "output_tokens") and v is not None}
    return TokenUsage.cached_inside(response_id, given, cached, output, meta)


class SpendCodec:
    """Reads the model (and, for legacy completions, the prompt) from the request and the usage from the
    response; streams end at [DONE] or at the end of the body (these APIs have no common final event)."""

    model_api = False
    ends_at_eof = True
    adapter = None
    array_responses = False

    def __init__(self, name: str, model_required: bool = False, prompt_field: str | None = None,
                 stream_usage: bool = False, batch_requests: bool = False, facts: tuple[str, ...] = ()) -> None:
        self.name = name
        self.model_required = model_required
        self.prompt_field = prompt_field
        self.stream_usage = stream_usage  # ask for usage in streams (stream_options.include_usage)
        self.batch_requests = batch_requests  # Anthropic message batches: the model is in requests[].params
        self.facts = facts  # request fields kept in the record's metadata (plain strings)

    def parse_request(self, body: dict, path: str = "") -> RequestInfo:
        model = body.get("model")
        facts = {k: body[k][:200] for k in self.facts if isinstance(body.get(k), str)}
        if self.batch_requests:
            reqs = body.get("requests")
            if not isinstance(reqs, list) or not reqs:
                raise BadRequest("requests: a non-empty list is required")
            facts["requests"] = len(reqs)
            models = {r.get("params", {}).get("model") for r in reqs
                      if isinstance(r, dict) and isinstance(r.get("params"), dict)}
            model = next((m for m in sorted(models, key=str) if isinstance(m, str)), None)
        if model is not None and not isinstance(model, str):
            raise BadRequest("model: must be a string")
        if self.model_required and not model:
            raise BadRequest("model: a non-empty string is required")
        stream = require_stream_flag(body) if isinstance(body.get("stream"), (bool, type(None))) else False
        prompt = None
        if self.prompt_field:
            p = body.get(self.prompt_field)
            if isinstance(p, str):
                prompt = p
            elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
                prompt = "\n".join(p)
        so = body.get("stream_options")
        return RequestInfo(model or "", stream, prompt, [], raw_stream_options=so if isinstance(so, dict) else None,
                           facts=facts or None)

    def prepare_request(self, body: dict) -> dict | None:
        if not (self.stream_usage and body.get("stream") is True):
            return None
        so = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        if so.get("include_usage") is True:
            return None
        return {**body, "stream_options": {**so, "include_usage": True}}

    def on_event(self, ev: SSEEvent, s: ResponseSummary) -> None:
        if ev.data.strip() == "[DONE]":
            s.complete = True
            return
        obj = load_json_event(ev.data)
        if obj is None:
            return
        _fold(obj, s)

    def summarize(self, body: dict) -> ResponseSummary:
        s = ResponseSummary(complete=True)
        _fold(body, s)
        return s

    def finish_stream(self, s: ResponseSummary) -> None:
        return None

    def stream_error_event(self, message: str, s: ResponseSummary) -> bytes:
        """These streams have no shared error event; the client sees the stream end."""
        return b""


def _fold(obj: dict, s: ResponseSummary) -> None:
    """Take id, model, error and usage from a response body or stream event (the last usage reported wins)."""
    inner: Any = obj.get("response") if isinstance(obj.get("response"), dict) else obj
    if isinstance(inner.get("id"), str):
        s.response_id = s.response_id or inner["id"]
    if isinstance(inner.get("model"), str):
        s.model = inner["model"]
    err = obj.get("error")
    if isinstance(err, dict) and (obj.get("type") in (None, "error") or not obj.get("object")):
        s.error = f"{err.get('type') or err.get('code') or 'error'}: {err.get('message', '')}"
    usage = inner.get("usage")
    if isinstance(usage, dict):
        s.usages[:] = [usage_from(usage, s.response_id)]

