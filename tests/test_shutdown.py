"""Stopping the gateway (SIGTERM, as systemd and the `--workers` supervisor send it): calls in flight finish
within `timeouts.shutdown_grace_seconds` (3 s here), what outlives it ends with its API's error event and a
`failed` record, nothing new is accepted, nothing is logged as a traceback; and a stopped `--workers` group
starts again on its port at once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import anthropic
import httpx
import openai
import pytest

from tests.support.gateway import ROOT, Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client, openai_client
from tests.support.wire import _sse, anthropic_message, anthropic_stream, request_body

GRACE = 3.0
SHORT = {"timeouts": {"shutdown_grace_seconds": GRACE}}


def slow_stream(deltas: int, usage=(21, 9)) -> list[bytes]:
    """An Anthropic stream with `deltas` text events (one chunk each) between its start and its end."""
    events = anthropic_stream("", usage)
    delta = _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
                 "content_block_delta")
    return events[:2] + [delta] * deltas + events[3:]


def terminate(gw: Gateway, timeout: float = 30) -> tuple[int, float]:
    """SIGTERM; the exit code and the seconds until the process exited."""
    t = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    rc = gw.proc.wait(timeout)
    return rc, time.monotonic() - t


def assert_clean_log(gw: Gateway) -> None:
    log = gw.log()
    for bad in ("Traceback", "CancelledError", "Unhandled error", "Exception in callback"):
        assert bad not in log, f"{bad!r} in the gateway's log:\n{log[-4000:]}"


class Streams:
    """Streaming calls with the official SDK in threads: each one's event types, or the error it raised."""

    def __init__(self, gw: Gateway, token: str, models: list[str]) -> None:
        self.client = anthropic_client(gw, token, timeout=30)
        self.events: dict[str, list[str]] = {m: [] for m in models}
        self.errors: dict[str, Exception] = {}
        self.threads = [threading.Thread(target=self._run, args=(m,)) for m in models]
        for t in self.threads:
            t.start()

    def _run(self, model: str) -> None:
        try:
            for ev in self.client.messages.create(stream=True, model=model, max_tokens=64,
                                                  messages=[{"role": "user", "content": "hi"}]):
                self.events[model].append(ev.type)
        except Exception as e:
            self.errors[model] = e

    def wait_started(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.events.values()):
            assert time.monotonic() < deadline, f"streams did not start: {self.events} {self.errors}"
            time.sleep(0.02)

    def join(self, timeout: float = 30) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)


def by_model(replies: dict[str, Reply]):
    """A stand-in check that answers each request by its model (concurrent calls arrive in any order)."""
    return lambda seen: replies.get(json.loads(seen.body or b"{}").get("model"))


def rows(gw: Gateway, models: list[str]) -> dict[str, dict]:
    """model -> its one interception with token usage, once the gateway has exited (DuckDB opened directly)."""
    found = gw.sql("SELECT i.model, i.status, i.error, t.input_tokens, t.output_tokens FROM aibridge_interceptions i "
                   "LEFT JOIN aibridge_token_usages t ON t.interception_id = i.id")
    found = [r for r in found if r["model"] in models]
    assert sorted(r["model"] for r in found) == sorted(models), found
    return {r["model"]: r for r in found}


def test_sigterm_lets_slow_streams_in_flight_finish_and_records_them_completed(own_gateway, mock):
    gw = own_gateway("slow", extra=SHORT)
    token = gw.new_user("slow")
    models = [f"claude-slow-{n}" for n in range(3)]
    mock.check = by_model({m: Reply.sse(slow_stream(5), delay=0.2) for m in models})  # 10 events, 1.8 s each
    streams = Streams(gw, token, models)
    streams.wait_started()
    rc, took = terminate(gw)
    streams.join()
    assert rc == 0 and not streams.errors
    for m in models:
        assert streams.events[m][0] == "message_start" and streams.events[m][-1] == "message_stop"
        assert streams.events[m].count("content_block_delta") == 5
    assert took < GRACE  # it waited for the streams, not for the grace
    got = rows(gw, models)
    assert {m: (r["status"], r["error"], r["input_tokens"], r["output_tokens"]) for m, r in got.items()} == {
        m: ("completed", None, 21, 9) for m in models}
    assert_clean_log(gw)


