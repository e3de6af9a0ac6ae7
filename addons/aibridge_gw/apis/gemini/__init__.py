"""Google Gemini (`type: gemini`): the generateContent API under /v1beta and /v1, at
generativelanguage.googleapis.com by default. Keys travel as `x-goog-api-key` (or a `key` query parameter)."""

from __future__ import annotations

from types import MappingProxyType

from ..base import endpoint, sse_only
from ..wire import gemini as generate


class Gemini:
    type = "gemini"
    # OpenTelemetry GenAI semantic conventions (telemetry.py): `gen_ai.provider.name`, and each recorded API's
    # `gen_ai.operation.name` (an API not named here: its own name)
    gen_ai_provider = "gcp.gemini"
    gen_ai_operations = MappingProxyType({"gemini.generate_content": "generate_content"})
    public_hosts = ("generativelanguage.googleapis.com",)
    default_base_url = "https://generativelanguage.googleapis.com/"
    credential_headers = ("x-goog-api-key",)
    own_credentials_only = False
    subscription_prefixes = ()
    transport = None
    stream_framing = staticmethod(sse_only)  # streams are server-sent events
    query_credential = "key"
    version_in_base_url = False
    apis = MappingProxyType({generate.API.name: generate.API})
    endpoints = tuple(
        e
        for version in ("/v1beta", "/v1")
        for e in (
            endpoint("POST", f"{version}/models/{{id}}:generateContent", "gemini.generate_content"),
            endpoint("POST", f"{version}/models/{{id}}:streamGenerateContent", "gemini.generate_content"),
            endpoint("POST", f"{version}/models/{{id}}:countTokens"),
            endpoint("GET", f"{version}/models"),
            endpoint("GET", f"{version}/models/{{id}}"),
        )
    )

    @staticmethod
    def auth_header(key: str) -> tuple[bytes, bytes]:
        return b"x-goog-api-key", key.encode()

    error_body = staticmethod(generate.error_body)


PROVIDER = Gemini()
