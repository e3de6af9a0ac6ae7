"""Reloading the configuration (SIGHUP, systemd's ExecReload): providers, budgets and limits change without a
dropped connection or a stream in flight cut; a bad file is refused whole and the running configuration kept;
the `--workers` supervisor forwards the signal to every worker."""

from __future__ import annotations

import signal
import socket
import time

import yaml

from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.wire import anthropic_message, chat_completion
from tests.test_shutdown import Streams, by_model, slow_stream


def providers(upstream_url: str, *names: str) -> list[dict]:
    every = {
        "anthropic": {"name": "anthropic", "type": "anthropic", "base_url": upstream_url + "/",
                      "key": UPSTREAM_ANTHROPIC_KEY},
        "openai": {"name": "openai", "type": "openai", "base_url": upstream_url + "/v1/", "key": UPSTREAM_OPENAI_KEY},
    }
    return [every[n] for n in names]


def rewrite(gw: Gateway, **changes) -> None:
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg.update(changes)
    gw.config_path.write_text(yaml.safe_dump(cfg))


def reload(gw: Gateway, expect: str, timeout: float = 10) -> None:
    """SIGHUP, then wait for the log line that says how it went."""
    before = gw.log().count(expect)
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while gw.log().count(expect) <= before:
        assert gw.proc.poll() is None, "the gateway exited on SIGHUP"
        assert time.monotonic() < deadline, f"no {expect!r} in the log:\n{gw.log()[-3000:]}"
        time.sleep(0.05)


def raw_call(sock: socket.socket, port: int, token: str, path: str, body: bytes) -> bytes:
    """One HTTP/1.1 request on an open keep-alive connection; the status line of its answer."""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the gateway closed the connection (after {data!r})"  # never spin on a closed socket
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the gateway closed the connection mid-body"
        rest += chunk
    return head.split(b"\r\n")[0]


CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
MESSAGE = b'{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'


def test_sighup_adds_a_provider_and_a_budget_without_dropping_connections_or_streams(own_gateway, mock):
    # The kept-alive connection waits through a stream and a reload: under load that may pass the default request
    # head timeout (10 s), which would close it for a reason this test is not about.
    gw = own_gateway("reload", providers=providers(mock.url, "anthropic"),
                     extra={"timeouts": {"request_head_seconds": 120}})
    token = gw.new_user("rel")
    mock.check = by_model({
        "claude-slow": Reply.sse(slow_stream(20), delay=0.2),
        "claude-x": Reply.json(anthropic_message("ok", (3, 1))),
        "gpt-4o-mini": Reply.json(chat_completion("ok", (4, 2), model="gpt-4o-mini")),
    })
    kept = socket.create_connection(("127.0.0.1", gw.port))
    assert raw_call(kept, gw.port, token, "/openai/v1/chat/completions", CHAT).split()[1] == b"404"
    streams = Streams(gw, token, ["claude-slow"])
    streams.wait_started()
    time.sleep(1)  # the stream's row is in the store: the new budget's counters start from it
    rewrite(gw, providers=providers(mock.url, "anthropic", "openai"),
            budgets={"default": {"requests_per_minute": 3}})
    reload(gw, "configuration reloaded")
    # The connection opened before the reload serves the new provider; the stream in flight finished whole.
    assert raw_call(kept, gw.port, token, "/openai/v1/chat/completions", CHAT).split()[1] == b"200"
    streams.join()
    assert not streams.errors and streams.events["claude-slow"][-1] == "message_stop"
    # The new budget is in force: 3 per minute, counting the stream that began before it (not the 404).
    assert raw_call(kept, gw.port, token, "/anthropic/v1/messages", MESSAGE).split()[1] == b"200"
    assert raw_call(kept, gw.port, token, "/anthropic/v1/messages", MESSAGE).split()[1] == b"429"
    kept.close()
    assert "Traceback" not in gw.log()


def test_a_bad_file_is_refused_and_the_running_configuration_stays(own_gateway, mock):
    gw = own_gateway("badreload", providers=providers(mock.url, "anthropic"))
    token = gw.new_user("bad")
    mock.check = by_model({"claude-x": Reply.json(anthropic_message("ok", (3, 1)))})
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + "retention_day: 3\n")
    reload(gw, "configuration reload (SIGHUP) refused")
    assert "did you mean `retention_days`?" in gw.log()
    gw.config_path.write_text("providers: [\n")  # not even YAML
    reload(gw, "configuration reload (SIGHUP) refused")
    gw.config_path.write_text(good)
    rewrite(gw, storage={"duckdb": str(gw.workdir / "other.duckdb")})
    reload(gw, "configuration reload (SIGHUP) refused")
    assert "cannot change while the gateway runs" in gw.log()
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        assert raw_call(s, gw.port, token, "/anthropic/v1/messages", MESSAGE).split()[1] == b"200"
    import httpx

    metrics = httpx.get(f"{gw.url}/aibridge/metrics").text
    assert 'aibridge_config_reloads_total{result="refused"} 3.0' in metrics


def wait_for_log(gw: Gateway, expect: str, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while gw.log().count(expect) < count:
        assert gw.proc.poll() is None, "the gateway exited"
        assert time.monotonic() < deadline, f"fewer than {count} {expect!r} in the log:\n{gw.log()[-3000:]}"
        time.sleep(0.05)


def test_reload_watch_applies_a_changed_file_and_refuses_a_bad_one_without_a_signal(own_gateway, mock):
    gw = own_gateway("watch", providers=providers(mock.url, "anthropic"),
                     extra={"reload": {"watch": True, "watch_interval_seconds": 0.2}})
    token = gw.new_user("watcher")
    mock.check = by_model({"gpt-4o-mini": Reply.json(chat_completion("ok", (4, 2), model="gpt-4o-mini"))})
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        assert raw_call(s, gw.port, token, "/openai/v1/chat/completions", CHAT).split()[1] == b"404"
    rewrite(gw, providers=providers(mock.url, "anthropic", "openai"))
    wait_for_log(gw, "configuration reloaded (file changed)", 1)
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        assert raw_call(s, gw.port, token, "/openai/v1/chat/completions", CHAT).split()[1] == b"200"
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + "retention_day: 3\n")
    wait_for_log(gw, "configuration reload (file changed) refused", 1)
    time.sleep(1)  # the same bad file is refused once, not on every check
    assert gw.log().count("configuration reload (file changed) refused") == 1
    with socket.create_connection(("127.0.0.1", gw.port)) as s:  # the running configuration stays
        assert raw_call(s, gw.port, token, "/openai/v1/chat/completions", CHAT).split()[1] == b"200"
    fixed = yaml.safe_load(good)
    fixed["providers"] = providers(mock.url, "anthropic")
    gw.config_path.write_text(yaml.safe_dump(fixed))  # the next change is read again
    wait_for_log(gw, "configuration reloaded (file changed)", 2)
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        assert raw_call(s, gw.port, token, "/openai/v1/chat/completions", CHAT).split()[1] == b"404"


def test_the_workers_supervisor_forwards_sighup_to_every_worker(tmp_path, mock):
    gw = Gateway(tmp_path / "w", mock.url, providers=providers(mock.url, "anthropic"), workers=2).start()
    try:
        rewrite(gw, providers=providers(mock.url, "anthropic", "openai"))
        before = gw.log().count("configuration reloaded")
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while gw.log().count("configuration reloaded") < before + 2:
            assert gw.proc.poll() is None and time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.1)
    finally:
        assert gw.stop() == 0
