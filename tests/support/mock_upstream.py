"""A loopback stand-in for the providers, speaking their real wire formats (replayed from captures).

Each request takes the next scripted reply; streamed replies are sent event by event with a delay, as
chunked HTTP/1.1, so tests can see whether the gateway relays chunks as they arrive.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .fixtures import Capture, http_section, sse_events


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    events: list[bytes] | None = None  # SSE events, sent one chunk each
    delay: float = 0.0  # seconds between events
    cut_after: int | None = None  # die (close the connection mid-stream) after this many events
    stall_after: int | None = None  # go silent after this many events, holding the connection until it is closed
    hang: float = 0.0  # seconds to wait before answering at all
    reset: bool = False  # read the request, then drop the connection without a byte of response
    tail_delay: float = 0.0  # seconds between the last event and the chunk terminator (the end of the body)

    @classmethod
    def json(cls, obj, status: int = 200) -> "Reply":
        return cls(status, {"content-type": "application/json"}, json.dumps(obj).encode())

    @classmethod
    def sse(cls, events: list[bytes], delay: float = 0.0) -> "Reply":
        return cls(200, {"content-type": "text/event-stream"}, events=events, delay=delay)

    @classmethod
    def from_capture(cls, cap: Capture, streaming: bool, suffix: str = "", delay: float = 0.0) -> "Reply":
        section = cap.sections[("streaming" if streaming else "non-streaming") + suffix]
        raw = http_section(section)
        if raw is not None:
            status, headers, body = raw
            return cls(status, {"content-type": headers.get("content-type", "application/json")}, body)
        if streaming:
            return cls.sse(sse_events(section), delay)
        return cls(200, {"content-type": "application/json"}, section.strip().encode())


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class MockUpstream:
    def __init__(self, ssl_context=None) -> None:
        self.replies: list[Reply] = []
        self.default: Reply | None = None  # answers when nothing is scripted
        self.check = None  # (Seen) -> Reply | None: a refusal answered before any scripted reply (e.g. a bad signature)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.active = 0  # requests being answered right now
        self.aborted = 0  # streamed replies the other side stopped reading (connection closed under us)
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                with mock.lock:
                    mock.active += 1
                try:
                    self._answer()
                finally:
                    with mock.lock:
                        mock.active -= 1

            def _answer(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                with mock.lock:
                    mock.seen.append(
                        Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    refusal = mock.check(mock.seen[-1]) if mock.check is not None else None
                    reply = refusal or (mock.replies.pop(0) if mock.replies else mock.default)
                if reply is None:
                    if self.path.rstrip("/").endswith("/models"):
                        reply = Reply.json({"object": "list", "data": [{"id": "mock-model", "object": "model"}]})
                    else:
                        reply = Reply.json({"error": {"message": "mock: no reply scripted"}}, 599)
                if reply.reset:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # linger 0: an RST, as a crashing provider or middlebox sends
                    self.close_connection = True
                    return
                if reply.hang:
                    time.sleep(reply.hang)
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.events is None:
                    self.send_header("content-length", str(len(reply.body)))
                    self.end_headers()
                    try:
                        self.wfile.write(reply.body)
                    except (BrokenPipeError, ConnectionResetError):  # the gateway gave up on us (timeouts)
                        self.close_connection = True
                    return
                self.send_header("transfer-encoding", "chunked")
                self.send_header("cache-control", "no-cache")
                self.end_headers()
                self.wfile.flush()
                try:
                    for i, ev in enumerate(reply.events):
                        if reply.cut_after is not None and i >= reply.cut_after:
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                        if reply.stall_after is not None and i >= reply.stall_after:
                            self.connection.settimeout(30)
                            self.connection.recv(1)  # returns when the gateway closes the connection
                            self.close_connection = True
                            with mock.lock:
                                mock.aborted += 1
                            return
                        if i and reply.delay:
                            time.sleep(reply.delay)
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                        self.wfile.flush()
                    if reply.tail_delay:
                        time.sleep(reply.tail_delay)
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    with mock.lock:
                        mock.aborted += 1

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = _Listener(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if ssl_context is not None:
            self.scheme = "https"
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> "MockUpstream":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def reset(self) -> None:
        with self.lock:
            self.default = None
            self.check = None
            self.replies.clear()
            self.seen.clear()
            self.aborted = 0


class _Listener(ThreadingHTTPServer):
    """A provider takes every connection a burst opens: socketserver's default backlog (5) would drop SYNs when
    the gateway opens dozens of upstream connections at once, and a test about the gateway would fail on that."""

    request_queue_size = 256
