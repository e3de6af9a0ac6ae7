"""Tools for injecting storage faults under traffic and checking what was kept: a tmpfs to fill up, official-SDK
traffic at a steady rate whose every call can be looked up in the audit afterwards, a watcher of /aibridge/healthz
and /aibridge/metrics, and the audit of one run of traffic."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.support.sdk import anthropic_client

USAGE = (11, 5)  # input and output tokens of every mock answer: what each recorded call must show


# --- a small file system to fill -------------------------------------------------------------------------------


class Tmpfs:
    """A tmpfs of `size` mounted on a fresh directory (root only); `fill` leaves a given number of bytes free,
    `grow` remounts it bigger, `unmount` takes it away (lazily if a process still holds a file in it)."""

    def __init__(self, size: str = "5m") -> None:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        self.path = Path(tempfile.mkdtemp(prefix="aibridge-tmpfs-"))
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.path.rmdir()
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        self.mounted = True
        self.filler = self.path / "filler"

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> int:
        """Add to the filler file until only `leave` bytes are free; returns the bytes free then."""
        with open(self.filler, "ab") as f:
            chunk = b"\0" * 65536
            while (room := self.free() - leave) > 0:
                f.write(chunk[:min(room, len(chunk))])
                f.flush()
        return self.free()

    def grow(self, size: str = "50m") -> None:
        r = subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], capture_output=True, text=True)
        assert r.returncode == 0, f"remount failed: {r.stderr}"

    def unmount(self) -> None:
        if not self.mounted:
            return
        deadline = time.monotonic() + 10  # a killed gateway's store process may still be finishing in it
        while subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
                break
            time.sleep(0.2)
        self.mounted = False
        shutil.rmtree(self.path, ignore_errors=True)


# --- traffic ---------------------------------------------------------------------------------------------------


@dataclass
class Call:
    model: str  # unique: `<prefix>-<n>`, the recorded interception's model
    gateway: int  # which of the gateways it went to
    started: float  # time.monotonic()
    ended: float
    status: int | None  # 200 when the whole answer arrived; the HTTP status of an error answer
    error: str | None = None  # what the SDK raised
    body: object = None  # an error answer's parsed body (the SDK's `e.body`)
    server_error: bool = False  # the SDK raised its InternalServerError (or a subclass: ServiceUnavailableError)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Traffic:
    """`threads` threads of Anthropic SDK calls (blocking, or streamed to the end) at about `rate` calls a second in
    all, spread over `gateways`, each with a model name of its own, until `stop()`. `answered` is every call whose
    client got its whole answer (HTTP 200, and the final event of a stream); `calls` is every call and its outcome."""

    def __init__(self, gateways, token: str, prefix: str, threads: int = 4, rate: float = 20.0,
                 stream: bool = False, timeout: float = 10.0) -> None:
        self.gateways = gateways if isinstance(gateways, (list, tuple)) else [gateways]
        self.token, self.prefix, self.stream, self.timeout = token, prefix, stream, timeout
        self.rate = rate
        self.calls: list[Call] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._next = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True, name=f"traffic-{n}")
                         for n in range(threads)]

    def start(self) -> "Traffic":
        self._next = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 60.0) -> "Traffic":
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a traffic thread did not finish its call"
        return self

    def __enter__(self) -> "Traffic":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def answered(self) -> list[str]:
        return [c.model for c in list(self.calls) if c.status == 200]

    def outcomes(self, since: float = 0.0, until: float = float("inf")) -> Counter:
        """How the calls started in a time window ended: 200, another status, or the exception's name."""
        return Counter(c.status if c.status is not None else c.error for c in list(self.calls)
                       if since <= c.started <= until)

    def _slot(self) -> float:
        """The next start time: `rate` a second in all, and no burst to catch up after calls were slow."""
        with self._lock:
            t = max(self._next, time.monotonic())
            self._next = t + 1.0 / self.rate
        return t

    def _run(self, n: int) -> None:
        clients = [anthropic_client(gw, self.token, timeout=self.timeout) for gw in self.gateways]
        while not self._stop.is_set():
            wait = self._slot() - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            number = next(self._numbers)
            model = f"{self.prefix}-{number}"
            which = number % len(self.gateways)
            self.calls.append(self.call(clients[which], model, which))

    def call(self, client: anthropic.Anthropic, model: str, which: int = 0) -> Call:
        started = time.monotonic()
        kw = dict(model=model, max_tokens=16, messages=[{"role": "user", "content": f"prompt of {model}"}])
        try:
            if self.stream:
                events = list(client.messages.create(stream=True, **kw))
                if not events or events[-1].type != "message_stop":
                    return Call(model, which, started, time.monotonic(), None, "stream ended early")
            else:
                client.messages.create(**kw)
            return Call(model, which, started, time.monotonic(), 200)
        except anthropic.APIStatusError as e:
            return Call(model, which, started, time.monotonic(), e.status_code, type(e).__name__, e.body,
                        isinstance(e, anthropic.InternalServerError))
        except Exception as e:  # a reset, a timeout, a stream cut off: the client did not get its answer
            return Call(model, which, started, time.monotonic(), None, type(e).__name__)


