"""Gemini through /gemini: Google's official google-genai SDK as the client, a loopback stand-in speaking the
generateContent wire format (JSON and alt=sse), the gateway token swapped for the upstream key, and exact usage
recorded (cached tokens split out of the prompt count, thoughts billed as output)."""

from __future__ import annotations

import json

import httpx
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.support.fixtures import capture
from tests.support.mock_upstream import Reply

UPSTREAM_GEMINI_KEY = "AIzaSy-upstream-0123456789abcdefSECRET"
MODEL = "gemini-2.5-flash"


@pytest.fixture
def ggw(own_gateway, upstream):
    gw = own_gateway("gemini", providers=[
        {"name": "gemini", "type": "gemini", "base_url": upstream.url + "/", "key": UPSTREAM_GEMINI_KEY},
    ])
    gw.token = gw.new_user("gem")
    return gw


def client(gw, token=None) -> genai.Client:
    """Keep the returned client referenced while using it: a collected Client closes its HTTP session."""
    return genai.Client(api_key=token or gw.token, http_options=types.HttpOptions(
        base_url=gw.url + "/gemini", retry_options=types.HttpRetryOptions(attempts=1)))


def contents(cap) -> list:
    return cap.request["contents"]


def test_blocking_call_is_relayed_with_the_upstream_key_and_recorded_exactly(ggw, upstream):
    cap = capture("gemini/simple.txtar")
    upstream.script(Reply.from_capture(cap, False))
    gc = client(ggw)
    resp = gc.models.generate_content(model=MODEL, contents=contents(cap), config=cap.request["generationConfig"])
    assert resp.text == "An AI gateway sits between your tools and the model providers."
    seen = upstream.seen[-1]
    assert seen.path == f"/v1beta/models/{MODEL}:generateContent"
    assert seen.headers["x-goog-api-key"] == UPSTREAM_GEMINI_KEY
    assert ggw.token not in json.dumps(seen.headers) + seen.path
    ic, = ggw.interceptions("gem")
    assert (ic["provider"], ic["api"], ic["model"], ic["status"]) == (
        "gemini", "gemini.generate_content", MODEL, "completed")
    usage, = ggw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert (usage["input_tokens"], usage["output_tokens"], usage["cache_read_input_tokens"]) == (9, 14 + 21, 0)
    assert json.loads(usage["metadata"])["thoughtsTokenCount"] == 21
    # Priced from the package's data (gemini-2.5-flash: $0.30 in, $2.50 out per 1M; thoughts bill as output).
    assert usage["cost_usd"] == pytest.approx((9 * 0.30 + 35 * 2.50) / 1e6)
    price = json.loads(usage["price"])
    assert (price["model"], price["input"], price["output"]) == (MODEL, 0.30, 2.50)
    assert price["source"].startswith("genai-prices ")
    prompt, = ggw.sql(f"SELECT prompt FROM aibridge_user_prompts WHERE interception_id = '{ic['id']}'")
    assert prompt["prompt"] == "explain what an AI gateway does"
    thought, = ggw.sql(f"SELECT content FROM aibridge_model_thoughts WHERE interception_id = '{ic['id']}'")
    assert thought["content"].startswith("**Gateways**")


def test_streamed_call_arrives_chunk_by_chunk_and_is_recorded(ggw, upstream):
    cap = capture("gemini/simple.txtar")
    upstream.script(Reply.from_capture(cap, True, delay=0.05))
    gc = client(ggw)
    chunks = list(gc.models.generate_content_stream(model=MODEL, contents=contents(cap),
                                                    config=cap.request["generationConfig"]))
    assert "".join(c.text or "" for c in chunks) == "An AI gateway sits between your tools and the model providers."
    seen = upstream.seen[-1]
    assert seen.path == f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    ic, = ggw.interceptions("gem")
    assert ic["status"] == "completed" and ic["stream"] is True
    usage, = ggw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert (usage["input_tokens"], usage["output_tokens"]) == (9, 35)  # the last (cumulative) usage, once
    thought, = ggw.sql(f"SELECT content FROM aibridge_model_thoughts WHERE interception_id = '{ic['id']}'")
    assert thought["content"] == "**Gateways**\n\nThinking about what a gateway sits between."


@pytest.mark.parametrize("streaming", [False, True])
def test_function_calls_and_cached_tokens(ggw, upstream, streaming):
    cap = capture("gemini/single_tool_cached.txtar")
    upstream.script(Reply.from_capture(cap, streaming))
    gc = client(ggw)
    c = gc.models
    config = types.GenerateContentConfig(tools=cap.request["tools"])
    if streaming:
        calls = [fc for ch in c.generate_content_stream(model=MODEL, contents=contents(cap), config=config)
                 for fc in (ch.function_calls or [])]
    else:
        calls = c.generate_content(model=MODEL, contents=contents(cap), config=config).function_calls
    assert [(f.name, f.args) for f in calls] == [("get_weather", {"city": "Paris"})]
    ic, = ggw.interceptions("gem")
    tool, = ggw.sql(f"SELECT tool, input, injected FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}'")
    assert (tool["tool"], json.loads(tool["input"]), tool["injected"]) == ("get_weather", {"city": "Paris"}, False)
    usage, = ggw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert (usage["input_tokens"], usage["cache_read_input_tokens"], usage["output_tokens"]) == (1200 - 1024, 1024, 7)


def test_a_bad_token_is_refused_in_googles_error_format(ggw, upstream):
    gc = client(ggw, "aib_not-a-token")
    with pytest.raises(genai_errors.ClientError) as e:
        gc.models.generate_content(model=MODEL, contents="hi")
    assert e.value.code == 401 and e.value.status == "UNAUTHENTICATED"
    assert upstream.seen == []