def test_sigterm_ends_a_stream_longer_than_the_grace_with_the_api_error_event_and_the_usage_seen(own_gateway, mock):
    gw = own_gateway("long", extra=SHORT)
    token = gw.new_user("long")
    mock.check = by_model({"claude-long": Reply.sse(slow_stream(40), delay=0.3)})  # 12 s: longer than the grace
    streams = Streams(gw, token, ["claude-long"])
    streams.wait_started()
    rc, took = terminate(gw)
    streams.join()
    assert rc == 0 and GRACE <= took < GRACE + 3
    error = streams.errors["claude-long"]
    assert isinstance(error, anthropic.APIStatusError) and "gateway shut down" in error.message
    assert error.body["error"]["type"] == "api_error"  # the API's own error event, read by the SDK
    events = streams.events["claude-long"]
    assert events[0] == "message_start" and "content_block_delta" in events and "message_stop" not in events
    row = rows(gw, ["claude-long"])["claude-long"]
    assert (row["status"], row["error"]) == ("failed", "gateway shut down")
    assert (row["input_tokens"], row["output_tokens"]) == (21, 1)  # what message_start said
    assert_clean_log(gw)


def test_a_blocking_call_still_waiting_when_the_grace_runs_out_gets_a_503_in_its_providers_format(own_gateway, mock):
    gw = own_gateway("blocking", extra=SHORT)
    token = gw.new_user("blocking")
    mock.default = Reply(**{**Reply.json({"object": "chat.completion"}).__dict__, "hang": 8})
    got: dict = {}

    def call():
        try:
            openai_client(gw, token, timeout=30).chat.completions.create(
                model="gpt-waits", messages=[{"role": "user", "content": "hi"}])
        except Exception as e:
            got["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while not mock.seen:  # the call reached the provider
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rc, took = terminate(gw)
    thread.join(10)
    assert rc == 0 and took < GRACE + 3
    error = got["error"]
    assert isinstance(error, openai.InternalServerError) and error.status_code == 503
    assert "gateway shut down" in error.message and error.body["type"] == "server_error"  # OpenAI's error shape
    row = rows(gw, ["gpt-waits"])["gpt-waits"]
    assert row["status"] == "failed" and "gateway shut down" in row["error"]
    assert_clean_log(gw)


def test_sigterm_with_only_idle_keepalive_connections_exits_within_three_seconds(own_gateway, mock):
    gw = own_gateway("idle", extra={"timeouts": {"shutdown_grace_seconds": 60}})
    token = gw.new_user("idle")
    mock.default = Reply.json(anthropic_message("ok", (3, 2)))
    clients = [httpx.Client(base_url=gw.url, trust_env=False, timeout=10) for _ in range(4)]
    try:
        for c in clients:  # each keeps its connection open afterwards
            assert c.post("/anthropic/v1/messages", json=request_body("anthropic", stream=False),
                          headers={"x-api-key": token}).status_code == 200
        rc, took = terminate(gw)
    finally:
        for c in clients:
            c.close()
    assert rc == 0 and took < 3.0  # measured: 0.8 s (idle connections settle 0.5 s and close, the store closes)
    assert_clean_log(gw)


def test_new_connections_are_refused_while_a_stream_in_flight_finishes(own_gateway, mock):
    gw = own_gateway("refuse", extra=SHORT)
    token = gw.new_user("refuse")
    mock.check = by_model({"claude-finishing": Reply.sse(slow_stream(5), delay=0.2)})  # 1.8 s
    streams = Streams(gw, token, ["claude-finishing"])
    streams.wait_started()
    gw.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 1
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
            time.sleep(0.02)
        except ConnectionRefusedError:
            refused = True
    assert refused and streams.running  # refused while the stream was still going
    streams.join()
    assert gw.proc.wait(10) == 0
    assert not streams.errors and streams.events["claude-finishing"][-1] == "message_stop"
    assert rows(gw, ["claude-finishing"])["claude-finishing"]["status"] == "completed"
    assert_clean_log(gw)


def test_a_request_on_a_kept_alive_connection_during_the_drain_gets_503_retry_after_and_connection_close(
        own_gateway, mock):
    gw = own_gateway("keptalive", extra=SHORT)
    token = gw.new_user("keptalive")
    mock.check = by_model({"claude-first": Reply.sse(slow_stream(5), delay=0.2)})  # 1.8 s
    body = json.dumps(request_body("anthropic", model="claude-first")).encode()
    second = json.dumps(request_body("anthropic", model="claude-second")).encode()

    def request(data: bytes) -> bytes:  # HTTP/1.1, the connection kept alive
        return (b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                b"x-api-key: " + token.encode() + b"\r\ncontent-length: " + str(len(data)).encode() + b"\r\n\r\n" + data)

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(request(body))
        got = b""
        while b"message_start" not in got:
            got += s.recv(65536)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        s.sendall(request(second))  # read after the first answer, during the drain
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break  # the gateway closed the connection after the 503
            got += chunk
    first, _, rest = got.partition(b"0\r\n\r\n")
    assert b"message_stop" in first
    head, _, error = rest.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert lines[0].startswith(b"HTTP/1.1 503") and headers[b"connection"] == b"close" and headers[b"retry-after"]
    error = json.loads(error)
    assert error["type"] == "error" and error["error"]["type"] == "api_error"  # Anthropic's shape
    assert "shutting down" in error["error"]["message"]
    assert [s.path for s in mock.seen] == ["/v1/messages"]  # the second never reached the provider
    assert gw.proc.wait(10) == 0
    assert_clean_log(gw)


@pytest.mark.parametrize("workers", [2, 1], ids=["workers", "single"])
def test_a_stopped_gateway_starts_again_at_once_on_its_port_after_keepalive_traffic(tmp_path, mock, workers):
    mock.default = Reply.json(anthropic_message("ok", (3, 2)))
    gw = Gateway(tmp_path / "w", mock.url, workers=workers, extra=SHORT).start()
    try:
        token = gw.new_user("restart")
        port, stop = gw.port, threading.Event()
        served = [0] * 6

        def traffic(n: int) -> None:  # keep-alive clients: connections reused until the gateway closes them
            with httpx.Client(base_url=gw.url, trust_env=False, timeout=5) as c:
                while not stop.is_set():
                    try:
                        c.post("/anthropic/v1/messages", json=request_body("anthropic", stream=False),
                               headers={"x-api-key": token})
                        served[n] += 1
                    except httpx.HTTPError:
                        time.sleep(0.02)

        threads = [threading.Thread(target=traffic, args=(n,)) for n in range(len(served))]
        for t in threads:
            t.start()
        time.sleep(1)
        # Idle connections the gateway closes itself when it stops: the side that closes first keeps the port's
        # connections in TIME_WAIT, which is what a restart on the same port must get past.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        rc, _ = terminate(gw)
        stop.set()
        for t in threads:
            t.join(10)
        for s in idle:
            s.settimeout(10)
            while s.recv(65536):
                pass
            s.close()
        assert rc == 0 and all(served)
        assert_clean_log(gw)
        with socket.socket() as plain:  # the test means something: the port's closed connections linger
            with pytest.raises(OSError):
                plain.bind(("127.0.0.1", port))
        t = time.monotonic()
        gw.start(port)
        assert time.monotonic() - t < 10 and gw.port == port
        assert httpx.post(gw.url + "/anthropic/v1/messages", json=request_body("anthropic", stream=False),
                          headers={"x-api-key": token}, trust_env=False, timeout=10).status_code == 200
        # And a port a live gateway listens on is still refused to a `--workers` group.
        other = Gateway(tmp_path / "second", mock.url)
        r = subprocess.run([sys.executable, "-m", "aibridge_gw.workers", "2", "--listen-host", "127.0.0.1",
                            "--listen-port", str(port), "--set", f"aibridge_config={other.config_path}"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2 and f"port {port} is in use" in r.stderr
    finally:
        gw.stop()


@pytest.mark.parametrize("listener", ["plain", "reuseport-group"])
def test_the_port_check_refuses_a_port_a_live_listener_holds(listener):
    from aibridge_gw.workers import _port_free

    socks = []
    try:
        for _ in range(1 if listener == "plain" else 2):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listeners have it
            if listener != "plain":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", socks[0].getsockname()[1] if len(socks) > 1 else 0))
            s.listen()
        port = socks[0].getsockname()[1]
        assert not _port_free("127.0.0.1", port) and not _port_free("", port)
    finally:
        for s in socks:
            s.close()


def test_sigterm_through_workers_lets_short_streams_finish_and_ends_long_ones(tmp_path, mock):
    mock.check = by_model({**{f"claude-short-{n}": Reply.sse(slow_stream(5), delay=0.3) for n in range(3)},
                           **{f"claude-long-{n}": Reply.sse(slow_stream(40), delay=0.3) for n in range(3)}})
    gw = Gateway(tmp_path / "w", mock.url, workers=2, extra=SHORT).start()
    try:
        token = gw.new_user("workers")
        mock.default = Reply.json(anthropic_message("ok", (3, 2)))
        deadline = time.monotonic() + 10
        while [httpx.post(gw.url + "/anthropic/v1/messages", headers={"x-api-key": token}, trust_env=False,
                          json=request_body("anthropic", stream=False)).status_code for _ in range(8)] != [200] * 8:
            assert time.monotonic() < deadline, "a worker never learned the token"  # new connections: any worker
            time.sleep(0.2)
        short = [f"claude-short-{n}" for n in range(3)]
        long = [f"claude-long-{n}" for n in range(3)]
        streams = Streams(gw, token, short + long)  # a connection each: the kernel spreads them over the workers
        streams.wait_started()
        rc, took = terminate(gw)
        streams.join()
    finally:
        gw.stop()
    assert rc == 0 and took < GRACE + 5
    for m in short:
        assert m not in streams.errors and streams.events[m][-1] == "message_stop"
    for m in long:
        assert isinstance(streams.errors[m], anthropic.APIStatusError) and "gateway shut down" in streams.errors[m].message
    got = rows(gw, short + long)
    assert {m: got[m]["status"] for m in short + long} == {**{m: "completed" for m in short},
                                                             **{m: "failed" for m in long}}
    assert all(got[m]["error"] == "gateway shut down" and got[m]["input_tokens"] == 21 for m in long)
    assert_clean_log(gw)


def test_shutdown_grace_is_a_positive_number_of_seconds_and_the_supervisor_waits_it_plus_a_margin(tmp_path):
    from aibridge_gw.config import ConfigError, load_config
    from aibridge_gw.workers import STOP_MARGIN, Supervisor

    def config(name: str, timeouts: dict | None) -> str:
        return str(Gateway(tmp_path / name, "http://127.0.0.1:9", extra={"timeouts": timeouts} if timeouts else None
                           ).config_path)

    assert load_config(config("default", None)).timeouts.shutdown_grace == 60
    for bad in (0, -1, "soon"):
        with pytest.raises(ConfigError, match="shutdown_grace_seconds"):
            load_config(config(f"bad{bad}", {"shutdown_grace_seconds": bad}))
    path = config("short", {"shutdown_grace_seconds": 7.5})
    supervisor = Supervisor(2, ["--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"aibridge_config={path}"])
    assert supervisor.stop_timeout == 7.5 + STOP_MARGIN
