"""Anthropic (`type: anthropic`): the Messages API and its neighbours, served at the instance's base URL
(which has no /v1: endpoint paths here are absolute)."""

from __future__ import annotations

from types import MappingProxyType

from ..base import endpoint, sse_only
from ..wire import anthropic_messages as messages
from ..wire.results import ResultsCodec, anthropic_line, anthropic_usage
from ..wire.spend import SpendCodec

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    407: "authentication_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class Anthropic:
    type = "anthropic"
    # OpenTelemetry GenAI semantic conventions (telemetry.py): `gen_ai.provider.name`, and each recorded API's
    # `gen_ai.operation.name` (an API not named here: its own name)
    gen_ai_provider = "anthropic"
    gen_ai_operations = MappingProxyType({"anthropic.messages": "chat", "anthropic.complete": "text_completion"})
    public_hosts = ("api.anthropic.com",)
    default_base_url = None
    credential_headers = ()
    own_credentials_only = False
    subscription_prefixes = ("sk-ant-oat",)  # Claude Code signed in with a Claude account
    transport = None
    stream_framing = staticmethod(sse_only)  # streams are server-sent events
    query_credential = None
    version_in_base_url = False
    apis = MappingProxyType({a.name: a for a in (
        messages.API,
        SpendCodec("anthropic.complete", model_required=True, prompt_field="prompt"),
        SpendCodec("anthropic.message_batches", batch_requests=True),
        ResultsCodec("anthropic.message_batches.results", "anthropic_batch", anthropic_line, anthropic_usage),
    )})
    endpoints = (
        endpoint("POST", "/v1/messages", "anthropic.messages"),
        endpoint("POST", "/v1/complete", "anthropic.complete"),
        endpoint("POST", "/v1/messages/batches", "anthropic.message_batches"),
        endpoint("POST", "/v1/messages/count_tokens"),
        endpoint("GET", "/v1/models"),
        endpoint("GET", "/v1/models/{id}"),
        endpoint("GET", "/v1/messages/batches/{id}"),
        endpoint("GET", "/v1/messages/batches/{id}/results", "anthropic.message_batches.results"),
        endpoint("POST", "/v1/messages/batches/{id}/cancel"),
        endpoint("GET", "/v1/files/{id}"),
        endpoint("GET", "/v1/files/{id}/content"),
        endpoint("POST", "/v1/files"),
        endpoint("DELETE", "/v1/files/{id}"),
        # Claude Code reads its managed settings from the API host (proxy mode).
        endpoint("GET", "/api/claude_code/settings"),
        endpoint("GET", "/api/claude_code/policy_limits"),
        endpoint("GET", "/api/oauth/profile"),  # Claude Code signed in with a Claude account asks who it is
        # Claude Code's service endpoints (docs/clients-endpoints.md): relayed unrecorded with the user's own
        # credential; on the central key the gateway answers them itself with what the client takes for "nothing
        # to tell" (its telemetry, and flags of the key's organisation rather than the user's, never go upstream).
        endpoint("GET", "/api/claude_cli/bootstrap", local={}),
        endpoint("GET", "/api/claude_code_penguin_mode",  # fast mode: not on the central key unless reviewed
                 local={"enabled": False, "disabled_reason": "org_level_disabled"}),
        endpoint("GET", "/api/claude_code/organizations/metrics_enabled", local={"metrics_logging_enabled": False}),
        endpoint("POST", "/api/event_logging/v2/batch", local={}),
        endpoint("POST", "/api/eval/{id}", local={"features": {}}),  # GrowthBook remote evaluation
        endpoint("GET", "/mcp-registry/v0/servers", local={"servers": [], "metadata": {}}),
        endpoint("GET", "/api/directory/servers", local={"servers": []}),
        endpoint("GET", "/api/directory/server-urls", local={}),
        endpoint("HEAD", "/", anyone=True),  # connectivity checks (base-URL mode): no key, answered here
        endpoint("HEAD GET", "/api/hello", anyone=True),
    )

    @staticmethod
    def auth_header(key: str) -> tuple[bytes, bytes]:
        return b"x-api-key", key.encode()

    @staticmethod
    def error_body(status: int, message: str) -> dict:
        etype = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": etype, "message": message}}


PROVIDER = Anthropic()
