"""GitHub Copilot (`type: copilot`): the Copilot API speaks OpenAI Chat Completions and Responses and Anthropic
Messages, so its endpoints reuse those wire APIs. Each user's own GitHub token goes upstream (recorded as
`byok`); who the user is comes from X-AIBridge-Token or proxy credentials. Business and enterprise accounts are
further instances with their own base URL."""

from __future__ import annotations

from types import MappingProxyType

from ..base import endpoint, sse_only
from ..openai import OpenAI
from ..wire import anthropic_messages as messages
from ..wire import openai_chat as chat
from ..wire import openai_responses as responses


class Copilot:
    type = "copilot"
    # OpenTelemetry GenAI semantic conventions (telemetry.py): `gen_ai.provider.name`, and each recorded API's
    # `gen_ai.operation.name` (an API not named here: its own name)
    gen_ai_provider = "github_copilot"
    gen_ai_operations = MappingProxyType({"openai.chat": "chat", "openai.responses": "chat", "anthropic.messages": "chat"})
    public_hosts = ("api.githubcopilot.com", "api.individual.githubcopilot.com", "api.business.githubcopilot.com",
                    "api.enterprise.githubcopilot.com")
    default_base_url = "https://api.individual.githubcopilot.com"
    credential_headers = ()
    query_credential = None
    version_in_base_url = False
    own_credentials_only = True  # there is no central Copilot key: every call carries the user's GitHub token
    subscription_prefixes = ()
    transport = None
    stream_framing = staticmethod(sse_only)  # streams are server-sent events
    apis = MappingProxyType({a.name: a for a in (chat.API, responses.API, messages.API)})
    endpoints = (
        endpoint("POST", "/chat/completions", "openai.chat"),
        endpoint("POST", "/v1/chat/completions", "openai.chat"),
        endpoint("POST", "/responses", "openai.responses"),
        endpoint("POST", "/v1/responses", "openai.responses"),
        endpoint("POST", "/v1/messages", "anthropic.messages"),
        endpoint("GET", "/models"),
        endpoint("GET", "/models/{id}"),
        endpoint("GET", "/agents"),
        endpoint("GET", "/mcp"),
        endpoint("GET", "/.well-known/{id}"),
    )

    @staticmethod
    def auth_header(key: str) -> tuple[bytes, bytes]:
        return b"authorization", f"Bearer {key}".encode()

    error_body = staticmethod(OpenAI.error_body)  # the Copilot API answers errors in OpenAI's shape


PROVIDER = Copilot()
