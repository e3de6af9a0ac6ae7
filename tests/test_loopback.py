"""The loopback server (addons/aibridge_gw/loopback.py) in-process: one-shot jobs, h11 framing, streaming chunk by
chunk, a peer that hangs up, malformed input; and the key-pool relay served through it (flow/relay.py) with a
stand-in provider (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
from types import SimpleNamespace

import httpx
import pytest
from aibridge_gw.flow.keypool import KeyPool
from aibridge_gw.flow.relay import Relay, RelayJob
from aibridge_gw.loopback import ClientGone, LoopbackServer, Responder

WAIT = 5.0


class Job:
    """A test job: `run(out)` is what its handler does with the Responder."""

    def __init__(self, run) -> None:
        self.run = run


class Jobs:
    def __init__(self) -> None:
        self.served: list[Job] = []

    async def serve(self, job: Job, out: Responder) -> None:
        self.served.append(job)
        await job.run(out)


def in_loop(fn):
    """Run the async test on its own event loop, with a started server (closed at the end)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        async def main():
            handler = Jobs()
            server = LoopbackServer({Job: handler})
            await server.start()
            try:
                await fn(server, handler, *args, **kwargs)
            finally:
                server.close()

        asyncio.run(asyncio.wait_for(main(), 30))

    params = list(inspect.signature(fn).parameters.values())[2:]
    run.__signature__ = inspect.Signature(params)  # pytest's fixtures: what the test takes past server and handler
    return run


def url(server: LoopbackServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def settled(server: LoopbackServer) -> None:
    """Every exchange has ended (the count of active exchanges is back to 0)."""
    for _ in range(int(WAIT / 0.01)):
        if server.active == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.active} exchange(s) still active")


