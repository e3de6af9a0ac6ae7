"""Policies on requests: deny, route, redact, tag and monitor, in each wire API, through the official SDKs and a
real gateway; guardrails that hang follow their `fail`; a reload changes the rules; every decision is an audit row.
(The tool gate's end-to-end tests are in test_tool_gate.py.)"""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import openai
import pytest
import yaml
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.support.gateway import wire_api_providers as providers
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_client, openai_client
from tests.support.wire import anthropic_message, anthropic_stream, chat_completion, chat_stream, responses_stream

AWS_KEY = "AKIA4HKQ2MZP7XW3RN5T"  # shaped like an AWS access key id (detect-secrets' AWS plugin finds it)
RULES = [
    {"name": "no-forbidden", "hook": "request", "when": 'model == "forbidden-model"', "action": "deny",
     "message": "that model is not allowed here"},
    {"name": "opus-for-staff", "hook": "request",
     "when": 'model.startsWith("claude-opus") && !("staff" in user.groups)', "action": "route",
     "model": "claude-sonnet-4-5"},
    {"name": "pro-to-flash", "hook": "request", "when": 'model == "gemini-2.5-pro"', "action": "route",
     "model": "gemini-2.5-flash"},
    {"name": "no-secrets-out", "hook": "request", "when": "size(secrets(prompt)) > 0", "action": "redact"},
    {"name": "label-ci", "hook": "request", "when": '"x-ci" in headers && headers["x-ci"] == "1"', "action": "tag",
     "tags": {"origin": "ci"}},
    {"name": "watch-only", "hook": "request", "when": 'prompt.contains("monitor-me")', "action": "deny",
     "mode": "monitor", "message": "would be denied"},
]


@pytest.fixture
def pgw(own_gateway, upstream):
    gw = own_gateway("policies", providers=providers(upstream.url), extra={"policies": {"rules": RULES}})
    gw.token = gw.new_user("pol")
    return gw


def gemini_client(gw) -> genai.Client:
    return genai.Client(api_key=gw.token, http_options=types.HttpOptions(
        base_url=gw.url + "/gemini", retry_options=types.HttpRetryOptions(attempts=1)))


def gemini_answer(text: str = "fine") -> dict:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7},
            "modelVersion": "gemini-2.5-flash"}


def decisions(gw, n: int, where: str = "true") -> list[dict]:
    return gw.wait_for(f"SELECT * FROM aibridge_policy_decisions WHERE {where} ORDER BY created_at",
                       lambda rows: len(rows) >= n)


def every_text(gw) -> str:
    """Everything the audit tables hold, as text."""
    tables = [r["table_name"] for r in gw.sql(
        "SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'aibridge_%'")]
    return json.dumps([gw.sql(f"SELECT * FROM {t}") for t in tables], default=str)


