"""OpenAI (`type: openai`) and OpenAI-compatible servers: Chat Completions, Responses and the other
spend-bearing endpoints. Base URLs end in /v1; endpoint paths here are relative to it."""

from __future__ import annotations

from types import MappingProxyType

from ..base import endpoint, sse_only
from ..wire import openai_chat as chat
from ..wire import openai_responses as responses
from ..wire.results import ResultsCodec, RetrieveCodec, openai_line
from ..wire.spend import SpendCodec, usage_from

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    426: ("invalid_request_error", "websocket_not_supported"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class OpenAI:
    type = "openai"
    # OpenTelemetry GenAI semantic conventions (telemetry.py): `gen_ai.provider.name`, and each recorded API's
    # `gen_ai.operation.name` (an API not named here: its own name)
    gen_ai_provider = "openai"
    gen_ai_operations = MappingProxyType({"openai.chat": "chat", "openai.responses": "chat", "openai.completions": "text_completion",
        "openai.embeddings": "embeddings"})
    public_hosts = ("api.openai.com",)
    default_base_url = None
    credential_headers = ("api-key",)  # Azure OpenAI's key header
    own_credentials_only = False
    subscription_prefixes = ()
    transport = None
    stream_framing = staticmethod(sse_only)  # streams are server-sent events
    query_credential = None
    version_in_base_url = True
    apis = MappingProxyType({a.name: a for a in (
        chat.API,
        responses.API,
        SpendCodec("openai.completions", model_required=True, prompt_field="prompt", stream_usage=True),
        SpendCodec("openai.responses.compact", model_required=True),
        SpendCodec("openai.embeddings", model_required=True),
        SpendCodec("openai.moderations"),
        SpendCodec("openai.images"),
        SpendCodec("openai.audio.speech", model_required=True),
        SpendCodec("openai.audio.transcriptions"),
        SpendCodec("openai.audio.translations"),
        SpendCodec("openai.batches", facts=("input_file_id", "endpoint", "completion_window")),
        SpendCodec("openai.fine_tuning"),
        SpendCodec("openai.realtime"),
        SpendCodec("openai.videos"),
        SpendCodec("openai.containers"),
        SpendCodec("openai.vector_stores.search"),
        SpendCodec("openai.evals"),
        ResultsCodec("openai.batches.results", "openai_file", openai_line, usage_from),
        RetrieveCodec("openai.responses.retrieve", responses.API),
    )})
    endpoints = (
        endpoint("POST", "/chat/completions", "openai.chat"),
        endpoint("POST", "/responses", "openai.responses"),
        endpoint("POST", "/responses/compact", "openai.responses.compact"),
        endpoint("POST", "/completions", "openai.completions"),
        endpoint("POST", "/embeddings", "openai.embeddings"),
        endpoint("POST", "/moderations", "openai.moderations"),
        endpoint("POST", "/images/generations", "openai.images"),
        endpoint("POST", "/images/edits", "openai.images"),
        endpoint("POST", "/images/variations", "openai.images"),
        endpoint("POST", "/audio/speech", "openai.audio.speech"),
        endpoint("POST", "/audio/transcriptions", "openai.audio.transcriptions"),
        endpoint("POST", "/audio/translations", "openai.audio.translations"),
        endpoint("POST", "/batches", "openai.batches"),
        endpoint("POST", "/fine_tuning/jobs", "openai.fine_tuning"),
        endpoint("POST", "/realtime/sessions", "openai.realtime"),
        endpoint("POST", "/realtime/transcription_sessions", "openai.realtime"),
        endpoint("POST", "/realtime/client_secrets", "openai.realtime"),
        endpoint("POST", "/videos", "openai.videos"),
        endpoint("POST", "/containers", "openai.containers"),
        endpoint("POST", "/vector_stores/{id}/search", "openai.vector_stores.search"),
        endpoint("POST", "/evals/{id}/runs", "openai.evals"),
        endpoint("GET", "/models"),
        endpoint("GET", "/models/{id}"),
        endpoint("POST", "/responses/input_tokens"),
        endpoint("GET", "/responses/{id}", "openai.responses.retrieve"),
        endpoint("GET", "/responses/{id}/input_items"),
        endpoint("POST", "/responses/{id}/cancel"),
        endpoint("GET", "/chat/completions/{id}"),
        endpoint("GET", "/batches/{id}"),
        endpoint("POST", "/batches/{id}/cancel"),
        endpoint("GET", "/files/{id}"),
        endpoint("GET", "/files/{id}/content", "openai.batches.results"),
        endpoint("POST", "/files"),
        endpoint("GET", "/fine_tuning/jobs/{id}"),
        endpoint("POST", "/fine_tuning/jobs/{id}/cancel"),
    )

    @staticmethod
    def auth_header(key: str) -> tuple[bytes, bytes]:
        return b"authorization", f"Bearer {key}".encode()

    @staticmethod
    def error_body(status: int, message: str) -> dict:
        etype, code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        return {"error": {"message": message, "type": etype, "param": None, "code": code}}


PROVIDER = OpenAI()
