"""Request bodies as the gateway reads them: decompressed with a cap, parsed as JSON or a multipart form.

The size limit applies to the decoded body (a 1 MB gzip bomb inflates to 1 GB); decompression stops as soon
as the output passes the limit. Callers run these off the event loop when the input is large.
"""

from __future__ import annotations

import io
import json
import zlib

import brotli
import zstandard

CHUNK = 256 * 1024


class BodyTooLarge(Exception):
    """The decoded body exceeds the limit (message: safe for the client)."""


class BadBody(Exception):
    """The body cannot be decoded or parsed (message: safe for the client)."""


def decode(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """The body with every content-coding removed (in reverse order of application), at most `limit` bytes."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    data = raw
    for coding in reversed(codings):
        if coding == "identity":
            continue
        try:
            if coding in ("gzip", "x-gzip"):
                data = _zlib(data, zlib.MAX_WBITS | 16, limit)
            elif coding == "deflate":
                try:
                    data = _zlib(data, zlib.MAX_WBITS, limit)
                except zlib.error:  # some clients send raw deflate without the zlib wrapper
                    data = _zlib(data, -zlib.MAX_WBITS, limit)
            elif coding == "br":
                data = _brotli(data, limit)
            elif coding == "zstd":
                data = _zstd(data, limit)
            else:
                raise BadBody(f"unsupported content-encoding {coding!r}")
        except (zlib.error, brotli.error, zstandard.ZstdError) as e:
            raise BadBody(f"the {coding} body cannot be decoded: {e}") from None
    if len(data) > limit:
        raise BodyTooLarge(f"the request body exceeds the {limit} byte limit")
    return data


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the decompressed request body exceeds the {limit} byte limit")


def _zlib(data: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    while pending:
        out += d.decompress(pending, limit + 1 - len(out))
        if len(out) > limit:
            raise _too_large(limit)
        pending = d.unconsumed_tail
        if d.eof:
            break
    out += d.flush()
    if len(out) > limit:
        raise _too_large(limit)
    if not d.eof:
        raise zlib.error("truncated stream")
    return bytes(out)


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = bytearray(d.process(data, output_buffer_limit=CHUNK))
    while not d.is_finished() and not d.can_accept_more_data():
        if len(out) > limit:
            raise _too_large(limit)
        out += d.process(b"", output_buffer_limit=CHUNK)
    if len(out) > limit:
        raise _too_large(limit)
    if not d.is_finished():
        raise brotli.error("truncated stream")
    return bytes(out)


def _zstd(data: bytes, limit: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = reader.read(limit + 1)
    if len(out) > limit:
        raise _too_large(limit)
    return out


def parse_json(data: bytes):
    """json.loads with every failure a BadBody: invalid JSON or UTF-8, and nesting too deep for the parser."""
    try:
        return json.loads(data)
    except RecursionError:
        raise BadBody("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadBody(f"request body is not valid JSON: {e}") from None


def form_fields(content_type: str, data: bytes) -> dict[str, str]:
    """The text fields of a multipart/form-data body (file parts skipped): enough to read model and stream."""
    from mitmproxy.net.http.multipart import decode_multipart

    try:
        parts = decode_multipart(content_type, data)
    except Exception as e:
        raise BadBody(f"the multipart body cannot be parsed: {e}") from None
    out = {}
    for name, value in parts:
        if len(value) <= 4096:
            try:
                out[name.decode("utf-8")] = value.decode("utf-8")
            except UnicodeDecodeError:
                continue
    return out
