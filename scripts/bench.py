"""aibridge benchmark suite: one table of ratios measured in the same run on this machine.

    scripts/bench [--quick] [--out docs/benchmarks.md]

Everything runs on loopback: a fast asyncio mock provider (its own process), bare mitmdump (no addons, regular
mode, used as an HTTP proxy), and the gateway (auth + recording on, base-URL mode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

CHAT = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4.1-2025-04-14",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6,
              "prompt_tokens_details": {"cached_tokens": 0}},
}).encode()


# --- the mock provider ------------------------------------------------------------------------------

def responses_events(deltas: int) -> list[bytes]:
    """A Responses stream's events (JSON), as the SSE `data:` payloads and the WebSocket messages carry them."""
    resp = {"id": "resp_bench", "object": "response", "status": "in_progress", "model": "gpt-5", "output": [],
            "usage": None}
    out = [{"type": "response.created", "sequence_number": 0, "response": resp}]
    out += [{"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "m", "output_index": 0,
             "content_index": 0, "delta": f"t{i} "} for i in range(deltas)]
    out.append({"type": "response.completed", "sequence_number": deltas + 1, "response": {
        **resp, "status": "completed", "usage": {"input_tokens": 5, "output_tokens": deltas, "total_tokens": 5 + deltas,
                                                 "input_tokens_details": {"cached_tokens": 0}}}})
    return [json.dumps(e).encode() for e in out]


async def ws_mock_main(port_file: str, deltas: int, gap: float) -> None:
    """The Responses API over a WebSocket (the provider's, relay mode): one stream of events per response.create."""
    from websockets.asyncio.server import serve

    async def handle(ws) -> None:
        async for _ in ws:
            for ev in responses_events(deltas):
                await ws.send(ev.decode())
                await asyncio.sleep(gap)

    async with serve(handle, "127.0.0.1", 0, compression=None) as server:
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        await server.serve_forever()


async def mock_main(port_file: str, delay: float, chunks: int, gap: float) -> None:
    """HTTP/1.1 keep-alive server: /v1/chat/completions answers JSON, or SSE when "stream": true."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                if delay:
                    await asyncio.sleep(delay)
                if b"/responses" in head.split(b"\r\n", 1)[0]:  # the Responses API, streamed (the WebSocket section)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    for ev in responses_events(chunks):
                        data = b"data: " + ev + b"\n\n"
                        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                        await writer.drain()
                        await asyncio.sleep(gap)
                    writer.write(b"0\r\n\r\n")
                elif b'"stream": true' in body or b'"stream":true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    for i in range(chunks):
                        ev = ('data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4.1","choices":[{"index":0,'
                              f'"delta":{{"content":"t{i} {time.time():.6f}"}},"finish_reason":null}}]}}\n\n').encode()
                        writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                        await writer.drain()
                        await asyncio.sleep(gap)
                    tail = (b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4.1","choices":[],'
                            b'"usage":{"prompt_tokens":5,"completion_tokens":20,"total_tokens":25}}\n\ndata: [DONE]\n\n')
                    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(CHAT), CHAT))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


# --- processes ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def start_mock(work: Path, delay: float = 0.0, chunks: int = 20, gap: float = 0.025) -> tuple[subprocess.Popen, int]:
    port_file = work / f"mock-{delay}.port"
    p = subprocess.Popen([sys.executable, __file__, "mock", str(port_file), str(delay), str(chunks), str(gap)])
    deadline = time.time() + 20
    while not port_file.exists() or not port_file.read_text():
        if time.time() > deadline:
            raise RuntimeError("mock did not start")
        time.sleep(0.05)
    return p, int(port_file.read_text())


def start_mitmdump(work: Path, name: str, extra: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(work / f"{name}.log", "wb")
    p = subprocess.Popen([str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", str(port),
                          "--set", f"confdir={work / 'certs'}", "--set", "flow_detail=0",
                          "--set", "termlog_verbosity=warn", *extra],
                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    wait_port(port)
    return p, port


def start_gateway(work: Path, mock_port: int, name: str = "gateway", workers: int = 1,
                  postgres: str | None = None, extra: dict | None = None) -> tuple[subprocess.Popen, int, str, Path]:
    """The gateway as scripts/run starts it: one mitmdump, or with `workers` the supervisor and N workers."""
    db = work / f"{name}.duckdb"
    cfg = work / f"{name}.yaml"
    storage = {"duckdb": str(db), **({"postgres": postgres} if postgres else {})}
    cfg.write_text(json.dumps({
        "providers": [{"name": "openai", "type": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1/",
                       "key": "sk-bench-upstream"}],
        "storage": storage, "retention_days": 0, **(extra or {}),
    }))
    env = {"AIBRIDGE_CONFIG": str(cfg)}
    run = lambda *a: subprocess.run([str(BIN / "aibridge"), *a], env={**os.environ, **env}, check=True,
                                    capture_output=True, text=True).stdout
    run("users", "add", "bench", "--admin")  # an admin: resetting the health counters needs one
    token = run("tokens", "create", "--user", "bench").strip().splitlines()[-1]
    args = ["-s", str(ROOT / "addons" / "aibridge.py"), "--set", f"aibridge_config={cfg}"]
    if workers > 1:
        port = free_port()
        log = open(work / f"{name}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "aibridge_gw.workers", str(workers), "--listen-host", "127.0.0.1",
                              "--listen-port", str(port), "--set", f"confdir={work / 'certs'}", "--set",
                              "flow_detail=0", "--set", "termlog_verbosity=warn", *args],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        wait_port(port)
    else:
        p, port = start_mitmdump(work, name, args, env)
    import httpx

    seen: set = set()
    for _ in range(300):  # ready when every worker answers its health check
        try:
            h = httpx.get(f"http://127.0.0.1:{port}/aibridge/healthz", trust_env=False).json()
            seen.add(h.get("worker"))
            if len(seen) >= workers:
                break
        except Exception:
            pass
        time.sleep(0.05)
    return p, port, token, cfg


def litellm_executable() -> Path:
    """LiteLLM's proxy in its own venv (.bench/litellm, or $AIBRIDGE_BENCH_LITELLM): installed on first use."""
    given = os.environ.get("AIBRIDGE_BENCH_LITELLM")
    if given:
        return Path(given)
    venv = ROOT / ".bench" / "litellm"
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"  installing litellm[proxy] into {venv} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def start_litellm(work: Path, mock_port: int) -> tuple[subprocess.Popen, int]:
    """LiteLLM's proxy in front of the same mock, one worker, a master key, no database (its lightest setup)."""
    cfg = work / "litellm.yaml"
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": "gpt-4.1", "litellm_params": {
            "model": "openai/gpt-4.1", "api_base": f"http://127.0.0.1:{mock_port}/v1", "api_key": "sk-bench-upstream"}}],
        "general_settings": {"master_key": "sk-bench-litellm"},
    }))
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "NO_PROXY": "*"}
    log = open(work / "litellm.log", "wb")
    p = subprocess.Popen([str(litellm_executable()), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                         stdout=log, stderr=subprocess.STDOUT, env=env)
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"litellm exited; see {work / 'litellm.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", trust_env=False).status_code == 200:
                return p, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("litellm did not become ready")


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (servers that fork workers; the supervisor, its workers and writer)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _tree_sum(pid: int, measure) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            total += measure(p)
        except OSError:
            pass
    return total


