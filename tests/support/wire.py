"""Provider responses written for this project's tests, in each API's real wire format (no ../shared needed),
and a raw HTTP/1.1 client for requests an SDK would never send (odd bytes, early hang-ups, bare paths)."""

from __future__ import annotations

import json
import socket
import time

from tests.support.mock_upstream import Reply


def _sse(obj: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n".encode()


def anthropic_stream(text: str = "Hello there", usage=(12, 7)) -> list[bytes]:
    mid = "msg_01TestStream"
    return [
        _sse({"type": "message_start", "message": {"id": mid, "type": "message", "role": "assistant",
              "model": "claude-sonnet-4-20250514", "content": [], "stop_reason": None, "stop_sequence": None,
              "usage": {"input_tokens": usage[0], "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                        "output_tokens": 1}}}, "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
             "content_block_start"),
        _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
             "content_block_delta"),
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
              "usage": {"output_tokens": usage[1]}}, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop"),
    ]


def anthropic_message(text: str = "Hello there", usage=(12, 7)) -> dict:
    return {"id": "msg_01TestBlocking", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": usage[0], "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": usage[1]}}


def chat_stream(text: str = "Hello there", usage=(12, 7), model: str = "gpt-4.1") -> list[bytes]:
    base = {"id": "chatcmpl-Test", "object": "chat.completion.chunk", "created": 1763900000, "model": model,
            "system_fingerprint": "fp_test"}
    return [
        _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
              "usage": None}),
        _sse({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}], "usage": None}),
        _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
        _sse({**base, "choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                                "total_tokens": sum(usage),
                                                "prompt_tokens_details": {"cached_tokens": 0}}}),
        b"data: [DONE]\n\n",
    ]


def chat_completion(text: str = "Hello there", usage=(12, 7), model: str = "gpt-4.1") -> dict:
    return {"id": "chatcmpl-TestBlocking", "object": "chat.completion", "created": 1763900000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}


def responses_stream(text: str = "Hello there", usage=(12, 7)) -> list[bytes]:
    resp = {"id": "resp_test", "object": "response", "created_at": 1763900000, "status": "in_progress",
            "model": "gpt-5", "output": [], "usage": None}
    item = {"id": "msg_test", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}
    done = {**resp, "status": "completed", "output": [item],
            "usage": {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": sum(usage)}}
    return [
        _sse({"type": "response.created", "sequence_number": 0, "response": resp}, "response.created"),
        _sse({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_test", "output_index": 0,
              "content_index": 0, "delta": text}, "response.output_text.delta"),
        _sse({"type": "response.output_item.done", "sequence_number": 2, "output_index": 0, "item": item},
             "response.output_item.done"),
        _sse({"type": "response.completed", "sequence_number": 3, "response": done}, "response.completed"),
    ]


STREAMS = {"anthropic": anthropic_stream, "chat": chat_stream, "responses": responses_stream}
PATHS = {"anthropic": "/anthropic/v1/messages", "chat": "/openai/v1/chat/completions",
         "responses": "/openai/v1/responses"}
# What each API's final event looks like on the wire: a client that has read it has the whole answer.
FINAL_MARKERS = {"anthropic": b"message_stop", "chat": b"data: [DONE]", "responses": b"response.completed"}


def request_body(api: str, prompt: str = "hi", stream: bool = True, model: str | None = None) -> dict:
    if api == "anthropic":
        return {"model": model or "claude-sonnet-4-20250514", "max_tokens": 64, "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}
    if api == "chat":
        return {"model": model or "gpt-4.1", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    return {"model": model or "gpt-5", "stream": stream, "input": prompt}


def stream_reply(api: str, delay: float = 0.0, **kw) -> Reply:
    reply = Reply.sse(STREAMS[api](), delay)
    for k, v in kw.items():
        setattr(reply, k, v)
    return reply


def raw_request(port: int, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"",
                read_until: bytes | None = None, timeout: float = 15.0, host: bytes | None = None) -> bytes:
    """Send one HTTP/1.1 request with exactly these bytes; return what came back. With read_until, hang up the
    moment those bytes have arrived (as llm and aider do after the final event)."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"host: " + (host or f"127.0.0.1:{port}".encode())]
    head += [k + b": " + v for k, v in headers]
    head += [b"content-length: " + str(len(body)).encode(), b"connection: close"]
    data = b"\r\n".join(head) + b"\r\n\r\n" + body
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
            if read_until is not None and read_until in got:
                break
    return got


def api_request(port: int, path: str, token: str, body: bytes | dict, extra: list[tuple[bytes, bytes]] = (),
                **kw) -> bytes:
    """POST a JSON body with the gateway token, as raw bytes (see raw_request)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [(b"authorization", b"Bearer " + token.encode()), (b"content-type", b"application/json"), *extra]
    return raw_request(port, "POST", path, headers, data, **kw)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def body_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[2]
