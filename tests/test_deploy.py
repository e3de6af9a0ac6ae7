"""deploy/: the documented fleet, for real — Debian's HAProxy with deploy/haproxy.cfg (TCP mode) in front of two
gateway machines (here two gateways) on one PostgreSQL, sharing one CA. Base-URL calls and proxy-mode TLS
interception work through the balancer whichever gateway takes the connection, every call is recorded once, and
killing one gateway leaves the fleet serving."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import anthropic
import psycopg
import pytest

from tests.support.gateway import ROOT, UPSTREAM_ANTHROPIC_KEY, Gateway, free_port
from tests.support.mock_upstream import Reply
from tests.support.postgres import Cluster
from tests.support.tls import client_context, tls_stand_in
from tests.support.wire import anthropic_message

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


def _haproxy() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        pytest.skip("no HAProxy here (apt-get install haproxy)")
    return found


def test_the_shipped_haproxy_config_is_valid():
    r = subprocess.run([_haproxy(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def _balancer(workdir: Path, gateways: list[Gateway]) -> tuple[subprocess.Popen, int]:
    """deploy/haproxy.cfg with loopback addresses: the listener and the gateways' ports, nothing else changed."""
    port = free_port()
    cfg = HAPROXY_CFG.read_text().replace("bind 0.0.0.0:8080", f"bind 127.0.0.1:{port}")
    servers = "".join(f"    server gw{n} 127.0.0.1:{gw.port}\n" for n, gw in enumerate(gateways, 1))
    cfg = re.sub(r"(    server gw\d+ [^\n]*\n)+", servers, cfg)
    (workdir / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen([_haproxy(), "-db", "-f", str(workdir / "haproxy.cfg")],
                            stdout=open(workdir / "haproxy.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return proc, port
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (workdir / "haproxy.log").read_text()
            time.sleep(0.1)


def test_two_gateways_behind_haproxy_share_one_ca_one_audit_and_survive_a_death(tmp_path):
    haproxy_bin = _haproxy()
    assert haproxy_bin
    cluster = Cluster().start()
    upstream = tls_stand_in(tmp_path / "upstream", ["127.0.0.1"])
    gateways: list[Gateway] = []
    balancer = None
    try:
        dsn = cluster.create_database("deployed")
        providers = [{"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/",
                      "key": UPSTREAM_ANTHROPIC_KEY, "hosts": ["api.anthropic.com"]}]
        for name in ("a", "b"):
            extra = {"storage": {"duckdb": str(tmp_path / name / "spool.duckdb"), "postgres": dsn},
                     "proxy": {"allow_addresses": ["localhost"]}}
            gateways.append(Gateway(tmp_path / name, upstream.url, extra=extra, providers=providers,
                                    args=["--set", f"ssl_verify_upstream_trusted_ca={upstream.ca}"]))
        a, b = gateways
        a.start()
        (b.workdir / "certs").mkdir(parents=True)
        for f in (a.workdir / "certs").iterdir():  # the shared CA: the same confdir files on every gateway
            shutil.copy2(f, b.workdir / "certs" / f.name)
        b.start()
        assert b.ca.read_bytes() == a.ca.read_bytes()
        balancer, port = _balancer(tmp_path, gateways)
        lb = f"http://127.0.0.1:{port}"
        token = a.new_user("deployed")
        time.sleep(1.5)  # b reloads users and tokens from PostgreSQL every second
        upstream.default = Reply.json(anthropic_message("through the balancer", (17, 6)))

        def base_url_call(prompt: str) -> str:
            client = anthropic.Anthropic(base_url=lb + "/anthropic", api_key=token, max_retries=0)
            msg = client.messages.create(model="claude-sonnet-4-0", max_tokens=5,
                                         messages=[{"role": "user", "content": prompt}])
            return msg.content[0].text

        def proxied_call(prompt: str) -> str:  # HTTPS_PROXY: CONNECT through HAProxy, TLS by whichever gateway
            client = anthropic.Anthropic(base_url="https://api.anthropic.com", api_key=token, max_retries=0,
                                         http_client=anthropic.DefaultHttpxClient(proxy=lb, verify=client_context(a.ca)))
            msg = client.messages.create(model="claude-sonnet-4-0", max_tokens=5,
                                         messages=[{"role": "user", "content": prompt}])
            return msg.content[0].text

        prompts = [f"base {n}" for n in range(6)] + [f"proxied {n}" for n in range(6)]
        answers = [base_url_call(p) for p in prompts[:6]] + [proxied_call(p) for p in prompts[6:]]
        assert answers == ["through the balancer"] * 12
        served = [len(re.findall(r"interception \S+ user=deployed", gw.log())) for gw in gateways]
        assert all(n > 0 for n in served) and sum(served) == 12, served  # both took connections

        def recorded(n: int) -> list:
            with psycopg.connect(dsn) as conn:
                deadline = time.monotonic() + 10
                while True:
                    rows = conn.execute(
                        "SELECT p.prompt, u.input_tokens, i.status FROM aibridge_user_prompts p JOIN "
                        "aibridge_interceptions i ON i.id = p.interception_id JOIN aibridge_token_usages u "
                        "ON u.interception_id = i.id").fetchall()
                    if len(rows) >= n or time.monotonic() > deadline:
                        return rows
                    time.sleep(0.1)

        assert sorted(r[0] for r in recorded(12)) == sorted(prompts)
        a.stop(signal.SIGKILL)
        after = [f"after {n}" for n in range(4)]
        assert [proxied_call(p) for p in after] == ["through the balancer"] * 4  # redispatched to b
        rows = recorded(16)
        assert sorted(r[0] for r in rows) == sorted(prompts + after)
        assert {(r[1], r[2]) for r in rows} == {(17, "completed")}
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for gw in gateways:
            gw.stop()
        upstream.stop()
        cluster.stop()
