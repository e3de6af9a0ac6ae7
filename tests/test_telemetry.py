"""OpenTelemetry export (`telemetry:`, docs/telemetry.md): a real OTLP/HTTP receiver decoding the protobuf payloads,
real gateways exporting to it. One span per interception with the GenAI attributes and the recorded token counts,
the client's traceparent continued, content only when asked, a refusal's span with error.type, injected tool calls
and MCP gateway calls as `execute_tool` spans, the token metric, a collector that is down, the flush at shutdown."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time

import httpx
import pytest
import yaml

from aibridge_gw.apis import PROVIDERS
from tests.support.fixtures import capture
from tests.support.gateway import Gateway, free_port
from tests.support.mcp_server import McpTestServer
from tests.support.mock_upstream import Reply
from tests.support.otlp import OtlpReceiver
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client, responses_call

pytestmark = pytest.mark.timeout(180)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
DENY = {"name": "no-interns", "hook": "request", "action": "deny", "message": "interns may not",
        "when": 'user.name == "intern"'}


@pytest.fixture(scope="module")
def otlp():
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def mcp_server():
    s = McpTestServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tgw(tmp_path_factory, upstream, otlp, mcp_server):
    gw = Gateway(tmp_path_factory.mktemp("otel-gw"), upstream.url, extra={
        "telemetry": {"otlp_endpoint": otlp.url + "/", "export_interval_seconds": 0.5,
                      "headers": {"authorization": "Bearer collector-secret-token"}},
        "policies": {"rules": [DENY]},
        "mcp_servers": [{"name": "coder", "url": mcp_server.url, "tool_deny_regex": "^create_gist$"}],
        "mcp_access": [{"servers": ["coder"], "users": ["tooluser", "agent"]}],  # the others' calls get no injected tools
        "mcp": {"tool_timeout_seconds": 5, "list_timeout_seconds": 3},
    }).start()
    yield gw
    gw.stop()


def spans_of(otlp, iid, timeout=15.0):
    return otlp.wait_spans(lambda s: s.attributes.get("aibridge.interception.id") == iid, timeout)


def recorded_tokens(gw, iid) -> tuple[int, int, int, int]:
    rows = gw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{iid}'")
    assert rows
    i = sum(r["input_tokens"] for r in rows)
    r_ = sum(r["cache_read_input_tokens"] for r in rows)
    w = sum(r["cache_write_input_tokens"] for r in rows)
    return i + r_ + w, sum(r["output_tokens"] for r in rows), r_, w


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_an_anthropic_call_is_one_span_with_the_recorded_usage(tgw, mock, otlp, stream):
    name = f"anth-{'s' if stream else 'b'}"
    token = tgw.new_user(name)
    cap = capture("anthropic/simple.txtar")
    mock.script(Reply.from_capture(cap, stream))
    anthropic_call(anthropic_client(tgw, token), cap.request, stream)
    (ic,) = tgw.interceptions(name)
    (span,) = spans_of(otlp, ic["id"])
    a = span.attributes
    assert span.name == "chat claude-sonnet-4-0" and span.kind == 3  # CLIENT
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == "claude-sonnet-4-0"
    assert a["gen_ai.response.model"] == "claude-sonnet-4-20250514"
    assert a["gen_ai.response.id"] == "msg_01AibrSimple5Vq8Rm2Tx7Kd3"
    total_in, out, cache_read, cache_write = recorded_tokens(tgw, ic["id"])
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (total_in, out)
    assert (a["gen_ai.usage.cache_read.input_tokens"], a["gen_ai.usage.cache_creation.input_tokens"]) == (
        cache_read, cache_write)
    assert a["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert a["aibridge.user.name"] == name and a["aibridge.status"] == "completed" and a["aibridge.stream"] is stream
    assert a["server.address"] == "127.0.0.1" and "error.type" not in a and span.status_code != 2
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # content is off by default
    assert span.parent_span_id == ""  # no traceparent: a trace of its own
    assert span.resource["service.name"] == "aibridge"
    # The span covers the interception: from its start to its end as recorded.
    assert span.end_ns >= span.start_ns
    started = ic["started_at"]
    started = dt.datetime.fromisoformat(started) if isinstance(started, str) else started
    assert abs(span.start_ns / 1e9 - started.timestamp()) < 0.01
    # The collector's headers went with the export; no credential is an attribute.
    assert any(h.get("authorization") == "Bearer collector-secret-token" for h in otlp.headers)
    assert not any("SECRET" in str(v) or "collector-secret" in str(v) for v in a.values())


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_an_openai_chat_call_continues_the_clients_trace(tgw, mock, otlp, stream):
    name = f"oai-{'s' if stream else 'b'}"
    token = tgw.new_user(name)
    cap = capture("openai/chatcompletions/simple.txtar")
    mock.script(Reply.from_capture(cap, stream))
    client = openai_client(tgw, token, default_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    chat_call(client, cap.request, stream)
    (ic,) = tgw.interceptions(name)
    (span,) = spans_of(otlp, ic["id"])
    a = span.attributes
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT_ID
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.operation.name"] == "chat"
    assert span.name == f"chat {cap.request['model']}"
    total_in, out, cache_read, _ = recorded_tokens(tgw, ic["id"])
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (total_in, out)
    assert a["gen_ai.usage.cache_read.input_tokens"] == cache_read
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert "gen_ai.input.messages" not in a


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_a_responses_call_counts_its_cached_tokens_in_the_input(tgw, mock, otlp, stream):
    name = f"resp-{'s' if stream else 'b'}"
    token = tgw.new_user(name)
    cap = capture(f"openai/responses/{'streaming' if stream else 'blocking'}/cached_input_tokens.txtar")
    mock.script(Reply.from_capture(cap, stream))
    responses_call(openai_client(tgw, token), cap.request, stream)
    (ic,) = tgw.interceptions(name)
    (span,) = spans_of(otlp, ic["id"])
    a = span.attributes
    total_in, out, cache_read, _ = recorded_tokens(tgw, ic["id"])
    assert cache_read > 0 and a["gen_ai.usage.cache_read.input_tokens"] == cache_read
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (total_in, out)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.response.finish_reasons"] == ["completed"]


def test_a_bad_traceparent_starts_a_trace_of_its_own(tgw, mock, otlp):
    token = tgw.new_user("badtrace")
    cap = capture("anthropic/simple.txtar")
    mock.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(tgw, token, default_headers={"traceparent": "00-zzzz-nope-01"}), cap.request, False)
    (ic,) = tgw.interceptions("badtrace")
    (span,) = spans_of(otlp, ic["id"])
    assert span.parent_span_id == "" and len(span.trace_id) == 32


def test_a_refused_call_has_a_span_with_its_error_type(tgw, mock, otlp):
    token = tgw.new_user("intern")
    cap = capture("anthropic/simple.txtar")
    r = httpx.post(tgw.url + "/anthropic/v1/messages", json=cap.request, trust_env=False, timeout=30,
                   headers={"x-api-key": token, "anthropic-version": "2023-06-01"})
    assert r.status_code == 403 and not mock.seen
    (ic,) = tgw.interceptions("intern")
    assert ic["status"] == "rejected"
    (span,) = spans_of(otlp, ic["id"])
    assert span.attributes["error.type"] == "403" and span.attributes["aibridge.status"] == "rejected"
    assert span.status_code == 2 and "interns may not" in span.status_message
    assert "gen_ai.usage.input_tokens" not in span.attributes


def test_an_injected_tool_call_is_a_child_span(tgw, mock, otlp, mcp_server):
    token = tgw.new_user("tooluser")
    cap = capture("anthropic/single_injected_tool.txtar")
    mock.script(Reply.from_capture(cap, True), Reply.from_capture(cap, True, "/tool-call"))
    anthropic_call(anthropic_client(tgw, token), cap.request, True)
    assert mcp_server.calls[-1] == ("coder_list_workspaces", {"owner": "admin"})
    (ic,) = tgw.interceptions("tooluser")
    (span,) = spans_of(otlp, ic["id"])
    (tool,) = otlp.wait_spans(lambda s: s.parent_span_id == span.span_id)
    assert tool.name == "execute_tool bmcp_coder_coder_list_workspaces" and tool.trace_id == span.trace_id
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "bmcp_coder_coder_list_workspaces"
    assert tool.attributes["gen_ai.tool.call.id"] and tool.attributes["aibridge.mcp.server"] == "coder"
    assert span.start_ns <= tool.start_ns <= tool.end_ns <= span.end_ns
    assert "gen_ai.tool.call.arguments" not in tool.attributes  # content is off
    total_in, out, _, _ = recorded_tokens(tgw, ic["id"])  # both rounds
    assert (span.attributes["gen_ai.usage.input_tokens"], span.attributes["gen_ai.usage.output_tokens"]) == (
        total_in, out)


def test_an_mcp_gateway_call_is_a_span_continuing_the_agents_trace(tgw, otlp):
    token = tgw.new_user("agent")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "coder__coder_list_workspaces", "arguments": {"owner": "admin"}}}
    r = httpx.post(tgw.url + "/aibridge/mcp", json=body, trust_env=False, timeout=30, headers={
        "authorization": f"Bearer {token}", "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-06-18", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert r.status_code == 200, r.text
    (span,) = otlp.wait_spans(lambda s: s.attributes.get("aibridge.user.name") == "agent")
    assert span.name == "execute_tool coder__coder_list_workspaces"
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT_ID
    assert span.attributes["aibridge.mcp.server"] == "coder" and span.attributes["aibridge.mcp.outcome"] == "ok"


def test_token_usage_and_duration_metrics_arrive(tgw, mock, otlp):
    token = tgw.new_user("metered")
    cap = capture("anthropic/simple.txtar")
    mock.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(tgw, token), cap.request, False)
    points = otlp.wait_points(lambda p: p.metric == "gen_ai.client.token.usage"
                              and p.attributes.get("gen_ai.token.type") == "output"
                              and p.attributes.get("gen_ai.provider.name") == "anthropic")
    assert points and points[-1].unit == "{token}" and points[-1].count >= 1
    assert points[-1].attributes["gen_ai.operation.name"] == "chat"
    assert "aibridge.user.name" not in points[-1].attributes  # no per-user series
    durations = otlp.wait_points(lambda p: p.metric == "gen_ai.client.operation.duration")
    assert durations and durations[-1].unit == "s"


def test_content_is_exported_only_when_asked_and_spans_are_flushed_at_shutdown(tmp_path, upstream, mock, otlp):
    # A long export interval: the span can only arrive by the flush at shutdown.
    gw = Gateway(tmp_path / "content", upstream.url, extra={
        "telemetry": {"otlp_endpoint": otlp.url, "content": True, "export_interval_seconds": 600,
                      "service_name": "aibridge-content"}}).start()
    try:
        token = gw.new_user("talker")
        cap = capture("anthropic/simple.txtar")
        mock.script(Reply.from_capture(cap, True))
        anthropic_call(anthropic_client(gw, token), cap.request, True)
        (ic,) = gw.interceptions("talker")
    finally:
        gw.stop()
    (span,) = spans_of(otlp, ic["id"], timeout=5)
    assert span.resource["service.name"] == "aibridge-content"
    (msg,) = json.loads(span.attributes["gen_ai.input.messages"])
    assert msg["role"] == "user" and msg["parts"][0]["content"].startswith("explain what an AI gateway does")
    (out,) = json.loads(span.attributes["gen_ai.output.messages"])
    assert out["role"] == "assistant" and out["finish_reason"] == "end_turn"
    kinds = [p["type"] for p in out["parts"]]
    assert kinds[0] == "reasoning" and "text" in kinds
    assert any(p["type"] == "text" and p["content"] for p in out["parts"])
    # The metrics were flushed at shutdown too.
    assert otlp.wait_points(lambda p: p.metric == "gen_ai.client.token.usage"
                            and p.attributes.get("gen_ai.request.model") == "claude-sonnet-4-0", timeout=5)


def test_a_collector_that_is_down_costs_the_calls_nothing_and_a_reload_points_elsewhere(tmp_path, upstream, mock,
                                                                                        otlp):
    telemetry = {"otlp_endpoint": f"http://127.0.0.1:{free_port()}", "export_interval_seconds": 0.2,
                 "timeout_seconds": 1}
    gw = Gateway(tmp_path / "down", upstream.url, extra={"telemetry": telemetry}).start()
    try:
        token = gw.new_user("unbothered")
        cap = capture("anthropic/simple.txtar")
        t0 = time.monotonic()
        for stream in (False, True, False, True):
            mock.script(Reply.from_capture(cap, stream))
            anthropic_call(anthropic_client(gw, token), cap.request, stream)
        assert time.monotonic() - t0 < 5
        assert [i["status"] for i in gw.interceptions("unbothered", 4)] == ["completed"] * 4
        time.sleep(1.5)  # several failed exports
        # A reload with another `telemetry:` section: exported there from the next call on.
        cfg = yaml.safe_load(gw.config_path.read_text())
        cfg["telemetry"] = {**telemetry, "otlp_endpoint": otlp.url, "service_name": "aibridge-reloaded"}
        gw.config_path.write_text(yaml.safe_dump(cfg))
        before = gw.log().count("configuration reloaded")
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while gw.log().count("configuration reloaded") <= before:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        mock.script(Reply.from_capture(cap, False))
        anthropic_call(anthropic_client(gw, token), cap.request, False)
        last = gw.interceptions("unbothered", 5)[-1]
        (span,) = spans_of(otlp, last["id"])
        assert span.resource["service.name"] == "aibridge-reloaded"
    finally:
        t1 = time.monotonic()
        assert gw.stop() == 0
        assert time.monotonic() - t1 < 15  # the flush at shutdown gives up within its timeout
    log = gw.log()
    said = {line for line in log.splitlines() if "telemetry export" in line}
    assert 1 <= len(said) <= 4, said  # once a minute per exporter: no spam
    assert "Traceback" not in log


def test_every_provider_declares_its_gen_ai_provider_name():
    for ptype, p in PROVIDERS.items():
        assert isinstance(p.gen_ai_provider, str) and p.gen_ai_provider, ptype
        assert set(p.gen_ai_operations) <= set(p.apis), ptype
    assert PROVIDERS["gemini"].gen_ai_provider == "gcp.gemini"
    assert PROVIDERS["bedrock"].gen_ai_provider == "aws.bedrock"


def test_telemetry_is_off_by_default_and_the_collectors_headers_are_a_secret():
    from aibridge_gw.config import TelemetrySettings
    from aibridge_gw.config_model import ConfigProblems, validate

    assert TelemetrySettings().otlp_endpoint is None
    with pytest.raises(ConfigProblems) as e:
        validate({"telemetry": {"otlp_endpoint": "collector:4318"}})
    assert "telemetry.otlp_endpoint" in str(e.value)
    with pytest.raises(ConfigProblems) as e:
        validate({"telemetry": {"headers": {"authorization": 5}}})
    assert "5" not in str(e.value).split("(got")[-1] or "not shown" in str(e.value)
    assert "collector-secret" not in repr(TelemetrySettings(headers=(("authorization", "collector-secret"),)))


def test_sdk_log_lines_are_said_once_a_minute_per_exporter_without_credentials(caplog):
    import logging

    from aibridge_gw.telemetry import Telemetry, _SdkLogs

    handler = _SdkLogs()
    record = logging.LogRecord("opentelemetry.exporter.otlp.proto.http.trace_exporter", logging.ERROR, "", 0,
                               "Failed to export to %s", ("http://otel:hunter2secret@collector:4318",), None)
    with caplog.at_level(logging.INFO, logger="aibridge.telemetry"):
        for _ in range(50):
            handler.emit(record)
    said = [r for r in caplog.records if r.name == "aibridge.telemetry"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "hunter2secret" not in said[0].getMessage()
    off = Telemetry()  # no endpoint: every entry point does nothing
    assert not off.enabled
    off.interception(object(), status="completed")
    off.shutdown()
    # Client-chosen model names are a bounded set of metric attributes.
    assert off._model_attribute("gpt-4o") == "gpt-4o" and off._model_attribute("no\nway") == "_OTHER"
    for n in range(300):
        off._model_attribute(f"made-up-{n}")
    assert off._model_attribute("made-up-299") == "_OTHER" and off._model_attribute("gpt-4o") == "gpt-4o"


def test_a_gemini_span_in_process_with_reasoning_tokens_and_a_tool_child(otlp):
    """The Telemetry object alone (no gateway): a Gemini interception with thoughts tokens and an injected call."""
    from aibridge_gw.config import TelemetrySettings
    from aibridge_gw.flow.exchange import RequestInfo, ResponseSummary, TokenUsage
    from aibridge_gw.flow.recorder import Interception
    from aibridge_gw.telemetry import Telemetry, ToolRun

    t = Telemetry()
    t.configure(TelemetrySettings(otlp_endpoint=otlp.url, export_interval_seconds=0.2, content=True))
    try:
        started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2)
        ic = Interception(id="5f0c6a52-1f0e-4b39-9a51-000000000001", user_id="u", user_name="gem", provider_type="gemini",
                          provider_name="gemini", api="gemini.generate_content", client="", user_agent=None,
                          session_id="s-1", credential_kind="central", credential_hint=None, upstream_path="/x",
                          started_at=started, info=RequestInfo("gemini-2.5-pro", False, "hi", []),
                          traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01")
        now = time.time_ns()
        t.tool_call(ic.id, ToolRun("bmcp_coder_x", "call-1", "coder", now - 10**9, now - 5 * 10**8, None, "{}", "ok"))
        summary = ResponseSummary(model="gemini-2.5-pro-001", finish_reasons=["STOP"], output_text=["hello"],
                                  usages=[TokenUsage(None, 10, 7, 5, 0, {"thoughtsTokenCount": 3})])
        t.interception(ic, status="completed", summary=summary, http_status=200, ended_at=dt.datetime.now(dt.UTC))
    finally:
        t.shutdown()
    (span,) = spans_of(otlp, ic.id, timeout=5)
    a = span.attributes
    assert span.name == "generate_content gemini-2.5-pro" and span.trace_id == TRACE_ID
    assert a["gen_ai.provider.name"] == "gcp.gemini" and a["gen_ai.conversation.id"] == "s-1"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.cache_read.input_tokens"]) == (15, 5)
    assert a["gen_ai.usage.reasoning.output_tokens"] == 3 and a["gen_ai.response.finish_reasons"] == ["STOP"]
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"] == [{"type": "text", "content": "hello"}]
    (tool,) = otlp.wait_spans(lambda s: s.parent_span_id == span.span_id)
    assert tool.attributes["gen_ai.tool.call.id"] == "call-1" and tool.attributes["gen_ai.tool.call.result"] == "ok"
