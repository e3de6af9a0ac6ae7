"""Paid work that is not a single call (#22): realtime sessions, message batches and their results, the OpenAI Batch
API's output files, background responses — through a real gateway with the official SDKs, against a stand-in
upstream speaking the providers' documented wire formats."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.gateway import UPSTREAM_OPENAI_KEY
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client, openai_client

REALTIME_SECRET = {"value": "ek_upstream_ephemeral", "expires_at": 1900000000,
                   "session": {"type": "realtime", "model": "gpt-realtime", "object": "realtime.session"}}


def openai_providers(upstream_url: str, **extra) -> list[dict]:
    return [{"name": "openai", "type": "openai", "base_url": upstream_url + "/v1/", "key": UPSTREAM_OPENAI_KEY,
             **extra}]


# --- realtime sessions ------------------------------------------------------------------------------


def test_realtime_client_secrets_and_sessions_are_refused_by_default(gateway, mock, user):
    """An ephemeral realtime key is billed to the central key and used straight against the provider."""
    name, token = user
    client = openai_client(gateway, token)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.realtime.client_secrets.create(session={"type": "realtime", "model": "gpt-realtime"})
    assert "allow_realtime" in e.value.message
    with pytest.raises(openai.PermissionDeniedError):
        client.beta.realtime.sessions.create(model="gpt-4o-realtime-preview")
    with pytest.raises(openai.PermissionDeniedError):
        client.beta.realtime.transcription_sessions.create()
    assert mock.seen == []  # nothing reached the provider


def test_realtime_is_relayed_and_recorded_when_the_instance_allows_it(own_gateway, upstream):
    gw = own_gateway("realtime", providers=openai_providers(upstream.url, allow_realtime=True))
    token = gw.new_user("rt")
    upstream.script(Reply.json(REALTIME_SECRET))
    secret = openai_client(gw, token).realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-realtime"})
    assert secret.value == "ek_upstream_ephemeral"
    (ic,) = gw.interceptions("rt")
    assert (ic["api"], ic["status"]) == ("openai.realtime", "completed")


def test_allow_realtime_must_be_a_boolean(own_gateway, upstream):
    with pytest.raises(RuntimeError, match="allow_realtime"):
        own_gateway("bad", providers=openai_providers(upstream.url, allow_realtime="yes"))
