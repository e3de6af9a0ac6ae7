"""The injected-tool loop. Flows whose request carries injected tools are routed by the addon to this
loopback endpoint, served on mitmproxy's own event loop; mitmproxy relays its response to the client like any
upstream's. Here the gateway calls the provider (httpx, async), runs injected MCP tools (async, with a
timeout) and continues the conversation, while the client sees one response streaming as it is produced.
Nothing here blocks the event loop: every wait is an await.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..apis import PROVIDERS
from ..flow.errors import error_body
from ..flow.exchange import ResponseSummary, summary_to_dict
from ..flow.keypool import Exhausted
from ..flow.relay import RelayJob, response_head, send_with_failover
from ..flow.sse import SSEParser
from .registry import McpRegistry
from .tools import Adapter, ToolResult, injected_call_record

log = logging.getLogger("aibridge.mcp")

_DROP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding",
                 "proxy-connection", "te", "upgrade"}


@dataclass
class LoopJob:
    url: str
    headers: dict[str, str]
    adapter: Adapter
    provider_type: str
    user_id: str
    max_rounds: int
    metadata: dict  # the flow's metadata["aibridge"]: the loop's summary is left here for recording
    transport: Any = None  # a signed provider's transport (apis/base.Transport): each round is built and signed
    api: str = ""
    base_path: str = ""
    # The client's request headers (lower-case names): a transport reads what its provider needs from them.
    request_headers: dict = field(default_factory=dict)
    pool: Any = None  # the instance's KeyPool: each round is sent with the next usable key on 429/401/403
    auth_header: Any = None  # the provider's key header for a key (with a pool)
    rounds: int = 0
    summary: ResponseSummary = field(default_factory=ResponseSummary)
    client_gone: bool = False  # the client went away mid-stream: this round is read to its end, no new one starts


class ClientGone(Exception):
    pass


class LoopServer:
    def __init__(self, registry: McpRegistry, verify: bool | str = True) -> None:
        self.registry = registry
        self.jobs: dict[str, LoopJob] = {}
        self.verify = verify
        self.port = 0
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self.active = 0
        self._loops: set[asyncio.Task] = set()  # the tasks running tool loops (not plain relays)
        self._ending: str | None = None  # shutdown: why every loop still running was ended

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            verify=self.verify, trust_env=False, http2=False,
            timeout=httpx.Timeout(connect=15, read=600, write=60, pool=30),
        )
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def end_all(self, reason: str) -> int:
        """Shutdown (drain.py): end every tool loop still running; each ends its client's answer the API's way
        (a stream's error event, else a 503) and records `reason`. How many there were."""
        self._ending = reason
        for task in self._loops:
            task.cancel(reason)
        return len(self._loops)

    def register(self, key: str, job: LoopJob | RelayJob) -> str:
        self.jobs[key] = job
        return f"/aibridge-loop/{key}"

    async def _relay(self, job: RelayJob, writer: asyncio.StreamWriter) -> None:
        """One request to a key-pool instance: sent with failover, the answer streamed back as it arrives."""
        try:
            got = await send_with_failover(self._client, job.pool, job.auth_header, job.method, job.url, job.headers,
                                           job.content, job.metadata)
        except httpx.HTTPError as e:
            body = error_body(job.provider_type, 502, f"aibridge: the provider's connection failed: {type(e).__name__}")
            await _respond(writer, 502, "application/json", json.dumps(body).encode())
            return
        if isinstance(got, Exhausted):
            await _respond_exhausted(writer, job.provider_type, got)
            return
        try:
            writer.write(response_head(got))
            await writer.drain()
            async for chunk in got.aiter_raw():
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except httpx.HTTPError as e:  # the provider broke off: closing without the last chunk tells mitmproxy so
            log.warning("provider %s: the answer broke off: %s", job.pool.provider, type(e).__name__)
        finally:
            await got.aclose()

    @contextlib.asynccontextmanager
    async def _upstream(self, job: LoopJob, url: str, headers: dict[str, str], content: bytes):
        """One round's upstream response, sent with the pool's next usable key when the instance has a pool."""
        if job.pool is None:
            async with self._client.stream("POST", url, headers=headers, content=content) as resp:
                yield resp
            return
        got = await send_with_failover(self._client, job.pool, job.auth_header, "POST", url, list(headers.items()),
                                       content, job.metadata)
        if isinstance(got, Exhausted):
            body = json.dumps(error_body(job.provider_type, got.status, got.message)).encode()
            extra = {"retry-after": str(got.retry_after)} if got.retry_after else {}
            yield httpx.Response(got.status, headers={"content-type": "application/json", **extra}, content=body)
            return
        try:
            yield got
        finally:
            await got.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            path = request_line.split(" ")[1]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.decode("latin-1").partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            if length:
                await reader.readexactly(length)  # the job already holds the body
            job = self.jobs.pop(path.rsplit("/", 1)[-1], None)
            if job is None:
                await _respond(writer, 404, "application/json", b'{"error":{"message":"unknown loop job"}}')
                return
            if isinstance(job, RelayJob):
                await self._relay(job, writer)
            else:
                task = asyncio.current_task()
                self._loops.add(task)
                try:
                    await self._run(job, writer)
                finally:
                    self._loops.discard(task)
        except (ClientGone, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("injected-tool loop failed")
        finally:
            self.active -= 1
            try:
                writer.close()
            except Exception:
                pass

    async def _run(self, job: LoopJob, writer: asyncio.StreamWriter) -> None:
        adapter = job.adapter
        merged = job.summary
        started = False
        note: str | None = None

        async def send(chunks: list[bytes]) -> None:
            data = b"".join(chunks)
            if not data:
                return
            try:
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            except (ConnectionError, RuntimeError) as e:
                raise ClientGone() from e

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
                        if not started:  # the provider's own error, as without the loop
                            merged.error = f"HTTP {resp.status_code}"
                            status = resp.status_code
                            shaped = job.transport.client_error(job.api, status, resp.headers,
                                                                body) if job.transport is not None else None
                            if shaped is not None:
                                (status, body), ctype = shaped, "application/json"
                            wait = resp.headers.get("retry-after", "")
                            await _respond(writer, status, ctype or "application/json", body,
                                           f"retry-after: {wait}\r\n" if wait.isdigit() else "")
                            return
                        merged.error = f"round {round_no}: HTTP {resp.status_code}: {body[:200]!r}"
                        await send([adapter.error_event(f"upstream error in tool round {round_no}: HTTP {resp.status_code}")])
                        break
                    if adapter.stream:
                        if not started:
                            await _start_chunked(writer, 200, "text/event-stream")
                            started = True
                        parser = SSEParser()
                        async for chunk in resp.aiter_raw():
                            out = []
                            for ev in parser.feed(framing.decode(chunk) if framing is not None else chunk):
                                out += adapter.on_event(ev)
                            await send(out)
                        out = []
                        for ev in parser.feed(b""):
                            out += adapter.on_event(ev)
                        await send(out)
                    else:
                        adapter.on_body(json.loads(await resp.aread()))
                end = adapter.round_end()
                merged.usages += end.summary.usages
                merged.thoughts += end.summary.thoughts
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
                results = await asyncio.gather(*(self._invoke(c, adapter, job) for c in end.injected))
                merged.tool_calls += [
                    injected_call_record(r.call, adapter.tools[r.call.name], rid, r.text if r.is_error else None)
                    for r in results
                ]
                adapter.continuation(list(results))
            merged.complete = merged.error is None
            if adapter.stream:
                if not started:
                    await _start_chunked(writer, 200, "text/event-stream")
                await send(adapter.finish_stream(note))
                try:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                except (ConnectionError, RuntimeError):
                    pass  # the client has the final event and hung up: only the chunk terminator was lost
            elif merged.error is None or not started:
                await _respond(writer, 200, "application/json", adapter.finish_body(note))
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
            if started:
                await send([adapter.error_event(message)])
                writer.write(b"0\r\n\r\n")
            else:
                await _respond(writer, status, "application/json",
                               json.dumps(error_body(job.provider_type, status, message)).encode())
        finally:
            job.metadata["loop"] = summary_to_dict(merged)
            job.metadata["loop_rounds"] = job.rounds

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


async def _start_chunked(writer: asyncio.StreamWriter, status: int, ctype: str) -> None:
    writer.write(
        f"HTTP/1.1 {status} OK\r\ncontent-type: {ctype}\r\ncache-control: no-cache\r\n"
        "transfer-encoding: chunked\r\nconnection: close\r\n\r\n".encode()
    )
    await writer.drain()


async def _respond(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, extra: str = "") -> None:
    writer.write(
        f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n{extra}"
        "connection: close\r\n\r\n".encode() + body
    )
    await writer.drain()


async def _respond_exhausted(writer: asyncio.StreamWriter, provider_type: str, got: Exhausted) -> None:
    body = json.dumps(error_body(provider_type, got.status, got.message)).encode()
    extra = f"retry-after: {got.retry_after}\r\nx-aibridge-error: 1\r\n" if got.retry_after else "x-aibridge-error: 1\r\n"
    await _respond(writer, got.status, "application/json", body, extra)


def upstream_headers(headers) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _DROP_HEADERS}
    out["accept-encoding"] = "identity"
    return out

