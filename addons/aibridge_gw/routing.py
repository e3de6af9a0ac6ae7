"""Which provider instance and which API a request is for: by path prefix (base-URL mode) or host (proxy mode)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, ProviderInstance

# (provider type, normalized endpoint) -> API handled by a codec; everything else is passthrough.
INTERCEPTED = {
    ("anthropic", "/v1/messages"): "anthropic.messages",
    ("openai", "/chat/completions"): "openai.chat",
    ("openai", "/responses"): "openai.responses",
}


@dataclass(frozen=True, slots=True)
class Route:
    provider: ProviderInstance
    upstream_path: str  # path (with query) to request from the provider's base_url host
    api: str | None  # codec name when intercepted, None for passthrough


class Router:
    def __init__(self, config: Config) -> None:
        self.by_prefix = {p.name: p for p in config.providers}
        self.by_host = {h: p for p in config.providers for h in p.hosts}

    def is_ai_host(self, host: str | None) -> bool:
        return bool(host) and host.lower() in self.by_host

    def match_prefix(self, path: str) -> Route | None:
        """Base-URL mode: /<instance>/<rest>."""
        seg, _, rest = path.lstrip("/").partition("/")
        name = seg.split("?", 1)[0]
        prov = self.by_prefix.get(name)
        if prov is None:
            return None
        if "?" in seg:  # "/anthropic?x" — no rest path
            rest = "?" + seg.split("?", 1)[1]
        return self._route(prov, "/" + rest if not rest.startswith("?") else rest)

    def match_host(self, host: str, path: str) -> Route | None:
        """Proxy mode: the request went to the provider's own host."""
        prov = self.by_host.get(host.lower())
        return self._route(prov, path) if prov else None

    def _route(self, prov: ProviderInstance, path: str) -> Route:
        endpoint, sep, query = path.partition("?")
        endpoint = "/" + endpoint.lstrip("/")
        if prov.type == "openai" and (endpoint == "/v1" or endpoint.startswith("/v1/")):
            # OpenAI-type base URLs already end in /v1; clients may or may not repeat it.
            endpoint = endpoint[3:] or "/"
        api = INTERCEPTED.get((prov.type, endpoint.rstrip("/") or "/"))
        upstream = prov.base_path + endpoint
        return Route(prov, upstream + (sep + query if sep else ""), api)
