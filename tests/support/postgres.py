"""A throw-away PostgreSQL cluster for the tests: Debian's server binaries (`initdb`, `pg_ctl`), a temp directory,
a loopback port; run as the `postgres` user when the tests run as root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Cluster:
    def __init__(self, durable: bool = False) -> None:
        self.durable = durable  # fsync on (benchmarks of the write rate); tests run without it
        self.bin = _bin_dir()
        if self.bin is None:
            pytest.skip("no PostgreSQL server binaries here (apt-get install postgresql)")
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="aibridge-pg-"))  # not under pytest's root-only temp dirs
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> "Cluster":
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.dir.chmod(0o700)
        r = self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--no-sync")
        if r.returncode != 0:
            self.remove()
            pytest.skip(f"initdb failed here: {r.stderr.strip()[-300:]}")
        try:
            self.start_server()
        except RuntimeError:
            self.remove()
            raise
        return self

    @property
    def _options(self) -> str:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        return options + ("" if self.durable else " -c fsync=off")

    def _log_tail(self, fallback: str) -> str:
        log = self.dir / "log"
        return (log.read_text(errors="replace") if log.exists() else fallback)[-1000:]

    # The server alone, its data directory kept: an outage of the database the gateways record into.

    def start_server(self) -> None:
        """Start the server on the same port and data directory; returns once it accepts connections."""
        r = self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", self._options, "-l", str(self.dir / "log"),
                      "-w", "start")
        if r.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {self._log_tail(r.stderr)}")

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnect every client and shut down cleanly, as an operator's restart does;
        `immediate`: as a crash), keeping the data; returns once it is down (connections are refused)."""
        r = self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")
        if r.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not stop: {r.stderr.strip()[-500:]}")

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m MODE`: every connection is cut, the data stays, the server is back on return."""
        r = self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", self._options, "-l", str(self.dir / "log"),
                      "-m", mode, "-w", "restart")
        if r.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not restart: {self._log_tail(r.stderr)}")

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.dir / "data"), "status").returncode == 0

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
