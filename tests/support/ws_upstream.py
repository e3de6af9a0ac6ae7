"""A provider stand-in serving the Responses API over a WebSocket (OpenAI's `wss://…/v1/responses`), speaking the
documented event sequence: `response.created`, `response.output_text.delta`…, `response.output_item.done`,
`response.completed` with usage; a `generate: false` warm-up gets `response.created` and `response.completed` with
no output and no usage. Runs the `websockets` package's server in a thread of its own."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from websockets.asyncio.server import serve


class WsUpstream:
    def __init__(self) -> None:
        self.port = 0
        self.handshakes: list[dict] = []  # the upgrade requests' headers (lower-case names)
        self.messages: list[dict] = []  # every message received, in order
        self.raw: list[str] = []  # the same, as the frames came
        self.closes: list[int | None] = []  # the close code each connection ended with
        self.usage = (21, 5)
        self.deltas = ["Hello ", "over ", "a socket."]
        self.delay = 0.0  # seconds between events
        self.tool_call: tuple[str, str] | None = None  # (name, arguments): the response calls this client tool
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._n = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "WsUpstream":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._thread.join(5)

    def reset(self) -> None:
        self.handshakes.clear()
        self.messages.clear()
        self.raw.clear()
        self.closes.clear()
        self.delay = 0.0
        self.tool_call = None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with serve(self._handler, "127.0.0.1", 0, process_request=self._head) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await server.wait_closed()

    def _head(self, connection, request):
        self.handshakes.append({k.lower(): v for k, v in request.headers.raw_items()})
        return None

    async def _handler(self, ws) -> None:
        try:
            async for raw in ws:
                self.raw.append(raw if isinstance(raw, str) else raw.decode("utf-8", "replace"))
                msg = json.loads(raw)
                self.messages.append(msg)
                if msg.get("type") != "response.create":
                    await ws.send(json.dumps({"type": "error", "status": 400,
                                              "error": {"type": "invalid_request_error", "message": "unknown"}}))
                    continue
                for event in self.events(msg):
                    await ws.send(json.dumps(event))
                    if self.delay:
                        await asyncio.sleep(self.delay)
        except Exception:
            pass
        finally:
            self.closes.append(ws.close_code)

    def events(self, msg: dict) -> list[dict]:
        self._n += 1
        rid = f"resp_ws_{self._n}"
        resp = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "model": msg.get("model"), "output": [], "usage": None}
        if msg.get("generate") is False:
            return [{"type": "response.created", "sequence_number": 0, "response": resp},
                    {"type": "response.completed", "sequence_number": 1, "response": {**resp, "status": "completed"}}]
        text = "".join(self.deltas)
        item = {"id": f"msg_{self._n}", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        out = [{"type": "response.created", "sequence_number": 0, "response": resp}]
        for n, d in enumerate(self.deltas):
            out.append({"type": "response.output_text.delta", "sequence_number": n + 1, "item_id": item["id"],
                        "output_index": 0, "content_index": 0, "delta": d})
        done = {**resp, "status": "completed", "output": [item],
                "usage": {"input_tokens": self.usage[0], "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": self.usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": sum(self.usage)}}
        out.append({"type": "response.output_item.done", "sequence_number": len(out), "output_index": 0,
                    "item": item})
        if self.tool_call is not None:
            name, args = self.tool_call
            call = {"id": f"fc_{self._n}", "type": "function_call", "status": "completed", "name": name,
                    "call_id": f"call_{self._n}", "arguments": args}
            out.append({"type": "response.output_item.added", "sequence_number": len(out), "output_index": 1,
                        "item": {**call, "status": "in_progress", "arguments": ""}})
            out.append({"type": "response.function_call_arguments.delta", "sequence_number": len(out),
                        "item_id": call["id"], "output_index": 1, "delta": args})
            out.append({"type": "response.function_call_arguments.done", "sequence_number": len(out),
                        "item_id": call["id"], "output_index": 1, "arguments": args})
            out.append({"type": "response.output_item.done", "sequence_number": len(out), "output_index": 1,
                        "item": call})
            done["output"] = [item, call]
        out.append({"type": "response.completed", "sequence_number": len(out), "response": done})
        return out


class Split:
    """One address for a provider that serves both the WebSocket and HTTP (like api.openai.com): each connection
    is piped to the WebSocket stand-in when its request upgrades, else to the HTTP stand-in."""

    def __init__(self, ws_port: int, http_port: int) -> None:
        self.ws_port, self.http_port = ws_port, http_port
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Split":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _serve(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except Exception:
            writer.close()
            return
        port = self.ws_port if b"\nupgrade: websocket" in head.lower() else self.http_port
        ur, uw = await asyncio.open_connection("127.0.0.1", port)
        uw.write(head)

        async def pipe(r, w) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except Exception:
                pass
            finally:
                try:
                    w.close()
                except Exception:
                    pass

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
