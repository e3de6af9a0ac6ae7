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
