"""A test-only mitmproxy addon, loaded after the gateway's: appends `METHOD HOST PATH STATUS` (the request as the
client sent it, without its query) for every answer a client got to the file named by $AIBRIDGE_TEST_ANSWERS, so a
real-client test can see what the gateway answered each call."""

from __future__ import annotations

import os

from mitmproxy import http

_ASKED = "test_answers_asked"


class Answers:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        flow.metadata[_ASKED] = f"{req.method} {req.pretty_host} {req.path.split('?')[0]}"

    def response(self, flow: http.HTTPFlow) -> None:
        asked = flow.metadata.get(_ASKED)
        if asked and os.environ.get("AIBRIDGE_TEST_ANSWERS"):
            with open(os.environ["AIBRIDGE_TEST_ANSWERS"], "a") as f:
                f.write(f"{asked} {flow.response.status_code}\n")


addons = [Answers()]
