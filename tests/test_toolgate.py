"""The tool gate (flow/toolgate.py and each wire API's gate): every tool call the model emits for the client is
decided before the client sees it. Judged by the official SDKs, which read the gated bytes from a loopback server:
a refused call is gone, its refusal is shown, the turn ends the API's way; allowed calls, text and usage pass
byte for byte; text is not held back; any chunking gives the same result; without a gate nothing changes."""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aibridge_gw.apis import WIRE_APIS
from aibridge_gw.apis.bedrock.eventstream import Native, ToSSE, chunk_frame
from aibridge_gw.flow.sse import SSEParser
from aibridge_gw.flow.tap import StreamTap
from aibridge_gw.flow.toolgate import GateCall, Refusal, SSEGate, check, gate_body, stream_gate
from tests.support.fixtures import capture, captures, http_section, sse_events

ANTHROPIC, CHAT, RESPONSES, GEMINI = "anthropic.messages", "openai.chat", "openai.responses", "gemini.generate_content"


# --- helpers ------------------------------------------------------------------------------------------------


def sse(obj, event=None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class Policy:
    """A `decide` that refuses calls whose name (or input) matches, and remembers every call it saw."""

    def __init__(self, *deny: str, rule: str = "no-shell", message: str = "this tool is not allowed here") -> None:
        self.deny, self.rule, self.message = deny, rule, message
        self.seen: list[GateCall] = []

    def __call__(self, call: GateCall):
        self.seen.append(call)
        if any(d == call.name or d in call.input for d in self.deny):
            return Refusal(self.rule, self.message)
        return None

    @property
    def text(self) -> str:
        return f"aibridge policy {self.rule}: {self.message}"


ALLOW = Policy()


def run_tap(api: str, chunks: list[bytes], decide=None, framing=None):
    """Feed a tap chunk by chunk; returns (what each call returned, the tap)."""
    codec = WIRE_APIS[api]
    tap = StreamTap(codec, framing, gate=None if decide is None else stream_gate(codec, decide))
    outs = []
    for c in chunks:
        r = tap(c)
        outs.append(r if isinstance(r, bytes) else b"".join(r))
    outs.append(tap(b""))
    return outs, tap


def gated(api: str, data: bytes | list[bytes], decide) -> bytes:
    chunks = data if isinstance(data, list) else [data]
    return b"".join(run_tap(api, chunks, decide)[0])


def fixture_stream(rel: str, section: str = "streaming") -> bytes:
    """A captured stream, each event ended by its blank line (a txtar section may drop the last one)."""
    return b"".join(sse_events(capture(rel).sections[section]))


def fixture_json(rel: str, section: str = "non-streaming"):
    return json.loads(capture(rel).sections[section])


def events(data: bytes) -> list[dict]:
    p = SSEParser()
    out = []
    for ev in p.feed(data) + p.feed(b""):
        try:
            out.append(json.loads(ev.data))
        except ValueError:
            out.append({"_raw": ev.data})
    return out


# --- the loopback server the SDKs read from -----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.server.requests.append((self.path, self.rfile.read(length)))
        chunks, ctype = self.server.reply
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("transfer-encoding", "chunked")
        self.send_header("connection", "close")
        self.end_headers()
        for c in chunks:
            if c:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests = []
    srv.reply = ([b""], "text/event-stream")
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()

    def serve(chunks, ctype="text/event-stream"):
        srv.reply = (chunks if isinstance(chunks, list) else [chunks], ctype)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield serve
    srv.shutdown()
    srv.server_close()


def anthropic_client(url):
    import anthropic

    return anthropic.Anthropic(base_url=url, api_key="sk-test", max_retries=0)


def openai_client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)


def genai_client(url):
    from google import genai
    from google.genai import types

    return genai.Client(api_key="test", http_options=types.HttpOptions(base_url=url))


# --- the streams the tests use -------------------------------------------------------------------------------

PARALLEL = "anthropic/single_builtin_tool_parallel.txtar"  # thinking, then two Read calls
ANTHROPIC_TOOL = "anthropic/multi_thinking_builtin_tool.txtar"  # thinking, text, thinking, one Read call
CHAT_TOOL = "openai/chatcompletions/single_builtin_tool.txtar"
CHAT_COMPAT = "openai/chatcompletions/streaming_injected_tool_nonzero_index.txtar"  # text, then a call at index 1
RESP_TOOL = "openai/responses/streaming/summary_and_commentary_builtin_tool.txtar"  # reasoning, text, add()
RESP_CUSTOM = "openai/responses/streaming/custom_tool.txtar"
GEMINI_TOOL = "gemini/single_tool_cached.txtar"

