"""AWS Bedrock through /bedrock: the official Anthropic SDK as the client, a loopback stand-in that checks every
request's SigV4 signature against a known secret and answers in Bedrock's formats (JSON, the binary event stream,
`x-amzn-ErrorType` errors). The same answers and exact usage as through /anthropic; the Bedrock model recorded."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time

import anthropic
import botocore.session
import pytest
from botocore.config import Config as BotoConfig
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError

from aibridge_gw.apis.bedrock.eventstream import ToSSE, chunk_frame, exception_frame
from aibridge_gw.config import ConfigError, parse_config
from tests.support.aws import (ACCESS_KEY, REGION, SECRET_KEY, bedrock_error, event_stream, signature_check,
                               signature_problem)
from tests.support.fixtures import capture, sse_events
from tests.support.gateway import BIN, ROOT, UPSTREAM_ANTHROPIC_KEY, Gateway
from tests.support.mcp_server import McpTestServer
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call
from tests.support.tls import tls_stand_in

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
    # Priced as the Bedrock model it ran on (the package's data knows Bedrock's model ids): the same rates.
    (via_cost,) = bgw.sql(f"SELECT cost_usd, price FROM aibridge_token_usages WHERE interception_id = '{via_ic['id']}'")
    (direct_cost,) = bgw.sql(f"SELECT cost_usd FROM aibridge_token_usages WHERE interception_id = '{direct_ic['id']}'")
    assert via_cost["cost_usd"] is not None and via_cost["cost_usd"] == pytest.approx(direct_cost["cost_usd"])
    assert json.loads(via_cost["price"])["source"].startswith("genai-prices ")
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


def test_a_routed_call_records_the_model_the_client_asked_for(own_gateway, upstream):
    """A route rule's model is mapped to its Bedrock id like any; the record keeps the client's own choice."""
    route = {"name": "to-haiku", "hook": "request", "when": 'model == "claude-sonnet-4-5"', "action": "route",
             "model": "claude-haiku-4-5"}
    gw = own_gateway("bedrock-route", providers=[bedrock_instance(upstream)], extra={"policies": {"rules": [route]}})
    upstream.check = signature_check
    upstream.script(Reply.json({"id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": "claude",
                                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}))
    token = gw.new_user("bed")
    out = anthropic.Anthropic(base_url=f"{gw.url}/bedrock", api_key=token, max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert out.content[0].text == "ok"
    assert upstream.seen[-1].path == "/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke"
    ic, = gw.interceptions("bed")
    assert ic["model"] == FAST and json.loads(ic["metadata"])["requested_model"] == "claude-sonnet-4-5"


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
    assert out.endswith(b'"type": "rate_limit_error", "message": "ThrottlingException: slow"}}\n\n')


# --- central MCP tools through Bedrock --------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_injected_tools_run_through_bedrock_with_every_round_signed(own_gateway, upstream, stream):
    cap = capture("anthropic/single_injected_tool.txtar")
    server = McpTestServer().start()
    try:
        gw = own_gateway("bedrock-mcp", providers=[bedrock_instance(upstream)], extra={
            "mcp_servers": [{"name": "coder", "url": server.url}], "mcp": {"tool_timeout_seconds": 5}})
        upstream.check = signature_check
        if stream:
            upstream.script(event_stream(sse_events(cap.sections["streaming"])),
                            event_stream(sse_events(cap.sections["streaming/tool-call"])))
        else:
            upstream.script(Reply.from_capture(cap, False), Reply.from_capture(cap, False, "/tool-call"))
        gw.token = gw.new_user("bmcp")
        result = anthropic_call(client(gw), cap.request, stream)
    finally:
        server.stop()
    assert server.calls == [("coder_list_workspaces", {"owner": "admin"})]
    first, second = upstream.seen
    op = "invoke-with-response-stream" if stream else "invoke"
    assert first.path == second.path == f"/model/{QUOTED}/{op}"
    assert signature_problem(first) is None and signature_problem(second) is None
    assert "bmcp_coder_coder_list_workspaces" in {t["name"] for t in first.json()["tools"]}
    assert second.json()["messages"][-1]["content"][0]["type"] == "tool_result"
    assert "model" not in second.json() and second.json()["anthropic_version"] == "bedrock-2023-05-31"
    if stream:
        assert all("bmcp_" not in e.model_dump_json() for e in result) and result[-1].type == "message_stop"
    else:
        assert "bmcp_" not in result.model_dump_json() and result.stop_reason == "end_turn"
    ic, = gw.interceptions("bmcp")
    assert ic["status"] == "completed" and ic["model"] == MODEL
    assert len(usages(gw, ic["id"])) == 2


# --- proxy mode: AWS SDK clients calling bedrock-runtime.<region>.amazonaws.com themselves --------------


@pytest.fixture(scope="module")
def tls_bedrock(tmp_path_factory):
    mock = tls_stand_in(tmp_path_factory.mktemp("bedrock-tls"), ["127.0.0.1"])
    yield mock
    mock.stop()


def proxy_bedrock_gateway(workdir, tls_bedrock, extra: dict | None = None, **over) -> Gateway:
    inst = {**bedrock_instance(tls_bedrock), "hosts": [f"bedrock-runtime.{REGION}.amazonaws.com"], **over}
    return Gateway(workdir, tls_bedrock.url, extra=extra, providers=[inst],
                   args=["--set", f"ssl_verify_upstream_trusted_ca={tls_bedrock.ca}"]).start()


def aws_sdk_client(gw, token: str, access_key: str, secret: str):
    """botocore's own bedrock-runtime client (what boto3 and the AWS CLI use), through the gateway as HTTPS proxy."""
    host = gw.url.split("://")[1]
    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name=REGION, aws_access_key_id=access_key, aws_secret_access_key=secret,
        verify=str(gw.ca), config=BotoConfig(proxies={"https": f"http://u:{token}@{host}"},
                                             retries={"max_attempts": 1}))


