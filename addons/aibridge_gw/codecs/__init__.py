"""Wire-format knowledge, one module per API. Each codec module provides:

- ``parse_request(body) -> RequestInfo`` (raises ``BadRequest``)
- ``prepare_request(body) -> dict | None``: the body to send upstream if the gateway must change it
- ``on_event(event, summary)``: fold one SSE event into a ``ResponseSummary``
- ``summarize(body) -> ResponseSummary`` for a blocking JSON response
"""

from __future__ import annotations

import logging
from types import ModuleType

from ..records import ResponseSummary
from ..sse import SSEParser
from . import anthropic_messages, openai_chat, openai_responses

log = logging.getLogger(__name__)

BY_API: dict[str, ModuleType] = {
    "anthropic.messages": anthropic_messages,
    "openai.chat": openai_chat,
    "openai.responses": openai_responses,
}


class StreamTap:
    """A ``flow.response.stream`` callable: passes every chunk on unchanged and parses it on the way.

    Runs on mitmproxy's event loop, so it only parses; a parse failure stops parsing, never the stream.
    """

    __slots__ = ("codec", "parser", "summary", "broken", "bytes_seen")

    def __init__(self, codec: ModuleType) -> None:
        self.codec = codec
        self.parser = SSEParser()
        self.summary = ResponseSummary()
        self.broken: str | None = None
        self.bytes_seen = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.bytes_seen += len(chunk)
        if self.broken is None:
            try:
                for ev in self.parser.feed(chunk):
                    self.codec.on_event(ev, self.summary)
            except Exception as e:  # malformed provider output must not cut the client's stream
                self.broken = f"{type(e).__name__}: {e}"
                log.warning("stream parse stopped: %s", self.broken)
        return chunk
