"""Which provider instance, endpoint and API a request is for: by path prefix (base-URL mode) or host (proxy mode).

Routing works on the canonical path only (percent-escapes decoded once, dot segments and empty segments
resolved), and the canonical path is what goes upstream: what the gateway routed is exactly what the provider
sees, so `chat%2fcompletions`, `v1/../v1/chat/completions` or `//chat` cannot reach a model endpoint unrecorded.

Every endpoint the gateway relays is listed in its provider's module (`apis/<provider>`). An endpoint that can spend money is recorded as an
interception (`api`); a read-only one is relayed unrecorded; anything else is refused with a 404 in the
provider's format — the central key never goes to a path nobody reviewed. A client's service endpoint (telemetry,
feature flags) may instead be answered by the gateway itself on the central key (`endpoint(…, local=…)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..apis import PROVIDERS
from ..apis.base import LocalAnswer
from ..config import Config, ProviderInstance

_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"  # RFC 3986 pchar without percent-escapes
# Where a public API host is reached: HTTPS, and plain HTTP (a proxied http:// request, handled by the pipeline
# like any other and sent to the instance's base_url, never to the host's port 80).
WEB_PORTS = (443, 80)


class BadPath(Exception):
    """The request target cannot be made canonical (bad escapes, control characters, backslashes)."""


@dataclass(frozen=True, slots=True)
class Route:
    provider: ProviderInstance
    upstream_path: str  # canonical path (with query) to request from the provider's base_url host
    api: str | None  # recorded api name; None for passthrough (known read-only, or unknown with BYOK only)
    label: str  # bounded route label for metrics
    known: bool = True  # False: no listed endpoint matched (relayed only with the user's own credential)
    local: LocalAnswer | None = None  # the gateway answers it itself on the central key (see apis/base.py)


def canonical_path(target: str) -> tuple[list[str], str]:
    """(path segments, query with its '?') of a request target, decoded once and with dot segments resolved."""
    path, sep, query = target.partition("?")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise BadPath("the path is not valid UTF-8 after percent-decoding") from None
    if "%" in decoded:
        raise BadPath("the path is percent-encoded more than once")
    if "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in decoded):
        raise BadPath("the path contains control characters or backslashes")
    segments: list[str] = []
    for seg in decoded.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    return segments, sep + query


def encode_path(segments: list[str], safe: str = _SEGMENT_SAFE) -> str:
    return "/" + "/".join(quote(s, safe=safe) for s in segments)


class Router:
    def __init__(self, config: Config) -> None:
        self.by_prefix = {p.name: p for p in config.providers}
        self.by_host = {h: p for p in config.providers for h in p.hosts}
        # The ports an AI host is served on (see is_ai_endpoint): the web ports, and each base_url's own port.
        self.ports = {h: set(WEB_PORTS) for h in self.by_host}
        for p in config.providers:
            if p.host in self.ports:
                self.ports[p.host].add(p.port)

    def is_ai_host(self, host: str | None) -> bool:
        return bool(host) and host.lower().rstrip(".") in self.by_host

    def is_ai_endpoint(self, host: str | None, port: int | None) -> bool:
        """An AI API's address: an AI host on one of its provider ports (443, 80, the port of a base_url on that
        host). Every request to it goes through the pipeline; the same host on any other port is an ordinary
        egress target (proxy credentials, the address policy), never the gateway's to vouch for."""
        ports = self.ports.get(host.lower().rstrip(".")) if host else None
        return ports is not None and port in ports

    def is_prefixed(self, target: str) -> bool:
        """The request names one of the gateway's own prefixes: base-URL traffic, whatever its Host header."""
        try:
            segments, _ = canonical_path(target)
        except BadPath:  # still the gateway's own (it answers 400), judged by the first segment as sent
            segments = [unquote(target.lstrip("/").split("/", 1)[0].split("?", 1)[0], errors="replace")]
        return bool(segments) and (segments[0] in self.by_prefix or segments[0] == "aibridge")

    def match_prefix(self, target: str, method: str = "POST") -> Route | None:
        """Base-URL mode: /<instance>/<rest>. Raises BadPath."""
        segments, query = canonical_path(target)
        prov = self.by_prefix.get(segments[0]) if segments else None
        if prov is None:
            return None
        return self._route(prov, segments[1:], query, method)

    def match_host(self, host: str, target: str, method: str = "POST") -> Route | None:
        """Proxy mode: the request went to the provider's own host. Raises BadPath."""
        prov = self.by_host.get(host.lower().rstrip("."))
        if prov is None:
            return None
        segments, query = canonical_path(target)
        return self._route(prov, segments, query, method)

    def reroute(self, route: Route, to: ProviderInstance, method: str) -> Route | None:
        """The same endpoint on another instance (a policy's route); None when that instance does not serve it
        with the same wire API."""
        path, sep, query = route.upstream_path.partition("?")
        base = route.provider.base_path
        endpoint = path[len(base):] if base and path.startswith(base) else path
        new = self._route(to, [unquote(s) for s in endpoint.split("/") if s], sep + query, method)
        return new if new.api is not None and new.api == route.api else None

    def _route(self, prov: ProviderInstance, segments: list[str], query: str, method: str) -> Route:
        provider = PROVIDERS[prov.type]
        if provider.version_in_base_url and segments[:1] == ["v1"]:
            segments = segments[1:]  # the base URL already ends in /v1; clients may or may not repeat it
        endpoint = encode_path(segments, prov.transport.path_safe if prov.transport is not None else _SEGMENT_SAFE)
        upstream = prov.base_path + endpoint + query
        for ep in provider.endpoints:
            if method in ep.methods and ep.pattern.match(endpoint):
                return Route(prov, upstream, ep.api, ep.label, local=ep.local)
        for prefix in prov.passthrough_paths:
            if endpoint == prefix or endpoint.startswith(prefix.rstrip("/") + "/"):
                return Route(prov, upstream, None, prefix)
        return Route(prov, upstream, None, "other", known=False)