@pytest.mark.parametrize("mode", ["resign", "keep"])
def test_aws_sdk_in_proxy_mode_is_recorded_and_resigned_or_kept(tmp_path, tls_bedrock, mode):
    tls_bedrock.reset()
    gw = proxy_bedrock_gateway(tmp_path / mode, tls_bedrock, client_signature=mode)
    try:
        token = gw.new_user("aws")
        if mode == "keep":  # the user's own AWS keys sign the request, and that signature goes upstream
            sdk = aws_sdk_client(gw, token, ACCESS_KEY, SECRET_KEY)
        else:  # whatever the client signed with, the gateway signs again with the instance's keys
            sdk = aws_sdk_client(gw, token, "AKIAUSERSDUMMYKEY000", "users-dummy-secret")
        tls_bedrock.check = signature_check
        events = sse_events(capture("anthropic/simple.txtar").sections["streaming"])
        tls_bedrock.script(event_stream(events))
        body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                "messages": [{"role": "user", "content": "say hello"}]}
        out = sdk.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(body))
        got = [json.loads(base64.b64decode(e["chunk"]["bytes"]) if isinstance(e["chunk"]["bytes"], str)
                          else e["chunk"]["bytes"]) for e in out["body"]]
        assert [g["type"] for g in got] == [json.loads(e.decode().split("data: ", 1)[1])["type"] for e in events]
        seen = tls_bedrock.seen[-1]
        assert seen.path == f"/model/{QUOTED}/invoke-with-response-stream"
        assert signature_problem(seen) is None and token not in json.dumps(seen.headers)
        assert "proxy-authorization" not in seen.headers
        ic, = gw.interceptions("aws")
        assert (ic["provider"], ic["api"], ic["model"], ic["status"]) == ("bedrock", "bedrock.invoke", MODEL, "completed")
        assert ic["credential_kind"] == ("byok" if mode == "keep" else "centralized")
        assert ic["credential_hint"] == "AKIA…MPLE"
        assert usages(gw, ic["id"]) == [(21, 187, 0, 0)]
        prompt, = gw.sql(f"SELECT prompt FROM aibridge_user_prompts WHERE interception_id = '{ic['id']}'")
        assert prompt["prompt"] == "say hello"
    finally:
        gw.stop()
        tls_bedrock.reset()


