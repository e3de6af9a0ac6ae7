"""AWS Bedrock through /bedrock: the official Anthropic SDK as the client, a loopback stand-in that checks every
request's SigV4 signature against a known secret and answers in Bedrock's formats (JSON, the binary event stream,
`x-amzn-ErrorType` errors). The same answers and exact usage as through /anthropic; the Bedrock model recorded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import anthropic
import httpx
import pytest

from aibridge_gw.apis.bedrock.eventstream import CONTENT_TYPE
from botocore.eventstream import EventStreamBuffer
from tests.support.aws import ACCESS_KEY, REGION, SECRET_KEY, bedrock_error, event_stream, signature_check, signature_problem
from tests.support.fixtures import capture, sse_events
from aibridge_gw.config import ConfigError, parse_config
from tests.support.gateway import BIN, ROOT, UPSTREAM_ANTHROPIC_KEY
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call

MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
FAST = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
QUOTED = "us.anthropic.claude-sonnet-4-5-20250929-v1%3A0"


def bedrock_instance(upstream, **over) -> dict:
    return {"name": "bedrock", "type": "bedrock", "region": REGION, "base_url": upstream.url,
            "access_key": ACCESS_KEY, "access_key_secret": SECRET_KEY, "model": MODEL, "small_fast_model": FAST,
            **over}


@pytest.fixture
def bgw(own_gateway, upstream):
    """A gateway with /bedrock (signing) beside /anthropic (the same answers, for comparison)."""
    gw = own_gateway("bedrock", providers=[
        bedrock_instance(upstream),
        {"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/", "key": UPSTREAM_ANTHROPIC_KEY},
    ])
    upstream.check = lambda seen: signature_check(seen) if seen.path.startswith("/model/") else None
    gw.token = gw.new_user("bed")
    return gw


def client(gw, prefix="bedrock") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/{prefix}", api_key=gw.token, max_retries=0)


def usages(gw, iid):
    return [(u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"], u["cache_write_input_tokens"])
            for u in gw.sql(f"SELECT * FROM aibridge_token_usages WHERE interception_id = '{iid}' ORDER BY id")]


def with_invocation_metrics(events: list[bytes]) -> list[bytes]:
    """Bedrock adds its own metrics to message_stop; SDKs ignore the extra key."""
    last = json.loads(events[-1].decode().split("data: ", 1)[1])
    last["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": 4, "outputTokenCount": 58,
                                                "invocationLatency": 2113, "firstByteLatency": 481}
    return events[:-1] + [f"event: message_stop\ndata: {json.dumps(last)}\n\n".encode()]


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_same_answers_and_usage_as_through_anthropic_and_signed_over_the_exact_bytes(bgw, upstream, stream):
    cap = capture("anthropic/single_builtin_tool.txtar")
    section = cap.sections["streaming" if stream else "non-streaming"]

    def reply(bedrock: bool) -> Reply:
        if not stream:
            return Reply.json(json.loads(section))
        events = sse_events(section)
        return event_stream(with_invocation_metrics(events)) if bedrock else Reply.sse(events)

    request = {**cap.request, "metadata": {"user_id": "user_abc_account__session_0b6c7d1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e"},
               "service_tier": "auto"}
    upstream.script(reply(False))
    direct = anthropic_call(client(bgw, "anthropic"), request, stream)
    upstream.script(reply(True))
    via = anthropic_call(client(bgw), request, stream)
    if stream:
        assert [e.type for e in via] == [e.type for e in direct]
        assert [e.model_dump(exclude={"message": {"usage"}}) for e in via if e.type != "message_stop"] == \
               [e.model_dump(exclude={"message": {"usage"}}) for e in direct if e.type != "message_stop"]
    else:
        assert via.model_dump() == direct.model_dump()

    seen = upstream.seen[-1]
    assert seen.path == f"/model/{QUOTED}/{'invoke-with-response-stream' if stream else 'invoke'}"
    assert signature_problem(seen) is None
    assert f"Credential={ACCESS_KEY}/" in seen.headers["authorization"]
    body = seen.json()
    assert body["anthropic_version"] == "bedrock-2023-05-31"
    assert not {"model", "stream", "metadata", "service_tier"} & set(body)
    assert body["messages"] == cap.request["messages"]
    assert bgw.token not in json.dumps(seen.headers) and "x-api-key" not in seen.headers
    assert "anthropic-version" not in seen.headers

    direct_ic, via_ic = sorted(bgw.interceptions("bed"), key=lambda r: r["started_at"])
    assert (via_ic["provider"], via_ic["provider_name"], via_ic["api"], via_ic["status"]) == (
        "bedrock", "bedrock", "anthropic.messages", "completed")
    assert via_ic["model"] == MODEL and direct_ic["model"] == cap.request["model"]
    assert via_ic["credential_kind"] == "centralized" and via_ic["credential_hint"] == "AKIA…MPLE"
    assert json.loads(via_ic["metadata"])["requested_model"] == cap.request["model"]
    assert usages(bgw, via_ic["id"]) == usages(bgw, direct_ic["id"]) != []
    tools = bgw.sql(f"SELECT tool FROM aibridge_tool_usages WHERE interception_id = '{via_ic['id']}'")
    assert [t["tool"] for t in tools] == ["Read"]


def test_haiku_goes_to_the_small_fast_model_and_betas_are_filtered(bgw, upstream):
    upstream.script(Reply.json({"id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": "claude",
                                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}))
    out = client(bgw).messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14,claude-code-20250219,oauth-2025-04-20"})
    assert out.content[0].text == "ok"
    seen = upstream.seen[-1]
    assert seen.path == "/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke"
    assert seen.json()["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]
    assert "anthropic-beta" not in seen.headers and signature_problem(seen) is None
    ic, = bgw.interceptions("bed")
    assert ic["model"] == FAST and json.loads(ic["metadata"])["requested_model"] == "claude-haiku-4-5"


def test_stream_reaches_the_client_frame_by_frame(bgw, upstream):
    events = sse_events(capture("anthropic/simple.txtar").sections["streaming"])
    upstream.script(event_stream(events, delay=0.08))
    arrivals, t0 = [], time.monotonic()
    with client(bgw).messages.stream(model="claude-sonnet-4-5", max_tokens=50,
                                     messages=[{"role": "user", "content": "hi"}]) as s:
        for _ in s:
            arrivals.append(time.monotonic() - t0)
        final = s.get_final_message()
    assert final.stop_reason and final.usage.output_tokens > 0
    spread = 0.08 * (len(events) - 1)
    assert arrivals[1] < arrivals[-1] - spread * 0.5  # not gathered at the end


@pytest.mark.parametrize(("status", "name", "error"), [
    (429, "ThrottlingException", anthropic.RateLimitError),
    (400, "ValidationException", anthropic.BadRequestError),
    (403, "AccessDeniedException", anthropic.PermissionDeniedError),
    (404, "ResourceNotFoundException", anthropic.NotFoundError),
    (503, "ServiceUnavailableException", anthropic.InternalServerError),
])
def test_bedrock_errors_reach_the_client_in_anthropic_format(bgw, upstream, status, name, error):
    upstream.script(bedrock_error(status, name, "Too many requests, please wait before trying again."))
    with pytest.raises(error) as info:
        client(bgw).messages.create(model="claude-sonnet-4-5", max_tokens=10,
                                    messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == status
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["message"] == f"{name}: Too many requests, please wait before trying again."
    ic, = bgw.interceptions("bed")
    assert ic["status"] == "failed" and ic["http_status"] == status


def test_mid_stream_exception_ends_the_stream_with_an_anthropic_error(bgw, upstream):
    events = sse_events(capture("anthropic/simple.txtar").sections["streaming"])
    upstream.script(event_stream(events[:3], exception=("ThrottlingException", "slow down")))
    with pytest.raises(anthropic.APIStatusError) as info:
        for _ in client(bgw).messages.create(model="claude-sonnet-4-5", max_tokens=50, stream=True,
                                             messages=[{"role": "user", "content": "hi"}]):
            pass
    assert "ThrottlingException: slow down" in str(info.value)
    ic = bgw.wait_for("SELECT * FROM aibridge_interceptions WHERE status <> 'in_progress'")[0]
    assert ic["status"] == "failed" and "slow down" in ic["error"]
    assert usages(bgw, ic["id"])  # what was reported before the error is kept


def test_corrupt_frame_fails_the_stream_cleanly(bgw, upstream):
    reply = event_stream(sse_events(capture("anthropic/simple.txtar").sections["streaming"]))
    bad = bytearray(reply.events[2])
    bad[-1] ^= 0xFF  # the message CRC no longer matches
    reply.events[2] = bytes(bad)
    upstream.script(reply)
    with pytest.raises(anthropic.APIStatusError):
        for _ in client(bgw).messages.create(model="claude-sonnet-4-5", max_tokens=50, stream=True,
                                             messages=[{"role": "user", "content": "hi"}]):
            pass
    ic = bgw.wait_for("SELECT * FROM aibridge_interceptions WHERE status <> 'in_progress'")[0]
    assert ic["status"] == "failed" and "ChecksumMismatch" in ic["error"]


def test_default_credential_chain_signs_with_the_environment_keys(own_gateway, upstream):
    inst = bedrock_instance(upstream)
    del inst["access_key"], inst["access_key_secret"]
    gw = own_gateway("chain", providers=[inst], env={
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLE",
        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"})
    upstream.check = signature_check
    upstream.script(Reply.json({"id": "msg_bdrk_02", "type": "message", "role": "assistant", "model": "claude",
                                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}))
    gw.token = gw.new_user("chain")
    assert client(gw).messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                      messages=[{"role": "user", "content": "hi"}]).content[0].text == "ok"
    seen = upstream.seen[-1]
    assert seen.headers["x-amz-security-token"] == "FwoGZXIvYXdzEXAMPLE" and signature_problem(seen) is None


@pytest.mark.parametrize(("over", "message"), [
    ({"access_key_secret": None}, "set both access_key and access_key_secret"),
    ({"access_key": None}, "set both access_key and access_key_secret"),
    ({"region": "mars"}, "region: an AWS region such as us-east-1 is required"),
    ({"client_signature": "sometimes"}, "client_signature: must be 'resign'"),
    ({"access_key": None, "access_key_env": "AIBRIDGE_TEST_UNSET_VAR"}, "access_key_env: $AIBRIDGE_TEST_UNSET_VAR is not set"),
])
def test_bad_bedrock_config_is_a_clear_error(over, message):
    inst = {k: v for k, v in {**bedrock_instance(_Url()), **over}.items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"providers": [inst]})


class _Url:
    url = "https://bedrock-runtime.us-east-1.amazonaws.com"


def test_default_base_url_and_proxy_host_come_from_the_region():
    inst = {"name": "bedrock", "type": "bedrock", "region": "eu-west-3", "access_key": ACCESS_KEY,
            "access_key_secret": SECRET_KEY}
    prov, = parse_config({"providers": [inst]}).providers
    assert prov.base_url == "https://bedrock-runtime.eu-west-3.amazonaws.com"
    assert prov.hosts == ("bedrock-runtime.eu-west-3.amazonaws.com",)


def test_no_credentials_anywhere_fails_at_start_up(tmp_path):
    config = tmp_path / "aibridge.yaml"
    config.write_text(json.dumps({"providers": [{"name": "bedrock", "type": "bedrock", "region": REGION, "model": MODEL}],
                                  "storage": {"duckdb": str(tmp_path / "a.duckdb")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AIBRIDGE_CONFIG=str(config), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([str(BIN / "mitmdump"), "-s", str(ROOT / "addons" / "aibridge.py"), "--listen-host",
                           "127.0.0.1", "--listen-port", "0", "--set", f"confdir={tmp_path / 'certs'}"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no AWS credentials found" in proc.stdout + proc.stderr


def test_event_stream_framing_round_trips_through_botocores_parser():
    from aibridge_gw.apis.bedrock.eventstream import ToSSE, chunk_frame, exception_frame
    data = chunk_frame({"type": "ping"}) + exception_frame("ThrottlingException", "slow")
    buf = EventStreamBuffer()
    buf.add_data(data)
    first, second = list(buf)
    assert first.headers[":event-type"] == "chunk" and second.headers[":exception-type"] == "throttlingException"
    sse = ToSSE().decode(data[:7]) + ToSSE().decode(b"")  # nothing until a frame is complete
    assert sse == b""
    framing = ToSSE()
    out = b"".join(framing.decode(data[i:i + 5]) for i in range(0, len(data), 5))
    assert out.startswith(b'event: ping\ndata: {"type":"ping"}\n\n')
    assert b'"type": "rate_limit_error"' in out and CONTENT_TYPE