# --- deny -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_deny_answers_403_in_anthropic_format_and_records_the_rule(pgw, upstream, stream):
    client = anthropic_client(pgw, pgw.token)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client.messages.create(model="forbidden-model", max_tokens=5, stream=stream,
                               messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "permission_error"
    assert e.value.body["error"]["message"] == "aibridge policy no-forbidden: that model is not allowed here"
    assert upstream.seen == []  # nothing reached the provider
    ic, = pgw.wait_for("SELECT * FROM aibridge_interceptions WHERE status = 'rejected'")
    assert ic["http_status"] == 403 and "no-forbidden" in ic["error"]
    d, = decisions(pgw, 1)
    assert (d["interception_id"], d["rule"], d["hook"], d["action"], d["enforced"]) == (
        ic["id"], "no-forbidden", "request", "deny", True)
    assert len(d["policy_version"]) == 12
    text = httpx.get(f"{pgw.url}/aibridge/metrics").text
    assert 'aibridge_policy_decisions_total{action="deny",rule="no-forbidden"} 1.0' in text


@pytest.mark.parametrize("stream", [False, True])
def test_deny_answers_403_to_chat_responses_and_gemini_clients(pgw, upstream, stream):
    oc = openai_client(pgw, pgw.token)
    with pytest.raises(openai.PermissionDeniedError) as e:
        oc.chat.completions.create(model="forbidden-model", stream=stream,
                                   messages=[{"role": "user", "content": "hi"}])
    assert "aibridge policy no-forbidden" in e.value.message
    with pytest.raises(openai.PermissionDeniedError):
        oc.responses.create(model="forbidden-model", input="hi", stream=stream)
    gc = gemini_client(pgw)
    with pytest.raises(genai_errors.ClientError) as g:
        if stream:
            list(gc.models.generate_content_stream(model="forbidden-model", contents="hi"))
        else:
            gc.models.generate_content(model="forbidden-model", contents="hi")
    assert g.value.code == 403 and "no-forbidden" in str(g.value)
    assert upstream.seen == []
    assert len(decisions(pgw, 3, "action = 'deny' AND enforced")) == 3


# --- route ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_route_sends_another_model_and_records_what_was_asked(pgw, upstream, stream):
    upstream.script(Reply.sse(anthropic_stream("routed")) if stream else Reply.json(anthropic_message("routed")))
    client = anthropic_client(pgw, pgw.token)
    out = client.messages.create(model="claude-opus-4-1", max_tokens=5, stream=stream,
                                 messages=[{"role": "user", "content": "hi"}])
    text = "".join(e.delta.text for e in out if e.type == "content_block_delta") if stream else out.content[0].text
    assert text == "routed"
    assert upstream.seen[-1].json()["model"] == "claude-sonnet-4-5"
    ic, = pgw.interceptions("pol")
    assert ic["model"] == "claude-sonnet-4-5" and ic["status"] == "completed"
    meta = json.loads(ic["metadata"])
    assert meta["requested_model"] == "claude-opus-4-1" and meta["policy_version"]
    d, = decisions(pgw, 1)
    assert (d["rule"], d["action"], d["enforced"]) == ("opus-for-staff", "route", True)


def test_route_rewrites_the_model_in_a_gemini_path(pgw, upstream):
    upstream.script(Reply.json(gemini_answer()))
    gc = gemini_client(pgw)
    assert gc.models.generate_content(model="gemini-2.5-pro", contents="hi").text == "fine"
    assert upstream.seen[-1].path == "/v1beta/models/gemini-2.5-flash:generateContent"
    ic, = pgw.interceptions("pol")
    assert ic["model"] == "gemini-2.5-flash"


def test_route_to_another_provider_instance_of_the_same_api(own_gateway, upstream):
    both = providers(upstream.url) + [
        {"name": "openai-eu", "type": "openai", "base_url": upstream.url + "/eu/v1/", "key": "sk-eu-upstream-key"}]
    rules = [{"name": "to-eu", "hook": "request", "when": 'user.name == "eu"', "action": "route",
              "provider": "openai-eu"}]
    gw = own_gateway("route-provider", providers=both, extra={"policies": {"rules": rules}})
    token = gw.new_user("eu")
    upstream.script(Reply.json(chat_completion("from eu", model="gpt-4.1")))
    out = openai_client(gw, token).chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == "from eu"
    seen = upstream.seen[-1]
    assert seen.path == "/eu/v1/chat/completions" and seen.headers["authorization"] == "Bearer sk-eu-upstream-key"
    ic, = gw.interceptions("eu")
    assert ic["provider_name"] == "openai-eu" and json.loads(ic["metadata"])["routed_from"] == "openai"


# --- redact ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_redact_masks_the_secret_upstream_and_no_table_holds_it(pgw, upstream, stream):
    upstream.script(Reply.sse(chat_stream("ok")) if stream else Reply.json(chat_completion("ok")))
    oc = openai_client(pgw, pgw.token)
    prompt = f"deploy with aws_access_key_id = {AWS_KEY} please"
    out = oc.chat.completions.create(model="gpt-4.1", stream=stream, messages=[{"role": "user", "content": prompt}])
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in out if c.choices) == "ok"
    sent = upstream.seen[-1].body.decode()
    assert AWS_KEY not in sent and "[REDACTED:aws-key]" in sent
    ic, = pgw.interceptions("pol")
    stored, = pgw.sql(f"SELECT prompt FROM aibridge_user_prompts WHERE interception_id = '{ic['id']}'")
    assert stored["prompt"] == "deploy with aws_access_key_id = [REDACTED:aws-key] please"
    d, = decisions(pgw, 1)
    assert (d["rule"], d["action"]) == ("no-secrets-out", "redact") and "aws-key" in d["detectors"]
    assert AWS_KEY not in every_text(pgw) and AWS_KEY not in pgw.log()


def test_redact_masks_a_responses_request_and_a_gemini_request(pgw, upstream):
    upstream.script(Reply.sse(responses_stream("ok")), Reply.json(gemini_answer()))
    oc = openai_client(pgw, pgw.token)
    list(oc.responses.create(model="gpt-5", input=f"key {AWS_KEY}", stream=True))
    gc = gemini_client(pgw)  # referenced while used: a collected client closes its session
    gc.models.generate_content(model="gemini-2.5-flash", contents=f"key {AWS_KEY}")
    assert all(AWS_KEY not in s.body.decode() for s in upstream.seen)
    assert len(upstream.seen) == 2
    assert AWS_KEY not in every_text(pgw)


# --- tag and monitor ------------------------------------------------------------------------------------