def test_a_policy_route_moves_an_invoke_model_call_to_the_model_in_its_path(tmp_path, tls_bedrock):
    """InvokeModel names its model in the path (its body has no `model`): a route rule rewrites the path, and the
    request, signed again over it, reaches the model routed to with the body as the client sent it."""
    tls_bedrock.reset()
    route = {"name": "sonnet-to-haiku", "hook": "request", "when": 'model.contains("sonnet")', "action": "route",
             "model": FAST}
    gw = proxy_bedrock_gateway(tmp_path / "route", tls_bedrock, extra={"policies": {"rules": [route]}})
    try:
        token = gw.new_user("aws")
        sdk = aws_sdk_client(gw, token, "AKIAUSERSDUMMYKEY000", "users-dummy-secret")
        tls_bedrock.check = signature_check
        tls_bedrock.script(Reply.json({"id": "msg_1", "type": "message", "role": "assistant", "model": FAST,
                                       "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                                       "usage": {"input_tokens": 5, "output_tokens": 2}}))
        body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                "messages": [{"role": "user", "content": "say hello"}]}
        out = sdk.invoke_model(modelId=MODEL, body=json.dumps(body))
        assert json.loads(out["body"].read())["content"][0]["text"] == "hi"
        seen = tls_bedrock.seen[-1]
        assert seen.path == "/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/invoke"
        assert json.loads(seen.body) == body and signature_problem(seen) is None
        ic, = gw.interceptions("aws")
        assert (ic["model"], ic["status"]) == (FAST, "completed")
        assert json.loads(ic["metadata"])["requested_model"] == MODEL
    finally:
        gw.stop()
        tls_bedrock.reset()


def test_proxy_mode_without_proxy_credentials_is_refused(tmp_path, tls_bedrock):
    tls_bedrock.reset()
    gw = proxy_bedrock_gateway(tmp_path / "anon", tls_bedrock)
    try:
        host = gw.url.split("://")[1]
        sdk = botocore.session.get_session().create_client(
            "bedrock-runtime", region_name=REGION, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            verify=str(gw.ca), config=BotoConfig(proxies={"https": f"http://{host}"}, retries={"max_attempts": 1}))
        with pytest.raises(ClientError) as info:
            sdk.invoke_model(modelId=MODEL, body=b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,'
                                                 b'"messages":[{"role":"user","content":"hi"}]}')
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] in (401, 407)
        assert tls_bedrock.seen == []
    finally:
        gw.stop()


def test_other_bedrock_operations_are_refused_even_with_the_users_own_signature(tmp_path, tls_bedrock):
    """Converse would be a model call the gateway cannot read: never relayed unrecorded."""
    tls_bedrock.reset()
    gw = proxy_bedrock_gateway(tmp_path / "converse", tls_bedrock, client_signature="keep")
    try:
        sdk = aws_sdk_client(gw, gw.new_user("conv"), ACCESS_KEY, SECRET_KEY)
        with pytest.raises(ClientError) as info:
            sdk.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        assert tls_bedrock.seen == []
    finally:
        gw.stop()


def test_capture_redacts_and_replay_rebuilds_bedrock_rows(tmp_path, tls_bedrock):
    """Both ways in: base-URL (the client got server-sent events) and native proxy mode (Bedrock's frames)."""
    flows_dir = tmp_path / "flows"
    inst = {**bedrock_instance(tls_bedrock), "hosts": [f"bedrock-runtime.{REGION}.amazonaws.com"],
            "session_token": "FwoGZXIvYXdzSESSIONSECRET"}
    tls_bedrock.reset()
    gw = Gateway(tmp_path / "cap", tls_bedrock.url, providers=[inst],
                 args=["--set", f"ssl_verify_upstream_trusted_ca={tls_bedrock.ca}", "--set",
                       f"aibridge_flows={flows_dir}"]).start()
    try:
        gw.token = gw.new_user("rep")
        events = sse_events(capture("anthropic/simple.txtar").sections["streaming"])
        tls_bedrock.script(event_stream(events), event_stream(events))
        for _ in client(gw).messages.create(model="claude-sonnet-4-5", max_tokens=50, stream=True,
                                            messages=[{"role": "user", "content": "hi"}]):
            pass
        sdk = aws_sdk_client(gw, gw.token, "AKIAUSERSDUMMYKEY000", "users-dummy-secret")
        out = sdk.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(
            {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "messages": [{"role": "user", "content": "yo"}]}))
        list(out["body"])
        gw.interceptions("rep", 2)
    finally:
        gw.stop()
        tls_bedrock.reset()
    files = sorted(flows_dir.glob("*.flows"))
    raw = b"".join(f.read_bytes() for f in files)
    for secret in (gw.token, SECRET_KEY, "FwoGZXIvYXdzSESSIONSECRET", "users-dummy-secret"):
        assert secret.encode() not in raw
    cols = "CAST(id AS VARCHAR) AS id, api, model, status, stream, credential_kind"
    live = gw.sql(f"SELECT {cols} FROM aibridge_interceptions ORDER BY id")
    live_usage = gw.sql("SELECT CAST(interception_id AS VARCHAR) AS iid, input_tokens, output_tokens FROM aibridge_token_usages "
                        "ORDER BY 1")
    rebuilt = tmp_path / "rebuilt.duckdb"
    r = subprocess.run([str(BIN / "aibridge"), "replay", *map(str, files), "--db", str(rebuilt)], capture_output=True,
                       text=True, env={**os.environ, "AIBRIDGE_CONFIG": str(gw.config_path)}, timeout=120)
    assert r.returncode == 0 and "2 interception(s)" in r.stdout, r.stdout + r.stderr
    import duckdb
    conn = duckdb.connect(str(rebuilt), read_only=True)
    try:
        cur = conn.execute(f"SELECT {cols} FROM aibridge_interceptions ORDER BY id")
        names = [d[0] for d in cur.description]
        assert [dict(zip(names, row)) for row in cur.fetchall()] == live
        assert {r["api"] for r in live} == {"anthropic.messages", "bedrock.invoke"}
        cur = conn.execute("SELECT CAST(interception_id AS VARCHAR) AS iid, input_tokens, output_tokens FROM aibridge_token_usages "
                        "ORDER BY 1")
        names = [d[0] for d in cur.description]
        assert [dict(zip(names, row)) for row in cur.fetchall()] == live_usage != []
    finally:
        conn.close()


