"""Codecs read usage, tool calls, thoughts and errors exactly as the providers report them.

Fed with the real captures in ../shared/fixtures/provider-traffic; streams are replayed in small uneven
chunks, as they arrive over a network.
"""

import json

import pytest
from aibridge_gw.apis import WIRE_APIS as BY_API
from aibridge_gw.flow.exchange import BadRequest
from aibridge_gw.flow.tap import StreamTap

from tests.support.fixtures import capture

A, C, R = BY_API["anthropic.messages"], BY_API["openai.chat"], BY_API["openai.responses"]


def stream(codec, text: str, step: int = 37):
    tap = StreamTap(codec)
    raw = text.encode()
    for i in range(0, len(raw), step):
        assert tap(raw[i : i + step]) == raw[i : i + step]  # bytes pass through unchanged
    tap(b"")
    codec.finish_stream(tap.summary)
    return tap.summary


def blocking(codec, text: str):
    return codec.summarize(json.loads(text))


def usage(s):
    return [(u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_write_input_tokens) for u in s.usages]


def tools(s):
    return [(t.name, t.call_id, json.loads(t.input) if t.input.startswith("{") else t.input) for t in s.tool_calls]


def test_anthropic_stream_output_tokens_are_the_final_count_not_a_sum():
    cap = capture("anthropic/simple.txtar")
    s = stream(A, cap.sections["streaming"])
    # message_start says output_tokens=1, message_delta says 187: the answer is 187, not 188.
    assert usage(s) == [(21, 187, 0, 0)]
    assert s.response_id == "msg_01AibrSimple5Vq8Rm2Tx7Kd3" and s.complete and s.error is None
    assert [t.source for t in s.thoughts] == ["thinking"]
    assert s.thoughts[0].content.startswith("The user asks what an AI gateway is for")
    assert usage(blocking(A, cap.sections["non-streaming"])) == [(21, 203, 0, 0)]


def test_anthropic_cache_tokens_and_tool_calls():
    cap = capture("anthropic/single_builtin_tool.txtar")
    s = stream(A, cap.sections["streaming"])
    assert usage(s) == [(4, 58, 12873, 31)]
    assert tools(s) == [("Read", "toolu_01AibrReadStream7Qx2Lm5", {"file_path": "/srv/app/config.yaml"})]
    b = blocking(A, cap.sections["non-streaming"])
    assert usage(b) == [(6, 77, 21907, 0)]
    assert tools(b) == [("Read", "toolu_01AibrReadBlock4Kp8Zc3", {"file_path": "/srv/app/config.yaml"})]


def test_anthropic_parallel_tool_calls_and_multiple_thinking_blocks():
    s = stream(A, capture("anthropic/single_builtin_tool_parallel.txtar").sections["streaming"])
    assert [t[1] for t in tools(s)] == ["toolu_01AibrParallelOne4Rt8", "toolu_01AibrParallelTwo7Jk2"]
    assert [t[2] for t in tools(s)] == [{"file_path": "/srv/app/config.yaml"}, {"file_path": "/srv/app/config.prod.yaml"}]
    m = stream(A, capture("anthropic/multi_thinking_builtin_tool.txtar").sections["streaming"])
    assert [t.source for t in m.thoughts] == ["thinking", "thinking"]


def test_anthropic_mid_stream_error_keeps_usage_seen_so_far():
    s = stream(A, capture("anthropic/stream_error.txtar").sections["streaming"])
    assert not s.complete
    assert s.error == "api_error: Overloaded"
    assert usage(s) == [(15, 1, 0, 0)]


def test_anthropic_request_prompt_session_and_tool_results():
    info = A.parse_request(
        {
            "model": "claude-x",
            "stream": True,
            "metadata": {"user_id": "user_abc_account_def_session_0f6b5a2e-1111-4222-8333-444455556666"},
            "messages": [
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "file body"},
                    {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                    {"type": "text", "text": "and now summarise"},
                ]},
            ],
        }
    )
    assert info.model == "claude-x" and info.stream is True
    assert info.prompt == "and now summarise"
    assert info.tool_result_ids == ["toolu_1"]
    assert info.session_hint == "0f6b5a2e-1111-4222-8333-444455556666"
    json_style = A.parse_request({"model": "m", "messages": [], "metadata": {"user_id": json.dumps({"session_id": "s-1"})}})
    assert json_style.session_hint == "s-1"


