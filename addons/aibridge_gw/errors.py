"""Errors the gateway itself answers with, in each provider's own JSON so SDKs raise the right exception."""

from __future__ import annotations

import json

from mitmproxy import http

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    407: "authentication_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    426: ("invalid_request_error", "websocket_not_supported"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def error_body(provider_type: str, status: int, message: str) -> dict:
    if provider_type == "anthropic":
        etype = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": etype, "message": message}}
    etype, code = _OPENAI_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def error_response(provider_type: str | None, status: int, message: str, headers: dict | None = None) -> http.Response:
    """A JSON error response; provider_type None gives a plain {"error": {"message": ...}} body."""
    body = error_body(provider_type, status, message) if provider_type else {"error": {"message": message}}
    h = {"content-type": "application/json", "x-aibridge-error": "1"}
    if headers:
        h.update(headers)
    return http.Response.make(status, json.dumps(body).encode(), h)


def install_json_error_pages() -> None:
    """mitmproxy answers connection failures (upstream refused, reset before headers…) itself, before any addon
    can: make that answer JSON that both SDK families read as an API error, instead of an HTML page."""
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1

    if getattr(_http1.make_error_response, "aibridge", False):
        return

    def make_error_response(status_code: int, message: str = "") -> bytes:
        kind = "overloaded_error" if status_code == 529 else ("api_error" if status_code >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": f"aibridge: {message}", "param": None, "code": None}}
        resp = http.Response.make(status_code, json.dumps(body).encode(),
                                  {"content-type": "application/json", "connection": "close"})
        return http1.assemble_response(resp)

    make_error_response.aibridge = True
    _http1.make_error_response = make_error_response
