"""The interface every provider and wire-API module implements, and the helpers they share.

A *wire API* (`anthropic.messages`, `openai.chat`, `openai.embeddings`, …) is one request/response format: how to
read a request, prepare it for upstream, fold a response (blocking or streamed) into a `ResponseSummary`, end a
broken stream the API's own way, and, for chat APIs, the adapter the injected-tool loop drives. A *provider*
(`anthropic`, `openai`, …) is what a config `type:` names: its endpoints (each mapped to a wire API or marked
read-only), its public hosts, how its key travels, and its error bodies. `apis/__init__.py` is the registry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import quote

from ..flow.exchange import BadRequest, RequestInfo, ResponseSummary
from ..flow.sse import SSEEvent
from ..flow.toolgate import ToolGate
from ..mcp.tools import Adapter


class BadSettings(Exception):
    """A provider instance's own config keys are unusable (the config loader reports it as a ConfigError)."""


class WireApi(Protocol):
    """One request/response format, recorded under `name`."""

    name: str
    model_api: bool  # a chat API: carries the user's prompt, MCP tools can be injected (needs `adapter`)
    ends_at_eof: bool  # a stream without a final event: complete when it ends normally
    adapter: type[Adapter] | None  # the injected-tool loop's adapter for this API
    array_responses: bool  # a body may be a JSON array of responses (Gemini's streamGenerateContent without SSE)
    # Optional `gate: flow.toolgate.ToolGate`: how the tool gate reads and rewrites this API's responses (absent or
    # None: nothing to gate).

    def parse_request(self, body: dict, path: str = "") -> RequestInfo:
        """Facts for the record (model, stream, prompt, tool results); raises BadRequest. `path` is the endpoint
        path (APIs that name the model or the stream mode in the path read them there)."""

    def prepare_request(self, body: dict) -> dict | None:
        """The body to send upstream when the gateway must change it (e.g. ask for stream usage), else None."""

    def on_event(self, ev: SSEEvent, s: ResponseSummary) -> None:
        """Fold one server-sent event into the summary."""

    def finish_stream(self, s: ResponseSummary) -> None:
        """A stream ended (maybe early): close what is still open (tool calls, thinking)."""

    def summarize(self, body: dict) -> ResponseSummary:
        """The summary of a blocking JSON response."""

    def stream_error_event(self, message: str, s: ResponseSummary) -> bytes:
        """The bytes that end a stream with an error the API's SDKs raise (b"" when the API has none)."""


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """What the gateway answers itself for a client's service endpoint (telemetry, feature flags, a connectivity
    check) rather than send it upstream under the central key: the answer the client takes for "nothing to tell"."""

    body: bytes  # JSON, or b"" (no content type)
    anyone: bool  # answered before identification (a connectivity check carries no key), even to a user's own key


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint a provider serves through the gateway."""

    methods: frozenset[str]
    pattern: re.Pattern
    label: str  # the route as a bounded metric label, e.g. "/v1/models/{id}"
    api: str | None  # recorded under this wire API; None: read-only passthrough, not recorded
    # Answered by the gateway on the central key; with the user's own credential relayed unrecorded, like a
    # read-only endpoint (unless `anyone`).
    local: LocalAnswer | None = None


def endpoint(methods: str, template: str, api: str | None = None, local: dict | None = None,
             anyone: bool = False) -> Endpoint:
    """`local`: the JSON the gateway answers itself on the central key ({} included); with `anyone`, an empty
    answer for everyone, before identification."""
    regex = re.escape(template).replace(re.escape("{id}"), "[^/]+")
    answer = LocalAnswer(b"" if local is None else json.dumps(local).encode(), anyone) \
        if local is not None or anyone else None
    return Endpoint(frozenset(methods.split()), re.compile(f"^{regex}$"), template, api, answer)


class Provider(Protocol):
    """What a config `type:` names."""

    type: str
    public_hosts: tuple[str, ...]  # intercepted in proxy mode by default
    endpoints: tuple[Endpoint, ...]  # relative to the instance's base_url path
    apis: Mapping[str, WireApi]  # the wire APIs its endpoints record
    version_in_base_url: bool  # base URLs end in /v1, which clients may repeat in the path
    default_base_url: str | None  # used when an instance sets none
    credential_headers: tuple[str, ...]  # where its clients send a key, besides Authorization/X-Api-Key
    # Optional `secret_headers: tuple[str, ...]`: other headers whose values are secrets (never logged or captured).
    query_credential: str | None  # a query parameter its clients may send the key in (moved to a header)
    own_credentials_only: bool  # no central key exists: each user's own credential goes upstream (Copilot)
    # A user's own credential starting with one of these is a subscription login, not an API key (Claude's
    # OAuth tokens); "" matches every credential (ChatGPT's backend takes nothing else).
    subscription_prefixes: tuple[str, ...]
    # Builds an instance's Transport from its config entry (raises BadSettings); None: requests go upstream
    # with the key header swapped and nothing else changed.
    transport: Callable[[dict, str], "Transport"] | None
    # OpenTelemetry GenAI semantic conventions (telemetry.py): the `gen_ai.provider.name` of its calls (a well-known
    # value where one exists: anthropic, openai, gcp.gemini, aws.bedrock), and the `gen_ai.operation.name` of each
    # wire API it records (chat, text_completion, embeddings, generate_content; an API not named: its own name).
    gen_ai_provider: str
    gen_ai_operations: Mapping[str, str]

    def auth_header(self, key: str) -> tuple[bytes, bytes]:
        """The upstream credential as a raw header field."""

    def error_body(self, status: int, message: str) -> dict:
        """An error in the provider's own JSON shape, so SDKs raise the right exception."""

    def stream_framing(self, api: str, headers: Mapping[str, str]) -> "Framing | None":
        """How a response with these headers streams when not as server-sent events (Bedrock's binary event
        stream): the framing the tap decodes. None: server-sent events, or not a stream. A property of the
        provider, not of an instance: a saved flow is re-read without any instance's config."""