# --- what the gateway says about itself ------------------------------------------------------------------------


@dataclass
class Probe:
    t: float  # time.monotonic() when the answer came
    code: int | None  # healthz's HTTP status (None: no answer)
    health: dict | None
    metrics: dict[str, float]  # aibridge_store_up, aibridge_records_backlog, aibridge_records_dead_lettered_total
    error: str | None = None

    @property
    def status(self) -> str | None:
        return (self.health or {}).get("status")

    @property
    def reasons(self) -> list:
        r = (self.health or {}).get("reasons")
        return r if isinstance(r, list) else []

    @property
    def store(self) -> dict:
        s = (self.health or {}).get("store")
        return s if isinstance(s, dict) else {}

    def brief(self) -> str:
        if self.code is None:
            return f"no answer ({self.error})"
        return (f"{self.code} {self.status} reasons={self.health.get('reasons', '<absent>')} "
                f"store={self.health.get('store', '<absent>')}")


METRIC_NAMES = ("aibridge_store_up", "aibridge_records_backlog", "aibridge_records_dead_lettered_total")


def metrics_of(text: str) -> dict[str, float]:
    out = {}
    for name in METRIC_NAMES:
        found = re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([-+\d.eE]+|NaN)$", text, re.M)
        if found:
            out[name] = sum(float(v) for v in found)
    return out


def probe(gw, timeout: float = 2.0) -> Probe:
    """healthz, then the metrics (a metrics request that fails leaves them empty; healthz's answer stands)."""
    try:
        r = httpx.get(gw.url + "/aibridge/healthz", timeout=timeout, trust_env=False)
    except httpx.HTTPError as e:
        return Probe(time.monotonic(), None, None, {}, type(e).__name__)
    t = time.monotonic()
    try:
        health = r.json()
    except ValueError:
        health = {"unparseable": r.text[:200]}
    try:
        metrics = metrics_of(httpx.get(gw.url + "/aibridge/metrics", timeout=timeout, trust_env=False).text)
    except httpx.HTTPError:
        metrics = {}
    return Probe(t, r.status_code, health, metrics)


class Watcher:
    """Polls a gateway's healthz and metrics every `every` seconds from a thread of its own."""

    def __init__(self, gw, every: float = 0.25) -> None:
        self.gw, self.every = gw, every
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="healthz-watcher")

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probes.append(probe(self.gw))
            self._stop.wait(self.every)

    def between(self, t0: float, t1: float) -> list[Probe]:
        return [p for p in list(self.probes) if t0 <= p.t <= t1]


def summary(probes: list[Probe], limit: int = 6) -> str:
    """What a window of probes saw, most frequent first."""
    seen = Counter(p.brief() for p in probes)
    return "; ".join(f"{n}x {what}" for what, n in seen.most_common(limit)) or "no probes"


def wait_health(gw, pred, timeout: float) -> tuple[Probe, float]:
    """Poll healthz until pred(probe) holds; the last probe and the seconds it took (timeout if never)."""
    t0 = time.monotonic()
    while True:
        p = probe(gw)
        if pred(p) or time.monotonic() - t0 > timeout:
            return p, time.monotonic() - t0
        time.sleep(0.2)