def test_bedrock_stream_is_complete_when_the_client_hangs_up_after_the_final_event(bgw, upstream):
    """The client reads message_stop (converted from Bedrock's last frame) and hangs up before the body ends."""
    from tests.support.wire import api_request, request_body

    reply = event_stream(sse_events(capture("anthropic/simple.txtar").sections["streaming"]))
    reply.tail_delay = 0.5
    upstream.script(reply)
    got = api_request(bgw.port, "/bedrock/v1/messages", bgw.token, request_body("anthropic"),
                      read_until=b"message_stop")
    assert b"event: message_stop" in got
    ic, = bgw.interceptions("bed")
    assert (ic["status"], ic["error"], ic["model"]) == ("completed", None, MODEL)
    assert signature_problem(upstream.seen[-1]) is None


def test_hostile_bedrock_requests_get_anthropic_format_errors_and_reach_nothing(bgw, upstream):
    from tests.support.wire import api_request, body_of, status_of

    for body in (b'{"model": 7, "max_tokens": 5, "messages": []}', b"\xff\xfe not json",
                 b'{"model": "claude", "messages": "nope"}', b"[" * 100_000 + b"]" * 100_000):
        raw = api_request(bgw.port, "/bedrock/v1/messages", bgw.token, body)
        assert status_of(raw) == 400, raw[:300]
        assert json.loads(body_of(raw))["error"]["type"] == "invalid_request_error"
    raw = api_request(bgw.port, "/bedrock/model/x%2F..%2F..%2Fother/converse", bgw.token, b"{}")
    assert status_of(raw) == 404
    assert upstream.seen == []


def test_a_policy_that_would_change_a_client_signed_request_refuses_it(tmp_path, tls_bedrock):
    """With `client_signature: keep` the user's own signature goes upstream: a redact (or route) would break it at
    AWS, so the gateway refuses the call, and the secret never leaves."""
    tls_bedrock.reset()
    rules = [{"name": "no-secrets-out", "hook": "request", "when": "size(secrets(prompt)) > 0", "action": "redact"}]
    gw = proxy_bedrock_gateway(tmp_path / "signed", tls_bedrock, extra={"policies": {"rules": rules}},
                               client_signature="keep")
    try:
        token = gw.new_user("aws")
        sdk = aws_sdk_client(gw, token, ACCESS_KEY, SECRET_KEY)
        body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                "messages": [{"role": "user", "content": "key AKIA4HKQ2MZP7XW3RN5T here"}]}
        with pytest.raises(botocore.exceptions.ClientError) as e:
            sdk.invoke_model(modelId=MODEL, body=json.dumps(body))
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert "signed by the client" in str(e.value)
        assert tls_bedrock.seen == []
    finally:
        gw.stop()
        tls_bedrock.reset()
