"""Conformance with real provider traffic: every capture in ../shared/fixtures/provider-traffic, streamed and
blocking, parses with the codec of its API — bytes pass through unchanged, nothing breaks the parser, and every
exchange that is not an error scenario ends complete with its usage. Collected only when ../shared is present
(see conftest.py); the rest of the suite runs on the project's own fixtures in tests/fixtures."""

from __future__ import annotations

import json

import pytest
from aibridge_gw.apis.wire import anthropic_messages, openai_chat, openai_responses
from aibridge_gw.flow.tap import StreamTap

from tests.support.fixtures import TRAFFIC, Capture, http_section, parse_txtar

CODECS = {"anthropic": anthropic_messages.API, "openai/chatcompletions": openai_chat.API, "openai/responses": openai_responses.API}
ERROR_SCENARIOS = ("error", "failure", "conversation", "wrong_response_format")


def shared_captures() -> list[str]:
    """The captured exchanges (files without a request section describe passthrough traffic, not an API call)."""
    return sorted(str(p.relative_to(TRAFFIC)) for p in TRAFFIC.rglob("*.txtar") if "-- request --\n" in p.read_text())


def codec_for(rel: str):
    return next(c for folder, c in CODECS.items() if rel.startswith(folder + "/"))


@pytest.mark.parametrize("rel", shared_captures())
def test_shared_capture_parses_like_the_real_thing(rel):
    cap = Capture(rel, parse_txtar((TRAFFIC / rel).read_text()))  # the real capture, not a project fixture
    codec = codec_for(rel)
    codec.parse_request(cap.request)
    expect_complete = not any(word in rel for word in ERROR_SCENARIOS)
    for name, text in cap.sections.items():
        if name == "request" or http_section(text) is not None:
            continue
        if name.startswith("streaming"):
            tap = StreamTap(codec)
            raw = text.encode()
            for i in range(0, len(raw), 53):
                assert tap(raw[i:i + 53]) == raw[i:i + 53]
            tail = tap(b"")
            codec.finish_stream(tap.summary)
            summary = tap.summary
            if expect_complete:
                assert tail == b"" and tap.broken is None, name
        else:
            try:
                body = json.loads(text)
            except ValueError:
                assert not expect_complete, name  # only the malformed-response scenarios may not be JSON
                continue
            summary = codec.summarize(body)
        if expect_complete:
            assert summary.complete and summary.error is None and summary.usages, name
