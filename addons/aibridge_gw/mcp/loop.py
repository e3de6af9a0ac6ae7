"""The injected-tool loop. Flows whose request carries injected tools are routed by the pipeline to the loopback
server (loopback.py), served on mitmproxy's own event loop, which hands their job to `ToolLoop`; mitmproxy relays
the answer to the client like any upstream's. Here the gateway calls the provider (httpx, async), runs injected
MCP tools (async, with a timeout) and continues the conversation, while the client sees one response streaming
as it is produced. Nothing here blocks the event loop: every wait is an await. The loop's summary of every round
is left on the flow's state (`FlowState.loop_summary`) for the pipeline to record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

from ..apis import PROVIDERS
from ..flow.errors import error_body
from ..flow.exchange import ResponseSummary
from ..flow.keypool import Exhausted
from ..flow.relay import send_with_failover
from ..flow.sse import SSEParser
from ..flow.state import FlowState
from ..flow.toolgate import Decide, Refusal, SSEGate, gate_body, stream_gate
from ..loopback import ClientGone, Responder
from ..telemetry import ToolRun
from .registry import McpRegistry
from .tools import Adapter, ToolResult, injected_call_record

log = logging.getLogger("aibridge.mcp")

_DROP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding",
                 "proxy-connection", "te", "upgrade"}
_STREAM_HEADERS = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))


@dataclass
class LoopJob:
    url: str
    headers: dict[str, str]
    adapter: Adapter
    provider_type: str
    user_id: str
    max_rounds: int
    state: FlowState  # the flow's state: the loop's summary and rounds (and a pool's key) are left there to record
    transport: Any = None  # a signed provider's transport (apis/base.Transport): each round is built and signed
    api: str = ""
    base_path: str = ""
    # The client's request headers (lower-case names): a transport reads what its provider needs from them.
    request_headers: dict = field(default_factory=dict)
    pool: Any = None  # the instance's KeyPool: each round is sent with the next usable key on 429/401/403
    auth_header: Any = None  # the provider's key header for a key (with a pool)
    rounds: int = 0
    summary: ResponseSummary = field(default_factory=ResponseSummary)
    # The tool hook (flow/toolgate.py): `gate` decides each tool call the client would see, `vet` each injected
    # call before it runs (name, arguments, call id → a refusal or None). None: no tool rules.
    gate: Decide | None = None
    vet: Callable[[str, str, str | None], Refusal | None] | None = None

    @property
    def client_gone(self) -> bool:
        """The client went away mid-stream: this round is read to its end, no new one starts."""
        return self.state.client_gone is not None


class ToolLoop:
    """Serves `LoopJob`s for the loopback server (loopback.py): runs the injected-tool loop of one request and
    answers through the `Responder` it is given."""

    def __init__(self, registry: McpRegistry | None, client: httpx.AsyncClient) -> None:
        self.registry = registry
        self.client = client
        self._loops: set[asyncio.Task] = set()  # the tasks running tool loops
        self._ending: str | None = None  # shutdown: why every loop still running was ended
        self.telemetry = None  # telemetry.Telemetry: each injected call becomes a span of its interception's

    def end_all(self, reason: str) -> int:
        """Shutdown (drain.py): end every tool loop still running; each ends its client's answer the API's way
        (a stream's error event, else a 503) and records `reason`. How many there were."""
        self._ending = reason
        for task in self._loops:
            task.cancel(reason)
        return len(self._loops)

    async def serve(self, job: LoopJob, out: Responder) -> None:
        task = asyncio.current_task()
        self._loops.add(task)
        try:
            await self._run(job, out)
        finally:
            self._loops.discard(task)

    @contextlib.asynccontextmanager
    async def _upstream(self, job: LoopJob, url: str, headers: dict[str, str], content: bytes):
        """One round's upstream response, sent with the pool's next usable key when the instance has a pool."""
        if job.pool is None:
            async with self.client.stream("POST", url, headers=headers, content=content) as resp:
                yield resp
            return
        got = await send_with_failover(self.client, job.pool, job.auth_header, "POST", url, list(headers.items()),
                                       content, job.state)
        if isinstance(got, Exhausted):
            body = json.dumps(error_body(job.provider_type, got.status, got.message)).encode()
            extra = {"retry-after": str(got.retry_after)} if got.retry_after else {}
            yield httpx.Response(got.status, headers={"content-type": "application/json", **extra}, content=body)
            return
        try:
            yield got
        finally:
            await got.aclose()

    async def _run(self, job: LoopJob, out: Responder) -> None:
        adapter = job.adapter
        merged = job.summary
        note: str | None = None
        gated = stream_gate(adapter.codec, job.gate) if job.gate is not None and adapter.stream else None
        sse_gate = SSEGate(gated) if gated is not None else None

        async def send(chunks: list[bytes], last: bool = False) -> None:
            data = b"".join(chunks)
            if sse_gate is not None:  # the client's tool calls are held until decided
                data = sse_gate.feed(data) + (sse_gate.finish() if last else b"")
            if data:
                await out.send(data)

        try:
            for round_no in range(1, job.max_rounds + 1):
                adapter.begin_round()
                job.rounds = round_no
                url, headers, content = await _round_request(job)
                async with self._upstream(job, url, headers, content) as resp:
                    ctype = resp.headers.get("content-type", "")
                    framing = PROVIDERS[job.provider_type].stream_framing(job.api, resp.headers)
                    streamed = "text/event-stream" in ctype or framing is not None
                    if resp.status_code >= 400 or (adapter.stream and not streamed):
                        body = await resp.aread()
                        if not out.started:  # the provider's own error, as without the loop
                            merged.error = f"HTTP {resp.status_code}"
                            status = resp.status_code
                            shaped = job.transport.client_error(job.api, status, resp.headers,
                                                                body) if job.transport is not None else None
                            if shaped is not None:
                                (status, body), ctype = shaped, "application/json"
                            wait = resp.headers.get("retry-after", "")
                            headers = [("content-type", ctype or "application/json")]
                            if wait.isdigit():
                                headers.append(("retry-after", wait))
                            await out.respond(status, headers, body)
                            return
                        merged.error = f"round {round_no}: HTTP {resp.status_code}: {body[:200]!r}"
                        await send([adapter.error_event(f"upstream error in tool round {round_no}: HTTP {resp.status_code}")])
                        break
                    if adapter.stream:
                        if not out.started:
                            await out.start(200, _STREAM_HEADERS)
                        parser = SSEParser()
                        async for chunk in resp.aiter_raw():
                            events = []
                            for ev in parser.feed(framing.decode(chunk) if framing is not None else chunk):
                                events += adapter.on_event(ev)
                            await send(events)
                        events = []
                        for ev in parser.feed(b""):
                            events += adapter.on_event(ev)
                        await send(events)
                    else:
                        adapter.on_body(json.loads(await resp.aread()))
                end = adapter.round_end()
                merged.usages += end.summary.usages
                merged.thoughts += end.summary.thoughts
                merged.output_text += end.summary.output_text
                merged.finish_reasons = end.summary.finish_reasons or merged.finish_reasons
                merged.response_id = merged.response_id or end.summary.response_id
                merged.model = merged.model or end.summary.model
                merged.tool_calls += [t for t in end.summary.tool_calls if t.name not in adapter.tools]
                if end.summary.error:
                    merged.error = end.summary.error
                    break
                if not end.injected:
                    break
                rid = end.summary.response_id
                if end.client_calls or round_no == job.max_rounds or job.client_gone:
                    why = ("not run: the same response also called client tools" if end.client_calls
                           else "not run: the client went away" if job.client_gone
                           else f"not run: tool round limit ({job.max_rounds}) reached")
                    merged.tool_calls += [injected_call_record(c, adapter.tools[c.name], rid, why) for c in end.injected]
                    if not end.client_calls and not job.client_gone:
                        note = f"\n\n[aibridge: stopped after {job.max_rounds} tool rounds]"
                    break
                results = await asyncio.gather(*(self._vetted(c, adapter, job) for c in end.injected))
                merged.tool_calls += [
                    injected_call_record(r.call, adapter.tools[r.call.name], rid, r.text if r.is_error else None)
                    for r in results
                ]
                adapter.continuation(list(results))
            merged.complete = merged.error is None
            if adapter.stream:
                if not out.started:
                    await out.start(200, _STREAM_HEADERS)
                await send(adapter.finish_stream(note), last=True)
                with contextlib.suppress(ClientGone):
                    await out.end()  # the client has the final event if it hung up now: only the last chunk is lost
            elif merged.error is None or not out.started:
                body = adapter.finish_body(note)
                if job.gate is not None:  # a whole answer: refused client calls replaced before it leaves
                    refused = gate_body(adapter.codec, json.loads(body), job.gate)
                    if refused is not None:
                        body = json.dumps(refused, ensure_ascii=False).encode()
                await out.respond(200, [("content-type", "application/json")], body)
        except ClientGone:
            merged.error = merged.error or "client disconnected"
            raise
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                if self._ending is None:
                    raise
                asyncio.current_task().uncancel()  # ended by end_all: the client still gets its answer
                merged.error, message, status = self._ending, f"aibridge: {self._ending}", 503
            else:
                if not isinstance(e, httpx.HTTPError):
                    log.exception("injected-tool loop failed")
                merged.error = f"tool round {job.rounds}: {type(e).__name__}: {e}"
                message, status = f"aibridge: request failed in tool round {job.rounds}: {type(e).__name__}", 502
            if out.ended:  # cut off as its last bytes went out: nothing more can be said
                pass
            elif out.started:
                tail = adapter.error_event(message)
                if sse_gate is not None:  # what is held is decided first; the error follows what was sent
                    tail = sse_gate.finish() + gated.tail(tail)
                await out.send(tail)
                with contextlib.suppress(ClientGone):
                    await out.end()
            else:
                await out.respond(status, [("content-type", "application/json")],
                                  json.dumps(error_body(job.provider_type, status, message)).encode())
        finally:
            job.state.loop_summary = merged
            job.state.loop_rounds = job.rounds

    async def _vetted(self, call, adapter: Adapter, job: LoopJob) -> ToolResult:
        """An injected call, run unless a tool rule refuses it: a refused one is not run, and the model is told
        why (its result is the refusal, marked as an error), so it can go on without it."""
        started = time.time_ns()
        refusal = job.vet(call.name, call.arguments, call.call_id) if job.vet is not None else None
        if refusal is not None:
            log.info("injected tool %s refused by policy rule %s", call.name, refusal.rule)
            result = ToolResult(call, refusal.text, True)
        else:
            result = await self._invoke(call, adapter, job)
        if self.telemetry is not None and job.state.interception is not None:
            tool = adapter.tools[call.name]
            self.telemetry.tool_call(job.state.interception.id, ToolRun(
                call.name, call.call_id, tool.server.name, started, time.time_ns(),
                result.text[:500] if result.is_error else None, call.arguments, result.text))
        return result

    async def _invoke(self, call, adapter: Adapter, job: LoopJob) -> ToolResult:
        tool = adapter.tools[call.name]
        try:
            args = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            return ToolResult(call, f"arguments are not valid JSON: {call.arguments[:200]}", True)
        text, is_error = await self.registry.call(tool, args, job.user_id)
        if is_error:
            log.warning("MCP tool %s failed: %s", call.name, text[:300])
        return ToolResult(call, text, is_error)


async def _round_request(job: LoopJob) -> tuple[str, dict[str, str], bytes]:
    """One round's upstream request: the adapter's body as JSON, or as a signed provider's transport builds it."""
    t = job.transport
    if t is None:
        headers = job.headers
        if not any(k.lower() == "content-type" for k in headers):
            headers = {**headers, "content-type": "application/json"}
        return job.url, headers, json.dumps(job.adapter.body, ensure_ascii=False).encode()
    await t.ready()
    parts = urlsplit(job.url)
    out = t.outbound(job.api, job.base_path, parts.path, job.adapter.body, b"", job.request_headers)
    url = f"{parts.scheme}://{parts.netloc}{out.path}"
    signed = dict((k.decode(), v.decode()) for k, v in t.sign(url, parts.netloc, out.content, job.adapter.stream))
    replaced = {h.decode() for h in t.replaced_headers}
    headers = {k: v for k, v in job.headers.items() if k.lower() not in signed and k.lower() not in replaced}
    headers.update(signed)
    return url, headers, out.content


def upstream_headers(headers) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _DROP_HEADERS}
    out["accept-encoding"] = "identity"
    return out

