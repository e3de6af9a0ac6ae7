"""How a Bedrock instance reaches AWS: the model mapped, the body made Bedrock's, every request signed.

Signing is botocore's SigV4 (service `bedrock`) over the exact bytes that go upstream; credentials are the
instance's static keys or, without them, AWS's default chain (environment, shared config and profiles, SSO,
container and instance roles), refreshed off the event loop when they expire.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.exceptions import BotoCoreError
from botocore.session import Session

from ..base import BadSettings, model_in_path
from .eventstream import CONTENT_TYPE, Native, ToSSE, anthropic_error, exception_name

ANTHROPIC_VERSION = "bedrock-2023-05-31"
# Messages API fields Bedrock rejects (it answers 400 "extraneous key"): the model travels in the path, the
# stream choice in the operation, and these have no Bedrock equivalent.
DROPPED_FIELDS = ("model", "stream", "metadata", "service_tier", "container", "mcp_servers", "inference_geo")
# anthropic-beta flags Bedrock accepts (sent in the body as `anthropic_beta`); others make it answer 400.
BETA_ALLOWLIST = frozenset((
    "computer-use-2024-10-22", "computer-use-2025-01-24", "computer-use-2025-11-24",
    "token-efficient-tools-2025-02-19", "interleaved-thinking-2025-05-14", "output-128k-2025-02-19",
    "dev-full-thinking-2025-05-14", "context-1m-2025-08-07", "context-management-2025-06-27",
    "effort-2025-11-24", "tool-search-tool-2025-10-19", "tool-examples-2025-10-29",
    "fine-grained-tool-streaming-2025-05-14",
))
_INVOKE = re.compile(r"/model/([^/]+)/(invoke|invoke-with-response-stream)$")
_SIGV4_CREDENTIAL = re.compile(r"Credential=([A-Za-z0-9]+)/")
KEEP, RESIGN = "keep", "resign"


@dataclass(frozen=True)
class Outbound:
    """What goes upstream for one request."""

    path: str  # with the base URL's path, the model id percent-encoded (`:` as %3A)
    content: bytes
    model: str  # the Bedrock model id (recorded as the model)
    requested: str | None  # the model the client asked for, when the gateway mapped it


def invoke_target(path: str) -> tuple[str, bool] | None:
    """(model id, streaming) of a native InvokeModel path."""
    m = _INVOKE.search(path.split("?", 1)[0])
    return (unquote(m.group(1)), m.group(2) != "invoke") if m else None


with_invoke_model = model_in_path(_INVOKE)  # `WireFunctions.with_model` for InvokeModel: the model is in the path


def client_access_key(headers: dict[str, str]) -> str | None:
    """The access key id a client's own SigV4 signature names (BYOK in proxy mode)."""
    auth = headers.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return None
    m = _SIGV4_CREDENTIAL.search(auth)
    return m.group(1) if m else None


def _secret(item: dict, key: str, where: str) -> str | None:
    if item.get(key):
        return str(item[key])
    env = item.get(f"{key}_env")
    if env:
        value = os.environ.get(str(env))
        if not value:
            raise BadSettings(f"{where}.{key}_env: ${env} is not set")
        return value
    return None