STREAM_FIXTURES = [
    (ANTHROPIC, PARALLEL), (ANTHROPIC, ANTHROPIC_TOOL), (ANTHROPIC, "anthropic/single_builtin_tool.txtar"),
    (ANTHROPIC, "anthropic/simple.txtar"), (ANTHROPIC, "anthropic/stream_error.txtar"),
    (CHAT, CHAT_TOOL), (CHAT, CHAT_COMPAT), (CHAT, "openai/chatcompletions/simple.txtar"),
    (CHAT, "openai/chatcompletions/stream_error.txtar"),
    (RESPONSES, RESP_TOOL), (RESPONSES, RESP_CUSTOM), (RESPONSES, "openai/responses/streaming/codex_example.txtar"),
    (RESPONSES, "openai/responses/streaming/simple.txtar"), (RESPONSES, "openai/responses/streaming/stream_error.txtar"),
    (GEMINI, GEMINI_TOOL), (GEMINI, "gemini/simple.txtar"), (GEMINI, "gemini/single_injected_tool.txtar"),
]

CHAT_BASE = {"id": "chatcmpl-Gate1", "object": "chat.completion.chunk", "created": 1763900000, "model": "gpt-4.1",
             "system_fingerprint": "fp_gate"}


def chat_parallel() -> list[bytes]:
    """Text, then two parallel calls (run_shell at index 0, read_file at index 1), finish, usage, [DONE]."""
    def chunk(delta, finish=None):
        return sse({**CHAT_BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    "usage": None})
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking "}), chunk({"content": "both."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_Shell1", "type": "function",
                               "function": {"name": "run_shell", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"cmd\": \"rm"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " -rf /\"}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_Read2", "type": "function",
                               "function": {"name": "read_file", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{\"path\": \"a.txt\"}"}}]}),
        chunk({}, "tool_calls"),
        sse({**CHAT_BASE, "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70,
                                                   "prompt_tokens_details": {"cached_tokens": 0}}}),
        b"data: [DONE]\n\n",
    ]