def tree_peak_rss_mb(pid: int) -> float:
    return _tree_sum(pid, peak_rss_mb)


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- load ---------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


class Target:
    def __init__(self, name: str, url: str, proxy: str | None = None, token: str | None = None) -> None:
        self.name, self.url, self.proxy, self.token = name, url, proxy, token

    def client(self, conns: int):
        import httpx

        return httpx.AsyncClient(proxy=self.proxy, trust_env=False, timeout=60,
                                 limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
                                 headers={"authorization": f"Bearer {self.token or 'sk-direct'}"})


BODY = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "ping"}]}


async def closed_loop(target: Target, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients each sending small blocking requests back to back."""
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    async with target.client(concurrency) as c:
        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    r = await c.post(target.url, json=BODY)
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t)
                    else:
                        errors += 1
                except Exception:
                    errors += 1
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"rps": len(lat) / elapsed, "p50": pct(lat, .5) * 1000, "p99": pct(lat, .99) * 1000, "errors": errors}


async def streams(target: Target, n: int) -> dict:
    """n concurrent SSE streams: time to first chunk, gaps between chunks (sent 25 ms apart)."""
    ttfb, gaps, errors, coalesced, received = [], [], 0, 0, 0
    async with target.client(n) as c:
        async def one():
            nonlocal errors, coalesced, received
            t0 = time.perf_counter()
            last = None
            try:
                async with c.stream("POST", target.url, json={**BODY, "stream": True}) as r:
                    if r.status_code != 200:
                        errors += 1
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {") or '"content"' not in line:
                            continue
                        now = time.perf_counter()
                        received += 1
                        if last is None:
                            ttfb.append(now - t0)
                        else:
                            gaps.append(now - last)
                            if now - last < 0.005:
                                coalesced += 1
                        last = now
            except Exception:
                errors += 1
        await asyncio.gather(*(one() for _ in range(n)))
    return {"ttfb_p50": pct(ttfb, .5) * 1000, "gap_p50": pct(gaps, .5) * 1000, "gap_p99": pct(gaps, .99) * 1000,
            "coalesced": coalesced, "chunks": received, "errors": errors}


async def burst(target: Target, total: int, concurrency: int) -> dict:
    ok = errors = 0
    sem = asyncio.Semaphore(concurrency)
    async with target.client(concurrency) as c:
        async def one():
            nonlocal ok, errors
            async with sem:
                try:
                    r = await c.post(target.url, json=BODY)
                    ok += r.status_code == 200
                    errors += r.status_code != 200
                except Exception:
                    errors += 1
        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        elapsed = time.perf_counter() - t
    return {"ok": ok, "errors": errors, "seconds": elapsed}


class RawPool:
    """A minimal keep-alive HTTP/1.1 client for the open-loop scenario: at hundreds of requests per second
    with ~750 in flight, a full-featured client costs more CPU than the proxy under test on a 2-core box.
    Plain-HTTP proxies get absolute-form request lines, everything else origin-form."""

    def __init__(self, target: Target) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(target.url)
        hop = urlsplit(target.proxy) if target.proxy else u
        self.addr = (hop.hostname, hop.port)
        path = target.url if target.proxy else u.path
        body = json.dumps(BODY).encode()
        self.request = (f"POST {path} HTTP/1.1\r\nhost: {u.hostname}:{u.port}\r\ncontent-type: application/json\r\n"
                        f"authorization: Bearer {target.token or 'sk-direct'}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self) -> int:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(*self.addr)
        reader, writer = conn
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self.idle.append(conn)
        return status


async def open_loop(target: Target, rate: float, seconds: float, upstream_delay: float) -> dict:
    """Requests offered at a fixed rate regardless of answers (virtual users = rate x upstream delay)."""
    lat: list[float] = []
    errors = 0
    total = int(rate * seconds)
    pool = RawPool(target)

    async def one(at: float):
        nonlocal errors
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        t = time.perf_counter()
        try:
            status = await asyncio.wait_for(pool.post(), 30)
            if status == 200:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1
        except Exception:
            errors += 1

    start = time.perf_counter() + 0.5
    await asyncio.gather(*(one(start + i / rate) for i in range(total)))
    elapsed = time.perf_counter() - start
    over = [x - upstream_delay for x in lat]
    return {"offered": total, "served_rps": len(lat) / elapsed, "success": len(lat) / total * 100,
            "p50_over": pct(over, .5) * 1000, "p99_over": pct(over, .99) * 1000, "errors": errors}


# --- workers (scripts/run --workers N) and PostgreSQL -------------------------------------------------

def tree_cpu_seconds(pid: int) -> float:
    return _tree_sum(pid, cpu_seconds)


def wrk_load(target: Target, conns: int, seconds: float, work: Path) -> dict | None:
    """Closed-loop load from wrk (Debian's `wrk`, C and epoll): a Python client would take more of the 2 cores
    than the gateway workers it is meant to measure. None when wrk is not installed."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return None
    script = work / "post.lua"
    script.write_text(f"wrk.method = \"POST\"\nwrk.body = {json.dumps(json.dumps(BODY))}\n"
                      "wrk.headers[\"Content-Type\"] = \"application/json\"\n"
                      f"wrk.headers[\"Authorization\"] = \"Bearer {target.token or 'sk-direct'}\"\n")
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds:.0f}s", "--latency", "-s", str(script), target.url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": rps, "p50": ms("50%"), "p99": ms("99%"), "errors": errors}


