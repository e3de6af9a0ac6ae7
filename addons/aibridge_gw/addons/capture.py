"""The `Capture` addon — forensic capture: intercepted AI flows written to rotating mitmproxy flow files, secrets redacted first.

The copy is redacted on the event loop (cheap header edits) and serialized by a background thread, so disk
I/O never stalls other flows. Files open in mitmproxy/mitmweb and feed `aibridge replay`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import queue
import threading
import time
from pathlib import Path

from mitmproxy import ctx, http, io

from ..files import private_file
from ..flow.state import LIVE_KEYS, state_of
from ..policy.auth import SECRET_HEADERS, mask
from ..policy.redact import Redactor
from .runtime import Runtime

log = logging.getLogger(__name__)

REDACTED_HEADERS = frozenset(h.encode() for h in SECRET_HEADERS)
_STOP = object()


def _redact(value: bytes) -> bytes:
    text = value.decode("utf-8", "surrogateescape")
    scheme, sep, secret = text.partition(" ")
    if sep and scheme.lower() in ("bearer", "basic"):
        out = f"{scheme} [redacted {mask(secret)}]"
    else:
        out = f"[redacted {mask(text)}]"
    return out.encode("utf-8", "surrogateescape")


def redacted_copy(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of the flow whose credential headers are replaced by masked hints (one pass over the headers)."""
    copy = flow.copy()
    for key in LIVE_KEYS:  # live handles, never saved
        copy.metadata.pop(key, None)
    fields = copy.request.headers.fields
    if any(name.lower() in REDACTED_HEADERS for name, _ in fields):
        copy.request.headers.fields = tuple(
            (name, _redact(value)) if name.lower() in REDACTED_HEADERS else (name, value) for name, value in fields)
    if copy.response is not None:
        rf = copy.response.headers.fields
        if any(name.lower() == b"set-cookie" for name, _ in rf):
            copy.response.headers.fields = tuple((n, v) for n, v in rf if n.lower() != b"set-cookie")
    return copy


class FlowArchive:
    def __init__(self, directory: Path, max_bytes: int, max_age_seconds: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_age = max_age_seconds
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="aibridge-capture", daemon=True)
        self._file = None
        self._opened_at = 0.0
        self.written = 0

    def start(self) -> "FlowArchive":
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._thread.start()
        return self

    def add(self, flow: http.HTTPFlow, masking: Redactor | None = None) -> None:
        """Queue a redacted copy; `masking` (a call whose policies mask what is stored) also masks its bodies'
        findings, on the writer thread (scanning a body may take milliseconds)."""
        self._q.put((redacted_copy(flow), masking))

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(30)
        self._close_file()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            try:
                flow, masking = item
                if masking is not None:
                    _mask_bodies(flow, masking)
                f = self._current()
                io.FlowWriter(f).add(flow)
                f.flush()
                self.written += 1
            except Exception:
                log.exception("flow capture failed")

    def _current(self):
        now = time.time()
        if self._file is not None and (
            self._file.tell() >= self.max_bytes or now - self._opened_at >= self.max_age
        ):
            self._close_file()
        if self._file is None:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            self._file = private_file(self.directory / f"aibridge-{stamp}.flows", "ab")
            self._opened_at = now
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _mask_bodies(flow: http.HTTPFlow, masking: Redactor) -> None:
    """Mask what the detectors find in the request and response bodies (as text: JSON and SSE alike)."""
    for message in (flow.request, flow.response):
        if message is None or not message.raw_content:
            continue
        try:
            text = message.get_text(strict=True)
        except ValueError:  # not text (audio, images): nothing a detector reads
            continue
        if text:
            masked = masking.text(text)
            if masked != text:
                message.text = masked


def _close_off_loop(archive: FlowArchive) -> None:
    """Close an archive replaced while the gateway runs (a reload): its writer may still have flows queued to
    serialize, so it is waited for in a thread of its own, never on the event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # start-up or an option set outside the loop: nothing to keep responsive
        archive.close()
        return
    threading.Thread(target=archive.close, name="aibridge-capture-close", daemon=True).start()


class Capture:
    """Writes every recorded exchange (not passthrough, not the gateway's own endpoints) to the archive."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.archive: FlowArchive | None = None
        runtime.on_reload.append(lambda: self.configure(set()))

    def load(self, loader) -> None:
        loader.add_option(
            "aibridge_flows", str, "",
            "Directory for forensic flow capture of intercepted AI flows (credentials redacted); "
            "overrides capture.directory in the config.",
        )

    def configure(self, updated: set[str]) -> None:
        if self.rt.config is None or self.rt.store is None:
            return
        option = ctx.options.aibridge_flows
        directory = Path(option).expanduser() if option else self.rt.config.capture.directory
        cap = self.rt.config.capture
        if self.archive is not None:
            if (directory and self.archive.directory.resolve() == directory.resolve()
                    and (self.archive.max_bytes, self.archive.max_age) == (cap.max_bytes, cap.max_age_seconds)):
                return
            _close_off_loop(self.archive)
            self.archive = None
        if directory:
            self.archive = FlowArchive(directory, cap.max_bytes, cap.max_age_seconds).start()
            # Keep streamed bodies on the flow so captured SSE responses can be analysed later.
            ctx.options.update(store_streamed_bodies=True)
            log.info("aibridge: capturing intercepted flows to %s", directory)

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if self.archive is None or state is None or state.interception is None or state.outcome is None:
            return
        if not state.captured:
            state.captured = True
            call = state.police
            masking = None
            if call is not None:  # a fresh scan: the call's own belongs to the event loop
                found = call.policing.stored_redactor(call.facts, call.stored)
                masking = Redactor(found.detectors) if found is not None else None
            self.archive.add(flow, masking)

    def done(self) -> None:
        if self.archive is not None:
            self.archive.close()
            self.archive = None