class Transport(Protocol):
    """How one instance reaches a provider that needs more than a swapped key header (Bedrock: a new path and body,
    a signature per request, a binary stream). Built once per instance from its config entry."""

    default_base_url: str
    keeps_client_signature: bool  # proxy mode: the user's own request signature goes upstream (BYOK)
    path_safe: str  # characters left unescaped in upstream path segments (Bedrock sends a model id's ':' as %3A)
    # Client headers the provider does not take or a fresh signature replaces (besides those `sign` returns).
    replaced_headers: frozenset[bytes]

    def start(self) -> None:
        """Find credentials (blocking, at start-up); raises BadSettings when there are none."""

    async def ready(self) -> None:
        """Make the credentials usable without blocking (refresh them on a thread when due)."""

    def hint(self) -> str | None:
        """The credential in use, for its masked hint in the record (None: there is none)."""

    def client_credential(self, headers: Mapping[str, str]) -> str | None:
        """The user's own credential to keep (BYOK), when this instance keeps clients' signatures."""

    def outbound(self, api: str, base_path: str, path: str, body: dict | None, raw: bytes,
                 headers: Mapping[str, str]):
        """The upstream path and bytes (an object with path, content, model, requested), from the client's request:
        its parsed body, raw bytes and headers (lower-case names; the transport reads the ones its provider needs)."""

    def sign(self, url: str, host: str, content: bytes, stream: bool) -> list[tuple[bytes, bytes]]:
        """Header fields that authenticate POST `url` carrying exactly `content`."""

    def client_error(self, api: str, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes] | None:
        """The provider's error response (status, headers, body) as the client's API shapes it; None: relay it
        unchanged."""


class Framing(Protocol):
    """A provider's own stream framing between it and the tap (see apis/bedrock/eventstream.py)."""

    converts: bool  # the client reads server-sent events, not the provider's frames
    content_type: str  # the client's content type when converting

    def decode(self, chunk: bytes) -> list: ...

    def error_tail(self, sse: bytes, message: str) -> bytes: ...


def sse_only(api: str, headers: Mapping[str, str]) -> None:
    """`Provider.stream_framing` for providers that stream server-sent events only."""
    return None


def model_in_body(body: dict, path: str, model: str) -> tuple[dict, str]:
    """`WireFunctions.with_model` for APIs whose body names the model."""
    return {**body, "model": model}, path


def model_in_path(pattern: re.Pattern) -> Callable[[dict, str, str], tuple[dict, str]]:
    """`WireFunctions.with_model` for APIs that name the model in the path (Gemini, Bedrock's InvokeModel): the
    pattern's first group is replaced, the body left as it is."""
    def with_model(body: dict, path: str, model: str) -> tuple[dict, str]:
        bare, sep, query = path.partition("?")
        m = pattern.search(bare)
        if m is None:
            return body, path
        return body, bare[:m.start(1)] + quote(model, safe="") + bare[m.end(1):] + sep + query
    return with_model


@dataclass(frozen=True)
class WireFunctions:
    """A WireApi made of a module's functions (the chat API modules)."""

    name: str
    model_api: bool
    parse_request: Callable[..., RequestInfo]
    prepare_request: Callable[[dict], dict | None]
    on_event: Callable[[SSEEvent, ResponseSummary], None]
    finish_stream: Callable[[ResponseSummary], None]
    summarize: Callable[[dict], ResponseSummary]
    stream_error_event: Callable[[str, ResponseSummary], bytes]
    adapter: type[Adapter] | None = None
    ends_at_eof: bool = False
    array_responses: bool = False
    # A policy's route to another model: the body and endpoint path that name it (where this API names it).
    with_model: Callable[[dict, str, str], tuple[dict, str]] = model_in_body
    gate: ToolGate | None = None  # the tool gate (flow/toolgate.py): APIs whose responses carry client tool calls

    def __post_init__(self) -> None:
        if self.adapter is not None:
            self.adapter.codec = self  # the loop folds each round with its own API's codec


# --- helpers the API modules share -----------------------------------------------------------------



def require_model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a non-empty string is required")
    return model


def require_objects(body: dict, key: str, what: str = "message") -> list[dict]:
    """body[key] as a list of JSON objects (the conversation), or BadRequest."""
    items = body.get(key)
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise BadRequest(f"{key}: a list of {what} objects is required")
    return items


def require_stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be a boolean")
    return stream


def text_of(content: Any, text_types: tuple[str, ...]) -> str | None:
    """Text of a message's content: a string, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [
        b["text"]
        for b in content
        if isinstance(b, dict) and b.get("type") in text_types and isinstance(b.get("text"), str)
    ]
    if not texts:
        return None
    # Coding agents wrap context in <system-reminder> blocks around the user's words; prefer the words.
    own = [t for t in texts if not t.lstrip().startswith("<system-reminder>")]
    return "\n".join(own or texts)


def load_json_event(data: str):
    """Parse an SSE data payload; None when it is not a JSON object (keep-alives, [DONE], junk)."""
    if not data or data[0] != "{":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def sse_bytes(obj: dict, event: str | None = None) -> bytes:
    """One SSE event as the providers frame it."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