class BedrockTransport:
    """One Bedrock instance's settings and credentials (built from its config entry)."""

    path_safe = "!$&'()*+,;=@-._~"  # RFC 3986 pchar without ':' (AWS SDKs send a model id's ':' as %3A)
    # The Messages API's version and betas move into the body; a client's own signing headers are replaced.
    replaced_headers = frozenset((b"anthropic-version", b"anthropic-beta", b"authorization", b"x-amz-date",
                                  b"x-amz-security-token", b"x-amz-content-sha256"))

    def __init__(self, item: dict, where: str) -> None:
        region = item.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not isinstance(region, str) or not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
            raise BadSettings(f"{where}.region: an AWS region such as us-east-1 is required, got {region!r}")
        self.region = region
        self.default_base_url = f"https://bedrock-runtime.{region}.amazonaws.com"
        for key in ("model", "small_fast_model"):
            if item.get(key) is not None and not (isinstance(item[key], str) and item[key]):
                raise BadSettings(f"{where}.{key}: must be a Bedrock model or inference profile id")
        self.model: str | None = item.get("model")
        self.small_fast_model: str | None = item.get("small_fast_model") or item.get("model")
        self.mode = item.get("client_signature", RESIGN)
        if self.mode not in (KEEP, RESIGN):
            raise BadSettings(f"{where}.client_signature: must be 'resign' (the gateway signs with the instance's "
                              f"credentials) or 'keep' (each user's own AWS signature goes upstream), got {self.mode!r}")
        access, secret = _secret(item, "access_key", where), _secret(item, "access_key_secret", where)
        if bool(access) != bool(secret):
            raise BadSettings(f"{where}: set both access_key and access_key_secret (or their *_env), or neither to "
                              "use the AWS default credential chain")
        token = _secret(item, "session_token", where)
        self._static = Credentials(access, secret, token) if access else None
        self.credentials: Credentials | None = self._static
        self.credential_source = "access_key" if access else "the AWS default credential chain"

    @property
    def keeps_client_signature(self) -> bool:
        return self.mode == KEEP

    def start(self) -> None:
        """Find credentials now, so a gateway that could sign nothing fails at start-up, not per request."""
        if self.credentials is not None or self.mode == KEEP:
            return
        try:
            creds = Session().get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except BotoCoreError as e:
            raise BadSettings(f"bedrock ({self.region}): the AWS default credential chain failed: {e}") from None
        if frozen is None or not frozen.access_key:
            raise BadSettings(
                f"bedrock ({self.region}): no AWS credentials found (set access_key and access_key_secret, or "
                "provide them through the environment, ~/.aws, or an instance or container role)")
        self.credentials = creds

    def hint(self) -> str | None:
        """The access key id in use (never the secret), for the record's masked credential hint."""
        creds = self.credentials
        return creds.access_key if creds is not None else None

    def client_credential(self, headers) -> str | None:
        return client_access_key(headers) if self.mode == KEEP else None

    async def ready(self) -> None:
        """Refresh expiring role credentials on a thread: botocore's refresh is blocking network I/O."""
        creds = self.credentials
        if isinstance(creds, RefreshableCredentials) and creds.refresh_needed():
            await asyncio.to_thread(creds.get_frozen_credentials)

    # --- the request ------------------------------------------------------------------------------

    def map_model(self, requested: str) -> str:
        if "haiku" in requested.lower() and self.small_fast_model:
            return self.small_fast_model
        return self.model or requested

    def outbound(self, api: str, base_path: str, path: str, body: dict | None, raw: bytes,
                 headers: Mapping[str, str]) -> Outbound:
        """The upstream path and bytes for a request. Messages API requests (base-URL mode) become InvokeModel
        calls; native InvokeModel requests (proxy mode) go as they came."""
        if api != "anthropic.messages" or body is None:
            target = invoke_target(path)
            return Outbound(path, raw, target[0] if target else "", None)
        requested = str(body.get("model") or "")
        model = self.map_model(requested)
        out = {k: v for k, v in body.items() if k not in DROPPED_FIELDS}
        out["anthropic_version"] = ANTHROPIC_VERSION
        beta = headers.get("anthropic-beta") or ""
        betas = [b.strip() for b in beta.split(",") if b.strip() in BETA_ALLOWLIST]
        given = out.pop("anthropic_beta", None)
        if isinstance(given, list):
            betas += [b for b in given if isinstance(b, str) and b in BETA_ALLOWLIST]
        if betas:
            out["anthropic_beta"] = list(dict.fromkeys(betas))
        op = "invoke-with-response-stream" if body.get("stream") is True else "invoke"
        return Outbound(f"{base_path}/model/{quote(model, safe='')}/{op}",
                        json.dumps(out, ensure_ascii=False).encode(), model, requested if requested != model else None)

    def sign(self, url: str, host: str, content: bytes, stream: bool) -> list[tuple[bytes, bytes]]:
        """SigV4 headers for POST `url` carrying exactly `content` (the credentials must be `ready()`)."""
        creds = self.credentials.get_frozen_credentials()
        accept = CONTENT_TYPE if stream else "application/json"
        req = AWSRequest("POST", url, data=content,
                         headers={"host": host, "content-type": "application/json", "accept": accept})
        SigV4Auth(creds, "bedrock", self.region).add_auth(req)
        return [(k.lower().encode(), v.encode()) for k, v in req.headers.items()]

    # --- the response -----------------------------------------------------------------------------

    @staticmethod
    def client_error(api: str, status: int, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes] | None:
        """A Bedrock error as the Messages API client expects it (proxy-mode AWS SDK clients get it unchanged)."""
        if api != "anthropic.messages":
            return None
        try:
            message = json.loads(body).get("message") or ""
        except (ValueError, AttributeError):
            message = body[:500].decode("utf-8", "replace")
        error_type = headers.get("x-amzn-errortype")
        return status, json.dumps(anthropic_error(exception_name(error_type), str(message))).encode()


def stream_framing(api: str, headers: Mapping[str, str]):
    """A response in Bedrock's binary event stream: Messages API clients get it as server-sent events, native
    InvokeModel clients as it came (both read by the tap); None: not an event stream."""
    if CONTENT_TYPE not in headers.get("content-type", ""):
        return None
    return ToSSE() if api == "anthropic.messages" else Native()
