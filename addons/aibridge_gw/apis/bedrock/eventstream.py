"""AWS's binary event stream (`application/vnd.amazon.eventstream`), as InvokeModelWithResponseStream sends it.

Frames are parsed with botocore's own parser. Each `chunk` event carries one Anthropic streaming event,
base64-encoded in `{"bytes": …}`; an `exception` frame is Bedrock's mid-stream error. Two framings sit between
the provider and the stream tap: `ToSSE` hands the client Anthropic server-sent events (base-URL mode: the client
speaks the Messages API), `Native` hands it the frames unchanged (proxy mode: the client is an AWS SDK) while the
tap reads the same events. A gated stream (flow/toolgate.py) relays the gate's events, so `Native.encode` frames them
again: the same events, in frames of the gateway's own (not the provider's bytes).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib

from botocore.eventstream import EventStreamBuffer, EventStreamMessage, ParserError

from ...flow.sse import SSEParser
from ..base import sse_bytes

CONTENT_TYPE = "application/vnd.amazon.eventstream"

# Bedrock's exception names → the Anthropic error type an SDK raises for the same failure (the HTTP status stays
# Bedrock's own: both APIs use 400/403/404/429/5xx alike).
EXCEPTIONS = {
    "ValidationException": "invalid_request_error",
    "AccessDeniedException": "permission_error",
    "UnrecognizedClientException": "authentication_error",
    "InvalidSignatureException": "authentication_error",
    "ExpiredTokenException": "authentication_error",
    "ResourceNotFoundException": "not_found_error",
    "ThrottlingException": "rate_limit_error",
    "ServiceQuotaExceededException": "rate_limit_error",
    "ModelNotReadyException": "overloaded_error",
    "ServiceUnavailableException": "overloaded_error",
    "ModelTimeoutException": "timeout_error",
    "ModelErrorException": "api_error",
    "ModelStreamErrorException": "api_error",
    "InternalServerException": "api_error",
}


def exception_name(raw: str | None) -> str:
    """`ThrottlingException` from `throttlingException` (stream frames) or `ThrottlingException:http://…`
    (the x-amzn-ErrorType header)."""
    name = (raw or "").split(":", 1)[0].strip()
    return name[:1].upper() + name[1:]


def anthropic_error(name: str, message: str) -> dict:
    etype = EXCEPTIONS.get(name, "api_error")
    return {"type": "error", "error": {"type": etype, "message": f"{name}: {message}" if name else message}}


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message with string headers (what the gateway itself sends an AWS SDK client)."""
    hdr = b"".join(
        struct.pack("!B", len(k.encode())) + k.encode() + struct.pack("!BH", 7, len(v.encode())) + v.encode()
        for k, v in headers.items())
    total = 16 + len(hdr) + len(payload)
    prelude = struct.pack("!II", total, len(hdr))
    head = prelude + struct.pack("!I", zlib.crc32(prelude))
    body = head + hdr + payload
    return body + struct.pack("!I", zlib.crc32(body))


def chunk_frame(event: dict) -> bytes:
    """A `chunk` event carrying one Anthropic event, as Bedrock frames it."""
    inner = base64.b64encode(json.dumps(event, separators=(",", ":")).encode()).decode()
    return frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
                 json.dumps({"bytes": inner}).encode())


def exception_frame(name: str, message: str) -> bytes:
    """A mid-stream exception (`name` as in the API reference, e.g. ThrottlingException)."""
    wire = name[:1].lower() + name[1:]
    return frame({":exception-type": wire, ":content-type": "application/json", ":message-type": "exception"},
                 json.dumps({"message": message}).encode())


def message_to_sse(msg: EventStreamMessage) -> bytes:
    """One frame as the Anthropic server-sent event it carries (errors as Anthropic error events)."""
    headers = msg.headers
    kind = headers.get(":message-type")
    if kind == "event":
        if headers.get(":event-type") != "chunk":
            return b""
        try:
            inner = base64.b64decode(json.loads(msg.payload)["bytes"], validate=True)
            event = json.loads(inner)
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise ParserError(f"chunk payload is not a base64 JSON event: {e}") from None
        if not isinstance(event, dict):
            raise ParserError("chunk payload is not a JSON object")
        etype = event.get("type")
        return b"event: %s\ndata: %s\n\n" % (str(etype).encode(), inner.replace(b"\n", b""))
    if kind == "exception":
        name = exception_name(headers.get(":exception-type"))
    else:  # "error": the service's own error frame
        name = exception_name(str(headers.get(":error-code") or "InternalServerException"))
    try:
        message = json.loads(msg.payload).get("message") or ""
    except (ValueError, AttributeError):
        message = str(headers.get(":error-message") or msg.payload[:200].decode("utf-8", "replace"))
    return sse_bytes(anthropic_error(name, str(message)), "error")


class ToSSE:
    """Base-URL mode: frames in, Anthropic server-sent events out (to the client and the tap alike)."""

    converts = True
    content_type = "text/event-stream"

    def __init__(self) -> None:
        self.buffer = EventStreamBuffer()

    def decode(self, chunk: bytes) -> bytes:
        """The server-sent events of every frame `chunk` completes (raises ParserError on corrupt framing)."""
        if not chunk:
            return b""
        self.buffer.add_data(chunk)
        return b"".join(message_to_sse(m) for m in self.buffer)

    @staticmethod
    def error_tail(sse: bytes, message: str) -> bytes:
        return sse


# An Anthropic error type → the Bedrock exception an AWS SDK raises for it (a gated stream's error events, re-framed).
_EXCEPTION_OF = {"rate_limit_error": "ThrottlingException", "overloaded_error": "ServiceUnavailableException",
                 "timeout_error": "ModelTimeoutException", "invalid_request_error": "ValidationException",
                 "permission_error": "AccessDeniedException", "not_found_error": "ResourceNotFoundException"}


class Native(ToSSE):
    """Proxy mode: the client (an AWS SDK) gets Bedrock's frames unchanged; only the tap reads the events."""

    converts = False
    content_type = CONTENT_TYPE

    @staticmethod
    def encode(sse: bytes) -> bytes:
        """Whole server-sent events (a gated stream's) as Bedrock frames: each event in a `chunk` frame, an error event
        as the exception frame it came as."""
        parser = SSEParser()
        out = []
        for ev in parser.feed(sse) + parser.feed(b""):
            try:
                event = json.loads(ev.data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("type") == "error":
                err = event.get("error") if isinstance(event.get("error"), dict) else {}
                message = str(err.get("message") or "")
                name, sep, rest = message.partition(": ")
                if sep and exception_name(name) in EXCEPTIONS:
                    out.append(exception_frame(name, rest))
                else:
                    out.append(exception_frame(_EXCEPTION_OF.get(err.get("type"), "InternalServerException"), message))
            else:
                out.append(chunk_frame(event))
        return b"".join(out)

    @staticmethod
    def error_tail(sse: bytes, message: str) -> bytes:
        return exception_frame("InternalServerException", message) if sse else b""
