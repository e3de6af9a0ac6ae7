"""The gateway's patches to mitmproxy internals (aibridge_gw/addons/patches.py): their targets still exist with the shape
the patches assume, and each patch takes. A mitmproxy upgrade that moves them fails here, loudly."""

from __future__ import annotations

import inspect

from aibridge_gw.addons import patches
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import HttpStream, _http1


def _original(fn):
    return getattr(fn, "aibridge_original", fn)


def test_patch_targets_have_the_shape_the_patches_assume():
    assert _http1.http1 is http1  # the HTTP/1 layer reads request heads through this module attribute
    assert list(inspect.signature(_original(http1.read_request_head)).parameters) == ["lines"]
    assert list(inspect.signature(_original(_http1.make_error_response)).parameters) == ["status_code", "message"]
    handle = _original(HttpStream.handle_protocol_error)
    assert list(inspect.signature(handle).parameters) == ["self", "event"] and inspect.isgeneratorfunction(handle)


def test_every_patch_takes_and_installing_twice_changes_nothing():
    patches.install(lambda flow, message: None)
    first = (http1.read_request_head, _http1.make_error_response, HttpStream.handle_protocol_error)
    patches.install(lambda flow, message: None)
    assert (http1.read_request_head, _http1.make_error_response, HttpStream.handle_protocol_error) == first
    assert all(getattr(f, "aibridge", False) for f in first)


def test_request_form_is_marked_as_mitmproxy_reads_the_request_line():
    patches.install(lambda flow, message: None)
    origin = http1.read_request_head([b"GET /a HTTP/1.1\r\n", b"Host: y:5\r\n"])
    absolute = http1.read_request_head([b"GET http://x/a HTTP/1.1\r\n", b"Host: y\r\n"])
    assert patches.request_form(origin) == patches.ORIGIN and patches.request_form(absolute) == patches.ABSOLUTE


def test_error_pages_are_json_both_sdk_families_read():
    import json

    patches.install(lambda flow, message: None)
    raw = _http1.make_error_response(502, "connection refused")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502") and b"application/json" in head
    err = json.loads(body)
    assert err["type"] == "error" and err["error"]["type"] == "api_error" and "connection refused" in err["error"]["message"]


def test_the_shared_listener_patch_wraps_mitmproxys_tcp_listen():
    """`--workers N` binds the one port with SO_REUSEPORT through this patch; mitmproxy's listen must keep the
    (self, host, port) shape and asyncio.start_server its reuse_port option."""
    import asyncio

    from mitmproxy.proxy.mode_servers import AsyncioServerInstance

    original = _original(AsyncioServerInstance.listen)
    assert list(inspect.signature(original).parameters) == ["self", "host", "port"]
    assert inspect.iscoroutinefunction(original)
    assert "reuse_port" in inspect.signature(asyncio.BaseEventLoop.create_server).parameters
    patches.install_shared_listener()
    first = AsyncioServerInstance.listen
    patches.install_shared_listener()
    assert AsyncioServerInstance.listen is first and first.aibridge


def test_the_listener_and_its_front_door_rely_on_what_mitmproxy_and_asyncio_provide():
    """The front door (patches.install_listener, serve_through_front_door) hands each accepted connection to
    `ServerInstance.handle_stream(reader, writer)` and switches mitmproxy's own listening socket over by serving a
    second descriptor of it (`asyncio.start_server(sock=…)`) in the instance's `_servers` list."""
    import asyncio

    from mitmproxy.proxy.mode_servers import AsyncioServerInstance, ServerInstance

    assert list(inspect.signature(ServerInstance.handle_stream).parameters)[:3] == ["self", "reader", "writer"]
    assert "_servers" in AsyncioServerInstance.__init__.__code__.co_names
    assert {"sock", "backlog"} <= set(inspect.signature(asyncio.BaseEventLoop.create_server).parameters)
    patches.install_listener()
    assert AsyncioServerInstance.listen.aibridge

    async def switch():
        class Instance:
            handled = []

            async def handle_stream(self, reader, writer):
                self.handled.append(writer.get_extra_info("peername"))
                writer.close()

        inst = Instance()
        original = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        inst._servers = [original]
        server_list = type("PS", (), {"servers": [inst]})()
        assert await patches.serve_through_front_door(server_list) == 1
        assert inst._servers[0] is not original and inst._servers[0].aibridge
        port = inst._servers[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.read()
        writer.close()
        assert len(inst.handled) == 1
        inst._servers[0].close()

    asyncio.run(switch())


def test_a_client_gone_mid_stream_keeps_the_stream_when_the_gateway_says_so():
    """The drain's assumptions about HttpStream (its client and server states, RequestProtocolError) hold: with
    `keep` saying yes, the client's disconnect is neither sent upstream nor made the flow's error and the flow stays
    live; without it, mitmproxy's own handling runs (the flow ends with the error)."""
    from mitmproxy import options
    from mitmproxy.proxy.context import Context
    from mitmproxy.proxy.layers.http import ErrorCode, RequestProtocolError, SendHttp
    from mitmproxy.test import tflow

    def gone_mid_stream():
        stream = HttpStream(Context(tflow.tclient_conn(), options.Options()), 1)
        stream.flow = tflow.tflow(resp=True)
        stream.flow.live = True
        stream.client_state, stream.server_state = stream.state_done, stream.state_stream_response_body
        return stream

    event = RequestProtocolError(1, "Client disconnected.", ErrorCode.CLIENT_DISCONNECTED)
    asked = []
    patches.install(lambda flow, message: None, lambda flow, message: asked.append(message) or True)
    kept = gone_mid_stream()
    assert list(kept.handle_protocol_error(event)) == []
    assert asked == ["Client disconnected."] and kept.flow.live and kept.flow.error is None
    assert kept.server_state == kept.state_stream_response_body

    patches.install(lambda flow, message: None, lambda flow, message: False)
    cut = gone_mid_stream()
    commands = list(cut.handle_protocol_error(event))
    assert any(isinstance(c, SendHttp) and c.connection is cut.context.server for c in commands)
    assert not cut.flow.live and cut.flow.error.msg == "Client disconnected."
    patches.install(lambda flow, message: None)


def test_the_websocket_hold_patch_takes_and_its_target_has_the_assumed_shape():
    """patches.install_websocket_holds wraps WebsocketLayer.relay_messages (a relayed Responses socket whose client
    closed mid-turn is read to the turn's end: tests/test_responses_websocket.py)."""
    from mitmproxy.proxy.layers import websocket

    target = _original(websocket.WebsocketLayer.relay_messages)
    assert list(inspect.signature(target).parameters) == ["self", "event"]
    assert hasattr(websocket, "WebsocketEndHook") and hasattr(websocket, "WebSocketMessageInjected")
    patches.install(lambda flow, message: None, hold=lambda flow: False)
    first = websocket.WebsocketLayer.relay_messages
    patches.install(lambda flow, message: None, hold=lambda flow: False)
    assert websocket.WebsocketLayer.relay_messages is first and first.aibridge
