"""`scripts/run --workers N`: N gateway processes behind one listening port, so one machine's traffic uses every
core (one mitmdump is one event loop on one core).

The supervisor (`python -m aibridge_gw.workers N MITMDUMP-ARGS…`) starts N mitmdump processes with the aibridge
addon. Each binds the port with SO_REUSEPORT (patches.install_shared_listener, installed before mitmdump starts:
mitmdump may load `-s` scripts only after it listens) and the kernel spreads new connections over them: CONNECT
tunnels and TLS stay inside the worker that accepted them, nothing is proxied twice.

- DuckDB takes one writing process per file, so the supervisor starts one writer (store/server.py --listen) and
  every worker records through it over a Unix socket; the writer also closes rows a previous run left open.
- With `storage.postgres` each worker has its own writer and spool; PostgreSQL takes them all.
- Either way the store is shared, so workers run as a fleet does: requests per minute are counted in the store,
  token and spend totals and the token directory are reloaded every second (runtime.Runtime.shared_store).
- The CLI reaches "the gateway" through the runtime file the supervisor writes; any worker may answer, with the
  one secret every worker was given.
- A worker that dies (a crash, `kill -9`) is started again; the others keep serving meanwhile, and what it had
  sent to the writer is committed. A writer that dies is started again; workers reconnect and resend.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import multiprocess

from .metrics import MULTIPROCESS_ENV

WORKER_ENV = "AIBRIDGE_WORKER"  # this worker's number, 1..N
WORKERS_ENV = "AIBRIDGE_WORKERS"  # how many workers share the port
STORE_SOCKET_ENV = "AIBRIDGE_STORE_SOCKET"  # the shared DuckDB writer's socket
CONTROL_SECRET_ENV = "AIBRIDGE_CONTROL_SECRET"  # the CLI's secret, the same in every worker
WORKERS_DIR_ENV = "AIBRIDGE_WORKERS_DIR"  # the supervisor's private directory (0700), shared by its workers

RESTART_WINDOW = 10.0  # a worker that dies this soon after it started, three times running, stops the supervisor
STOP_MARGIN = 15.0  # workers get timeouts.shutdown_grace_seconds plus this to exit after SIGTERM, then SIGKILL
STOP_TIMEOUT = 30.0  # the writer's time to commit what it holds and exit

log = logging.getLogger("aibridge.workers")


def in_worker() -> bool:
    """True in a worker of `scripts/run --workers N` (the supervisor set its environment)."""
    return int(os.environ.get(WORKERS_ENV) or 0) > 1


def worker_number() -> int | None:
    n = os.environ.get(WORKER_ENV)
    return int(n) if n and in_worker() else None


def store_socket() -> str | None:
    return (os.environ.get(STORE_SOCKET_ENV) or None) if in_worker() else None


def control_secret() -> str | None:
    return (os.environ.get(CONTROL_SECRET_ENV) or None) if in_worker() else None


def workers_dir() -> Path | None:
    d = os.environ.get(WORKERS_DIR_ENV)
    return Path(d) if d and in_worker() else None


class KeyBoard:
    """Upstream key pools live in each worker's memory (its own failovers); `aibridge keys` reaches whichever
    worker answers, and must still see and reset every worker's keys. Each worker publishes its pools' state
    about once a second to the supervisor's private directory, and a reset is appended there for every worker to
    apply within a second."""

    def __init__(self, directory: Path, worker: int) -> None:
        self.dir, self.worker = directory, worker
        self.resets = directory / "keys-resets.jsonl"
        try:
            self._seen = self.resets.stat().st_size  # only resets asked for from now on
        except FileNotFoundError:
            self._seen = 0

    def publish(self, rows: list[dict]) -> None:
        tmp = self.dir / f".keys-w{self.worker}.json"
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, self.dir / f"keys-w{self.worker}.json")

    def everyone(self, own: list[dict]) -> list[dict]:
        """Every worker's rows, this one's live, the others' as last published, each with its worker number."""
        rows = [{"worker": self.worker, **r} for r in own]
        for path in sorted(self.dir.glob("keys-w*.json")):
            n = int(path.stem.removeprefix("keys-w"))
            if n != self.worker:
                try:
                    rows += [{"worker": n, **r} for r in json.loads(path.read_text())]
                except (OSError, ValueError):
                    pass
        return sorted(rows, key=lambda r: (r["provider"], r["key"], r["worker"]))

    def request_reset(self, provider: str | None) -> None:
        with open(self.resets, "a") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps({"provider": provider, "by": self.worker}) + "\n")

    def pending_resets(self) -> list[str | None]:
        """Resets other workers asked for since the last look (the provider, None for every pool)."""
        try:
            with open(self.resets, "rb") as f:
                f.seek(self._seen)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self._seen += len(complete)
        out = []
        for line in complete.splitlines():
            try:
                req = json.loads(line)
            except ValueError:
                continue
            if req.get("by") != self.worker:
                out.append(req.get("provider"))
        return out


