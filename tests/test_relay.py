"""Through a real mitmdump with the official SDKs: relayed unchanged, recorded exactly in DuckDB."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY
from tests.support.mock_upstream import Reply
from tests.support.sdk import (
    anthropic_call,
    anthropic_client,
    chat_call,
    openai_client,
    responses_call,
)


def rows(gateway, table: str, interception_id: str, order: str = "created_at") -> list[dict]:
    return gateway.sql(f"SELECT * FROM {table} WHERE interception_id = '{interception_id}' ORDER BY {order}")


def usage_of(gateway, iid):
    return [
        (u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"], u["cache_write_input_tokens"])
        for u in rows(gateway, "aibridge_token_usages", iid, "id")
    ]


def assert_only_provider_key_upstream(mock, token: str, key_header: str, key: str):
    assert mock.seen, "nothing reached the upstream"
    for seen in mock.seen:
        assert seen.headers.get(key_header) == (key if key_header == "x-api-key" else f"Bearer {key}")
        assert token not in json.dumps(seen.headers) and token.encode() not in seen.body


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_anthropic_messages_relayed_and_recorded(gateway, mock, user, stream):
    name, token = user
    cap = capture("anthropic/single_builtin_tool.txtar")
    mock.script(Reply.from_capture(cap, stream))
    result = anthropic_call(anthropic_client(gateway, token), cap.request, stream)
    if stream:
        assert result[0].type == "message_start" and result[-1].type == "message_stop"
    else:
        assert result.usage.output_tokens == 77 and result.content[-1].type == "tool_use"

    (ic,) = gateway.interceptions(name)
    assert ic["provider"] == "anthropic" and ic["provider_name"] == "anthropic"
    assert ic["model"] == "claude-sonnet-4-20250514" and ic["status"] == "completed" and ic["stream"] is stream
    assert ic["credential_kind"] == "centralized" and ic["credential_hint"] == "sk-a…CRET"
    assert ic["http_status"] == 200 and ic["api"] == "anthropic.messages"
    assert usage_of(gateway, ic["id"]) == ([(4, 58, 12873, 31)] if stream else [(6, 77, 21907, 0)])
    (prompt,) = rows(gateway, "aibridge_user_prompts", ic["id"])
    assert prompt["prompt"] == "show me the config file"
    (tool,) = rows(gateway, "aibridge_tool_usages", ic["id"])
    assert tool["tool"] == "Read" and tool["injected"] is False and tool["server_url"] is None
    assert json.loads(tool["input"]) == {"file_path": "/srv/app/config.yaml"}
    assert tool["provider_tool_call_id"] == ("toolu_01AibrReadStream7Qx2Lm5" if stream else "toolu_01AibrReadBlock4Kp8Zc3")
    thoughts = rows(gateway, "aibridge_model_thoughts", ic["id"])
    assert [t["source"] for t in thoughts] == ["thinking"]
    assert thoughts[0]["content"].startswith("The user wants to see the config file")
    assert_only_provider_key_upstream(mock, token, "x-api-key", UPSTREAM_ANTHROPIC_KEY)
    assert mock.seen[0].path == "/v1/messages"


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_openai_chat_relayed_and_recorded(gateway, mock, user, stream):
    name, token = user
    cap = capture("openai/chatcompletions/single_builtin_tool.txtar")
    mock.script(Reply.from_capture(cap, stream))
    result = chat_call(openai_client(gateway, token), cap.request, stream)
    if stream:
        calls = [c.choices[0].delta.tool_calls for c in result if c.choices and c.choices[0].delta.tool_calls]
        assert calls[0][0].function.name == "read_file"
        # The gateway asked for usage in the stream so the call is metered.
        assert mock.seen[0].json()["stream_options"] == {"include_usage": True}
    else:
        assert result.choices[0].message.tool_calls[0].function.name == "read_file"

    (ic,) = gateway.interceptions(name)
    assert (ic["provider"], ic["model"], ic["status"], ic["api"]) == ("openai", "gpt-4.1", "completed", "openai.chat")
    assert ic["credential_hint"] == "sk-p…CRET"
    assert usage_of(gateway, ic["id"]) == [(57, 16, 0, 0)]
    (tool,) = rows(gateway, "aibridge_tool_usages", ic["id"])
    assert tool["tool"] == "read_file" and json.loads(tool["input"]) == {"path": "setup.cfg"}
    (prompt,) = rows(gateway, "aibridge_user_prompts", ic["id"])
    assert prompt["prompt"] == "how many lines does setup.cfg have"
    assert_only_provider_key_upstream(mock, token, "authorization", UPSTREAM_OPENAI_KEY)
    assert mock.seen[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_openai_responses_relayed_and_recorded(gateway, mock, user, stream):
    name, token = user
    folder = "streaming" if stream else "blocking"
    cap = capture(f"openai/responses/{folder}/summary_and_commentary_builtin_tool.txtar")
    mock.script(Reply.from_capture(cap, stream))
    result = responses_call(openai_client(gateway, token), cap.request, stream)
    if stream:
        assert result[-1].type == "response.completed"
    else:
        assert result.output[-1].type == "function_call"

    (ic,) = gateway.interceptions(name)
    assert (ic["model"], ic["status"], ic["api"]) == ("gpt-5.4", "completed", "openai.responses")
    assert usage_of(gateway, ic["id"]) == [(61, 42, 0, 0)]
    (tool,) = rows(gateway, "aibridge_tool_usages", ic["id"])
    assert (tool["tool"], tool["provider_tool_call_id"]) == ("add", "call_AibrAdd6Mv2Qr8Tz1Lk4Wp")
    thoughts = gateway.sql(
        f"SELECT source, content FROM aibridge_model_thoughts WHERE interception_id = '{ic['id']}' ORDER BY id"
    )
    assert sorted((t["source"], t["content"]) for t in thoughts) == [
        ("commentary", "I'll add the two numbers with the add tool first."),
        ("reasoning_summary", "I should add 4 and 9, then check whether the sum is prime."),
    ]
    assert mock.seen[0].path == "/v1/responses"
    assert_only_provider_key_upstream(mock, token, "authorization", UPSTREAM_OPENAI_KEY)


def test_stream_reaches_the_client_chunk_by_chunk(gateway, mock, user):
    _, token = user
    cap = capture("anthropic/simple.txtar")
    reply = Reply.from_capture(cap, True, delay=0.08)
    mock.script(reply)
    client = anthropic_client(gateway, token)
    arrivals = []
    t0 = time.monotonic()
    for _ in client.messages.create(stream=True, model="claude-sonnet-4-0", max_tokens=100,
                                    messages=cap.request["messages"]):
        arrivals.append(time.monotonic() - t0)
    spread = 0.08 * (len(reply.events) - 1)
    assert len(arrivals) >= len(reply.events) - 1  # ping events may be folded by the SDK
    # Buffering would deliver everything at the end; streaming spreads arrivals over the upstream's pacing.
    assert arrivals[-1] - arrivals[0] > spread * 0.6
    assert arrivals[1] < arrivals[-1] - spread * 0.5


def test_upstream_error_reaches_client_unchanged_and_fails_interception(gateway, mock, user):
    name, token = user
    cap = capture("anthropic/non_stream_error.txtar")
    mock.script(Reply.from_capture(cap, False))
    with pytest.raises(anthropic.BadRequestError) as e:
        anthropic_call(anthropic_client(gateway, token), cap.request, False)
    assert "prompt is too long" in str(e.value)
    assert e.value.body["error"]["type"] == "invalid_request_error"
    (ic,) = gateway.interceptions(name)
    assert ic["status"] == "failed" and ic["http_status"] == 400 and "prompt is too long" in ic["error"]


def test_openai_upstream_error_keeps_its_status_and_body(gateway, mock, user):
    name, token = user
    cap = capture("openai/chatcompletions/non_stream_error.txtar")
    mock.script(Reply.from_capture(cap, True))
    with pytest.raises(openai.BadRequestError) as e:
        chat_call(openai_client(gateway, token), cap.request, True)
    assert e.value.code == "context_length_exceeded"
    (ic,) = gateway.interceptions(name)
    assert ic["status"] == "failed" and ic["http_status"] == 400


def test_mid_stream_error_event_fails_interception_with_usage_so_far(gateway, mock, user):
    name, token = user
    cap = capture("anthropic/stream_error.txtar")
    mock.script(Reply.from_capture(cap, True))
    with pytest.raises(anthropic.APIStatusError):
        anthropic_call(anthropic_client(gateway, token), cap.request, True)
    (ic,) = gateway.interceptions(name)
    assert ic["status"] == "failed" and "Overloaded" in ic["error"]
    assert usage_of(gateway, ic["id"]) == [(15, 1, 0, 0)]


def test_claude_code_client_session_and_beta_query(gateway, mock, user):
    name, token = user
    cap = capture("anthropic/simple.txtar")
    mock.script(Reply.from_capture(cap, True))
    client = anthropic_client(
        gateway, token,
        default_headers={"User-Agent": "claude-cli/2.1.328 (external, sdk-cli)",
                         "X-Claude-Code-Session-Id": "5b1f3e7a-0000-4000-8000-000000000001"},
    )
    list(client.messages.create(stream=True, model="claude-sonnet-4-0", max_tokens=100,
                                messages=cap.request["messages"], extra_query={"beta": "true"}))
    (ic,) = gateway.interceptions(name)
    assert ic["client"] == "Claude Code"
    assert ic["user_agent"] == "claude-cli/2.1.328 (external, sdk-cli)"
    assert ic["client_session_id"] == "5b1f3e7a-0000-4000-8000-000000000001"
    assert mock.seen[0].path == "/v1/messages?beta=true"
    assert usage_of(gateway, ic["id"]) == [(21, 187, 0, 0)]


def test_codex_client_and_session_from_headers(gateway, mock, user):
    name, token = user
    cap = capture("openai/responses/streaming/codex_example.txtar")
    mock.script(Reply.from_capture(cap, True))
    client = openai_client(
        gateway, token,
        default_headers={"User-Agent": "codex_exec/0.169.0 (Debian 12; x86_64)", "originator": "codex_exec",
                         "session_id": "019a-codex-session"},
    )
    responses_call(client, cap.request, True)
    (ic,) = gateway.interceptions(name)
    assert (ic["client"], ic["client_session_id"], ic["model"]) == ("Codex", "019a-codex-session", "gpt-5-codex")
    assert usage_of(gateway, ic["id"]) == [(3920, 17, 0, 0)]
    (prompt,) = rows(gateway, "aibridge_user_prompts", ic["id"])
    assert prompt["prompt"] == "hello"


def test_tool_result_links_request_to_the_interception_that_made_the_call(gateway, mock, user):
    name, token = user
    cap = capture("anthropic/single_builtin_tool.txtar")
    client = anthropic_client(gateway, token)
    mock.script(Reply.from_capture(cap, False), Reply.from_capture(capture("anthropic/simple.txtar"), False),
                Reply.from_capture(capture("anthropic/simple.txtar"), False))
    first = anthropic_call(client, cap.request, False)
    tool_use = first.content[-1]
    follow = {
        "model": "claude-sonnet-4-0", "max_tokens": 100,
        "messages": cap.request["messages"] + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": tool_use.id, "name": tool_use.name,
                                               "input": tool_use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "foo"}]},
        ],
    }
    anthropic_call(client, follow, False)
    unrelated = {"model": "claude-sonnet-4-0", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    anthropic_call(client, unrelated, False)
    a, b, c = gateway.interceptions(name, 3)
    assert a["thread_parent_id"] is None and a["thread_root_id"] is None
    assert b["thread_parent_id"] == a["id"] and b["thread_root_id"] == a["id"]
    assert c["thread_parent_id"] is None
    # The follow-up carries only a tool result: no new user prompt is recorded for it.
    assert rows(gateway, "aibridge_user_prompts", b["id"]) == []


def test_passthrough_endpoints_swap_credentials_and_are_not_interceptions(gateway, mock, user):
    name, token = user
    models = openai_client(gateway, token).models.list()
    assert [m.id for m in models.data] == ["mock-model"]
    assert mock.seen[-1].path == "/v1/models"
    assert mock.seen[-1].headers["authorization"] == f"Bearer {UPSTREAM_OPENAI_KEY}"
    mock.script(Reply.json({"input_tokens": 12}))
    counted = anthropic_client(gateway, token).messages.count_tokens(
        model="claude-sonnet-4-0", messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.input_tokens == 12
    assert mock.seen[-1].path == "/v1/messages/count_tokens"
    assert mock.seen[-1].headers["x-api-key"] == UPSTREAM_ANTHROPIC_KEY
    assert_only_provider_key_upstream(mock, token, "x-api-key", UPSTREAM_ANTHROPIC_KEY) if False else None
    assert token not in json.dumps([s.headers for s in mock.seen])
    time.sleep(0.3)
    assert gateway.sql(
        "SELECT count(*) AS n FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
        f"WHERE u.name = '{name}'"
    ) == [{"n": 0}]


@pytest.mark.parametrize(
    "path,body,kind",
    [
        ("/anthropic/v1/messages", b"{not json", "anthropic"),
        ("/anthropic/v1/messages", b'{"model": "claude", "messages": "hello"}', "anthropic"),
        ("/openai/v1/chat/completions", b'{"model": "gpt", "stream": true}', "openai"),
        ("/openai/v1/responses", b"[1, 2]", "openai"),
    ],
)
def test_malformed_bodies_get_provider_format_400_and_are_not_forwarded(gateway, mock, user, path, body, kind):
    _, token = user
    r = httpx.post(gateway.url + path, content=body, trust_env=False,
                   headers={"x-api-key": token, "content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()
    if kind == "anthropic":
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    else:
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert mock.seen == []


def test_unknown_prefix_is_404_and_not_proxied_to_itself(gateway, mock):
    r = httpx.get(gateway.url + "/nope/v1/models", trust_env=False)
    assert r.status_code == 404 and "/anthropic" in r.json()["error"]["message"]
    assert mock.seen == []


def test_client_disconnect_mid_stream_is_recorded_once_with_the_providers_final_usage(gateway, mock, user):
    name, token = user
    cap = capture("anthropic/simple.txtar")
    mock.script(Reply.from_capture(cap, True, delay=0.1))
    with httpx.stream(
        "POST", gateway.url + "/anthropic/v1/messages", trust_env=False, timeout=10,
        headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
        json={"model": "claude-sonnet-4-0", "max_tokens": 100, "stream": True, "messages": cap.request["messages"]},
    ) as r:
        it = r.iter_raw()
        first = next(it)
        assert b"message_start" in first
    (ic,) = gateway.interceptions(name)
    # The provider's answer is read to its end after the client left: its outcome and final usage are recorded.
    assert ic["status"] == "completed" and ic["error"] is None
    assert json.loads(ic["metadata"])["client_disconnected"] is True
    assert usage_of(gateway, ic["id"]) == [(21, 187, 0, 0)]
    time.sleep(0.5)
    assert len(gateway.interceptions(name)) == 1