def test_tag_labels_the_interception_and_monitor_records_without_enforcing(pgw, upstream):
    upstream.script(Reply.json(anthropic_message("ok")))
    client = anthropic_client(pgw, pgw.token, default_headers={"x-ci": "1"})
    out = client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "monitor-me"}])
    assert out.content[0].text == "ok"  # the monitored deny changed nothing
    ic, = pgw.interceptions("pol")
    assert json.loads(ic["metadata"])["tags"] == {"origin": "ci"}
    rows = decisions(pgw, 2)
    assert {(r["rule"], r["action"], r["enforced"]) for r in rows} == {
        ("label-ci", "tag", True), ("watch-only", "deny", False)}


# --- guardrails -----------------------------------------------------------------------------------------


class _Guardrail:
    """A guardrail service on loopback: answers with `answer`, or hangs past any timeout."""

    def __init__(self) -> None:
        self.answer: dict | None = {"action": "allow"}
        self.seen: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                owner.seen.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                if owner.answer is None:
                    time.sleep(3)
                body = json.dumps(owner.answer or {"action": "allow"}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/check"


@pytest.fixture
def guardrail():
    g = _Guardrail()
    yield g
    g.server.shutdown()


def test_guardrails_deny_and_a_hung_one_follows_its_fail_setting(own_gateway, upstream, guardrail):
    policies = {"guardrails": [
        {"name": "dlp", "hook": "request", "url": guardrail.url, "timeout_ms": 300, "fail": "closed"}]}
    gw = own_gateway("guard", extra={"policies": policies})
    token = gw.new_user("g")
    oc = openai_client(gw, token)
    guardrail.answer = {"action": "deny", "message": "looks like customer data"}
    with pytest.raises(openai.PermissionDeniedError) as e:
        oc.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "the list"}])
    assert e.value.body["message"] == "aibridge policy dlp: looks like customer data"
    assert guardrail.seen[-1]["prompt"] == "the list" and guardrail.seen[-1]["user"]["name"] == "g"
    assert "authorization" not in json.dumps(guardrail.seen[-1]).lower()
    guardrail.answer = None  # hangs: closed refuses within the timeout
    started = time.monotonic()
    with pytest.raises(openai.PermissionDeniedError) as e:
        oc.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - started < 2.5 and "failed (no answer within 300 ms)" in e.value.message
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg["policies"]["guardrails"][0]["fail"] = "open"
    gw.config_path.write_text(yaml.safe_dump(cfg))
    before = gw.log().count("configuration reloaded")
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while gw.log().count("configuration reloaded") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    upstream.script(Reply.json(chat_completion("through")))
    out = oc.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "y"}])
    assert out.choices[0].message.content == "through"  # open: the call goes on, the failure is recorded
    rows = decisions(gw, 3)
    assert [(r["action"], r["enforced"]) for r in rows] == [("deny", True), ("error", True), ("error", False)]
    assert len({r["policy_version"] for r in rows}) == 2  # the reload made a new version


def test_a_bad_rule_refuses_the_config_with_the_rules_name(own_gateway, upstream, tmp_path):
    from aibridge_gw.config import ConfigError, parse_config

    bad = {"providers": providers(upstream.url), "policies": {"rules": [
        {"name": "typo", "hook": "request", "when": 'usr.name == "x"', "action": "deny"}]}}
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    assert "rule `typo`" in str(e.value) and "did you mean `user`" in str(e.value)