def health_shape(p: Probe) -> list[str]:
    """What the issue fixes about healthz's JSON: the old keys kept, `reasons` and `store` added."""
    import datetime as dt

    h, problems = p.health or {}, []
    for key in ("inflight", "pid", "worker"):
        if key not in h:
            problems.append(f"healthz lost {key!r}")
    if not isinstance(h.get("reasons"), list) or not all(isinstance(r, str) for r in h.get("reasons", [])):
        problems.append(f"healthz 'reasons' is not a list of strings: {h.get('reasons', '<absent>')!r}")
    s = h.get("store")
    types = {"up": bool, "reason": (str, type(None)), "since": (str, type(None)), "backlog": int, "refusing": bool}
    if not isinstance(s, dict) or any(not isinstance(s.get(k), t) or (t is int and isinstance(s.get(k), bool))
                                      for k, t in types.items() if k in s) or set(types) - set(s):
        problems.append(f"healthz 'store' is not {{up, reason, since, backlog, refusing}}: {s!r}")
    elif s["since"] is not None:
        try:
            dt.datetime.fromisoformat(s["since"])
        except ValueError:
            problems.append(f"healthz store.since is not ISO-8601: {s['since']!r}")
    return problems


# --- the audit of one run of traffic ---------------------------------------------------------------------------


def recorded(sql, prefix: str) -> dict[str, list[tuple]]:
    """model -> [(status, input_tokens, output_tokens, error)] for every interception of the run, one per row of
    its usage (no usage: None tokens)."""
    rows = sql(
        "SELECT i.model, i.status, i.error, u.input_tokens, u.output_tokens FROM aibridge_interceptions i "
        f"LEFT JOIN aibridge_token_usages u ON u.interception_id = i.id WHERE i.model LIKE '{prefix}-%'")
    out: dict[str, list[tuple]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append((r["status"], r["input_tokens"], r["output_tokens"], r["error"]))
    return out


def not_recorded(answered: list[str], rows: dict[str, list[tuple]]) -> list[str]:
    """The answered calls that are not in the audit exactly once, completed, with the mock's exact usage."""
    return [m for m in answered if [r[:3] for r in rows.get(m, [])] != [("completed", *USAGE)]]


def wait_recorded(sql, prefix: str, answered: list[str], timeout: float = 15.0
                  ) -> tuple[list[str], dict[str, list[tuple]], float]:
    """Poll the audit until every answered call is recorded (or `timeout`): (missing, rows, seconds taken)."""
    t0 = time.monotonic()
    missing, rows, error = list(answered), {}, None
    while True:
        try:
            rows = recorded(sql, prefix)
            missing = not_recorded(answered, rows)
            error = None
        except Exception as e:  # the store still coming back: try again
            error = e
        if not missing and error is None:
            return missing, rows, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            if error is not None and not rows:
                raise AssertionError(f"the audit could not be read within {timeout} s: {error}")
            return missing, rows, time.monotonic() - t0
        time.sleep(0.25)


def describe_missing(missing: list[str], rows: dict[str, list[tuple]], limit: int = 5) -> str:
    return ", ".join(f"{m}: {rows.get(m, 'no row')}" for m in missing[:limit])


def log_lines(gw, start: int, pattern: str) -> list[str]:
    """Log records of the gateway (and of its store process, which shares the log) written after byte offset
    `start` that match `pattern` (case-insensitive); a record's continuation lines are not counted again."""
    data = gw.log_path.read_bytes()[start:].decode(errors="replace")
    rx = re.compile(pattern, re.I)
    return [line for line in data.splitlines() if line[:1] not in ("", " ", "\t") and rx.search(line)]


def commonest(lines: list[str], n: int = 3) -> str:
    """The most repeated shapes among log lines (times, numbers, ids and paths blanked), with their counts."""
    shapes = Counter(re.sub(r"\d+", "N", re.sub(r"^\[[^]]*\]\s*", "", line))[:160] for line in lines)
    return "; ".join(f"{k}x {shape!r}" for shape, k in shapes.most_common(n))


def log_size(gw) -> int:
    return gw.log_path.stat().st_size if gw.log_path.exists() else 0


def dead_letter_entries(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
