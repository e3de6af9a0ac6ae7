"""The router on its own (no sockets): canonical paths, the endpoint table, provider hosts."""

from __future__ import annotations

import pytest
from aibridge_gw.config import parse_config
from aibridge_gw.flow.routing import BadPath, Router, canonical_path

CONFIG = parse_config({"providers": [
    {"name": "anthropic", "type": "anthropic", "base_url": "https://api.anthropic.com/", "key": "k"},
    {"name": "openai", "type": "openai", "base_url": "https://api.openai.com/v1/", "key": "k"},
    {"name": "vllm", "type": "openai", "base_url": "http://vllm.internal:8000/v1/", "key": "k",
     "passthrough_paths": ["/tokenize"]},
]})
ROUTER = Router(CONFIG)


@pytest.mark.parametrize("target,segments,query", [
    ("/openai/v1/chat/completions", ["openai", "v1", "chat", "completions"], ""),
    ("/openai/v1/chat%2fcompletions?x=1", ["openai", "v1", "chat", "completions"], "?x=1"),
    ("//openai/./v1/../v1//chat/completions/", ["openai", "v1", "chat", "completions"], ""),
    ("/../../etc", ["etc"], ""),
    ("/openai/models/gpt%3A4", ["openai", "models", "gpt:4"], ""),
])
def test_canonical_path(target, segments, query):
    assert canonical_path(target) == (segments, query)


@pytest.mark.parametrize("target", ["/a%252fb", "/a%00b", "/a\\b", "/a%ffb", "/a%0ab"])
def test_paths_that_cannot_be_made_canonical(target):
    with pytest.raises(BadPath):
        canonical_path(target)


@pytest.mark.parametrize("method,target,api,upstream", [
    ("POST", "/anthropic/v1/messages?beta=true", "anthropic.messages", "/v1/messages?beta=true"),
    ("POST", "/openai/v1/chat/completions", "openai.chat", "/v1/chat/completions"),
    ("POST", "/openai/chat/completions", "openai.chat", "/v1/chat/completions"),  # /v1 optional for OpenAI-type
    ("POST", "/openai/v1/responses", "openai.responses", "/v1/responses"),
    ("POST", "/openai/v1/responses/compact", "openai.responses.compact", "/v1/responses/compact"),
    ("POST", "/openai/v1/embeddings", "openai.embeddings", "/v1/embeddings"),
    ("POST", "/openai/v1/images/edits", "openai.images", "/v1/images/edits"),
    ("POST", "/anthropic/v1/messages/batches", "anthropic.message_batches", "/v1/messages/batches"),
    ("POST", "/vllm/v1/completions", "openai.completions", "/v1/completions"),
])
def test_spend_bearing_endpoints_are_recorded_apis(method, target, api, upstream):
    route = ROUTER.match_prefix(target, method)
    assert (route.api, route.upstream_path, route.known) == (api, upstream, True)


@pytest.mark.parametrize("method,target,label", [
    ("GET", "/openai/v1/models", "/models"),
    ("GET", "/openai/v1/models/gpt-4.1", "/models/{id}"),
    ("POST", "/anthropic/v1/messages/count_tokens", "/v1/messages/count_tokens"),
    ("GET", "/anthropic/api/claude_code/settings", "/api/claude_code/settings"),
    ("POST", "/vllm/v1/tokenize", "/tokenize"),  # an admin's extra passthrough path
    ("POST", "/vllm/v1/tokenize/batch", "/tokenize"),  # and what is under it
])
def test_read_only_endpoints_pass_through_unrecorded(method, target, label):
    route = ROUTER.match_prefix(target, method)
    assert (route.api, route.label, route.known) == (None, label, True)


@pytest.mark.parametrize("method,target", [
    ("GET", "/openai/v1/files"),  # lists the whole organisation's files
    ("GET", "/openai/v1/organization/costs"),
    ("POST", "/openai/v1/assistants"),
    ("GET", "/openai/v1/chat/completions"),  # stored completions of everyone
    ("DELETE", "/openai/v1/models/ft-x"),
    ("POST", "/vllm/v1/tokenizer"),  # not under the admin's /tokenize
])
def test_everything_else_is_unknown(method, target):
    route = ROUTER.match_prefix(target, method)
    assert route.api is None and not route.known and route.label == "other"


def test_proxy_mode_routes_by_host_including_the_default_public_hosts():
    assert ROUTER.match_host("API.OpenAI.com.", "/v1/chat%2Fcompletions", "POST").api == "openai.chat"
    assert ROUTER.match_host("api.anthropic.com", "/v1/messages", "POST").provider.name == "anthropic"
    assert ROUTER.match_host("example.com", "/v1/messages", "POST") is None
    assert ROUTER.is_prefixed("/openai/v1/chat%252fcompletions")  # the gateway's own, even if it is a 400
    assert not ROUTER.is_prefixed("/v1/chat/completions")
