"""Official SDK clients pointed at the gateway, and calls that replay a capture's request."""

from __future__ import annotations

import anthropic
import openai

_CORE = {"model", "messages", "max_tokens", "input", "stream"}


def anthropic_client(gateway, token: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gateway.url + "/anthropic", api_key=token, max_retries=0, **kw,
    )


def openai_client(gateway, token: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + "/openai/v1", api_key=token, max_retries=0, **kw,
    )


def extra(request: dict) -> dict:
    return {k: v for k, v in request.items() if k not in _CORE}


def anthropic_call(client, request: dict, stream: bool):
    """Blocking: the Message. Streaming: the list of events, in order."""
    kw = dict(model=request["model"], max_tokens=request.get("max_tokens", 1024), messages=request["messages"],
              extra_body=extra(request))
    if not stream:
        return client.messages.create(**kw)
    return list(client.messages.create(stream=True, **kw))


def chat_call(client, request: dict, stream: bool):
    kw = dict(model=request["model"], messages=request["messages"], extra_body=extra(request))
    if not stream:
        return client.chat.completions.create(**kw)
    return list(client.chat.completions.create(stream=True, **kw))


def responses_call(client, request: dict, stream: bool):
    kw = dict(model=request["model"], input=request["input"], extra_body=extra(request))
    if not stream:
        return client.responses.create(**kw)
    return list(client.responses.create(stream=True, **kw))
