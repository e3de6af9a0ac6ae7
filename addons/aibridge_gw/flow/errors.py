"""Errors the gateway itself answers with, in each provider's own JSON so SDKs raise the right exception."""

from __future__ import annotations

import json

from mitmproxy import http

from ..apis import PROVIDERS


def error_body(provider_type: str, status: int, message: str) -> dict:
    return PROVIDERS[provider_type].error_body(status, message)


def error_response(provider_type: str | None, status: int, message: str, headers: dict | None = None) -> http.Response:
    """A JSON error response; provider_type None gives a plain {"error": {"message": ...}} body."""
    body = error_body(provider_type, status, message) if provider_type else {"error": {"message": message}}
    h = {"content-type": "application/json", "x-aibridge-error": "1"}
    if headers:
        h.update(headers)
    return http.Response.make(status, json.dumps(body).encode(), h)