def _die_with_supervisor() -> None:
    """In the child before exec (Linux): SIGTERM when the supervisor dies, even by `kill -9`, so no worker is
    left serving without its writer."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Refused(Exception):
    """`--workers` cannot run as asked; the message says why and what to do."""


def _option(args: list[str], names: tuple[str, ...]) -> str | None:
    """The last value given for a mitmdump option (`--name V`, `--name=V`), as mitmdump's parser takes it."""
    value = None
    for n, arg in enumerate(args):
        for name in names:
            if arg == name and n + 1 < len(args):
                value = args[n + 1]
            elif arg.startswith(name + "=") and name.startswith("--"):
                value = arg[len(name) + 1:]
    return value


def _set_option(args: list[str], key: str) -> str | None:
    """The last `--set key=value`."""
    value = None
    for n, arg in enumerate(args):
        if arg == "--set" and n + 1 < len(args) and args[n + 1].startswith(key + "="):
            value = args[n + 1][len(key) + 1:]
    return value


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on the port yet. Workers bind it with SO_REUSEPORT, which would silently share it
    with another gateway's workers started the same way: refuse that instead. SO_REUSEADDR (as every listener
    asyncio makes has) lets the check pass over connections of a stopped gateway lingering in TIME-WAIT, so a
    restart works at once; on Linux a live listener (plain, or a SO_REUSEPORT group) still refuses the bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Supervisor:
    def __init__(self, count: int, command: list[str]) -> None:
        from .config import ConfigError, load_config

        if count < 2:
            raise Refused("--workers needs 2 or more (one worker is plain `scripts/run`)")
        if not hasattr(socket, "SO_REUSEPORT"):
            raise Refused("--workers needs SO_REUSEPORT (Linux, BSD, macOS); run several gateways behind a balancer "
                          "instead (see deploy/)")
        self.count = count
        self.command = list(command)
        self.host = _option(self.command, ("--listen-host",)) or ""
        port = int(_option(self.command, ("--listen-port", "-p")) or 8080)
        if port == 0:  # every worker must bind the same port: choose it here
            with socket.socket() as s:
                s.bind((self.host or "127.0.0.1", 0))
                port = s.getsockname()[1]
            self.command += ["--listen-port", str(port)]
        self.port = port
        if not _port_free(self.host, port):
            raise Refused(f"port {port} is in use; stop what listens there or choose another --listen-port")
        try:
            self.config = load_config(_set_option(self.command, "aibridge_config") or None)
        except ConfigError as e:
            raise Refused(str(e)) from None
        # SIGTERM lets each worker finish its calls in flight for the grace period (drain.py): wait that long.
        self.stop_timeout = self.config.timeouts.shutdown_grace + STOP_MARGIN
        self.workers: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.quick_deaths: dict[int, int] = {}
        self.writer: subprocess.Popen | None = None
        self.socket_dir: str | None = None
        self.metrics_dir: str | None = None
        self.socket: str | None = None
        self.secret: str | None = None
        self.stopping = False

    # --- the shared DuckDB writer -------------------------------------------------------------------

    def start_writer(self, close_stale: bool) -> None:
        from .store.process import start_writer_process

        flags = ["--listen", self.socket] + (["--close-stale"] if close_stale else [])
        proc = start_writer_process(self.config.duckdb_path.resolve(), flags,
                                    backlog_max_mb=self.config.storage.backlog_max_mb)
        line = proc.stdout.readline()
        try:
            hello = json.loads(line)
        except ValueError:
            hello = {"t": "error", "m": f"the store process exited ({proc.wait()})"}
        if hello.get("t") != "ready":
            proc.kill()
            proc.wait()
            raise Refused(hello.get("m", "the store process failed to start"))
        self.writer = proc

    # --- workers --------------------------------------------------------------------------------------

    def start_worker(self, n: int) -> None:
        env = dict(os.environ)
        env.update({WORKER_ENV: str(n), WORKERS_ENV: str(self.count), CONTROL_SECRET_ENV: self.secret,
                    MULTIPROCESS_ENV: self.metrics_dir, WORKERS_DIR_ENV: self.socket_dir})
        if self.socket:
            env[STORE_SOCKET_ENV] = self.socket
        command = [sys.executable, "-m", "aibridge_gw.workers", "--worker", *self.command]
        self.workers[n] = subprocess.Popen(command, env=env, preexec_fn=_die_with_supervisor)
        self.started[n] = time.monotonic()

    def run(self) -> int:
        from .admin.gateway_client import remove_runtime_file, write_runtime_file

        old = os.umask(0o077)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        db = self.config.duckdb_path.resolve()
        try:
            # Every worker must present the same CA: create it once here, not in N workers racing to write it.
            from .certs import ensure_ca

            confdir = _set_option(self.command, "confdir") or "~/.mitmproxy"
            ensure_ca(Path(os.path.expanduser(confdir)))
            self.socket_dir = tempfile.mkdtemp(prefix="aibridge-")  # private (0700): the socket, the metrics
            self.metrics_dir = os.path.join(self.socket_dir, "metrics")
            os.mkdir(self.metrics_dir)
            if not self.config.storage.postgres:
                self.socket = os.path.join(self.socket_dir, "store.sock")
                self.start_writer(close_stale=True)
            host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            self.secret = write_runtime_file(db, f"http://{host}:{self.port}")
            for n in range(1, self.count + 1):
                self.start_worker(n)
            log.info("aibridge: %d workers on port %d (pids %s)%s", self.count, self.port,
                     " ".join(str(p.pid) for p in self.workers.values()),
                     ", one DuckDB writer for all" if self.socket else ", each recording into PostgreSQL")
            return self._watch()
        finally:
            self._shutdown()
            remove_runtime_file(db, self.secret)
            if self.socket_dir:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
            os.umask(old)

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _reload(self, signum, frame) -> None:
        """SIGHUP: every worker reloads the configuration itself (each refuses a bad file and keeps its own)."""
        for proc in self.workers.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGHUP)
                except OSError:
                    pass

    def _watch(self) -> int:
        while not self.stopping:
            time.sleep(0.2)
            if self.writer is not None and self.writer.poll() is not None and not self.stopping:
                log.error("aibridge: the store process exited (%s); starting it again", self.writer.returncode)
                try:
                    self.start_writer(close_stale=False)  # rows in flight in the workers are live
                except Refused as e:
                    log.error("aibridge: the store process could not be started again: %s", e)
                    return 1
            for n, proc in list(self.workers.items()):
                code = proc.poll()
                if code is None or self.stopping:
                    continue
                quick = time.monotonic() - self.started[n] < RESTART_WINDOW
                self.quick_deaths[n] = self.quick_deaths.get(n, 0) + 1 if quick else 0
                if self.quick_deaths[n] >= 3:
                    log.error("aibridge: worker %d keeps exiting (%s); stopping", n, code)
                    return code or 1
                log.error("aibridge: worker %d (pid %d) exited (%s); starting it again", n, proc.pid, code)
                multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # its gauges go; its counts stay
                self.start_worker(n)
        return 0

    def _shutdown(self) -> None:
        """Workers first (each drains: its calls in flight finish within the grace period, what is left is ended and
        recorded), then the writer commits and exits."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in self.workers.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.writer is not None:
            self.writer.stdin.close()
            try:
                self.writer.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.writer.kill()
                self.writer.wait()


def worker(args: list[str]) -> int:
    """One worker: mitmdump itself, its listener patched to share the port."""
    from mitmproxy.tools.main import mitmdump

    from .addons.patches import install_shared_listener

    install_shared_listener()
    return mitmdump(args) or 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if len(argv) < 1:
        print("usage: python -m aibridge_gw.workers N [MITMDUMP-ARGS…]", file=sys.stderr)
        return 2
    try:
        count = int(argv[0])
    except ValueError:
        print(f"aibridge: --workers takes a number, not {argv[0]!r}", file=sys.stderr)
        return 2
    try:
        return Supervisor(count, argv[1:]).run()
    except Refused as e:
        print(f"aibridge: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
