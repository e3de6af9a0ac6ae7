"""Requests to an instance with a key pool go through the gateway's own upstream client (served by the loopback
server, `loopback.py`), because trying the next key means sending the request again, which mitmproxy cannot do
within one flow. The relay streams the chosen answer back as it arrives; mitmproxy taps and records it as usual.
The key that answered is noted on the flow's state (`FlowState.key_hint`), for the record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

import httpx

from ..loopback import Responder
from .errors import error_body
from .keypool import Exhausted, KeyPool
from .state import FlowState

log = logging.getLogger("aibridge")


def upstream_client(verify: bool | str = True) -> httpx.AsyncClient:
    """The gateway's own upstream client, shared by the relay and the injected-tool loop."""
    return httpx.AsyncClient(
        verify=verify, trust_env=False, http2=False,
        timeout=httpx.Timeout(connect=15, read=600, write=60, pool=30),
    )


@dataclass
class RelayJob:
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]  # as mitmproxy would send them, without a credential (added per attempt)
    content: bytes
    pool: KeyPool
    auth_header: Callable[[str], tuple[bytes, bytes]]  # the provider's key header for a key
    state: FlowState  # the flow's state: the hint of the key that answered is left there for recording
    provider_type: str


class Relay:
    """Serves `RelayJob`s for the loopback server: one request to a key-pool instance, sent with failover, the
    answer streamed back as it arrives."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def serve(self, job: RelayJob, out: Responder) -> None:
        try:
            got = await send_with_failover(self.client, job.pool, job.auth_header, job.method, job.url, job.headers,
                                           job.content, job.state)
        except httpx.HTTPError as e:
            body = error_body(job.provider_type, 502, f"aibridge: the provider's connection failed: {type(e).__name__}")
            await out.respond(502, [("content-type", "application/json")], json.dumps(body).encode())
            return
        if isinstance(got, Exhausted):
            await respond_exhausted(out, job.provider_type, got)
            return
        try:
            await out.start(got.status_code, got.headers.raw, got.reason_phrase)
            async for chunk in got.aiter_raw():
                await out.send(chunk)
            await out.end()
        except httpx.HTTPError as e:  # the provider broke off: closing without the last chunk tells mitmproxy so
            log.warning("provider %s: the answer broke off: %s", job.pool.provider, type(e).__name__)
        finally:
            await got.aclose()


async def send_with_failover(client: httpx.AsyncClient, pool: KeyPool, auth_header, method: str, url: str,
                             headers, content: bytes, state: FlowState) -> httpx.Response | Exhausted:
    """Send with each usable key in turn until the provider answers something other than 429/401/403; returns
    the open (streaming) response, which the caller closes, or what to tell the client when no key is left.
    The hint of the key last tried is noted on `state.key_hint`."""
    while True:
        usable = pool.usable()
        if not usable:
            return pool.exhausted()
        key = usable[0]
        name, value = auth_header(key.key)
        req = client.build_request(method, url, headers=[*headers, (name, value)], content=content)
        resp = await client.send(req, stream=True)
        state.key_hint = key.hint
        if not pool.failed(key, resp.status_code, resp.headers.get("retry-after")):
            return resp
        log.warning("provider %s: key %s answered %d; trying the next key", pool.provider, key.hint, resp.status_code)
        await resp.aclose()


async def respond_exhausted(out: Responder, provider_type: str, got: Exhausted) -> None:
    """No key could serve the request: the pool's answer, marked as the gateway's own (`x-aibridge-error`)."""
    body = json.dumps(error_body(provider_type, got.status, got.message)).encode()
    headers = [("content-type", "application/json")]
    if got.retry_after:
        headers.append(("retry-after", str(got.retry_after)))
    headers.append(("x-aibridge-error", "1"))
    await out.respond(got.status, headers, body)
