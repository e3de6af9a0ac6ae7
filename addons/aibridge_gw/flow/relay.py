"""Requests to an instance with a key pool go through the gateway's own upstream client (served beside the
injected-tool loop), because trying the next key means sending the request again, which mitmproxy cannot do
within one flow. The relay streams the chosen answer back as it arrives; mitmproxy taps and records it as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import httpx

from .keypool import Exhausted, KeyPool

log = logging.getLogger("aibridge")

# Hop-by-hop and framing headers: the relay frames its own answer.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "trailer",
        "upgrade"}


@dataclass
class RelayJob:
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]  # as mitmproxy would send them, without a credential (added per attempt)
    content: bytes
    pool: KeyPool
    auth_header: Callable[[str], tuple[bytes, bytes]]  # the provider's key header for a key
    metadata: dict  # the flow's metadata["aibridge"]: the hint of the key used is left here for recording
    provider_type: str


async def send_with_failover(client: httpx.AsyncClient, pool: KeyPool, auth_header, method: str, url: str,
                             headers, content: bytes, metadata: dict) -> httpx.Response | Exhausted:
    """Send with each usable key in turn until the provider answers something other than 429/401/403; returns
    the open (streaming) response, which the caller closes, or what to tell the client when no key is left."""
    while True:
        usable = pool.usable()
        if not usable:
            return pool.exhausted()
        key = usable[0]
        name, value = auth_header(key.key)
        req = client.build_request(method, url, headers=[*headers, (name, value)], content=content)
        resp = await client.send(req, stream=True)
        metadata["key_hint"] = key.hint
        if not pool.failed(key, resp.status_code, resp.headers.get("retry-after")):
            return resp
        log.warning("provider %s: key %s answered %d; trying the next key", pool.provider, key.hint, resp.status_code)
        await resp.aclose()


def response_head(resp: httpx.Response) -> bytes:
    """The status line and headers the relay sends mitmproxy (chunked, one exchange per connection)."""
    lines = [f"HTTP/1.1 {resp.status_code} {resp.reason_phrase or 'X'}"]
    lines += [f"{k}: {v}" for k, v in resp.headers.multi_items() if k.lower() not in _HOP]
    lines += ["transfer-encoding: chunked", "connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
