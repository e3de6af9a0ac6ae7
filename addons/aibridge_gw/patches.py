"""The gateway's one patch to how mitmproxy reads HTTP/1 requests, kept here so an upgrade that changes what it
wraps fails its test loudly (tests/test_hardening.py checks the mark on live requests).

Regular-mode mitmproxy accepts both origin-form requests (`POST /openai/v1/… ` — base-URL clients talking to the
gateway itself) and absolute-form ones (`POST http://host/…` — plain-HTTP proxy requests), then fills an
origin-form request's host from its `Host:` header and clears the target's authority, so the two look the same
to addons. The `Host:` header must never decide where a request addressed to the gateway goes, so the request
line's form is noted on the request as it is read.
"""

from __future__ import annotations

from mitmproxy import http

ORIGIN, ABSOLUTE = "origin", "absolute"


def install_request_form_marker() -> None:
    from mitmproxy.net.http import http1

    original = http1.read_request_head
    if getattr(original, "aibridge", False):
        return

    def read_request_head(lines):
        request = original(lines)
        if request.method != "CONNECT":
            request.aibridge_form = ABSOLUTE if request.authority else ORIGIN
        return request

    read_request_head.aibridge = True
    http1.read_request_head = read_request_head


def request_form(request: http.Request) -> str | None:
    """ORIGIN or ABSOLUTE for HTTP/1 requests read since the patch; None for HTTP/2 and HTTP/3."""
    return getattr(request, "aibridge_form", None)