def test_a_rule_sees_the_users_groups_as_they_change(pgw, upstream):
    upstream.default = Reply.json(anthropic_message("ok"))
    client = anthropic_client(pgw, pgw.token)
    ask = {"model": "claude-opus-4-1", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    client.messages.create(**ask)
    assert upstream.seen[-1].json()["model"] == "claude-sonnet-4-5"  # not staff: routed
    assert pgw.cli("users", "groups", "set", "pol", "staff,ml").returncode == 0
    client.messages.create(**ask)
    assert upstream.seen[-1].json()["model"] == "claude-opus-4-1"  # staff now, at once


def test_policy_check_and_replay_rehearse_a_candidate_on_the_recorded_audit(pgw, upstream, tmp_path):
    tool_use = {"id": "msg_t", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                             "input": {"command": "rm -rf ./victim"}}],
                "usage": {"input_tokens": 10, "output_tokens": 4}}
    upstream.script(Reply.json(anthropic_message("ok")), Reply.json(tool_use), Reply.json(anthropic_message("ok")))
    client = anthropic_client(pgw, pgw.token)
    for prompt in ("hello", "clean up please", "hello again"):
        client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": prompt}])
    pgw.interceptions("pol", 3)
    pgw.wait_for("SELECT * FROM aibridge_tool_usages")
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump({"rules": [
        {"name": "no-hello", "hook": "request", "when": 'prompt.startsWith("hello")', "action": "deny"},
        {"name": "no-rm", "hook": "tool", "action": "deny",
         "when": 'tool.name == "Bash" && has(tool.input.command) && tool.input.command.contains("rm -rf")'},
    ], "guardrails": [{"name": "dlp", "hook": "request", "url": "http://127.0.0.1:9/x"}]}))
    checked = pgw.cli("policy", "check", str(candidate))
    assert checked.returncode == 0 and "2 rule(s), 1 guardrail(s)" in checked.stdout
    out = pgw.cli("policy", "replay", str(candidate), "--since", "1d", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    counts = {(o["rule"], o["action"], o["user"]): o["calls"] for o in report["outcomes"]}
    assert counts == {("no-hello", "deny", "pol"): 2, ("no-rm", "deny", "pol"): 1}
    assert report["calls"] == 3 and report["tool_calls"] == 1 and report["guardrails_not_called"] == ["dlp"]
    assert len(upstream.seen) == 3  # nothing was sent anywhere
    text = pgw.cli("policy", "replay", str(candidate)).stdout
    assert "no-hello [request] would deny: 2 call(s) of pol" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: a, hook: request, when: 'modl == 1', action: deny}]")
    refused = pgw.cli("policy", "check", str(bad))
    assert refused.returncode == 1 and "rule `a`: unknown variable `modl` (did you mean `model`?)" in refused.stderr


def test_redact_stored_masks_prompts_tool_inputs_and_capture_but_not_what_goes_upstream(own_gateway, upstream,
                                                                                        tmp_path):
    flows = tmp_path / "flows"
    gw = own_gateway("stored", extra={"policies": {"redact_stored": True}, "capture": {"directory": str(flows)}})
    token = gw.new_user("st")
    answer = {"id": "msg_s", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
              "usage": {"input_tokens": 9, "output_tokens": 3},
              "content": [{"type": "tool_use", "id": "toolu_s", "name": "Bash",
                           "input": {"command": f"export AWS_ACCESS_KEY_ID={AWS_KEY}"}}]}
    upstream.script(Reply.json(answer))
    client = anthropic_client(gw, token)
    out = client.messages.create(model="claude-x", max_tokens=5,
                                 messages=[{"role": "user", "content": f"use {AWS_KEY} for this"}])
    assert out.content[0].input["command"].endswith(AWS_KEY)  # the client's answer is the provider's
    assert AWS_KEY in upstream.seen[-1].body.decode()  # no rule masks the request itself
    ic, = gw.interceptions("st")
    tool, = gw.sql(f"SELECT input FROM aibridge_tool_usages WHERE interception_id = '{ic['id']}'")
    assert "[REDACTED:aws-key]" in tool["input"]
    assert AWS_KEY not in every_text(gw)
    gw.stop()  # the archive is flushed and closed
    archived = b"".join(p.read_bytes() for p in flows.glob("*.flows"))
    assert b"[REDACTED:aws-key]" in archived and AWS_KEY.encode() not in archived


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_a_rule_that_errors_on_a_call_follows_its_fail_setting(own_gateway, upstream, fail):
    rules = [{"name": "needs-team", "hook": "request", "action": "deny", "fail": fail,
              "when": 'headers["x-team"] == "blocked"'}]  # no such header: the condition errors
    gw = own_gateway(f"fail-{fail}", extra={"policies": {"rules": rules}})
    token = gw.new_user("f")
    upstream.script(Reply.json(chat_completion("went through")))
    oc = openai_client(gw, token)
    ask = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "x"}]}
    if fail == "closed":
        with pytest.raises(openai.PermissionDeniedError) as e:
            oc.chat.completions.create(**ask)
        assert "policy rule needs-team failed" in e.value.body["message"] and upstream.seen == []
    else:
        assert oc.chat.completions.create(**ask).choices[0].message.content == "went through"
    d, = decisions(gw, 1)
    assert (d["rule"], d["action"], d["enforced"]) == ("needs-team", "error", fail == "closed")


def test_a_route_to_an_instance_without_a_key_is_refused_cleanly(own_gateway, upstream):
    keyless = providers(upstream.url) + [
        {"name": "openai-spare", "type": "openai", "base_url": upstream.url + "/spare/v1/", "key": ""}]
    rules = [{"name": "to-spare", "hook": "request", "when": "true", "action": "route", "provider": "openai-spare"}]
    gw = own_gateway("route-keyless", providers=keyless, extra={"policies": {"rules": rules}})
    token = gw.new_user("k")
    with pytest.raises(openai.PermissionDeniedError) as e:
        openai_client(gw, token).chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    assert "cannot route to provider openai-spare: it has no upstream key" in e.value.body["message"]
    assert upstream.seen == []
