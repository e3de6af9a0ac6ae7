"""Property-based tests: any input to the request parsers and stream parsers gives a result or a clean error."""

from __future__ import annotations

import json
import uuid

from aibridge_gw.apis import WIRE_APIS as BY_API
from aibridge_gw.flow.exchange import BadRequest, RequestInfo
from aibridge_gw.flow.recorder import child_id
from aibridge_gw.flow.sse import SSEParser
from aibridge_gw.flow.tap import StreamTap
from hypothesis import given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
shaped = st.fixed_dictionaries(
    {},
    optional={"model": json_values | st.text(max_size=10), "messages": json_values | st.lists(json_values),
              "input": json_values, "stream": json_values, "metadata": json_values, "stream_options": json_values,
              "tools": json_values},
)


@settings(max_examples=300, deadline=None)
@given(body=shaped, api=st.sampled_from(sorted(BY_API)))
def test_request_parsers_give_info_or_bad_request(body, api):
    codec = BY_API[api]
    try:
        info = codec.parse_request(body)
    except BadRequest:
        return
    assert isinstance(info, RequestInfo) and isinstance(info.model, str)
    codec.prepare_request(body)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
def test_sse_parser_accepts_any_bytes_however_split(data, cuts):
    whole = SSEParser().feed(data) + SSEParser().feed(b"")
    p = SSEParser()
    parts, prev = [], 0
    for c in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
        parts.append(data[prev:c])
        prev = c
    events = [e for part in parts if part for e in p.feed(part)] + p.feed(b"")
    one = SSEParser()
    ref = one.feed(data) + one.feed(b"")
    assert [(e.event, e.data) for e in events] == [(e.event, e.data) for e in ref]
    assert whole is not None


event_lines = st.lists(
    st.sampled_from(["event: message_start", "event: content_block_delta", "event: error", "data: [DONE]",
                     'data: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":1}}}',
                     'data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"x"}}',
                     'data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{"}}',
                     'data: {"type":"response.output_item.done","item":{"type":"function_call"}}',
                     'data: {"choices":[{"delta":{"tool_calls":[{"index":"x"}]}}]}', "data: {", ": comment", ""])
    | st.text(max_size=40),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(lines=event_lines, api=st.sampled_from(sorted(BY_API)), junk=st.binary(max_size=50))
def test_stream_taps_pass_bytes_through_and_never_raise(lines, api, junk):
    codec = BY_API[api]
    tap = StreamTap(codec)
    data = ("\n".join(lines) + "\n\n").encode() + junk
    for i in range(0, len(data), 7):
        assert tap(data[i:i + 7]) == data[i:i + 7]
    tap(b"")
    codec.finish_stream(tap.summary)
    json.dumps([u.input_tokens for u in tap.summary.usages])


@given(st.uuids(), st.sampled_from(["prompt", "usage", "tool", "thought"]), st.integers(0, 10_000))
def test_child_ids_are_uuid5_of_the_interception_id(parent, kind, n):
    """Replaying a flow saved by any version must rewrite the same row ids: they are uuid5, however computed."""
    assert child_id(str(parent), kind, n) == str(uuid.uuid5(parent, f"{kind}:{n}"))
