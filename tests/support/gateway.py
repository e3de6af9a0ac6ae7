"""Runs the real gateway (`mitmdump -s addons/aibridge.py`) on an ephemeral loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UPSTREAM_ANTHROPIC_KEY = "sk-ant-upstream-0123456789abcdefSECRET"
UPSTREAM_OPENAI_KEY = "sk-proj-upstream-0123456789abcdefSECRET"
UPSTREAM_GEMINI_KEY = "AIzaSy-upstream-0123456789abcdefSECRET"


def wire_api_providers(upstream_url: str) -> list[dict]:
    """One instance of each wire API's provider (Anthropic, OpenAI, Gemini) on the stand-in."""
    return [
        {"name": "anthropic", "type": "anthropic", "base_url": upstream_url + "/", "key": UPSTREAM_ANTHROPIC_KEY},
        {"name": "openai", "type": "openai", "base_url": upstream_url + "/v1/", "key": UPSTREAM_OPENAI_KEY},
        {"name": "gemini", "type": "gemini", "base_url": upstream_url + "/", "key": UPSTREAM_GEMINI_KEY},
    ]

sys.path.insert(0, str(ROOT / "addons"))
from aibridge_gw.admin.gateway_client import run_op  # noqa: E402

RUNNING: set["Gateway"] = set()  # started and not stopped: the suite stops and reports any left at its end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    def __init__(self, workdir: Path, upstream_url: str, extra: dict | None = None,
                 args: list[str] | None = None, providers: list[dict] | None = None,
                 env: dict[str, str] | None = None, workers: int = 1, flow_detail: int = 0) -> None:
        self.flow_detail = flow_detail  # mitmproxy's own printing of every flow (2: request lines and headers)
        self.env = env or {}
        self.workers = workers  # above 1: `scripts/run --workers N`'s supervisor, as scripts/run starts it
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = workdir / "audit.duckdb"
        self.config_path = workdir / "aibridge.yaml"
        self.args = args or []
        self.postgres = ((extra or {}).get("storage") or {}).get("postgres")  # fleet mode: operations go there
        cfg = {
            "providers": providers or [
                {"name": "anthropic", "type": "anthropic", "base_url": upstream_url + "/",
                 "key": UPSTREAM_ANTHROPIC_KEY},
                {"name": "openai", "type": "openai", "base_url": upstream_url + "/v1/",
                 "key": UPSTREAM_OPENAI_KEY},
            ],
            "storage": {"duckdb": str(self.db)},
        }
        if extra:
            cfg.update(extra)
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "mitmdump.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        """The gateway's CA certificate (its confdir is per test)."""
        return self.workdir / "certs" / "mitmproxy-ca-cert.pem"

    def start(self, port: int | None = None) -> "Gateway":
        """Start on `port` (a restart on the same port), else on a free one."""
        self.port = port or free_port()
        env = {**os.environ, "AIBRIDGE_CONFIG": str(self.config_path), **self.env}
        env.pop("HTTPS_PROXY", None)
        env.pop("HTTP_PROXY", None)
        self._log = open(self.log_path, "ab")
        RUNNING.add(self)
        command = [
            str(BIN / "mitmdump"), "-s", str(ROOT / "addons" / "aibridge.py"),
            "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
            "--set", f"confdir={self.workdir / 'certs'}", "--set", "connection_strategy=lazy",
            "--set", f"flow_detail={self.flow_detail}", "--set", f"aibridge_config={self.config_path}", *self.args,
        ]
        if self.workers > 1:
            command = [sys.executable, "-m", "aibridge_gw.workers", str(self.workers), *command[1:]]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/aibridge/healthz", timeout=1, trust_env=False).status_code == 200 \
                        and (self.postgres or self.db.with_name(self.db.name + ".gateway.json").exists()) \
                        and len(self.workers_answering()) >= self.workers:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def workers_answering(self, connections: int = 12) -> dict[int, int]:
        """Worker number -> pid of the workers that answered health checks on fresh connections (the kernel
        spreads connections over the workers by their addresses)."""
        if self.workers <= 1:
            return {0: self.proc.pid}
        seen = {}
        for _ in range(connections):
            try:
                health = httpx.get(self.url + "/aibridge/healthz", timeout=2, trust_env=False).json()
            except (httpx.HTTPError, ValueError):
                continue
            if health.get("worker"):
                seen[health["worker"]] = health["pid"]
        return seen

    def stop(self, sig: int = signal.SIGTERM) -> int:
        RUNNING.discard(self)
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        self._log.close()
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- admin helpers -----------------------------------------------------------------------------

    def op(self, _op: str, **args):
        return run_op(self.db, _op, args, self.postgres)

    def sql(self, query: str) -> list[dict]:
        r = self.op("sql", query_text=query)
        return [dict(zip(r["columns"], row)) for row in r["rows"]]

    def cli(self, *args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "AIBRIDGE_CONFIG": str(self.config_path), **(env or {})}
        return subprocess.run(
            [str(BIN / "aibridge"), *args], capture_output=True, text=True, env=env, input=input, timeout=60,
            cwd=self.workdir,
        )

    def new_user(self, name: str) -> str:
        """Create a user and a token; returns the token."""
        self.op("users.add", name=name)
        return self.op("tokens.create", user=name, name="test")["token"]

    def wait_for(self, query: str, pred=lambda rows: bool(rows), timeout: float = 10.0) -> list[dict]:
        """Poll a query until pred(rows) holds: records reach DuckDB asynchronously."""
        deadline = time.time() + timeout
        rows: list[dict] = []
        while time.time() < deadline:
            rows = self.sql(query)
            if pred(rows):
                return rows
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {query!r}; last rows: {rows}")

    def interceptions(self, user: str, n: int = 1) -> list[dict]:
        """The user's finished interceptions, oldest first."""
        return self.wait_for(
            "SELECT i.* FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
            f"WHERE u.name = '{user}' AND i.status <> 'in_progress' ORDER BY i.started_at",
            lambda rows: len(rows) >= n,
        )
