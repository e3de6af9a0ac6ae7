"""AWS Bedrock (`type: bedrock`): Anthropic models behind InvokeModel, in an AWS region.

Base-URL mode (`/<name>/v1/messages`): clients speak the Anthropic Messages API (any Anthropic SDK, Claude Code
with ANTHROPIC_BASE_URL); the transport maps the model, makes the body Bedrock's, signs it and turns the binary
event stream back into server-sent events. Proxy mode: clients that call Bedrock themselves (Claude Code with
CLAUDE_CODE_USE_BEDROCK=1, boto3) are read natively on `bedrock-runtime.<region>.amazonaws.com`, re-signed with
the instance's credentials or sent on with their own signature (`client_signature: keep`).
"""

from __future__ import annotations

from types import MappingProxyType
from urllib.parse import unquote

from ...flow.exchange import BadRequest, RequestInfo
from ..anthropic import Anthropic
from ..base import WireFunctions, endpoint
from ..wire import anthropic_messages as messages
from .settings import BedrockSettings
from .transport import BedrockTransport, invoke_target, stream_framing, with_invoke_model


def parse_invoke(body: dict, path: str = "") -> RequestInfo:
    """A native InvokeModel request: the model is in the path, the stream choice is the operation."""
    target = invoke_target(path)
    if target is None:
        raise BadRequest(f"not an InvokeModel path: {unquote(path)[:200]!r}")
    model, stream = target
    info = messages.parse_request({**body, "model": model, "stream": False}, path)
    info.stream = stream
    return info


# Native InvokeModel bodies are Anthropic Messages bodies without model and stream; answers are the same events.
INVOKE = WireFunctions(
    name="bedrock.invoke", model_api=True, parse_request=parse_invoke, prepare_request=messages.prepare_request,
    on_event=messages.on_event, finish_stream=messages.finish_stream, summarize=messages.summarize,
    stream_error_event=messages.stream_error_event, gate=messages.GATE, with_model=with_invoke_model,
)


class Bedrock:
    type = "bedrock"
    # OpenTelemetry GenAI semantic conventions (telemetry.py): `gen_ai.provider.name`, and each recorded API's
    # `gen_ai.operation.name` (an API not named here: its own name)
    gen_ai_provider = "aws.bedrock"
    gen_ai_operations = MappingProxyType({"anthropic.messages": "chat", "bedrock.invoke": "chat"})
    public_hosts = ()  # per region: an instance intercepts its own base_url host
    default_base_url = None  # from the region (see BedrockTransport)
    credential_headers = ()
    secret_headers = ("x-amz-security-token",)  # a client's temporary AWS credentials (never logged or captured)
    query_credential = None
    version_in_base_url = False
    own_credentials_only = False
    subscription_prefixes = ()
    transport = BedrockTransport
    stream_framing = staticmethod(stream_framing)  # the binary event stream, decoded for the tap
    settings_model = BedrockSettings  # its own config keys (region, model, credentials)
    apis = MappingProxyType({a.name: a for a in (messages.API, INVOKE)})
    endpoints = (
        endpoint("POST", "/v1/messages", "anthropic.messages"),
        endpoint("POST", "/model/{id}/invoke", "bedrock.invoke"),
        endpoint("POST", "/model/{id}/invoke-with-response-stream", "bedrock.invoke"),
        endpoint("POST", "/model/{id}/count-tokens"),  # free; Claude Code asks before long prompts
    )

    @staticmethod
    def auth_header(key: str) -> tuple[bytes, bytes]:
        return b"authorization", b""  # never sent: every Bedrock request is signed (see BedrockTransport.sign)

    @staticmethod
    def error_body(status: int, message: str) -> dict:
        # Anthropic's shape for Messages API clients, plus the `message` key AWS SDKs read (proxy mode).
        return {**Anthropic.error_body(status, message), "message": message}


PROVIDER = Bedrock()