async def raw_exchange(server: LoopbackServer, data: bytes) -> bytes:
    """Send bytes as they are and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:  # closed with what was sent unread
        return b""
    finally:
        writer.close()


def answer(status=200, headers=(("content-type", "text/plain"),), body=b"ok"):
    async def run(out: Responder) -> None:
        await out.respond(status, list(headers), body)
    return run


@in_loop
async def test_an_unknown_key_gets_404_and_a_key_serves_one_request_only(server, handler):
    async with httpx.AsyncClient() as client:
        r = await client.get(url(server, "/aibridge-loop/nobody"))
        assert r.status_code == 404 and r.json() == {"error": {"message": "unknown loop job"}}
        assert r.headers["connection"] == "close"
        path = server.register("k1", Job(answer(body=b"hello")))
        assert path == "/aibridge-loop/k1"
        r = await client.post(url(server, path), content=b"x" * 300_000)  # a body longer than one read
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"hello", "5")
        r = await client.post(url(server, path), content=b"again")
        assert r.status_code == 404  # one-shot: the job was taken by the first request
        server.register("k2", Job(answer()))
        r = await client.get(url(server, "/elsewhere/k2"))  # only the loopback's own path names a job
        assert r.status_code == 404
        r = await client.head(url(server, "/aibridge-loop/k2"))
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "2"
        path = server.register("k3", Job(answer()))
        assert server.forget("k3") and not server.forget("k3")  # its flow ended before it came
        r = await client.get(url(server, path))
        assert r.status_code == 404
    assert len(handler.served) == 2
    await settled(server)
    assert server.jobs == {}


@in_loop
async def test_a_chunked_request_body_is_read_before_the_job_answers(server, handler):
    async def parts():
        yield b"a" * 70_000
        yield b"b"

    server.register("k", Job(answer(body=b"done")))
    async with httpx.AsyncClient() as client:
        r = await client.post(url(server, "/aibridge-loop/k"), content=parts())
    assert (r.status_code, r.content) == (200, b"done")
    await settled(server)


@in_loop
async def test_a_job_of_a_kind_without_a_handler_cannot_be_registered(server, handler):
    with pytest.raises(TypeError):
        server.register("k", object())


@in_loop
async def test_malformed_input_is_closed_cleanly_and_the_server_keeps_serving(server, handler, caplog):
    caplog.set_level(logging.DEBUG)
    got = await raw_exchange(server, b"NOT HTTP AT ALL\x00\x01\r\n\r\n")
    assert got == b"" or got.startswith(b"HTTP/1.1 400 ")
    got = await raw_exchange(server, b"POST /aibridge-loop/k HTTP/1.1\r\nhost: x\r\ncontent-length: nine\r\n\r\n")
    assert got == b"" or got.startswith(b"HTTP/1.1 400 ")
    got = await raw_exchange(server, b"GET /aibridge-loop/k HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"y" * 300_000)
    assert got == b"" or got.startswith(b"HTTP/1.1 431 ")  # a head beyond the bound
    # The peer closes in the middle of its body: no answer, nothing to log.
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /aibridge-loop/k HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly a part")
    await writer.drain()
    writer.close()
    await settled(server)
    server.register("k", Job(answer(body=b"still here")))
    async with httpx.AsyncClient() as client:
        r = await client.get(url(server, "/aibridge-loop/k"))
    assert (r.status_code, r.content) == (200, b"still here")
    assert handler.served and len(handler.served) == 1  # the malformed requests never reached a handler
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
    await settled(server)


@in_loop
async def test_a_streamed_answer_reaches_the_client_chunk_by_chunk_as_it_is_sent(server, handler):
    second = asyncio.Event()
    sent = []

    async def run(out: Responder) -> None:
        await out.start(200, [("content-type", "text/event-stream"), ("content-length", "999"),
                              ("transfer-encoding", "gzip"), ("x-kept", "yes")])
        await out.send(b"data: first\n\n")
        sent.append(1)
        await asyncio.wait_for(second.wait(), WAIT)  # the client must have the first chunk before this one
        await out.send(b"data: second\n\n")
        sent.append(2)
        await out.end()

    server.register("k", Job(run))
    async with httpx.AsyncClient() as client:
        async with client.stream("POST", url(server, "/aibridge-loop/k"), content=b"{}") as r:
            assert r.status_code == 200 and r.reason_phrase == "OK"
            assert r.headers["transfer-encoding"] == "chunked"  # the server's framing, not the handler's headers
            assert "content-length" not in r.headers and r.headers["connection"] == "close"
            assert r.headers["x-kept"] == "yes"
            chunks = r.aiter_raw()
            first = await asyncio.wait_for(chunks.__anext__(), WAIT)
            assert first == b"data: first\n\n" and sent == [1]
            second.set()
            rest = b"".join([c async for c in chunks])
    assert rest == b"data: second\n\n" and sent == [1, 2]
    await settled(server)


@in_loop
async def test_a_client_that_hangs_up_makes_send_raise_client_gone(server, handler):
    outcome = asyncio.get_running_loop().create_future()

    async def run(out: Responder) -> None:
        await out.start(200, [("content-type", "text/event-stream")])
        try:
            for n in range(500):
                await out.send(b"data: %d\n\n" % n)
                await asyncio.sleep(0.01)
        except ClientGone:
            outcome.set_result(("gone", n))
            raise
        outcome.set_result(("sent everything", n))

    server.register("k", Job(run))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /aibridge-loop/k HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 200 ")
    await asyncio.wait_for(reader.readuntil(b"data: 0\n\n"), WAIT)
    writer.close()
    kind, n = await asyncio.wait_for(outcome, WAIT)
    assert kind == "gone" and n < 100
    await settled(server)


@in_loop
async def test_a_handler_that_fails_leaves_an_unterminated_answer_and_is_logged(server, handler, caplog):
    async def run(out: Responder) -> None:
        await out.start(200, [("content-type", "text/event-stream")])
        await out.send(b"data: part\n\n")
        raise RuntimeError("boom")

    server.register("k", Job(run))
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", url(server, "/aibridge-loop/k")) as r:
            with pytest.raises(httpx.RemoteProtocolError):  # no last chunk: the client knows the answer broke off
                await r.aread()
    assert "serving Job failed" in caplog.text
    await settled(server)


# --- the key-pool relay, served through the loopback --------------------------------------------------------------


async def streamed(*parts: bytes):
    """A stand-in provider's body, streamed as a real transport's is (a bytes body would come already read)."""
    for part in parts:
        yield part


def auth(key: str) -> tuple[bytes, bytes]:
    return b"x-api-key", key.encode()


def relay_server(provider) -> tuple[LoopbackServer, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(provider))
    return LoopbackServer({RelayJob: Relay(client)}), client


def relay_job(pool: KeyPool, state) -> RelayJob:
    return RelayJob(method="POST", url="https://provider.test/v1/messages",
                    headers=[(b"content-type", b"application/json")], content=b'{"q": 1}', pool=pool,
                    auth_header=auth, state=state, provider_type="anthropic")


def in_relay_loop(fn):
    @functools.wraps(fn)
    def run():
        asyncio.run(asyncio.wait_for(fn(), 30))
    return run


@in_relay_loop
async def test_the_relay_fails_over_streams_the_answer_and_notes_the_key_on_the_flows_state():
    seen = []

    def provider(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["x-api-key"], request.content))
        if request.headers["x-api-key"] == "key-a":
            return httpx.Response(429, headers={"retry-after": "30"}, content=streamed(b"slow down"))
        return httpx.Response(200, headers={"content-type": "text/event-stream", "x-request-id": "r1"},
                              content=streamed(b"data: one\n\n", b"data: two\n\n"))

    server, client = relay_server(provider)
    await server.start()
    pool = KeyPool("anthropic", [("key-a", "hint-a"), ("key-b", "hint-b")])
    state = SimpleNamespace(key_hint=None)
    try:
        path = server.register("k", relay_job(pool, state))
        async with httpx.AsyncClient() as c:
            r = await c.post(url(server, path), content=b"ignored: the job holds the body")
        assert (r.status_code, r.content) == (200, b"data: one\n\ndata: two\n\n")
        assert r.headers["x-request-id"] == "r1" and r.headers["transfer-encoding"] == "chunked"
        assert seen == [("key-a", b'{"q": 1}'), ("key-b", b'{"q": 1}')]
        assert state.key_hint == "hint-b"
        await settled(server)
    finally:
        server.close()
        await client.aclose()


@in_relay_loop
async def test_the_relay_passes_the_providers_error_on_and_answers_an_exhausted_pool_itself():
    def provider(request: httpx.Request) -> httpx.Response:
        if request.headers["x-api-key"] == "key-a":
            return httpx.Response(400, headers={"content-type": "application/json"},
                                  content=streamed(b'{"error": "bad"}'))
        return httpx.Response(429, headers={"retry-after": "7"}, content=streamed())

    server, client = relay_server(provider)
    await server.start()
    try:
        async with httpx.AsyncClient() as c:
            state = SimpleNamespace(key_hint=None)
            path = server.register("a", relay_job(KeyPool("anthropic", [("key-a", "hint-a")]), state))
            r = await c.post(url(server, path))
            assert (r.status_code, r.content) == (400, b'{"error": "bad"}') and "x-aibridge-error" not in r.headers
            assert r.reason_phrase == "Bad Request" and state.key_hint == "hint-a"
            path = server.register("b", relay_job(KeyPool("anthropic", [("key-b", "hint-b")]), state))
            r = await c.post(url(server, path))
            assert r.status_code == 429 and r.headers["x-aibridge-error"] == "1"
            assert 6 <= int(r.headers["retry-after"]) <= 7
            assert "rate limited" in json.dumps(r.json())
            assert r.headers["content-length"] == str(len(r.content))
        await settled(server)
    finally:
        server.close()
        await client.aclose()