@pytest.mark.parametrize(
    "body",
    [{"messages": []}, {"model": "m"}, {"model": "m", "messages": "hi"}, {"model": 5, "messages": []},
     {"model": "m", "messages": [], "stream": "yes"}],
)
def test_anthropic_rejects_bodies_that_are_not_messages_requests(body):
    with pytest.raises(BadRequest):
        A.parse_request(body)


def test_chat_usage_splits_cached_tokens_out_of_prompt_tokens():
    cap = capture("openai/chatcompletions/single_injected_tool.txtar")
    s = stream(C, cap.sections["streaming/tool-call"])
    # prompt_tokens 4627 of which 4352 cached: 275 uncached input + 4352 cache read.
    assert usage(s) == [(275, 52, 4352, 0)]


def test_chat_stream_and_blocking_usage_and_tool_calls():
    cap = capture("openai/chatcompletions/simple.txtar")
    assert usage(stream(C, cap.sections["streaming"])) == [(14, 171, 0, 0)]
    assert usage(blocking(C, cap.sections["non-streaming"])) == [(14, 146, 0, 0)]
    cap = capture("openai/chatcompletions/single_builtin_tool.txtar")
    s = stream(C, cap.sections["streaming"])
    assert tools(s) == [("read_file", "call_AibrStreamRead9Tq2Wm", {"path": "setup.cfg"})]
    assert s.complete and usage(s) == [(57, 16, 0, 0)]


def test_chat_tool_call_with_nonzero_index():
    s = stream(C, capture("openai/chatcompletions/streaming_injected_tool_nonzero_index.txtar").sections["streaming"])
    assert [t.call_id for t in s.tool_calls] == ["call_AibrNonzeroIdx3Fk8"]
    assert usage(s) == [(496, 47, 6016, 0)]


def test_chat_mid_stream_error_marks_failure():
    s = stream(C, capture("openai/chatcompletions/stream_error.txtar").sections["streaming"])
    assert not s.complete and s.error.startswith("server_error: The server had an error")


def test_chat_streams_are_asked_to_include_usage():
    body = {"model": "m", "messages": [], "stream": True}
    assert C.prepare_request(body)["stream_options"] == {"include_usage": True}
    assert C.prepare_request({**body, "stream_options": {"include_usage": True}}) is None
    assert C.prepare_request({"model": "m", "messages": []}) is None


def test_chat_request_prompt_and_trailing_tool_results():
    info = C.parse_request(
        {"model": "gpt", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is in README?"}]},
            {"role": "assistant", "tool_calls": [{"id": "call_1"}, {"id": "call_2"}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a"},
            {"role": "tool", "tool_call_id": "call_2", "content": "b"},
        ]}
    )
    # A tool round continues the turn: its prompt was recorded with the request that started it.
    assert info.prompt is None and info.tool_result_ids == ["call_1", "call_2"]


def test_responses_cached_input_tokens():
    s = stream(R, capture("openai/responses/streaming/cached_input_tokens.txtar").sections["streaming"])
    assert usage(s) == [(14210 - 13056, 47, 13056, 0)]
    b = blocking(R, capture("openai/responses/blocking/cached_input_tokens.txtar").sections["non-streaming"])
    assert usage(b) == [(10343 - 10112, 38, 10112, 0)]


def test_responses_reasoning_summary_commentary_and_function_call():
    for s in (
        stream(R, capture("openai/responses/streaming/summary_and_commentary_builtin_tool.txtar").sections["streaming"]),
        blocking(R, capture("openai/responses/blocking/summary_and_commentary_builtin_tool.txtar").sections["non-streaming"]),
    ):
        assert [(t.source, t.content) for t in s.thoughts] == [
            ("reasoning_summary", "I should add 4 and 9, then check whether the sum is prime."),
            ("commentary", "I'll add the two numbers with the add tool first."),
        ]
        assert tools(s) == [("add", "call_AibrAdd6Mv2Qr8Tz1Lk4Wp", {"a": 4, "b": 9})]
        assert usage(s) == [(61, 42, 0, 0)]


def test_responses_custom_tool_input_is_kept_raw():
    s = stream(R, capture("openai/responses/streaming/custom_tool.txtar").sections["streaming"])
    assert tools(s) == [("shell_exec", "call_AibrCustom5Gy7Np3Xd", "ls -la /srv/app")]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("stream_error", "ERR_UPSTREAM_TIMEOUT: The upstream model timed out"),
        ("stream_failure", "server_error: The model could not finish this response."),
        ("conversation", "invalid_request_error: Conversation with id"),
    ],
)
def test_responses_stream_errors(name, expected):
    s = stream(R, capture(f"openai/responses/streaming/{name}.txtar").sections["streaming"])
    assert s.error.startswith(expected)


