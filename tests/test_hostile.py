"""Hostile requests (#22): no credential reaches a log line, `aibridge sql` cannot write or touch the file system,
and idle or slow connections cannot crowd out a legitimate client."""

from __future__ import annotations

import json
import os

import pytest

from aibridge_gw.store.ops import OpError
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.wire import chat_completion

AUDIT_TABLES = ("aibridge_interceptions", "aibridge_token_usages", "aibridge_user_prompts", "aibridge_tool_usages",
                "aibridge_model_thoughts", "aibridge_users", "aibridge_tokens")


def _sql_attacks(tmp_path):
    copied = tmp_path / "copied.csv"
    return copied, [
        "EXPLAIN ANALYZE DELETE FROM aibridge_token_usages",
        "EXPLAIN ANALYZE UPDATE aibridge_users SET role = 'admin'",
        f"EXPLAIN ANALYZE COPY aibridge_users TO '{copied}'",
        f"COPY aibridge_users TO '{copied}'",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT content FROM read_blob('/etc/hostname')",
        "FROM '/etc/hostname'",
        "SELECT * FROM glob('/etc/*')",
        "WITH gone AS (DELETE FROM aibridge_token_usages RETURNING *) SELECT count(*) FROM gone",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
        "SET enable_external_access = true",
        "SELECT * FROM aibridge_users; SET lock_configuration = false",
    ]


