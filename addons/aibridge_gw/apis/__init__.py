"""The registry of providers and wire APIs. Adding a provider: write its module (see `base.Provider` and
`base.WireApi`), add it to PROVIDERS below, and configure an instance with `type: <its type>`."""

from __future__ import annotations

from types import MappingProxyType

from . import anthropic, bedrock, chatgpt, copilot, gemini, openai
from .base import Provider, WireApi

PROVIDERS: MappingProxyType[str, Provider] = MappingProxyType({p.type: p for p in (
    anthropic.PROVIDER,
    openai.PROVIDER,
    gemini.PROVIDER,
    copilot.PROVIDER,
    bedrock.PROVIDER,
    chatgpt.PROVIDER,
)})

# Every wire API any provider records, by name (names are unique across providers).
WIRE_APIS: MappingProxyType[str, WireApi] = MappingProxyType(
    {name: api for p in PROVIDERS.values() for name, api in p.apis.items()})
# The chat APIs: their requests carry the user's prompt, and the MCP loop can inject tools into them.
MODEL_APIS = frozenset(name for name, api in WIRE_APIS.items() if api.model_api)