def test_responses_malformed_event_is_skipped_without_breaking_the_rest():
    s = stream(R, capture("openai/responses/streaming/wrong_response_format.txtar").sections["streaming"])
    assert s.complete and usage(s) == [(9, 23, 0, 0)]


def test_responses_request_prompt_and_tool_outputs():
    info = R.parse_request(capture("openai/responses/streaming/codex_example.txtar").request)
    assert info.model == "gpt-5-codex" and info.stream and info.prompt == "hello"
    info = R.parse_request({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "add them"}]},
        {"type": "function_call", "call_id": "call_9", "name": "add", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_9", "output": "8"},
    ]})
    assert info.prompt is None and info.tool_result_ids == ["call_9"]  # a tool round: no new prompt
    with pytest.raises(BadRequest):
        R.parse_request({"model": "m"})


def test_usage_counts_as_providers_send_them_integral_floats_and_values_beyond_the_column():
    """1000.0 is 1000 tokens in every API (it was 0); 2^63+5 is kept until the recorder bounds it: clamped to
    BIGINT's maximum and named in the usage's metadata; a fraction rounds; negative, NaN and booleans count 0."""
    import datetime as dt

    from aibridge_gw.config import Limits
    from aibridge_gw.flow.exchange import BIGINT_MAX, as_int
    from aibridge_gw.policy.budgets import Budgets
    from aibridge_gw.pricing import PriceTable

    big = 2**63 + 5
    s = A.summarize({"id": "m", "model": "claude-sonnet-4-0", "content": [],
                     "usage": {"input_tokens": 1000.0, "output_tokens": big, "cache_read_input_tokens": 3.0}})
    assert usage(s) == [(1000, big, 3, 0)]
    s = C.summarize({"id": "c", "model": "gpt-4.1", "choices": [],
                     "usage": {"prompt_tokens": 1000.0, "completion_tokens": 7.0,
                               "prompt_tokens_details": {"cached_tokens": 10.0}}})
    assert usage(s) == [(990, 7, 10, 0)]
    s = R.summarize({"id": "r", "model": "gpt-5", "status": "completed", "output": [],
                     "usage": {"input_tokens": 1000.0, "output_tokens": float("inf")}})
    assert usage(s)[0][:1] == (1000,) and usage(s)[0][1] > BIGINT_MAX
    assert [as_int(v) for v in (12.6, -5, float("nan"), True, "7", None, -0.0)] == [13, 0, 0, 0, 0, 0, 0]

    u = s.usages[0]
    assert u.bound() and u.output_tokens == BIGINT_MAX and u.metadata["usage_clamped"] == ["output_tokens"]
    assert u.bound() and u.metadata["usage_clamped"] == ["output_tokens"]  # idempotent

    budgets = Budgets(Limits(tokens_per_day=100), {}, PriceTable({}))
    now = dt.datetime.now(dt.UTC)
    budgets.record("u1", now, "gpt-5", [u])  # clamped: charged to no budget
    assert budgets.check("u1", "someone") is None
    budgets.record("u1", now, "gpt-5", s.usages[:0] + A.summarize(
        {"id": "m", "content": [], "usage": {"input_tokens": big, "output_tokens": 1}}).usages)  # not yet bounded
    assert budgets.check("u1", "someone") is None
    budgets.record("u1", now, "gpt-5", A.summarize({"id": "m", "content": [], "usage": {"input_tokens": 100.0}}).usages)
    assert budgets.check("u1", "someone") is not None  # 100.0 tokens are charged as 100