def responses_parallel() -> list[bytes]:
    """A message, then two function calls (run_shell, then read_file), completed with usage."""
    rid = "resp_gate1"
    base = {"id": rid, "object": "response", "created_at": 1763900000, "status": "in_progress", "model": "gpt-5",
            "output": [], "usage": None, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True}
    msg = {"id": "msg_g1", "type": "message", "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": "Checking both.", "annotations": [], "logprobs": []}]}
    shell = {"id": "fc_g2", "type": "function_call", "status": "completed", "arguments": "{\"cmd\":\"rm -rf /\"}",
             "call_id": "call_Shell1", "name": "run_shell"}
    read = {"id": "fc_g3", "type": "function_call", "status": "completed", "arguments": "{\"path\":\"a.txt\"}",
            "call_id": "call_Read2", "name": "read_file"}
    evs = [
        ("response.created", {"response": base}),
        ("response.in_progress", {"response": base}),
        ("response.output_item.added", {"output_index": 0, "item": {**msg, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {"item_id": "msg_g1", "output_index": 0, "content_index": 0,
                                         "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
        ("response.output_text.delta", {"item_id": "msg_g1", "output_index": 0, "content_index": 0,
                                        "delta": "Checking both.", "logprobs": []}),
        ("response.output_text.done", {"item_id": "msg_g1", "output_index": 0, "content_index": 0,
                                       "text": "Checking both.", "logprobs": []}),
        ("response.content_part.done", {"item_id": "msg_g1", "output_index": 0, "content_index": 0,
                                        "part": msg["content"][0]}),
        ("response.output_item.done", {"output_index": 0, "item": msg}),
    ]
    for oi, call in ((1, shell), (2, read)):
        args = call["arguments"]
        evs += [
            ("response.output_item.added", {"output_index": oi, "item": {**call, "status": "in_progress",
                                                                          "arguments": ""}}),
            ("response.function_call_arguments.delta", {"item_id": call["id"], "output_index": oi,
                                                        "delta": args[:7]}),
            ("response.function_call_arguments.delta", {"item_id": call["id"], "output_index": oi,
                                                        "delta": args[7:]}),
            ("response.function_call_arguments.done", {"item_id": call["id"], "output_index": oi, "arguments": args}),
            ("response.output_item.done", {"output_index": oi, "item": call}),
        ]
    done = {**base, "status": "completed", "output": [msg, shell, read],
            "usage": {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 30,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 70}}
    evs.append(("response.completed", {"response": done}))
    return [sse({"type": kind, "sequence_number": n, **body}, kind) for n, (kind, body) in enumerate(evs)]


GEMINI_BASE = {"modelVersion": "gemini-2.5-flash", "responseId": "gemGate1"}


def gemini_stream() -> list[bytes]:
    """Text, then a chunk with text, run_shell and read_file calls; usage on the last chunk."""
    return [
        sse({**GEMINI_BASE, "candidates": [{"content": {"role": "model", "parts": [{"text": "Checking"}]},
                                            "index": 0}]}),
        sse({**GEMINI_BASE, "candidates": [{"content": {"role": "model", "parts": [
            {"text": " both."},
            {"functionCall": {"name": "run_shell", "args": {"cmd": "rm -rf /"}}, "thoughtSignature": "c2ln"},
            {"functionCall": {"name": "read_file", "args": {"path": "a.txt"}}}]},
            "index": 0, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 12, "totalTokenCount": 42}}),
    ]


# --- without a gate, and with one that allows everything: the bytes as they came ---------------------------


@pytest.mark.parametrize("api,rel", STREAM_FIXTURES)
def test_without_a_gate_the_tap_relays_every_chunk_unchanged(api, rel):
    data = fixture_stream(rel)
    chunks = [data[i:i + 53] for i in range(0, len(data), 53)]
    outs, _ = run_tap(api, chunks)
    assert outs[:-1] == chunks  # each chunk as it came, in the same call


@pytest.mark.parametrize("api,rel", STREAM_FIXTURES)
def test_a_gate_that_allows_everything_relays_the_same_bytes_and_records_the_same(api, rel):
    data = fixture_stream(rel)
    chunks = [data[i:i + 41] for i in range(0, len(data), 41)]
    policy = Policy()
    outs, tap = run_tap(api, chunks, policy)
    plain_outs, plain = run_tap(api, chunks)
    assert b"".join(outs) == b"".join(plain_outs)
    assert tap.summary.tool_calls == plain.summary.tool_calls and tap.summary.usages == plain.summary.usages
    # Every call the client was to run was decided, with the arguments the record keeps.
    assert [(c.name, c.input, c.call_id) for c in policy.seen] == \
        [(t.name, t.input, t.call_id) for t in plain.summary.tool_calls]


def test_the_raw_parser_gives_back_every_byte_however_the_stream_is_split():
    data = b"".join(fixture_stream(r) for _, r in STREAM_FIXTURES[:3]) + b": ping\r\n\r\ndata: x\r\rdata: tail"
    import random

    rnd = random.Random(7)
    for _ in range(200):
        cuts = sorted(rnd.sample(range(1, len(data)), 12))
        p = SSEParser(keep_raw=True)
        evs = []
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            evs += p.feed(data[a:b])
        evs += p.feed(b"")
        assert b"".join(e.raw for e in evs) == data


# --- Anthropic Messages --------------------------------------------------------------------------------------


def test_anthropic_parallel_calls_one_refused_the_sdk_sees_text_in_its_place(server):
    policy = Policy("/srv/app/config.prod.yaml")
    out = gated(ANTHROPIC, fixture_stream(PARALLEL), policy)
    assert [c.input for c in policy.seen] == ['{"file_path": "/srv/app/config.yaml"}',
                                              '{"file_path": "/srv/app/config.prod.yaml"}']
    client = anthropic_client(server(out))
    with client.messages.stream(model="claude-sonnet-4-20250514", max_tokens=64,
                                messages=[{"role": "user", "content": "compare"}]) as s:
        for _ in s:
            pass
        msg = s.get_final_message()
    assert [b.type for b in msg.content] == ["thinking", "tool_use", "text"]
    assert msg.content[1].input == {"file_path": "/srv/app/config.yaml"}
    assert msg.content[2].text == policy.text
    assert msg.stop_reason == "tool_use"  # the allowed call is still owed its result
    assert msg.usage.output_tokens == 96
    # The allowed call's events are the provider's bytes.
    original = fixture_stream(PARALLEL)
    start = original.index(b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1")
    end = original.index(b"event: content_block_start", start + 10)
    assert original[start:end] in out


def test_anthropic_only_call_refused_ends_the_turn(server):
    policy = Policy("Read")
    out = gated(ANTHROPIC, fixture_stream(ANTHROPIC_TOOL), policy)
    client = anthropic_client(server(out))
    chunks = list(client.messages.create(model="claude-sonnet-4-20250514", max_tokens=64, stream=True,
                                         messages=[{"role": "user", "content": "x"}]))
    assert not any(getattr(e, "content_block", None) is not None and e.content_block.type == "tool_use"
                   for e in chunks)
    with client.messages.stream(model="claude-sonnet-4-20250514", max_tokens=64,
                                messages=[{"role": "user", "content": "x"}]) as s:
        msg = s.get_final_message()
    assert [b.type for b in msg.content] == ["thinking", "text", "thinking", "text"]
    assert msg.content[3].text == policy.text and msg.content[1].text == "Let me look at it."
    assert msg.stop_reason == "end_turn"


def test_anthropic_server_tool_use_is_not_gated():
    stream = [
        sse({"type": "message_start", "message": {"id": "msg_s", "type": "message", "role": "assistant",
             "model": "claude-sonnet-4-20250514", "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 5, "output_tokens": 1}}}, "message_start"),
        sse({"type": "content_block_start", "index": 0, "content_block": {"type": "server_tool_use", "id": "srvtoolu_1",
             "name": "web_search", "input": {}}}, "content_block_start"),
        sse({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
             "partial_json": "{\"query\": \"x\"}"}}, "content_block_delta"),
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 9}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    policy = Policy("web_search")
    outs, _ = run_tap(ANTHROPIC, stream, policy)
    assert outs[:-1] == stream and policy.seen == []


# --- OpenAI Chat Completions -----------------------------------------------------------------------------------


def test_chat_parallel_calls_first_refused_the_sdk_sees_the_other_and_the_refusal(server):
    policy = Policy("run_shell")
    stream = chat_parallel()
    out = gated(CHAT, stream, policy)
    assert [c.name for c in policy.seen] == ["run_shell", "read_file"]
    assert policy.seen[0].input == "{\"cmd\": \"rm -rf /\"}"
    client = openai_client(server(out))
    with client.chat.completions.stream(model="gpt-4.1", messages=[{"role": "user", "content": "x"}]) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert [(t.function.name, t.function.arguments) for t in msg.tool_calls] == [("read_file", "{\"path\": \"a.txt\"}")]
    assert msg.content == "Checking both.\n\n" + policy.text
    assert final.choices[0].finish_reason == "tool_calls"  # one call was let through
    assert final.usage.total_tokens == 70
    assert stream[-2] in out  # the usage chunk, byte for byte


def test_chat_every_call_refused_finishes_with_stop(server):
    policy = Policy("read_file")
    out = gated(CHAT, fixture_stream(CHAT_TOOL), policy)
    client = openai_client(server(out))
    chunks = list(client.chat.completions.create(model="gpt-4.1", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "x"}]))
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == policy.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.total_tokens == 73
    assert chunks[0].choices[0].delta.role == "assistant"


def test_chat_a_call_at_a_provider_index_other_than_zero(server):
    policy = Policy("bmcp_coder_coder_list_workspaces")
    out = gated(CHAT, fixture_stream(CHAT_COMPAT), policy)
    client = openai_client(server(out))  # a compatible server's chunks (no `object`): read raw, as its clients do
    chunks = list(client.chat.completions.create(model="x", stream=True, messages=[{"role": "user", "content": "x"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Listing your workspaces:\n\n" + policy.text
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.prompt_tokens == 6512


def test_chat_a_call_whose_arguments_are_whole_is_decided_on_its_last_argument_chunk():
    stream = chat_parallel()
    codec = WIRE_APIS[CHAT]
    gate = stream_gate(codec, Policy())
    parser = SSEParser(keep_raw=True)
    outs = [b"".join(gate.feed(ev) for ev in parser.feed(c)) for c in stream]
    assert outs[3] == outs[4] == b""  # the call's start and first arguments: held
    assert outs[5] == b"".join(stream[3:6])  # its last argument chunk releases it, byte for byte


def test_chat_text_and_a_call_in_one_chunk_the_text_goes_at_once():
    chunk = sse({**CHAT_BASE, "choices": [{"index": 0, "delta": {"content": "Sure.", "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "run_shell", "arguments": "{\"c"}}]},
        "finish_reason": None}]})
    gate = stream_gate(WIRE_APIS[CHAT], Policy("run_shell"))
    parser = SSEParser(keep_raw=True)
    first = b"".join(gate.feed(ev) for ev in parser.feed(chunk))
    assert [e["choices"][0]["delta"] for e in events(first)] == [{"content": "Sure."}]
    rest = b"".join(gate.feed(ev) for ev in parser.feed(b"data: [DONE]\n\n")) + gate.finish()
    assert events(rest)[0]["choices"][0]["delta"] == {"content": "\n\naibridge policy no-shell: this tool is not "
                                                                 "allowed here"}


# --- OpenAI Responses ------------------------------------------------------------------------------------------


def _responses_final(url):
    client = openai_client(url)
    with client.responses.stream(model="gpt-5", input="x") as s:
        kinds = [e.type for e in s]
        return kinds, s.get_final_response()


def test_responses_parallel_calls_first_refused_the_sdk_sees_a_message_in_its_place(server):
    policy = Policy("run_shell")
    stream = responses_parallel()
    out = gated(RESPONSES, stream, policy)
    evs = events(out)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))  # consecutive after the refusal
    kinds, final = _responses_final(server(out))
    assert [i.type for i in final.output] == ["message", "message", "function_call"]
    assert final.output[1].content[0].text == policy.text
    assert final.output[2].name == "read_file" and final.output[2].arguments == "{\"path\":\"a.txt\"}"
    assert final.usage.total_tokens == 70
    assert kinds.count("response.output_text.done") == 2
    # The allowed call's events carry the provider's bytes up to their renumbering.
    read_events = [e for e in evs if e.get("item_id") == "fc_g3" or (e.get("item") or {}).get("id") == "fc_g3"]
    assert len(read_events) == 5


def test_responses_only_call_refused_completed_lists_the_message(server):
    policy = Policy("add")
    out = gated(RESPONSES, fixture_stream(RESP_TOOL), policy)
    kinds, final = _responses_final(server(out))
    assert [i.type for i in final.output] == ["reasoning", "message", "message"]
    assert final.output[2].content[0].text == policy.text and final.status == "completed"
    assert "response.function_call_arguments.delta" not in kinds
    completed = events(out)[-1]
    assert completed["type"] == "response.completed"
    assert [i["type"] for i in completed["response"]["output"]] == ["reasoning", "message", "message"]
    client = openai_client(server(out))
    raw = list(client.responses.create(model="gpt-5", input="x", stream=True))
    assert [e.sequence_number for e in raw] == list(range(len(raw)))


def test_responses_custom_tool_call_refused(server):
    policy = Policy("shell_exec")
    out = gated(RESPONSES, fixture_stream(RESP_CUSTOM), policy)
    assert policy.seen[0].input == "ls -la /srv/app" and policy.seen[0].call_id == "call_AibrCustom5Gy7Np3Xd"
    _, final = _responses_final(server(out))
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output_text == policy.text


def test_responses_allowed_calls_pass_byte_for_byte():
    stream = responses_parallel()
    assert gated(RESPONSES, stream, Policy()) == b"".join(stream)


# --- Gemini -----------------------------------------------------------------------------------------------------


def test_gemini_a_refused_call_becomes_a_text_part_in_its_chunk(server):
    policy = Policy("run_shell")
    stream = gemini_stream()
    out = gated(GEMINI, stream, policy)
    assert out.startswith(stream[0])  # the first chunk as it came
    client = genai_client(server(out))
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="x"))
    parts = [p for c in chunks for p in c.candidates[0].content.parts]
    assert [p.text for p in parts if p.text] == ["Checking", " both.", "\n\n" + policy.text]
    assert [p.function_call.name for p in parts if p.function_call] == ["read_file"]
    assert chunks[-1].candidates[0].finish_reason.name == "STOP"
    assert chunks[-1].usage_metadata.total_token_count == 42
    assert [c.name for c in policy.seen] == ["run_shell", "read_file"]


def test_gemini_fixture_call_refused(server):
    policy = Policy("get_weather")
    out = gated(GEMINI, fixture_stream(GEMINI_TOOL), policy)
    client = genai_client(server(out))
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="x"))
    assert chunks[0].text == policy.text and not chunks[0].function_calls
    assert chunks[0].usage_metadata.cached_content_token_count == 1024


# --- any chunking, text first, timing -----------------------------------------------------------------------

GATED_STREAMS = {
    "anthropic": (ANTHROPIC, lambda: [fixture_stream(PARALLEL)], "config.prod"),
    "chat": (CHAT, chat_parallel, "run_shell"),
    "responses": (RESPONSES, responses_parallel, "run_shell"),
    "gemini": (GEMINI, gemini_stream, "run_shell"),
    "chat-compat": (CHAT, lambda: [fixture_stream(CHAT_COMPAT)], "list_workspaces"),
    "responses-custom": (RESPONSES, lambda: [fixture_stream(RESP_CUSTOM)], "shell_exec"),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(sorted(GATED_STREAMS)), cuts=st.lists(st.integers(min_value=1, max_value=10**6),
                                                                    max_size=25), deny=st.booleans())
def test_any_chunking_gives_the_same_output(which, cuts, deny):
    api, build, name = GATED_STREAMS[which]
    data = b"".join(build())
    points = sorted({c % len(data) for c in cuts} - {0})
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    whole = gated(api, [data], Policy(*([name] if deny else [])))
    split = gated(api, chunks, Policy(*([name] if deny else [])))
    assert split == whole
    if not deny:
        assert whole == data


@pytest.mark.parametrize("which", sorted(GATED_STREAMS))
def test_text_goes_out_in_the_call_that_brought_it_and_a_call_in_the_call_that_completed_it(which):
    """Fed event by event: every event before the first tool call is returned by the feed that received it."""
    api, build, _ = GATED_STREAMS[which]
    data = b"".join(build())
    p = SSEParser(keep_raw=True)
    evs = [e for e in p.feed(data) + p.feed(b"")]
    gate = stream_gate(WIRE_APIS[api], Policy())
    first_call = next(i for i, e in enumerate(evs) if any(k in e.data for k in (
        '"tool_use"', '"tool_calls"', '"function_call"', '"custom_tool_call"', '"functionCall"')))
    outs = [gate.feed(e) for e in evs]
    for i in range(first_call):
        assert outs[i] == evs[i].raw, i  # text, thinking, reasoning: out with the feed that brought them
    if api != GEMINI:  # Gemini's calls come whole in one chunk: nothing to hold
        assert outs[first_call] == b""  # the call's start: held until its arguments are complete
    assert b"".join(outs) + gate.finish() == data


def test_through_the_tap_text_is_relayed_by_the_call_that_received_it():
    data = fixture_stream(ANTHROPIC_TOOL)
    p = SSEParser(keep_raw=True)
    raws = [e.raw for e in p.feed(data) + p.feed(b"")]
    call = next(i for i, r in enumerate(raws) if b'"tool_use"' in r)
    codec = WIRE_APIS[ANTHROPIC]
    tap = StreamTap(codec, gate=stream_gate(codec, Policy()))
    for r in raws[:call]:
        assert tap(r) == r
    assert tap(raws[call]) == []  # held: no chunk at all (an empty one would end the client's body)


def _release_latency(api: str, events_before: list, last) -> float:
    gate = stream_gate(WIRE_APIS[api], Policy())
    for e in events_before:
        gate.feed(e)
    t = time.perf_counter()
    out = gate.feed(last)
    took = time.perf_counter() - t
    assert out  # released by this very call
    return took


def test_a_held_call_is_released_within_a_millisecond_of_its_last_argument_chunk():
    cases = []
    for api, build, marker in [
        (ANTHROPIC, lambda: [fixture_stream(PARALLEL)], '"content_block_stop","index":1'),
        (CHAT, chat_parallel, '" -rf /\\"}"'),
        (RESPONSES, responses_parallel, '"response.output_item.done","sequence_number":12'),
        (GEMINI, gemini_stream, '"functionCall"'),
    ]:
        p = SSEParser(keep_raw=True)
        evs = p.feed(b"".join(build())) + p.feed(b"")
        i = next(n for n, e in enumerate(evs) if marker in e.data)
        cases.append((api, evs[:i], evs[i]))
    for api, before, last in cases:
        took = statistics.median(_release_latency(api, before, last) for _ in range(30))
        print(f"{api}: {took * 1e6:.0f} µs from the last argument chunk to release")
        assert took < 0.001


# --- ends, failures, framings ---------------------------------------------------------------------------------


def test_a_stream_cut_inside_a_call_decides_it_as_far_as_it_came_then_errors(server):
    data = fixture_stream(PARALLEL)
    cut = data.index(b"pp/config.yaml")
    policy = Policy("/srv/a")
    codec = WIRE_APIS[ANTHROPIC]
    tap = StreamTap(codec, gate=stream_gate(codec, policy))
    out = tap(data[:cut])
    out += tap.upstream_failed("upstream connection lost")
    assert policy.seen[0].input == '{"file_path": "/srv/a'
    evs = events(out)
    assert evs[-1]["type"] == "error" and evs[-2]["type"] == "content_block_stop"
    assert evs[-3]["delta"]["text"] == policy.text
    import anthropic

    client = anthropic_client(server(out))
    with pytest.raises(anthropic.APIError):
        with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
            s.get_final_message()


def test_an_unreadable_event_ends_a_gated_stream_and_nothing_after_it_is_relayed():
    stream = chat_parallel()
    codec = WIRE_APIS[CHAT]
    tap = StreamTap(codec, gate=stream_gate(codec, Policy()))
    first = tap(b"".join(stream[:4]))
    assert events(first)[-1]["choices"][0]["delta"] == {"content": "both."}

    def boom(ev, s):
        raise ValueError("bad event")

    tap.codec = type("C", (), {"on_event": staticmethod(boom), "stream_error_event": staticmethod(codec.stream_error_event),
                               "ends_at_eof": False})()
    out = tap(stream[4])
    assert b"server_error" in out and b"call_Shell1" in out  # the held call, decided, then the error
    assert tap(b"".join(stream[5:])) == [] and tap(b"") == b""


def test_responses_error_tail_continues_the_gate_numbering():
    stream = responses_parallel()
    codec = WIRE_APIS[RESPONSES]
    tap = StreamTap(codec, gate=stream_gate(codec, Policy("run_shell")))
    out = tap(b"".join(stream[:14]))  # through the refused call: 5 events became 6
    out += tap.upstream_failed("upstream connection lost")
    evs = events(out)
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert evs[-1]["type"] == "response.failed"


def test_a_failing_policy_refuses_the_call():
    def broken(call):
        raise RuntimeError("rule bug")

    refusal = check(broken, GateCall("x", "{}", None, CHAT))
    assert refusal is not None and refusal.rule == "error"
    out = gated(CHAT, chat_parallel(), broken)
    assert b"call_Shell1" not in out and b"aibridge policy error" in out


def test_bedrock_converted_stream_is_gated_and_native_frames_are_re_framed():
    from botocore.eventstream import EventStreamBuffer

    original = events(fixture_stream(ANTHROPIC_TOOL))
    frames = b"".join(chunk_frame(e) for e in original)
    policy = Policy("Read")
    outs, tap = run_tap(ANTHROPIC, [frames[i:i + 97] for i in range(0, len(frames), 97)], policy, ToSSE())
    converted = events(b"".join(outs))
    assert [e["type"] for e in converted][-5:] == ["content_block_start", "content_block_delta", "content_block_stop",
                                                   "message_delta", "message_stop"]
    assert converted[-2]["delta"]["stop_reason"] == "end_turn" and tap.summary.tool_calls[0].name == "Read"

    outs, tap = run_tap("bedrock.invoke", [frames[i:i + 97] for i in range(0, len(frames), 97)], policy, Native())
    buf = EventStreamBuffer()
    buf.add_data(b"".join(outs))
    native = [json.loads(base64.b64decode(json.loads(m.payload)["bytes"])) for m in buf]
    assert native == converted  # the same events, in Bedrock's frames
    assert policy.seen[-1].api == "bedrock.invoke"


def test_the_loop_helper_gates_a_byte_stream():
    policy = Policy("run_shell")
    g = SSEGate(stream_gate(WIRE_APIS[CHAT], policy))
    data = b"".join(chat_parallel())
    out = b"".join(g.feed(data[i:i + 10]) for i in range(0, len(data), 10)) + g.finish()
    assert out == gated(CHAT, chat_parallel(), Policy("run_shell"))


# --- blocking bodies -----------------------------------------------------------------------------------------------


def test_anthropic_body(server):
    body = fixture_json("anthropic/single_builtin_tool.txtar")
    assert gate_body(WIRE_APIS[ANTHROPIC], body, Policy()) is None
    policy = Policy("Read")
    new = gate_body(WIRE_APIS[ANTHROPIC], body, policy)
    client = anthropic_client(server(json.dumps(new).encode(), "application/json"))
    msg = client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert not [b for b in msg.content if b.type == "tool_use"]
    assert msg.content[-1].text == policy.text and msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == body["usage"]["input_tokens"]


def test_chat_body(server):
    body = fixture_json(CHAT_TOOL)
    policy = Policy("read_file")
    new = gate_body(WIRE_APIS[CHAT], body, policy)
    client = openai_client(server(json.dumps(new).encode(), "application/json"))
    done = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert not done.choices[0].message.tool_calls and done.choices[0].finish_reason == "stop"
    assert policy.text in done.choices[0].message.content
    assert done.usage.total_tokens == body["usage"]["total_tokens"]


def test_responses_body(server):
    body = fixture_json("openai/responses/blocking/summary_and_commentary_builtin_tool.txtar")
    policy = Policy("add")
    new = gate_body(WIRE_APIS[RESPONSES], body, policy)
    client = openai_client(server(json.dumps(new).encode(), "application/json"))
    resp = client.responses.create(model="gpt-5", input="x")
    assert "function_call" not in [i.type for i in resp.output]
    assert resp.output[-1].content[0].text == policy.text
    assert [i.type for i in resp.output] == [i["type"] if i["type"] != "function_call" else "message"
                                             for i in body["output"]]


def test_gemini_body_and_array(server):
    body = fixture_json(GEMINI_TOOL)
    policy = Policy("get_weather")
    new = gate_body(WIRE_APIS[GEMINI], body, policy)
    client = genai_client(server(json.dumps(new).encode(), "application/json"))
    resp = client.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert resp.text == policy.text and not resp.function_calls
    assert resp.candidates[0].finish_reason.name == "STOP"
    array = [json.loads(e.data) for e in SSEParser().feed(b"".join(gemini_stream()))]
    gated_array = gate_body(WIRE_APIS[GEMINI], array, Policy("run_shell"))
    assert gated_array[0] == array[0]
    assert [list(p) for p in (x for x in gated_array[1]["candidates"][0]["content"]["parts"])] == \
        [["text"], ["text"], ["functionCall"]]
    assert gate_body(WIRE_APIS[GEMINI], array, Policy()) is None


# --- every captured provider stream and body (../shared, when present), judged by the SDKs ----------------------

FOLDERS = {"anthropic": ANTHROPIC, "openai/chatcompletions": CHAT, "openai/responses/streaming": RESPONSES,
           "openai/responses/blocking": RESPONSES}


def _captured() -> list[tuple[str, str, str]]:
    out = []
    for folder, api in FOLDERS.items():
        for rel in captures(folder):
            for section in capture(rel).sections:
                if section.startswith(("streaming", "non-streaming")):
                    out.append((api, rel, section))
    return out


CAPTURED = _captured()
DENY_ALL = Policy("", rule="deny-all", message="no tools today")  # "" is in every input


def sdk_view(api: str, url: str, stream: bool):
    """What the API's official SDK makes of the bytes: (text, client tool calls, stop/finish/status)."""
    if api == ANTHROPIC:
        client = anthropic_client(url)
        kw = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        if stream:
            with client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        else:
            msg = client.messages.create(**kw)
        return ("".join(b.text for b in msg.content if b.type == "text"),
                [b.name for b in msg.content if b.type == "tool_use"], msg.stop_reason)
    if api == CHAT:
        client = openai_client(url)
        kw = dict(model="m", messages=[{"role": "user", "content": "x"}])
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls = [t.function.name for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []
                     if t.function and t.function.name]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            return text, calls, finish[-1] if finish else None
        done = client.chat.completions.create(**kw)
        msg = done.choices[0].message
        return msg.content or "", [t.function.name for t in msg.tool_calls or []], done.choices[0].finish_reason
    client = openai_client(url)
    if stream:
        with client.responses.stream(model="m", input="x") as s:
            for _ in s:
                pass
            resp = s.get_final_response()
    else:
        resp = client.responses.create(model="m", input="x")
    client_calls = ("function_call", "custom_tool_call", "local_shell_call", "shell_call", "apply_patch_call",
                    "computer_call")
    return resp.output_text, [i.type for i in resp.output if i.type in client_calls], resp.status


@pytest.mark.parametrize("api,rel,section", CAPTURED, ids=[f"{r}:{s}" for _, r, s in CAPTURED] or None)
def test_captured_traffic_allowed_is_unchanged_and_refused_is_read_by_the_sdk(server, api, rel, section):
    text = capture(rel).sections[section]
    # Captures of what the SDKs cannot read even ungated (malformed on purpose, a model list): bytes only.
    unreadable = "wrong_response_format" in rel or "fallthrough" in rel
    if section.startswith("non-streaming"):
        if http_section(text) is not None or unreadable:
            return  # an HTTP error, a malformed or a non-model body: relayed as it came (not a gated API's JSON)
        body = json.loads(text)
        codec = WIRE_APIS[api]
        assert gate_body(codec, body, Policy()) is None
        calls = [t for t in codec.summarize(body).tool_calls]
        new = gate_body(codec, body, DENY_ALL)
        gated_body = json.dumps(new if new is not None else body).encode()
        text_seen, calls_seen, stop = sdk_view(api, server(gated_body, "application/json"), stream=False)
    else:
        data = b"".join(sse_events(text))
        chunks = [data[i:i + 64] for i in range(0, len(data), 64)]
        policy = Policy()
        outs, tap = run_tap(api, chunks, policy)
        plain_outs, plain = run_tap(api, chunks)
        assert b"".join(outs) == b"".join(plain_outs)
        assert tap.summary.usages == plain.summary.usages and tap.summary.tool_calls == plain.summary.tool_calls
        outs, tap = run_tap(api, chunks, DENY_ALL)
        assert tap.summary.usages == plain.summary.usages  # recording reads the provider's events
        if plain.summary.error or not plain.summary.complete or unreadable:
            return  # a failed stream: the SDK raises, as it does ungated
        calls = plain.summary.tool_calls
        text_seen, calls_seen, stop = sdk_view(api, server(b"".join(outs)), stream=True)
    client_calls = [c for c in calls if not c.name.endswith(("web_search_call", "file_search_call",
                                                              "code_interpreter_call", "image_generation_call"))
                    and "." not in c.name]
    assert calls_seen == []
    if client_calls:
        assert DENY_ALL.text in text_seen
        assert stop in ("end_turn", "stop", "completed")


def test_responses_a_call_whose_start_the_stream_did_not_show_is_decided_on_its_done_item():
    """A retrieval resumed after a call's start (`starting_after`): its done item is still decided."""
    stream = responses_parallel()[11:]  # from the refused call's arguments.done on
    out = gated(RESPONSES, stream, Policy("run_shell"))
    evs = events(out)
    assert not any((e.get("item") or {}).get("call_id") == "call_Shell1" for e in evs)
    assert [i["type"] for i in evs[-1]["response"]["output"]] == ["message", "message", "function_call"]
    assert [e["text"] for e in evs if e.get("type") == "response.output_text.done"] == [Policy().text]


def test_native_bedrock_exceptions_keep_their_frame_when_re_framed():
    from botocore.eventstream import EventStreamBuffer

    from aibridge_gw.apis.bedrock.eventstream import exception_frame

    original = events(fixture_stream(ANTHROPIC_TOOL))
    frames = b"".join(chunk_frame(e) for e in original[:3]) + exception_frame("ThrottlingException", "slow down")
    outs, tap = run_tap("bedrock.invoke", [frames], Policy(), Native())
    buf = EventStreamBuffer()
    buf.add_data(b"".join(outs))
    msgs = list(buf)
    assert [m.headers[":message-type"] for m in msgs] == ["event"] * 3 + ["exception"]
    assert msgs[-1].headers[":exception-type"] == "throttlingException"
    assert json.loads(msgs[-1].payload) == {"message": "slow down"}
    assert tap.summary.error


def test_chat_long_arguments_are_decided_once_and_pass_unchanged():
    """Code with many `}`: completeness is checked at doubling lengths (linear in all), the call is decided once."""
    args = json.dumps({"path": "a.js", "content": "function f(x) { if (x) { return {a: 1}; } }\n" * 900})

    def chunk(delta, finish=None):
        return sse({**CHAT_BASE, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    stream = [chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "write_file", "arguments": ""}}]})]
    stream += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 8]}}]})
               for i in range(0, len(args), 8)]
    stream += [chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    policy = Policy()
    assert gated(CHAT, stream, policy) == b"".join(stream)
    assert [c.input for c in policy.seen] == [args]
    refused = gated(CHAT, stream, Policy("write_file"))
    assert b"c1" not in refused and b'"finish_reason": "stop"' in refused