def _check_sql_is_contained(gw: Gateway, tmp_path, via_gateway: bool):
    cli = gw.cli
    before = {t: gw.sql(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in AUDIT_TABLES}
    copied, attacks = _sql_attacks(tmp_path)
    r = cli("sql", attacks[0])  # as the CLI says it: one line, exit 1
    assert r.returncode == 1 and "read-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for attack in attacks:  # the same operation, without a process per query
        with pytest.raises(OpError) as refused:
            gw.op("sql", query_text=attack)
        assert os.uname().nodename not in str(refused.value), attack
    assert not copied.exists() and not (tmp_path / "other.duckdb").exists()
    assert {t: gw.sql(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in AUDIT_TABLES} == before
    users = json.loads(cli("sql", "SELECT name, role FROM aibridge_users", "--json").stdout)
    assert not any(u["role"] == "admin" and u["name"] == "eve" for u in users)
    # Every audit table stays queryable by name, EXPLAIN ANALYZE of a read still works.
    assert gw.sql("SELECT count(*) AS n FROM " + " CROSS JOIN ".join(
        f"(SELECT count(*) AS n{i} FROM {t})" for i, t in enumerate(AUDIT_TABLES)))
    assert gw.op("sql", query_text="EXPLAIN ANALYZE SELECT count(*) FROM aibridge_interceptions")["rows"]
    # export keeps working.
    out = tmp_path / ("export-gw" if via_gateway else "export-file")
    r = cli("export", "--format", "csv", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "aibridge_users.csv").read_text().startswith("id,")
    assert "eve" in (out / "aibridge_users.csv").read_text()
    r = cli("export", "--format", "parquet", "--out", str(out / "pq"))
    assert r.returncode == 0 and (out / "pq" / "aibridge_interceptions.parquet").exists(), r.stderr


def test_sql_cannot_write_or_touch_files_through_a_running_gateway_or_on_the_file(own_gateway, tmp_path, mock):
    import httpx

    gw = own_gateway("sqlguard")
    token = gw.new_user("eve")
    mock.script(Reply.json(chat_completion()))
    r = httpx.post(gw.url + "/openai/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, trust_env=False)
    assert r.status_code == 200
    gw.interceptions("eve")
    _check_sql_is_contained(gw, tmp_path, via_gateway=True)
    gw.stop()
    _check_sql_is_contained(gw, tmp_path, via_gateway=False)


# --- credentials in logs ----------------------------------------------------------------------------------------


def _exchange(gw: Gateway, raw: bytes, close_early: bool = False, timeout: float = 5.0) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as s:
        s.sendall(raw)
        if close_early:
            return b""
        s.shutdown(socket.SHUT_WR) if b"\r\n\r\n" not in raw else None
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and not close_early and b"content-length: 0" in data.lower():
                    break
        except TimeoutError:
            pass
        return data


def _files_text(root) -> dict[str, str]:
    """Every file the gateway wrote under its directory (logs, journal, spool, dead letters, captures), as text;
    not its config (which names the upstream keys) nor its CA."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and path.name != "aibridge.yaml" and "certs" not in path.parts:
            out[str(path)] = path.read_bytes().decode("latin-1")
    return out


def test_no_credential_reaches_the_log_journal_spool_or_audit(own_gateway, mock):
    import base64

    import duckdb

    from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY

    gw = own_gateway("nologs")
    gw.op("users.add", name="root-admin", role="admin")
    admin = gw.op("tokens.create", user="root-admin", name="t")["token"]
    user = gw.new_user("logged")
    unknown = "aib_UnknownTokenZZ9-" + "q" * 24
    byok = "sk-proj-ByokKeyOfTheUser0123456789abcdef"
    basic = base64.b64encode(f"logged:{user}".encode()).decode()
    basic_admin = base64.b64encode(f"root-admin:{admin}".encode()).decode()
    secrets = [admin, user, unknown, byok, basic, basic_admin, UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY]

    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {admin}\r\n"
            f"Proxy-Authorization: Basic {basic_admin}\r\nX-Api-Key: {user}\r\nX-AIBridge-Token: {user}\r\n")
    # A client that hangs up before finishing its headers: mitmproxy logs what it had read.
    _exchange(gw, head.encode(), close_early=True)
    _exchange(gw, head.encode() + b"Content-Type: applic", close_early=True)
    # ... before finishing its body.
    _exchange(gw, head.encode() + f"Content-Length: {len(body) + 50}\r\n\r\n".encode() + body, close_early=True)
    # Refused tokens, through each header and the query string.
    for h in (f"Authorization: Bearer {unknown}", f"X-Api-Key: {unknown}", f"Api-Key: {unknown}"):
        assert b" 401 " in _exchange(gw, f"GET /openai/v1/models HTTP/1.1\r\nHost: gw\r\n{h}\r\n"
                                        "Connection: close\r\n\r\n".encode())
    _exchange(gw, f"GET /openai/v1/models?key={unknown} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
    # Proxy credentials refused, and accepted for a target the egress policy refuses.
    bad = base64.b64encode(f"mallory:{unknown}".encode()).decode()
    _exchange(gw, f"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
                  f"Proxy-Authorization: Basic {bad}\r\n\r\n".encode(), timeout=2)
    _exchange(gw, f"GET http://127.0.0.1:9/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nProxy-Authorization: Basic {basic}\r\n"
                  "Connection: close\r\n\r\n".encode())
    # An upstream error, a BYOK key with a gateway token, and a completed call.
    mock.script(Reply.json({"error": {"message": f"bad key {UPSTREAM_OPENAI_KEY}"}}, status=401),
                Reply.json(chat_completion()), Reply.json(chat_completion()))
    for extra in (f"Authorization: Bearer {user}", f"Authorization: Bearer {byok}\r\nX-AIBridge-Token: {user}",
                  f"Authorization: Bearer {admin}"):
        _exchange(gw, (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n{extra}\r\nContent-Type: "
                       f"application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    gw.interceptions("logged", 2)
    gw.stop()

    log_text = gw.log()
    assert "Client closed connection before completing request headers" in log_text  # the case is exercised
    for secret in secrets:
        assert secret not in log_text, secret
    for path, text in _files_text(gw.workdir).items():
        for secret in secrets:
            assert secret not in text, (path, secret)
    con = duckdb.connect(str(gw.db), read_only=True)
    try:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            dump = repr(con.execute(f'SELECT * FROM "{table}"').fetchall())
            for secret in secrets:
                assert secret not in dump, (table, secret)
    finally:
        con.close()


def test_log_records_are_redacted_whoever_formats_them():
    """The record factory redacts messages, arguments and exception text, for every handler and formatter
    (mitmproxy's own formats `exc_info` itself)."""
    import logging

    from mitmproxy.log import MitmFormatter

    from aibridge_gw.logsafe import install_log_redaction, redact

    before = logging.getLogRecordFactory()
    install_log_redaction(("x-goog-api-key",))
    try:
        _check_redaction(logging.getLogRecordFactory(), MitmFormatter)
    finally:
        logging.setLogRecordFactory(before)
    assert redact("postgresql://aibridge:hunter22@db/x") == "postgresql://aibridge:<redacted>@db/x"
    assert redact("/gemini/v1beta/models/m:generateContent?key=abc&alt=sse").endswith("key=<redacted>&alt=sse")
    assert redact("Authorization: Bearer sk-ant-api03-" + "x" * 40) == "Authorization: Bearer <redacted>"


def _check_redaction(factory, MitmFormatter):
    import logging
    import sys

    token = "aib_" + "T" * 43
    head = b"GET / HTTP/1.1\r\nproxy-authorization: Basic dXNlcjpwYXNz\r\nx-goog-api-key: plainkey\r\n"
    try:
        raise ValueError(f"header {token}")
    except ValueError:
        record = factory("mitmproxy.test", logging.WARNING, __file__, 1, "read %r for %s", (head, token),
                         sys.exc_info())
    for text in (MitmFormatter(False).format(record), logging.Formatter().format(record)):
        assert token not in text and "dXNlcjpwYXNz" not in text and "plainkey" not in text, text
        assert "ValueError" in text and "Basic <redacted>" in text and "aib_…TTTT" in text


# --- slow and idle connections ----------------------------------------------------------------------------------


def _open_from(gw: Gateway, source: str):
    import socket

    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", gw.port))
    return s


def _closed_by_peer(s, wait: float = 0.0) -> bool:
    """The gateway closed this connection (EOF or reset), waiting up to `wait` seconds for it; what it sent before
    is read and dropped."""
    import select
    import time

    deadline = time.monotonic() + wait
    poller = select.poll()  # not select(): descriptors above 1024 here
    poller.register(s, select.POLLIN)
    while True:
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            return False
        try:
            if not s.recv(65536):
                return True
        except ConnectionResetError:
            return True


def test_idle_connections_are_capped_per_address_and_timed_out_without_a_request_head(own_gateway, mock):
    import time

    gw = own_gateway("idle", extra={"timeouts": {"request_head_seconds": 3},
                                    "limits": {"max_idle_connections_per_address": 5}})
    token = gw.new_user("slowpoke")
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    mock.script(Reply(200, {"content-type": "application/json"}, json.dumps(chat_completion()).encode(), hang=4.5),
                Reply.json(chat_completion()))
    # A call in flight longer than the head timeout, from the address that is about to go over its cap.
    busy = _open_from(gw, "127.0.0.3")
    busy.sendall(request)
    time.sleep(0.3)
    idle = []
    for _ in range(8):
        idle.append(_open_from(gw, "127.0.0.3"))
        time.sleep(0.05)
    time.sleep(1.6)
    # Over the cap of 5 idle connections: once idle past the grace (a quarter of the head timeout here), the 3
    # oldest idle ones are closed, not the busy one, not the newest (the head timeout of 3 s leaves the newest 5
    # over a second to be seen open, even on a loaded machine).
    assert [_closed_by_peer(s) for s in idle] == [True] * 3 + [False] * 5
    # Another address has its own cap; a kept-alive connection after a complete exchange; a slowloris.
    other = _open_from(gw, "127.0.0.4")
    kept = _open_from(gw, "127.0.0.5")
    kept.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        head += kept.recv(65536)
    assert head.startswith(b"HTTP/1.1 200")
    drip = _open_from(gw, "127.0.0.6")
    started = time.monotonic()
    for byte in b"GET /aibridge/healthz HTTP/1.1\r\nHost: gw\r\n":
        if _closed_by_peer(drip, 0.2):
            break
        try:
            drip.sendall(bytes([byte]))
        except OSError:
            break
    assert time.monotonic() - started < 4.5  # a head sent a byte at a time is cut off too
    for s in idle[3:] + [other, kept]:
        assert _closed_by_peer(s, 4.0)
    # The call in flight was never cut: its answer arrives whole.
    busy.settimeout(5)
    answer = b""
    while b"Hello there" not in answer:
        chunk = busy.recv(65536)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    import httpx

    assert httpx.get(gw.url + "/aibridge/healthz", trust_env=False).status_code == 200
    for s in [busy, drip, other, kept, *idle]:
        s.close()


@pytest.mark.parametrize("tls", [False, True], ids=["raw-tcp", "tls-passthrough"])
def test_a_quiet_tunnel_is_not_an_idle_connection(own_gateway, tmp_path, tls):
    """A CONNECT relayed without decryption (a non-AI host: TLS passed through, or raw TCP) carries no request the
    gateway could see; silent longer than the request head timeout, it stays open."""
    import base64
    import socket
    import threading
    import time

    from tests.support.tls import client_context, make_server_cert, server_context

    ca, cert, key = make_server_cert(tmp_path / "origin", ["localhost"])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        if tls:
            conn = server_context(cert, key).wrap_socket(conn, server_side=True)
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    gw = own_gateway("tunnel", extra={"timeouts": {"request_head_seconds": 1},
                                      "proxy": {"allow_addresses": ["localhost"]}})
    token = gw.new_user("tunneller")
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    credentials = base64.b64encode(f"tunneller:{token}".encode()).decode()
    s.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n"
              f"Proxy-Authorization: Basic {credentials}\r\n\r\n".encode())
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    if tls:
        s = client_context(ca).wrap_socket(s, server_hostname="localhost")
    try:
        s.sendall(b"first")
        assert s.recv(1024) == b"first"
        time.sleep(2.5)
        s.sendall(b"after a silence")
        assert s.recv(1024) == b"after a silence"
    finally:
        s.close()
        listener.close()


def test_a_burst_of_idle_connections_does_not_keep_a_new_client_waiting(own_gateway):
    """2000 connections opened at once from one address (that send nothing) are queued, not dropped (mitmproxy
    listened with a backlog of 100: the kernel dropped the overflow and a new client waited for its SYN retransmit,
    1 s and more), and wait their turn behind other addresses' connections: a legitimate client is answered within a
    second all along, and the idle connections left are the per-address cap's."""
    import resource
    import socket
    import threading
    import time

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gw = own_gateway("burst", extra={"limits": {"max_idle_connections_per_address": 20}})
    flood: list = []
    lock = threading.Lock()
    waits: dict[float, float] = {}

    def attack(n: int) -> None:
        for _ in range(n):
            s = _open_from(gw, "127.0.0.2")
            with lock:
                flood.append(s)

    def client(at: float, t0: float) -> None:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(b"GET /aibridge/healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 ")
        waits[at] = time.monotonic() - started

    t0 = time.monotonic()
    threads = [threading.Thread(target=attack, args=(500,)) for _ in range(4)]
    threads += [threading.Thread(target=client, args=(at, t0)) for at in (0.02, 0.05, 0.1, 0.2, 0.4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(waits) == 5 and max(waits.values()) < 1.0, waits
        time.sleep(2.5)  # idle past the grace (1 s), then the next sweep trims the address to its cap
        assert sum(not _closed_by_peer(s) for s in flood) == 20
    finally:
        for s in flood:
            s.close()


def test_a_burst_of_busy_clients_from_one_address_is_never_taken_for_idle_connections(own_gateway, mock):
    """Behind a load balancer every client shares one address: many more connections than the idle cap, each
    between two requests for a moment, are served, none closed as idle (the cap counts only connections idle past
    the grace)."""
    import threading

    import httpx

    gw = own_gateway("busy", extra={"limits": {"max_idle_connections_per_address": 4}})
    token = gw.new_user("crowd")
    mock.default = Reply.json(chat_completion())
    failures: list = []
    barrier = threading.Barrier(24)

    def client() -> None:
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as c:
            barrier.wait()
            for _ in range(6):
                try:
                    r = c.post("/openai/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                               json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
                    if r.status_code != 200:
                        failures.append(r.status_code)
                except httpx.HTTPError as e:
                    failures.append(type(e).__name__)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
