"""Helpers shared by the codecs."""

from __future__ import annotations

import json
from typing import Any

from ..records import BadRequest


def require_model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a non-empty string is required")
    return model


def require_stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be a boolean")
    return stream


def text_of(content: Any, text_types: tuple[str, ...]) -> str | None:
    """Text of a message's content: a string, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [
        b["text"]
        for b in content
        if isinstance(b, dict) and b.get("type") in text_types and isinstance(b.get("text"), str)
    ]
    if not texts:
        return None
    # Coding agents wrap context in <system-reminder> blocks around the user's words; prefer the words.
    own = [t for t in texts if not t.lstrip().startswith("<system-reminder>")]
    return "\n".join(own or texts)


def load_json_event(data: str):
    """Parse an SSE data payload; None when it is not a JSON object (keep-alives, [DONE], junk)."""
    if not data or data[0] != "{":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def sse_bytes(obj: dict, event: str | None = None) -> bytes:
    """One SSE event as the providers frame it."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