def load_with(target: Target, conns: int, seconds: float, work: Path) -> tuple[str, dict]:
    r = wrk_load(target, conns, seconds, work)
    if r is not None:
        return "wrk", r
    return "httpx", asyncio.run(closed_loop(target, conns, seconds))


def postgres_cluster():
    """A throw-away PostgreSQL (Debian's binaries, fsync on); None where there is none."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests.support.postgres import Cluster

        return Cluster(durable=True).start()
    except BaseException as e:  # the helper skips (a pytest exception) where no server is installed
        print(f"  (no PostgreSQL here: {e})", flush=True)
        return None


def pg_write_capacity(dsn: str, work: Path, interceptions: int) -> dict:
    """What one PostgreSQL here commits, through the gateway's own writer (PgStore: batches of up to 2000 records,
    one unnest statement per table): each interception as the gateway records a call — its start, token usage,
    prompt and end."""
    import datetime as dt
    import uuid

    from aibridge_gw.store.pg import PgStore
    from aibridge_gw.store.rows import INTERCEPTIONS, TOKEN_USAGES, USER_PROMPTS, interception_end

    store = PgStore(dsn, work / "pg-capacity", spool=True)
    store.open()
    now = dt.datetime.now(dt.UTC)
    user = str(uuid.uuid4())
    records = []
    for _ in range(interceptions):
        iid = str(uuid.uuid4())
        records += [
            INTERCEPTIONS.row(id=iid, initiator_id=user, provider="openai", provider_name="openai", model="gpt-4.1",
                              client="Unknown", credential_kind="centralized", credential_hint="sk-b…ench",
                              status="in_progress", started_at=now, metadata="{}", api="openai.chat", stream=False),
            TOKEN_USAGES.row(id=str(uuid.uuid4()), interception_id=iid, provider_response_id="chatcmpl-bench",
                             input_tokens=5, output_tokens=1, cache_read_input_tokens=0, cache_write_input_tokens=0,
                             metadata="{}", created_at=now),
            USER_PROMPTS.row(id=str(uuid.uuid4()), interception_id=iid, provider_response_id="chatcmpl-bench",
                             prompt="ping", created_at=now),
            interception_end(iid, status="completed", ended_at=now, http_status=200, error=None, metadata="{}"),
        ]
    t = time.perf_counter()
    for rec in records:
        store.submit(rec)
    store.flush().result(timeout=600)
    elapsed = time.perf_counter() - t
    store.close()
    return {"interceptions_per_s": interceptions / elapsed, "records_per_s": len(records) / elapsed}


def pg_completed(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM aibridge_interceptions WHERE status = 'completed'").fetchone()[0]


def workers_section(work: Path, quick: bool, rows: list) -> None:
    n = max(2, os.cpu_count() or 2)
    dur = 3.0 if quick else 8.0
    big_seconds = 10.0 if quick else 60.0
    procs: list[subprocess.Popen] = []
    cluster = None
    try:
        mock, mport = start_mock(work)
        procs.append(mock)
        small: dict[int, dict] = {}
        generator = "httpx"
        for count in (1, n):
            proc, port, token, _ = start_gateway(work, mport, f"workers-{count}", workers=count)
            procs.append(proc)
            target = Target(f"{count} worker(s)", f"http://127.0.0.1:{port}/openai/v1/chat/completions", token=token)
            load_with(target, 32, 1.0, work)  # warm-up
            before = tree_cpu_seconds(proc.pid)
            generator, r = load_with(target, 32, dur, work)
            r["cpu_us"] = (tree_cpu_seconds(proc.pid) - before) * 1e6 / max(1.0, r["rps"] * dur)
            small[count] = r
            print(f"  small requests c=32 ({generator}), {count} worker(s): {r}", flush=True)
            stop(proc)
            procs.remove(proc)
        one, many = small[1], small[n]
        rows.append(("workers", f"small requests, c=32 ({generator}): req/s, {n} workers / 1",
                     f"{many['rps'] / one['rps']:.2f}x ({many['rps']:.0f} / {one['rps']:.0f}; errors "
                     f"{many['errors']} / {one['errors']})", ">= 1.5x"))
        rows.append(("workers", f"small requests: gateway CPU per request (every process), {n} workers / 1",
                     f"{many['cpu_us']:.0f} / {one['cpu_us']:.0f} µs", "(cores used = req/s x CPU per request)"))
        rows.append(("workers", f"small requests: latency p50 / p99, {n} workers (1 worker)",
                     f"{many['p50']:.1f} / {many['p99']:.1f} ms ({one['p50']:.1f} / {one['p99']:.1f})", ""))
        stop(mock)
        procs.remove(mock)

        slow, sport = start_mock(work, delay=1.5)
        procs.append(slow)
        d = asyncio.run(open_loop(Target("direct", f"http://127.0.0.1:{sport}/v1/chat/completions"), 500, big_seconds,
                                  1.5))
        print(f"  500 req/s x {big_seconds:.0f} s, upstream 1.5 s, direct: {d}", flush=True)
        stores = [("DuckDB", None)]
        cluster = postgres_cluster()
        if cluster is not None:
            stores.append(("PostgreSQL", cluster.create_database("bench")))
        sec = f"500 req/s, 1.5 s upstream, {n} workers"
        for label, dsn in stores:
            proc, port, token, cfg = start_gateway(work, sport, f"workers-slow-{label.lower()}", workers=n, postgres=dsn)
            procs.append(proc)
            target = Target(label, f"http://127.0.0.1:{port}/openai/v1/chat/completions", token=token)
            before = pg_completed(dsn) if dsn else 0
            r = asyncio.run(open_loop(target, 500, big_seconds, 1.5))
            ended = time.perf_counter()
            r["rss"] = tree_peak_rss_mb(proc.pid)
            print(f"  500 req/s x {big_seconds:.0f} s, upstream 1.5 s, {n} workers on {label}: {r}", flush=True)
            rows.append((sec, f"{label}: served req/s, success ({r['offered']} offered over {big_seconds:.0f} s)",
                         f"{r['served_rps']:.1f} req/s, {r['success']:.1f}% (direct {d['served_rps']:.1f}, "
                         f"{d['success']:.1f}%)", ">= 424 req/s, 100%"))
            rows.append((sec, f"{label}: overhead p50 / p99 over direct",
                         f"{r['p50_over'] - d['p50_over']:.1f} / {r['p99_over'] - d['p99_over']:.1f} ms "
                         f"(peak RSS of every process {r['rss']:.0f} MB)", "p50 <= 3 ms"))
            if dsn:
                served = int(r["success"] * r["offered"] / 100 + 0.5)
                got = pg_completed(dsn) - before
                while got < served and time.perf_counter() - ended < 60:
                    time.sleep(0.05)
                    got = pg_completed(dsn) - before
                lag = time.perf_counter() - ended
                rows.append((sec, "PostgreSQL: calls recorded / answered, time until the last was committed",
                             f"{got} / {served}, {lag * 1000:.0f} ms after the load ended "
                             f"({got / (big_seconds + lag):.0f} interceptions/s written)", "equal"))
            stop(proc)
            procs.remove(proc)
        if cluster is not None:
            cap = pg_write_capacity(cluster.create_database("capacity"), work, 5000 if quick else 40000)
            print(f"  PostgreSQL write capacity: {cap}", flush=True)
            rows.append(("PostgreSQL", "write capacity of one server here (fsync on), the gateway's writer",
                         f"{cap['interceptions_per_s']:.0f} interceptions/s ({cap['records_per_s']:.0f} records/s: "
                         "start, usage, prompt, end)", "(bounds a fleet's calls/s per database)"))
    finally:
        for p in procs:
            stop(p)
        if cluster is not None:
            cluster.stop()


# --- the run ------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short durations (smoke run)")
    ap.add_argument("--out", help="write the results as markdown to this file")
    ap.add_argument("--peer", choices=["litellm"], help="also run the 500 req/s scenario through this peer gateway "
                    "(LiteLLM's proxy, installed into .bench/litellm on first use)")
    ap.add_argument("--section", choices=["all", "single", "workers", "policy", "websocket"], default="all",
                    help="single: one gateway process against bare mitmdump; workers: scripts/run --workers N, "
                         "the 500 req/s scenario on DuckDB and PostgreSQL, PostgreSQL's write rate; policy: the "
                         "cost of ten policy rules per request and of the tool gate; websocket: a Responses turn over "
                         "Codex's WebSocket (relayed, translated) against the same turn over HTTP SSE")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "addons"))
    dur = 2.0 if args.quick else 5.0
    big_seconds = 10.0 if args.quick else 60.0
    burst_n = 2000 if args.quick else 10_000
    work = Path(tempfile.mkdtemp(prefix="aibridge-bench-"))
    parts: dict[str, list[tuple[str, str, str, str]]] = {}  # part -> rows of (section, metric, value, target)
    if args.section in ("all", "single"):
        single_section(work, args, parts.setdefault("single", []), dur, big_seconds, burst_n)
    if args.section in ("all", "workers"):
        workers_section(work, args.quick, parts.setdefault("workers", []))
    if args.section in ("all", "policy"):
        policy_section(work, args.quick, parts.setdefault("policy", []), dur)
    if args.section in ("all", "websocket"):
        websocket_section(work, args.quick, parts.setdefault("websocket", []))
    for part, rows in parts.items():
        report(part, rows, args)


def single_section(work: Path, args, rows: list, dur: float, big_seconds: float, burst_n: int) -> None:
    procs: list[subprocess.Popen] = []
    try:
        import httpx

        mock, mport = start_mock(work)
        procs.append(mock)
        bare, bport = start_mitmdump(work, "bare", [])
        procs.append(bare)
        gw, gport, token, cfg = start_gateway(work, mport)
        procs.append(gw)
        direct = Target("direct", f"http://127.0.0.1:{mport}/v1/chat/completions")
        proxied = Target("bare mitmdump", f"http://127.0.0.1:{mport}/v1/chat/completions", proxy=f"http://127.0.0.1:{bport}")
        gateway = Target("gateway", f"http://127.0.0.1:{gport}/openai/v1/chat/completions", token=token)

        print(f"aibridge bench on {platform.node()} ({os.cpu_count()} cores), work dir {work}", flush=True)
        blocking = {}
        pids = {"bare mitmdump": bare.pid, "gateway": gw.pid}
        for t in (direct, proxied, gateway):  # warm-up, not measured: first connections, lazy imports, caches
            asyncio.run(closed_loop(t, 8, 1.0))
        for c in (1, 8, 32):
            for t in (direct, proxied, gateway):
                before = cpu_seconds(pids[t.name]) if t.name in pids else 0.0
                blocking[(t.name, c)] = r = asyncio.run(closed_loop(t, c, dur))
                if t.name in pids:
                    r["cpu_us"] = (cpu_seconds(pids[t.name]) - before) * 1e6 / max(1, r["rps"] * dur)
                print(f"  blocking c={c:<3} {t.name:<14} {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  "
                      f"p99 {r['p99']:6.2f} ms  errors {r['errors']}", flush=True)
        for c in (1, 8, 32):
            b, g = blocking[("bare mitmdump", c)], blocking[("gateway", c)]
            rows.append(("blocking", f"c={c}: req/s gateway / bare mitmdump", f"{g['rps'] / b['rps']:.2f}x "
                         f"({g['rps']:.0f} / {b['rps']:.0f}; direct {blocking[('direct', c)]['rps']:.0f})", ">= 0.85x"))
            rows.append(("blocking", f"c={c}: added p50 latency vs bare mitmdump",
                         f"{g['p50'] - b['p50']:+.2f} ms (p99 {g['p99'] - b['p99']:+.2f} ms)", "<= 3 ms"))
            rows.append(("blocking", f"c={c}: proxy CPU per request, gateway / bare mitmdump",
                         f"{g['cpu_us']:.0f} / {b['cpu_us']:.0f} µs ({g['cpu_us'] / b['cpu_us']:.2f}x)",
                         "(steadier than req/s on a shared machine)"))

        # Bare mitmdump buffers whole bodies unless told to stream them: the fair streaming baseline streams.
        bare_s, bsport = start_mitmdump(work, "bare-stream", ["--set", "stream_large_bodies=1"])
        procs.append(bare_s)
        proxied_s = Target("bare mitmdump", proxied.url, proxy=f"http://127.0.0.1:{bsport}")
        for n in (1, 200):
            sd, sb, sg = (asyncio.run(streams(t, n)) for t in (direct, proxied_s, gateway))
            print(f"  streams n={n}: direct {sd}\n                 bare   {sb}\n                 gateway {sg}", flush=True)
            rows.append(("streaming", f"{n} stream(s): added TTFB p50 vs direct", f"{sg['ttfb_p50'] - sd['ttfb_p50']:+.2f} ms "
                         f"(bare mitmdump {sb['ttfb_p50'] - sd['ttfb_p50']:+.2f} ms)", "<= 5 ms"))
            rows.append(("streaming", f"{n} stream(s): chunk gap p50 / p99 (sent every 25 ms)",
                         f"{sg['gap_p50']:.1f} / {sg['gap_p99']:.1f} ms (bare {sb['gap_p50']:.1f} / {sb['gap_p99']:.1f})",
                         "no coalescing"))
            rows.append(("streaming", f"{n} stream(s): coalesced chunks, errors",
                         f"{sg['coalesced']} of {sg['chunks']}, {sg['errors']} errors (bare {sb['coalesced']}, "
                         f"direct {sd['coalesced']})", "0, 0"))

        stop(bare_s)
        procs.remove(bare_s)
        base = httpx.get(f"http://127.0.0.1:{gport}/aibridge/healthz?reset_lag=1", trust_env=False,
                         headers={"authorization": f"Bearer {token}"}).json()
        def recorded() -> int:
            out = subprocess.run([str(BIN / "aibridge"), "sql", "SELECT count(*) AS n FROM aibridge_interceptions "
                                  "WHERE status = 'completed'", "--json"], env={**os.environ, "AIBRIDGE_CONFIG": str(cfg)},
                                 capture_output=True, text=True, check=True).stdout
            return json.loads(out)[0]["n"]

        def recorded_since(before: int, expected: int) -> int:
            """Records reach DuckDB asynchronously: wait (up to a minute) until `expected` more have."""
            n = before
            for _ in range(300):
                n = recorded()
                if n - before >= expected:
                    break
                time.sleep(0.2)
            return n - before

        before = recorded()
        b = asyncio.run(burst(gateway, burst_n, 64))
        got = recorded_since(before, b["ok"])
        health = httpx.get(f"http://127.0.0.1:{gport}/aibridge/healthz", trust_env=False).json()
        lag, gc_pause = health["event_loop_lag_max_ms"], health.get("gc_pause_max_ms", float("nan"))
        print(f"  burst: {b}, recorded {got}, loop lag max {lag} ms (before: {base['event_loop_lag_max_ms']})", flush=True)
        rows.append(("recording", f"{burst_n} request burst: recorded in DuckDB / answered 200",
                     f"{got} / {b['ok']} ({b['errors']} errors, {b['ok'] / b['seconds']:.0f} req/s)", "equal, 0 lost"))
        rows.append(("recording", "longest event-loop stall during the burst", f"{lag:.1f} ms (longest GC pause "
                     f"{gc_pause:.1f} ms)", "<= 20 ms"))
        # The burst saturates the loop, so its stalls mix queueing with blocking. Below saturation, a stall can only
        # come from one piece of work holding the loop (or the GIL), which is what "a stall from recording" means.
        steady_rate = 100 if args.quick else 200
        httpx.get(f"http://127.0.0.1:{gport}/aibridge/healthz?reset_lag=1", trust_env=False,
                         headers={"authorization": f"Bearer {token}"})
        before = recorded()
        st = asyncio.run(open_loop(gateway, steady_rate, big_seconds / 2, 0.0))
        got = recorded_since(before, st["offered"] - st["errors"])
        health = httpx.get(f"http://127.0.0.1:{gport}/aibridge/healthz", trust_env=False).json()
        print(f"  steady {steady_rate} req/s: {st}, recorded {got}, loop lag max "
              f"{health['event_loop_lag_max_ms']} ms", flush=True)
        rows.append(("recording", f"longest event-loop stall at a steady {steady_rate} req/s (below saturation)",
                     f"{health['event_loop_lag_max_ms']:.1f} ms (longest GC pause {health.get('gc_pause_max_ms', float('nan')):.1f} ms; "
                     f"{got} / {st['offered']} recorded, p50 {st['p50_over']:.1f} ms)", "<= 20 ms"))
        stop(gw)
        procs.remove(gw)

        stop(bare)
        procs.remove(bare)
        slow, sport = start_mock(work, delay=1.5)
        procs.append(slow)
        results = {}
        for name in ("direct", "bare mitmdump", "gateway") + ((args.peer,) if args.peer else ()):
            proc = None
            if name == "direct":
                target = Target(name, f"http://127.0.0.1:{sport}/v1/chat/completions")
            elif name == "bare mitmdump":
                proc, p2 = start_mitmdump(work, "bare-slow", [])
                target = Target(name, f"http://127.0.0.1:{sport}/v1/chat/completions", proxy=f"http://127.0.0.1:{p2}")
            elif name == "litellm":
                proc, p2 = start_litellm(work, sport)
                target = Target(name, f"http://127.0.0.1:{p2}/v1/chat/completions", token="sk-bench-litellm")
            else:
                proc, p2, token2, _ = start_gateway(work, sport, "gateway-slow")
                target = Target(name, f"http://127.0.0.1:{p2}/openai/v1/chat/completions", token=token2)
            r = asyncio.run(open_loop(target, 500, big_seconds, 1.5))
            r["rss"] = tree_peak_rss_mb(proc.pid) if proc else 0.0
            if proc:
                stop(proc)
            results[name] = r
            print(f"  500 req/s x {big_seconds:.0f} s, upstream 1.5 s, {name}: {r}", flush=True)
        d, b, g = results["direct"], results["bare mitmdump"], results["gateway"]
        sec = "500 req/s, 1.5 s upstream"
        rows.append((sec, f"served req/s, gateway ({g['offered']} offered over {big_seconds:.0f} s)",
                     f"{g['served_rps']:.1f} (bare mitmdump {b['served_rps']:.1f}, direct {d['served_rps']:.1f})",
                     ">= 424 (Bifrost 424, LiteLLM 44.8)"))
        rows.append((sec, "success rate, gateway", f"{g['success']:.1f}% (bare {b['success']:.1f}%, direct {d['success']:.1f}%)",
                     "100% (LiteLLM 88.8%)"))
        rows.append((sec, "overhead p50 / p99, gateway", f"{g['p50_over']:.1f} / {g['p99_over']:.1f} ms "
                     f"(bare {b['p50_over']:.1f} / {b['p99_over']:.1f}, direct {d['p50_over']:.1f} / {d['p99_over']:.1f})",
                     "p50 <= 3 ms (Bifrost ~1 ms, LiteLLM 40 ms)"))
        rows.append((sec, "peak RSS, gateway", f"{g['rss']:.0f} MB (bare mitmdump {b['rss']:.0f} MB)",
                     "(Bifrost 120 MB, LiteLLM 372 MB)"))
        if args.peer:
            q = results[args.peer]
            rows.append((sec, f"{args.peer} (same machine, same run): served req/s, success, overhead p50 / p99, "
                         "peak RSS", f"{q['served_rps']:.1f} req/s, {q['success']:.1f}%, {q['p50_over']:.1f} / "
                         f"{q['p99_over']:.1f} ms, {q['rss']:.0f} MB", "(for comparison)"))
    finally:
        for p in procs:
            stop(p)


TEN_RULES = [  # what an admin writes: model and group checks, a header, a prompt test, tool rules
    {"name": "no-forbidden", "hook": "request", "when": 'model == "forbidden"', "action": "deny"},
    {"name": "opus-for-staff", "hook": "request", "when": 'model.startsWith("claude-opus") && !("staff" in user.groups)',
     "action": "route", "model": "claude-sonnet-4-5"},
    {"name": "admins-only-o3", "hook": "request", "when": 'model == "o3" && user.role != "admin"', "action": "deny"},
    {"name": "ci-tag", "hook": "request", "when": '"x-ci" in headers', "action": "tag", "tags": {"origin": "ci"},
     "fail": "open"},
    {"name": "no-big-prompts", "hook": "request", "when": "size(prompt) > 200000", "action": "deny"},
    {"name": "client-allowlist", "hook": "request", "when": 'client == "curl"', "action": "deny"},
    {"name": "interns-mini", "hook": "request", "when": '"interns" in user.groups && model != "gpt-4.1-mini"',
     "action": "route", "model": "gpt-4.1-mini"},
    {"name": "provider-check", "hook": "request", "when": 'provider == "nowhere"', "action": "deny"},
    {"name": "session-tag", "hook": "request", "when": 'session.startsWith("ci-")', "action": "tag",
     "tags": {"ci": "yes"}, "fail": "open"},
    {"name": "no-destructive-shell", "hook": "tool",
     "when": 'tool.name == "Bash" && has(tool.input.command) && tool.input.command.contains("rm -rf")',
     "action": "deny"},
]


def policy_section(work: Path, quick: bool, rows: list, dur: float) -> None:
    """Ten rules: their cost per request in-process (CEL) and end to end (the gateway with and without them); the
    tool gate: how soon a held call is released after its last argument chunk, and what it adds per text chunk."""
    from aibridge_gw.config_model import validate_policies
    from aibridge_gw.policy.rules import Policy

    policy = Policy(validate_policies({"rules": TEN_RULES}))
    users = [{"name": f"u{i}", "id": f"id{i}", "role": "member", "groups": ["ml"] if i % 2 else []} for i in range(8)]
    models = ["gpt-4.1", "claude-sonnet-4-5", "gpt-4.1-mini", "claude-opus-4-1"]
    samples = []
    n = 5_000 if quick else 50_000
    for i in range(n):
        variables = {"user": users[i % 8], "client": "Claude Code", "session": f"s{i % 16}", "provider": "openai",
                     "api": "openai.chat", "model": models[i % 4], "prompt": f"write a test for case {i}",
                     "headers": {"user-agent": "claude-cli/2.0", "content-type": "application/json"}}
        t0 = time.perf_counter_ns()
        policy.evaluate("request", variables)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    rows.append(("policy", "10 rules (9 request, 1 tool): CEL evaluation per request, facts changing each call",
                 f"p50 {pct(samples, 0.5):.1f} µs, p99 {pct(samples, 0.99):.1f} µs", "<= 50 µs p50"))

    release, per_event = tool_gate_timings(2_000 if quick else 20_000)
    rows.append(("policy", "tool gate: a held call released after the event that completes its arguments",
                 f"p50 {pct(release, 0.5):.0f} µs, p99 {pct(release, 0.99):.0f} µs", "<= 1 ms"))
    rows.append(("policy", "tool gate: text event through the tap, gated / ungated",
                 f"{per_event[0]:.1f} / {per_event[1]:.1f} µs (relayed in the read that brought it)", "not delayed"))

    per_call = policing_per_call(2_000 if quick else 20_000)
    rows.append(("policy", "what the 10 rules add to a call in the gateway (facts, request hook, gate on the answer)",
                 f"p50 {pct(per_call, 0.5):.1f} µs, p99 {pct(per_call, 0.99):.1f} µs", "<= 50 µs p50"))

    procs: list[subprocess.Popen] = []
    try:
        mock, mport = start_mock(work)
        procs.append(mock)
        names = ("no rules", "no rules (twin)", "10 rules")
        targets, pids = [], {}
        for i, name in enumerate(names):
            extra = {"policies": {"rules": TEN_RULES}} if name == "10 rules" else None
            p, port, token, _ = start_gateway(work, mport, f"policy{i}", extra=extra)
            procs.append(p)
            pids[name] = p.pid
            targets.append(Target(name, f"http://127.0.0.1:{port}/openai/v1/chat/completions", token=token))
        for t in targets:
            asyncio.run(closed_loop(t, 4, 1.0))
        got: dict[str, dict] = {}
        for _ in range(3):  # alternate, so a noisy moment does not land on one side only; keep each one's best
            for t in targets:
                before = cpu_seconds(pids[t.name])
                r = asyncio.run(closed_loop(t, 1, dur))
                r["cpu_us"] = (cpu_seconds(pids[t.name]) - before) * 1e6 / max(1, r["rps"] * dur)
                prev = got.get(t.name)
                got[t.name] = r if prev is None or r["cpu_us"] < prev["cpu_us"] else prev
                print(f"  policy c=1 {t.name:<16} p50 {r['p50']:.3f} ms  cpu/request {r['cpu_us']:.0f} µs", flush=True)
        a, twin, b = (got[n] for n in names)
        rows.append(("policy", "c=1 end to end: gateway CPU per request, 10 rules / none (twin: a second gateway "
                     "without rules, the noise floor)",
                     f"{b['cpu_us']:.0f} / {a['cpu_us']:.0f} µs ({b['cpu_us'] - a['cpu_us']:+.0f} µs; twin "
                     f"{twin['cpu_us'] - a['cpu_us']:+.0f} µs)", "within the noise floor"))
        rows.append(("policy", "c=1 end to end: p50 latency, 10 rules / none",
                     f"{b['p50']:.3f} / {a['p50']:.3f} ms (twin {twin['p50']:.3f})", "within the noise floor"))
    finally:
        for p in procs:
            stop(p)


def policing_per_call(n: int) -> list[float]:
    """The pipeline's policy work for one blocking call, in-process: the call's facts, the request hook (rules,
    no guardrails) and the tool gate over the answer."""
    import httpx

    from aibridge_gw.apis import WIRE_APIS
    from aibridge_gw.config_model import validate_policies
    from aibridge_gw.flow.toolgate import gate_body
    from aibridge_gw.policy.policing import CallFacts, Policing, conversation, offered_tools, variable_headers

    policing = Policing(validate_policies({"rules": TEN_RULES}), lambda *a: None, httpx.AsyncClient())
    codec = WIRE_APIS["openai.chat"]
    headers = {"host": "127.0.0.1", "user-agent": "claude-cli/2.0.1", "accept": "application/json",
               "content-type": "application/json", "authorization": "Bearer aib_x", "content-length": "120"}

    async def run() -> list[float]:
        out = []
        for i in range(n):
            body = {"model": ("gpt-4.1", "claude-opus-4-1")[i % 2], "messages": [{"role": "user", "content": f"q{i}"}]}
            t0 = time.perf_counter_ns()
            facts = CallFacts(f"id{i}", {"name": f"u{i % 8}", "id": f"uid{i % 8}", "role": "member", "groups": []},
                              "Claude Code", f"s{i % 16}", "openai", "openai.chat", body["model"], f"q{i}",
                              conversation(body), offered_tools(body), variable_headers(headers))
            await policing.request(facts, body, 120)
            gate_body(codec, json.loads(CHAT), lambda c: None)
            out.append((time.perf_counter_ns() - t0) / 1000)
        return sorted(out)

    return asyncio.run(run())


def tool_gate_timings(n: int) -> tuple[list[float], tuple[float, float]]:
    """An Anthropic stream through the stream tap: a text block, then a Bash call in two argument chunks."""
    from aibridge_gw.apis import WIRE_APIS
    from aibridge_gw.flow.tap import StreamTap
    from aibridge_gw.flow.toolgate import Refusal, stream_gate

    codec = WIRE_APIS["anthropic.messages"]

    def ev(kind: str, body: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    head = [ev("message_start", {"message": {"id": "m", "type": "message", "role": "assistant", "model": "c",
                                             "content": [], "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
    text = ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "some words "}})
    call = [ev("content_block_stop", {"index": 0}),
            ev("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "Bash",
                                                                     "input": {}}}),
            ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                             "partial_json": '{"command": "ls'}})]
    last = ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": ' -la"}'}})
    stop_ev = ev("content_block_stop", {"index": 1})
    decide = lambda c: Refusal("r", "no") if "rm -rf" in c.input else None  # noqa: E731
    release, gated_text, plain_text = [], [], []
    for _ in range(n):
        for gated, sink in ((True, gated_text), (False, plain_text)):
            tap = StreamTap(codec, None, gate=stream_gate(codec, decide) if gated else None)
            for chunk in head:
                tap(chunk)
            t0 = time.perf_counter_ns()
            tap(text)
            sink.append((time.perf_counter_ns() - t0) / 1000)
            if gated:
                for chunk in call:
                    tap(chunk)
                tap(last)
                t0 = time.perf_counter_ns()
                out = tap(stop_ev)
                release.append((time.perf_counter_ns() - t0) / 1000)
                assert b"tool_use" in (out if isinstance(out, bytes) else b"".join(out))
    release.sort()
    gated_text.sort()
    plain_text.sort()
    return release, (pct(gated_text, 0.5), pct(plain_text, 0.5))


WS_DELTAS, WS_GAP = 20, 0.01  # the provider's stream: 20 text deltas 10 ms apart (plus created and completed)


def websocket_section(work: Path, quick: bool, rows: list) -> None:
    """A Responses turn (22 events, 10 ms apart at the provider) through the gateway: over HTTP SSE, over the
    WebSocket translated to HTTP (`websocket: false`) and relayed to a provider WebSocket (`websocket: true`). Turn
    latency is from sending the request to the final event; frame gaps are the client's gaps between successive
    events minus the provider's 10 ms (no coalescing: each event arrives on its own, on time)."""
    import httpx
    from websockets.asyncio.client import connect

    procs: list[subprocess.Popen] = []
    turns = 30 if quick else 200
    try:
        mock, mport = start_mock(work, chunks=WS_DELTAS, gap=WS_GAP)
        procs.append(mock)
        port_file = work / "wsmock.port"
        wsmock = subprocess.Popen([sys.executable, __file__, "wsmock", str(port_file), str(WS_DELTAS), str(WS_GAP)])
        procs.append(wsmock)
        deadline = time.time() + 20
        while not port_file.exists() or not port_file.read_text():
            if time.time() > deadline:
                raise RuntimeError("the WebSocket mock did not start")
            time.sleep(0.05)
        wsport = int(port_file.read_text())
        gw, gport, token, _ = start_gateway(work, mport, name="ws-gateway", extra={"providers": [
            {"name": "openai", "type": "openai", "base_url": f"http://127.0.0.1:{mport}/v1/", "key": "sk-bench"},
            {"name": "relay", "type": "openai", "base_url": f"http://127.0.0.1:{wsport}/v1/", "key": "sk-bench",
             "websocket": True}]})
        procs.append(gw)
        body = {"model": "gpt-5", "input": "ping", "stream": True}
        create = json.dumps({"type": "response.create", **{k: v for k, v in body.items() if k != "stream"}})

        async def http_turns() -> tuple[list[float], list[float]]:
            lat, gaps = [], []
            async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
                for _ in range(turns):
                    t0 = time.perf_counter()
                    last = None
                    async with c.stream("POST", f"http://127.0.0.1:{gport}/openai/v1/responses", json=body,
                                        headers={"authorization": f"Bearer {token}"}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                now = time.perf_counter()
                                if last is not None:
                                    gaps.append((now - last - WS_GAP) * 1000)
                                last = now
                    lat.append((time.perf_counter() - t0) * 1000)
            return lat, gaps

        async def ws_turns(instance: str) -> tuple[list[float], list[float]]:
            lat, gaps = [], []
            async with connect(f"ws://127.0.0.1:{gport}/{instance}/v1/responses", compression=None,
                               additional_headers={"authorization": f"Bearer {token}"}) as ws:
                for _ in range(turns):
                    t0 = time.perf_counter()
                    await ws.send(create)
                    last = None
                    while True:
                        ev = json.loads(await ws.recv())
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append((now - last - WS_GAP) * 1000)
                        last = now
                        if ev["type"] in ("response.completed", "error"):
                            break
                    lat.append((time.perf_counter() - t0) * 1000)
            return lat, gaps

        provider_ms = (WS_DELTAS + 2) * WS_GAP * 1000
        for name, run in (("HTTP SSE", http_turns), ("WebSocket, translated", lambda: ws_turns("openai")),
                          ("WebSocket, relayed", lambda: ws_turns("relay"))):
            lat, gaps = asyncio.run(run())
            lat.sort()
            gaps.sort()
            print(f"websocket: {name}: turn p50 {pct(lat, .5):.1f} ms p95 {pct(lat, .95):.1f} ms", flush=True)
            rows.append(("websocket", f"turn latency, {name} (p50 / p95; provider streams {provider_ms:.0f} ms)",
                         f"{pct(lat, .5):.1f} / {pct(lat, .95):.1f} ms", "within a few ms of HTTP SSE"))
            rows.append(("websocket", f"frame gap beyond the provider's 10 ms, {name} (p50 / p99 / max)",
                         f"{pct(gaps, .5):+.2f} / {pct(gaps, .99):+.2f} / {gaps[-1]:+.2f} ms",
                         "each event as it arrives (no coalescing)"))
    finally:
        for p in procs:
            stop(p)


def report(part: str, rows: list, args) -> None:
    """Print the part's table; with --out, replace that part's table in the file (between its markers), keeping
    the hand-written analysis around it."""
    width = max(len(r[1]) for r in rows)
    print("\n| section | measure | result | target |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:<{width}} | {r[2]} | {r[3]} |")
    if not args.out:
        return
    cmd = "scripts/bench" + (" --quick" if args.quick else "") + (f" --peer {args.peer}" if args.peer else "") \
        + (f" --section {args.section}" if args.section != "all" else "")
    who = ("the load generator, the mock provider, bare mitmdump and the gateway share the machine" if part == "single"
           else "the load generator, the mock providers (HTTP and WebSocket) and the gateway share the machine"
           if part == "websocket"
           else "the load generator, the mock provider, the gateway's workers, its writer and PostgreSQL share the "
                "machine")
    table = (f"Measured with `{cmd}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores "
             f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, everything on "
             f"loopback: {who}.\n\n| section | measure | result | target |\n|---|---|---|---|\n"
             + "".join(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |\n" for r in rows))
    out = Path(args.out)
    old = out.read_text() if out.exists() else "# Benchmarks\n"
    begin, end = f"<!-- bench:{part}:begin -->\n", f"<!-- bench:{part}:end -->"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        out.write_text(head + begin + table + rest[rest.index(end):])
    else:
        out.write_text(old.rstrip("\n") + f"\n\n{begin}{table}{end}\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "wsmock":
        try:
            asyncio.run(ws_mock_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        except KeyboardInterrupt:
            pass
    elif len(sys.argv) > 1 and sys.argv[1] == "mock":
        try:
            asyncio.run(mock_main(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
        except KeyboardInterrupt:
            pass
    else:
        main()
