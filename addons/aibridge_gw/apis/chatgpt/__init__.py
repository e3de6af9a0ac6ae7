"""ChatGPT's Codex backend (`type: chatgpt`): Codex CLI signed in with a ChatGPT account calls
`chatgpt.com/backend-api/codex/responses` with the account's own access token. In proxy mode the gateway
intercepts chatgpt.com, names the user by proxy credentials, relays the user's own login and records the
Responses API exchange as `credential_kind = subscription`. There is no central key for it."""

from __future__ import annotations

from types import MappingProxyType

from ..base import endpoint, sse_only
from ..openai import OpenAI
from ..wire import openai_responses as responses


class ChatGPT:
    type = "chatgpt"
    # OpenTelemetry GenAI semantic conventions (telemetry.py): `gen_ai.provider.name`, and each recorded API's
    # `gen_ai.operation.name` (an API not named here: its own name)
    gen_ai_provider = "openai"
    gen_ai_operations = MappingProxyType({"openai.responses": "chat"})
    public_hosts = ("chatgpt.com",)
    default_base_url = "https://chatgpt.com"
    credential_headers = ()
    query_credential = None
    version_in_base_url = False
    own_credentials_only = True  # a ChatGPT login, never an API key
    subscription_prefixes = ("",)
    transport = None
    stream_framing = staticmethod(sse_only)  # streams are server-sent events
    apis = MappingProxyType({responses.API.name: responses.API})
    endpoints = (
        endpoint("POST", "/backend-api/codex/responses", "openai.responses"),
        endpoint("GET", "/backend-api/codex/models"),
        endpoint("GET", "/backend-api/wham/usage"),  # Codex's rate-limit status
    )

    @staticmethod
    def auth_header(key: str) -> tuple[bytes, bytes]:
        return b"authorization", f"Bearer {key}".encode()

    error_body = staticmethod(OpenAI.error_body)


PROVIDER = ChatGPT()