def test_a_key_in_the_query_identifies_the_user_and_never_goes_upstream(ggw, upstream):
    cap = capture("gemini/simple.txtar")
    upstream.script(Reply.from_capture(cap, False))
    r = httpx.post(f"{ggw.url}/gemini/v1beta/models/{MODEL}:generateContent?key={ggw.token}",
                   json=cap.request, trust_env=False)
    assert r.status_code == 200
    seen = upstream.seen[-1]
    assert seen.path == f"/v1beta/models/{MODEL}:generateContent"
    assert seen.headers["x-goog-api-key"] == UPSTREAM_GEMINI_KEY
    assert ggw.interceptions("gem")[0]["status"] == "completed"


def test_upstream_errors_reach_the_sdk_and_are_recorded(ggw, upstream):
    upstream.script(Reply.json({"error": {"code": 429, "message": "Resource has been exhausted",
                                          "status": "RESOURCE_EXHAUSTED"}}, status=429))
    gc = client(ggw)
    with pytest.raises(genai_errors.ClientError) as e:
        gc.models.generate_content(model=MODEL, contents="hi")
    assert e.value.code == 429
    ic, = ggw.interceptions("gem")
    assert ic["status"] == "failed" and ic["http_status"] == 429 and "RESOURCE_EXHAUSTED" in ic["error"]


def test_model_listing_and_token_counts_pass_through_unrecorded(ggw, upstream):
    upstream.script(Reply.json({"models": [{"name": f"models/{MODEL}"}]}))
    upstream.script(Reply.json({"totalTokens": 9}))
    gc = client(ggw)
    c = gc.models
    assert [m.name for m in c.list()] == [f"models/{MODEL}"]
    assert c.count_tokens(model=MODEL, contents="explain what an AI gateway does").total_tokens == 9
    assert [s.headers["x-goog-api-key"] for s in upstream.seen] == [UPSTREAM_GEMINI_KEY] * 2
    assert ggw.sql("SELECT count(*) AS n FROM aibridge_interceptions")[0]["n"] == 0


def test_a_stream_without_sse_a_json_array_is_recorded(ggw, upstream):
    """streamGenerateContent without alt=sse answers one JSON array of responses: recorded, not refused."""
    cap = capture("gemini/simple.txtar")
    chunks = [json.loads(e.decode().removeprefix("data: ")) for e in Reply.from_capture(cap, True).events]
    upstream.script(Reply.json(chunks))
    r = httpx.post(f"{ggw.url}/gemini/v1beta/models/{MODEL}:streamGenerateContent",
                   headers={"x-goog-api-key": ggw.token}, json=cap.request, trust_env=False)
    assert r.status_code == 200 and r.json() == chunks
    ic, = ggw.interceptions("gem")
    assert ic["status"] == "completed"
    usage, = ggw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{ic['id']}'")
    assert (usage["input_tokens"], usage["output_tokens"]) == (9, 35)


@pytest.mark.parametrize("streaming", [False, True], ids=["blocking", "streaming"])
def test_central_mcp_tools_run_in_the_loop_and_the_client_sees_one_answer(own_gateway, upstream, streaming):
    from tests.support.mcp_server import McpTestServer

    server = McpTestServer().start()
    try:
        gw = own_gateway("gemini-mcp", providers=[
            {"name": "gemini", "type": "gemini", "base_url": upstream.url + "/", "key": UPSTREAM_GEMINI_KEY}],
            extra={"mcp_servers": [{"name": "coder", "url": server.url}], "mcp": {"list_timeout_seconds": 5}})
        token = gw.new_user("gemtools")
        cap = capture("gemini/single_injected_tool.txtar")
        upstream.script(Reply.from_capture(cap, streaming), Reply.from_capture(cap, streaming, "/tool-call"))
        gc = client(gw, token)
        if streaming:
            chunks = list(gc.models.generate_content_stream(model=MODEL, contents=contents(cap)))
            text = "".join(c.text or "" for c in chunks)
            calls = [f for c in chunks for f in (c.function_calls or [])]
            usage = chunks[-1].usage_metadata
        else:
            resp = gc.models.generate_content(model=MODEL, contents=contents(cap))
            text, calls, usage = resp.text, resp.function_calls or [], resp.usage_metadata
        assert text == "You have one workspace: dev (running)." and calls == []
        assert (usage.prompt_token_count, usage.candidates_token_count) == (310 + 402, 18 + 25)
        assert server.calls == [("coder_list_workspaces", {"owner": "admin"})]
        first, second = (s.json() for s in upstream.seen[-2:])
        decls = [d for t in first["tools"] for d in t.get("functionDeclarations", [])]
        assert "bmcp_coder_coder_list_workspaces" in {d["name"] for d in decls}
        assert all("parametersJsonSchema" in d for d in decls)
        assert second["contents"][-2]["parts"][0]["functionCall"]["name"] == "bmcp_coder_coder_list_workspaces"
        answer = second["contents"][-1]["parts"][0]["functionResponse"]
        assert answer["name"] == "bmcp_coder_coder_list_workspaces" and "result" in answer["response"]
        ic, = gw.interceptions("gemtools")
        assert ic["status"] == "completed"
        tool, = gw.sql(f"SELECT tool, input, injected, server_url FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}'")
        assert tool["injected"] and tool["server_url"] == server.url and json.loads(tool["input"]) == {"owner": "admin"}
        rounds = gw.sql(f"SELECT input_tokens, output_tokens FROM aibridge_token_usages WHERE interception_id = '{ic['id']}' ORDER BY input_tokens")
        assert [(r["input_tokens"], r["output_tokens"]) for r in rounds] == [(310, 18), (402, 25)]
    finally:
        server.stop()
