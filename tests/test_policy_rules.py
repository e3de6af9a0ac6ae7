"""Policy rules: config refusals that name the rule and the key, each action and the order they combine in,
monitor mode, failing open or closed, safe defaults for unknown facts, and a stable policy version; guardrails
against a loopback stand-in, including one that hangs."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import httpx
import pytest
import yaml
from aibridge_gw import config_model
from aibridge_gw.config import ConfigError, load_policies
from aibridge_gw.config_model import compile_condition
from aibridge_gw.policy.detectors import DETECTORS, Scan
from aibridge_gw.policy.guardrails import Guardrails
from aibridge_gw.policy.policing import CallFacts, Policing
from aibridge_gw.policy.rules import Policy, Verdict, policy_version

AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"

SPEC_EXAMPLE = {
    "mode": "enforce",
    "redact_stored": False,
    "rules": [
        {"name": "no-destructive-shell", "hook": "tool", "action": "deny",
         "when": 'tool.name == "Bash" && tool.input.command.contains("rm -rf")',
         "message": "destructive shell commands are not allowed here"},
        {"name": "opus-for-staff", "hook": "request", "action": "route", "model": "claude-sonnet-4-5",
         "when": 'model.startsWith("claude-opus") && !("staff" in user.groups)'},
        {"name": "no-secrets-out", "hook": "request", "when": "size(secrets(prompt)) > 0", "action": "redact"},
    ],
    "guardrails": [{"name": "corp-dlp", "hook": "request", "url": "http://dlp.internal/check", "timeout_ms": 300,
                    "fail": "open"}],
}


def rule(name: str, when: str = "true", action: str = "deny", hook: str = "request", **extra) -> dict:
    return {"name": name, "hook": hook, "when": when, "action": action, **extra}


def policy(*rules: dict, **section) -> Policy:
    return Policy(config_model.validate({"policies": {"rules": list(rules), **section}}).policies)


def problems(raw: dict) -> list[str]:
    with pytest.raises(config_model.ConfigProblems) as e:
        config_model.validate(raw)
    return e.value.problems


@pytest.mark.parametrize(("rules", "message"), [
    ([{**rule("a"), "mesage": "x"}],
     "policies.rules[0].mesage: unknown key; did you mean `policies.rules[0].message`?"),
    ([rule("a"), rule("broken", when='model == "x" &&')],
     "policies.rules[1].when: rule `broken`: CEL does not compile: 1:16: Syntax error"),
    ([rule("typo", when='usr.name == "bob"')],
     "policies.rules[0].when: rule `typo`: unknown variable `usr` (did you mean `user`?)"),
    ([rule("typo", when="size(secret(prompt)) > 0")],
     "policies.rules[0].when: rule `typo`: unknown function `secret` (did you mean `secrets`?)"),
    ([rule("cheaper", action="route")], "policies.rules[0]: rule `cheaper`: route needs a model or a provider"),
    ([rule("same"), rule("other"), rule("same", hook="tool")], "policies.rules[2]: name `same` is already used by "
                                                               "rules[0]"),
    ([rule("late", hook="response")], "policies.rules[0]: rule `late`: deny cannot act on a response"),
    ([rule("label", action="tag")], "policies.rules[0]: rule `label`: tag needs tags"),
    ([rule("odd", action="deny", model="x")], "policies.rules[0]: rule `odd`: model and provider are route targets"),
    ([rule("h", hook="prompt")], "policies.rules[0].hook: Input should be 'request', 'tool' or 'response'"),
    ([rule("f", fail="maybe")], "policies.rules[0].fail: Input should be 'open' or 'closed'"),
])
def test_a_bad_rule_is_refused_naming_its_place_and_reason(rules, message):
    assert any(message in p for p in problems({"policies": {"rules": rules}})), problems({"policies": {"rules": rules}})


def test_a_guardrail_may_not_share_a_rules_name_and_the_two_policy_sources_exclude_each_other():
    raw = {"policies": {"rules": [rule("dlp")], "guardrails": [{"name": "dlp", "hook": "request",
                                                                 "url": "http://127.0.0.1:1/"}]}}
    assert problems(raw) == ["policies.guardrails[0]: name `dlp` is already used by rules[0]"]
    assert problems({"policies": {"rules": [rule("a")]}, "policies_file": "p.yaml"}) == [
        "policies_file: set policies or policies_file, not both"]


def test_the_issue_example_loads_inline_and_from_a_policies_file_as_the_same_version(tmp_path):
    inline = config_model.validate({"policies": SPEC_EXAMPLE})
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(SPEC_EXAMPLE))
    assert config_model.validate({"policies_file": str(path)}).policies_file == str(path)
    assert Policy(load_policies(path)).version == Policy(inline.policies).version
    path.write_text("rules:\n  - {name: x, hook: request, when: 'true', action: dney}\n")
    with pytest.raises(ConfigError, match=r"policies\.rules\[0\]\.action: Input should be"):
        load_policies(path)


def test_the_version_is_a_content_hash_stable_across_key_order_and_spelled_defaults():
    base = config_model.validate({"policies": SPEC_EXAMPLE}).policies
    reordered = {k: SPEC_EXAMPLE[k] for k in reversed(list(SPEC_EXAMPLE))}
    reordered["rules"] = [dict(reversed(list(r.items()))) for r in SPEC_EXAMPLE["rules"]]
    defaults_omitted = {k: v for k, v in SPEC_EXAMPLE.items() if k not in ("mode", "redact_stored")}
    changed = {**SPEC_EXAMPLE, "mode": "monitor"}
    version = policy_version(base)
    assert len(version) == 12 and int(version, 16) >= 0
    assert policy_version(config_model.validate({"policies": reordered}).policies) == version
    assert policy_version(config_model.validate({"policies": defaults_omitted}).policies) == version
    assert policy_version(config_model.validate({"policies": changed}).policies) != version


def test_deny_refuses_the_tool_call_it_names_and_lets_others_through():
    p = Policy(config_model.validate({"policies": SPEC_EXAMPLE}).policies)
    verdict = p.evaluate("tool", {"tool": {"name": "Bash", "input": '{"command": "rm -rf /tmp/x"}'}})
    assert not verdict.allowed
    assert verdict.denied.message == "destructive shell commands are not allowed here"
    assert [d.as_record() for d in verdict.decisions] == [
        {"rule": "no-destructive-shell", "hook": "tool", "action": "deny", "enforced": True, "detectors": [],
         "message": "destructive shell commands are not allowed here"}]
    assert p.evaluate("tool", {"tool": {"name": "Bash", "input": {"command": "ls -la"}}}).allowed
    assert p.evaluate("tool", {"tool": {"name": "Read", "input": "not json"}}).decisions == []
    assert p.evaluate("request", {"model": "claude-sonnet-4-5"}).decisions == []  # other hooks' rules do not run


def test_route_rewrites_the_model_for_non_staff_and_the_first_route_wins():
    p = policy(rule("opus-for-staff", 'model.startsWith("claude-opus") && !("staff" in user.groups)', "route",
                    model="claude-sonnet-4-5"),
               rule("everything-to-eu", "true", "route", provider="anthropic-eu"))
    v = p.evaluate("request", {"model": "claude-opus-4-1", "user": {"name": "bob", "groups": ["eng"]}})
    assert (v.model, v.provider) == ("claude-sonnet-4-5", None)
    assert [(d.rule, d.action, d.enforced) for d in v.decisions] == [
        ("opus-for-staff", "route", True), ("everything-to-eu", "route", False)]
    v = p.evaluate("request", {"model": "claude-opus-4-1", "user": {"name": "ann", "groups": ["staff"]}})
    assert (v.model, v.provider) == (None, "anthropic-eu")


def test_allow_stops_evaluation_and_the_first_deny_wins():
    p = policy(rule("tag-all", action="tag", tags={"seen": "yes"}),
               rule("admins-may", 'user.role == "admin"', "allow"),
               rule("no-opus", 'model.contains("opus")', message="no opus"),
               rule("no-anything", message="nothing"))
    admin = p.evaluate("request", {"model": "claude-opus-4", "user": {"role": "admin"}})
    assert admin.allowed and [d.rule for d in admin.decisions] == ["tag-all", "admins-may"]
    assert admin.tags == {"seen": "yes"}
    other = p.evaluate("request", {"model": "claude-opus-4", "user": {"role": "dev"}})
    assert other.denied.rule == "no-opus" and [d.rule for d in other.decisions] == ["tag-all", "no-opus"]


def test_redact_and_tag_accumulate_and_decisions_name_detector_types_never_the_secret():
    p = policy(rule("no-secrets-out", "size(secrets(prompt)) > 0", "redact"),
               rule("no-cards", '"card" in pii(prompt)', "redact"),
               rule("label-a", action="tag", tags={"team": "a", "tier": "1"}),
               rule("label-b", action="tag", tags={"team": "b", "cost": "high"}))
    prompt = f"deploy with {AWS_KEY_ID}, card 4111 1111 1111 1111"
    v = p.evaluate("request", {"prompt": prompt})
    assert v.allowed and v.redact == ("secrets", "pii")
    assert v.tags == {"team": "a", "tier": "1", "cost": "high"}  # the first rule to set a name wins
    assert [(d.rule, d.detectors) for d in v.decisions[:2]] == [("no-secrets-out", ("aws-key",)),
                                                                ("no-cards", ("card",))]
    assert AWS_KEY_ID not in repr(v)
    clean = p.evaluate("request", {"prompt": "hello"})
    assert clean.redact == () and [d.rule for d in clean.decisions] == ["label-a", "label-b"]


def test_a_redact_rule_without_a_detector_in_its_condition_masks_with_all_of_them():
    v = policy(rule("mask-for-contractors", '"contractors" in user.groups', "redact")).evaluate(
        "request", {"user": {"groups": ["contractors"]}})
    assert v.redact == ("secrets", "pii")


def test_monitor_mode_records_every_decision_and_changes_nothing():
    rules = (rule("no-opus", 'model.contains("opus")'), rule("cheaper", action="route", model="m"),
             rule("mask", "true", "redact"), rule("label", action="tag", tags={"a": "b"}))
    v = policy(*rules, mode="monitor").evaluate("request", {"model": "claude-opus-4"})
    assert v.allowed and (v.model, v.redact, v.tags) == (None, (), {})
    assert [(d.rule, d.action, d.enforced) for d in v.decisions] == [
        ("no-opus", "deny", False), ("cheaper", "route", False), ("mask", "redact", False), ("label", "tag", False)]


def test_a_rules_own_mode_overrides_the_policies_mode():
    trial = policy(rule("trial-deny", mode="monitor"), rule("real-deny", message="real"))
    v = trial.evaluate("request", {})
    assert v.denied.rule == "real-deny" and [(d.rule, d.enforced) for d in v.decisions] == [
        ("trial-deny", False), ("real-deny", True)]
    enforced_in_monitor = policy(rule("strict", mode="enforce"), mode="monitor")
    assert enforced_in_monitor.evaluate("request", {}).denied.rule == "strict"


def test_a_rule_that_errors_fails_closed_by_default_and_open_when_asked():
    missing_field = 'tool.input.path.startsWith("/etc")'
    closed = policy(rule("etc", missing_field, hook="tool"), rule("after", hook="tool", action="tag",
                                                                    tags={"x": "y"}))
    v = closed.evaluate("tool", {"tool": {"name": "Read", "input": {"file": "/etc/passwd"}}})
    assert not v.allowed and v.denied.action == "error" and v.denied.rule == "etc"
    assert v.denied.message == "policy rule etc failed (no field 'path'); refused because it fails closed"
    assert [d.rule for d in v.decisions] == ["etc"]
    opened = policy(rule("etc", missing_field, hook="tool", fail="open"),
                    rule("after", hook="tool", action="tag", tags={"x": "y"}))
    v = opened.evaluate("tool", {"tool": {"name": "Read", "input": {"file": "/etc/passwd"}}})
    assert v.allowed and v.tags == {"x": "y"}
    assert [(d.rule, d.action, d.enforced) for d in v.decisions] == [("etc", "error", False), ("after", "tag", True)]
    monitored = policy(rule("etc", missing_field, hook="tool", mode="monitor"))
    assert monitored.evaluate("tool", {"tool": {"input": {}}}).allowed


def test_text_cel_cannot_hold_is_still_evaluated_and_a_value_it_cannot_take_follows_fail():
    # A lone surrogate is valid JSON ("\udc00") and what a header byte that is not UTF-8 decodes to; CEL refuses it.
    prompt = json.loads('"please run forbidden \\udc00 now"')
    p = policy(rule("no-forbidden", 'prompt.contains("forbidden")'),
               rule("ci", '"x-ci" in headers && headers["x-ci"].startsWith("1")', "tag", tags={"origin": "ci"}))
    v = p.evaluate("request", {"prompt": prompt, "headers": {"x-ci": "1\udce9"}})
    assert v.denied is not None and v.denied.rule == "no-forbidden" and v.denied.action == "deny"
    assert p.evaluate("request", {"prompt": "fine", "headers": {"x-ci": "1\udce9"}}).tags == {"origin": "ci"}
    assert p.evaluate("request", {"prompt": "fine"}).allowed  # nothing stale from the calls before
    # A value CEL cannot take at all: each rule fails as its `fail` says, never an exception out of evaluate.
    odd = {"messages": [{None: "x"}]}
    closed = policy(rule("m", "size(messages) > 5"), rule("after", action="tag", tags={"x": "y"}))
    v = closed.evaluate("request", odd)
    assert v.denied is not None and v.denied.rule == "m" and v.denied.action == "error"
    opened = policy(rule("m", "size(messages) > 5", fail="open"), rule("after", "true", "tag", fail="open",
                                                                       tags={"x": "y"}))
    v = opened.evaluate("request", odd)
    assert v.allowed and [(d.rule, d.action) for d in v.decisions] == [("m", "error"), ("after", "error")]
    v = policy(rule("tool", 'tool.input.command.contains("rm")', hook="tool")).evaluate(
        "tool", {"tool": {"name": "Bash", "input": '{"command": "rm -rf / \\udc00"}'}})
    assert v.denied is not None and v.denied.action == "deny"


def test_a_condition_that_is_not_a_boolean_is_an_error():
    v = policy(rule("stringy", "model")).evaluate("request", {"model": "gpt-4.1"})
    assert v.denied.action == "error" and "not a boolean" in v.denied.message


def test_every_declared_variable_has_a_safe_default():
    every = ('user.name == "" && user.id == "" && user.role == "" && size(user.groups) == 0 && client == "" '
             '&& session == "" && provider == "" && api == "" && model == "" && prompt == "" '
             '&& size(messages) == 0 && size(tools) == 0 && size(headers) == 0 && tool.name == "" '
             '&& size(tool.input) == 0 && !tool.injected && usage.input_tokens == 0 && usage.output_tokens == 0 '
             '&& usage.cache_read_input_tokens == 0 && usage.cache_write_input_tokens == 0 '
             '&& size(secrets(prompt)) == 0 && size(pii(prompt)) == 0')
    p = policy(rule("defaults", every, "tag", hook="response", tags={"ok": "yes"}))
    assert p.evaluate("response", {}).tags == {"ok": "yes"}
    assert p.evaluate("response", {"user": {"name": None, "groups": None}, "tool": {"input": ""}}).tags == {"ok": "yes"}


def test_facts_reach_conditions_in_their_documented_shape():
    p = policy(rule("shape", 'headers["x-team"] == "ml" && "Bash" in tools && tool.input.command == "ls" '
                             '&& usage.output_tokens > 10 && messages[0].role == "user" && tool.injected',
                    "tag", hook="tool", tags={"ok": "yes"}),
               rule("raw-input", 'tool.input == "plain text"', "tag", hook="tool", tags={"raw": "yes"}))
    v = p.evaluate("tool", {"headers": {"X-Team": "ml"}, "tools": ["Bash", "Read"], "usage": {"output_tokens": 11},
                            "tool": {"name": "Bash", "input": '{"command": "ls"}', "injected": True},
                            "messages": [{"role": "user", "content": "hi"}]})
    assert v.tags == {"ok": "yes"}
    assert p.evaluate("tool", {"tool": {"input": "plain text"}}).tags == {"raw": "yes"}


def test_each_call_sees_its_own_values_even_when_the_caller_reuses_and_mutates_them():
    p = policy(rule("staff-only", '!("staff" in user.groups)'),
               rule("secret-prompt", "size(secrets(prompt)) > 0"))
    user = {"name": "bob", "groups": ["eng"]}
    assert not p.evaluate("request", {"user": user}).allowed
    user["groups"].append("staff")
    assert p.evaluate("request", {"user": user}).allowed
    user["groups"].remove("staff")
    assert not p.evaluate("request", {"user": user}).allowed
    staff = {"user": {"groups": ["staff"]}}
    assert not p.evaluate("request", {**staff, "prompt": f"key {AWS_KEY_ID}"}).allowed
    assert p.evaluate("request", {**staff, "prompt": "no key"}).allowed


def test_a_requests_scan_is_shared_with_the_caller():
    scan = Scan()
    prompt = f"key {AWS_KEY_ID}"
    policy(rule("s", "size(secrets(prompt)) > 0", "redact")).evaluate("request", {"prompt": prompt}, scan)
    assert [f.type for f in scan.findings("secrets", prompt)] == ["aws-key"]


def test_ten_rules_evaluate_well_within_a_loose_bound():
    rules = [rule(f"r{n}", f'model.startsWith("claude-opus-{n}") && !("staff" in user.groups)', "route",
                  model="m") for n in range(9)] + [rule("s", "size(secrets(prompt)) > 0", "redact")]
    p = policy(*rules)
    facts = {"model": "claude-sonnet-4-5", "user": {"name": "bob", "groups": ["eng"]}, "prompt": "hello " * 1000}
    scan = Scan()
    times = []
    for _ in range(200):
        started = time.perf_counter()
        p.evaluate("request", facts, scan)
        times.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.005  # loose, never flaky: measured numbers are in the commit report


def policing_of(*rules: dict) -> Policing:
    return Policing(config_model.validate({"policies": {"rules": list(rules)}}).policies, lambda *a: None,
                    httpx.AsyncClient())


def facts_of(**more) -> CallFacts:
    return CallFacts("0e1a6f4e-5d3c-4b2a-9f8e-7d6c5b4a3f21", {"name": "bob", "id": "u1"}, "", "", "anthropic",
                     "anthropic.messages", "claude-sonnet-4-5", "hi", [{"role": "user", "content": "hi"}], [], {},
                     **more)


def test_a_large_requests_scan_on_a_thread_never_holds_up_rules_on_the_event_loop(monkeypatch):
    """Detectors over a large request run on a worker thread; the tool gate's rules (and small requests') run on
    the event loop meanwhile, and must not wait for that scan."""
    policing = policing_of(rule("no-secrets", "size(secrets(messages)) > 0", "redact"),
                           rule("no-rm", 'tool.input.command.contains("rm -rf")', hook="tool"))
    scanning = threading.Event()

    def slow(text):
        scanning.set()
        time.sleep(1.0)
        return []

    monkeypatch.setitem(DETECTORS, "secrets", slow)

    async def main():
        task = asyncio.create_task(policing.request(facts_of(), {"messages": []}, 10**6))
        while not scanning.is_set():
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        denied = policing.tool(facts_of(), "Bash", '{"command": "rm -rf /"}', "c1", injected=False)
        elapsed = time.perf_counter() - started
        await task
        return denied, elapsed

    denied, elapsed = asyncio.run(main())
    assert denied is not None and denied.rule == "no-rm"
    assert elapsed < 0.5  # not the scan's second


def test_rules_reading_a_large_conversation_run_off_the_event_loop_at_request_and_response(monkeypatch):
    """Converting a whole conversation into CEL costs milliseconds per MB: with a large request, the request and
    response hooks evaluate on a worker thread (a small one stays on the loop)."""
    policing = policing_of(rule("long", "size(messages) > 1000", "tag", tags={"long": "yes"}),
                           rule("late", "size(messages) > 1000", "tag", hook="response", tags={"late": "yes"}))
    where = []
    evaluate = policing.policy.evaluate

    def spy(*args, **kwargs):
        where.append(threading.current_thread() is threading.main_thread())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(policing.policy, "evaluate", spy)

    async def main():
        await policing.request(facts_of(), {"messages": []}, 10)
        await policing.response(facts_of(), {}, None)
        await policing.request(facts_of(size=10**6), {"messages": []}, 10**6)
        await policing.response(facts_of(size=10**6), {}, None)

    asyncio.run(main())
    assert where == [True, True, False, False]


class GuardrailStandIn:
    """A guardrail service on 127.0.0.1: the path chooses the answer (/hang never answers); it keeps what it got."""

    ANSWERS = {
        "/allow": (200, {"action": "allow"}),
        "/deny": (200, {"action": "deny", "message": "DLP: customer data"}),
        "/tag": (200, {"action": "tag", "tags": {"dlp": "checked"}}),
        "/redact": (200, {"action": "redact", "detectors": ["pii"]}),
        "/garbage": (200, "not a decision"),
        "/bad-action": (200, {"action": "explode"}),
        "/error": (500, {"action": "allow"}),
    }

    def __init__(self) -> None:
        self.received: list[tuple[str, dict, dict]] = []
        self.handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())
        try:
            await self._answer(reader, writer)
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        path = head[0].split(" ")[1]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        self.received.append((path, json.loads(await reader.readexactly(int(headers["content-length"]))), headers))
        if path == "/hang":
            await asyncio.sleep(60)
        status, answer = self.ANSWERS[path]
        body = json.dumps(answer).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()


def guardrails_of(base: str, *entries: dict, **section) -> Guardrails:
    items = [{"hook": "request", "timeout_ms": 2000, **e, "url": base + e["url"]} for e in entries]
    return Guardrails(config_model.validate({"policies": {"guardrails": items, **section}}).policies)


@pytest.mark.integration  # a loopback HTTP stand-in
def test_guardrails_are_posted_the_facts_and_their_answers_combine_like_rules():
    async def main():
        stand_in = GuardrailStandIn()
        async with stand_in as base:
            g = guardrails_of(base, {"name": "label", "url": "/tag"}, {"name": "dlp", "url": "/deny",
                                                                        "headers": {"authorization": "Bearer t"}},
                              {"name": "second-deny", "url": "/deny"}, {"name": "mask", "url": "/redact"})
            rules_verdict = policy(rule("mask-secrets", "true", "redact")).evaluate("request", {})
            v = await g.evaluate("request", {"user": {"name": "bob"}, "model": "m", "prompt": "hi",
                                             "messages": [{"role": "user", "content": "hi"}]}, rules_verdict)
            await g.aclose()
        assert v.denied.rule == "dlp" and v.denied.message == "DLP: customer data"
        assert v.tags == {"dlp": "checked"} and v.redact == ("secrets", "pii")
        assert [(d.rule, d.action, d.enforced) for d in v.decisions] == [
            ("mask-secrets", "redact", True), ("label", "tag", True), ("dlp", "deny", True),
            ("second-deny", "deny", True), ("mask", "redact", True)]
        sent = {doc["guardrail"]: (doc, headers) for _, doc, headers in stand_in.received}
        assert set(sent) == {"label", "dlp", "second-deny", "mask"}  # all asked, concurrently
        doc, headers = sent["dlp"]
        assert headers["authorization"] == "Bearer t" and "authorization" not in sent["label"][1]
        assert doc["hook"] == "request" and doc["model"] == "m"
        assert doc["user"] == {"name": "bob", "id": "", "role": "", "groups": []} and doc["prompt"] == "hi"
        assert "messages" not in doc and "headers" not in doc

    asyncio.run(main())


@pytest.mark.integration  # a loopback HTTP stand-in
@pytest.mark.parametrize(("path", "reason"), [
    ("/hang", "no answer within 200 ms"), ("/garbage", "an answer without an action"),
    ("/bad-action", "an answer without an action"), ("/error", "status 500"),
])
def test_a_guardrail_that_hangs_errs_or_answers_nonsense_follows_its_fail(path, reason):
    async def main():
        async with GuardrailStandIn() as base:
            g = guardrails_of(base, {"name": "closed", "url": path, "timeout_ms": 200},
                              {"name": "open", "url": path, "timeout_ms": 200, "fail": "open"})
            started = time.perf_counter()
            v = await g.evaluate("request", {})
            elapsed = time.perf_counter() - started
            await g.aclose()
        assert elapsed < 5  # the hang costs its timeout, not the stand-in's minute
        assert v.denied.rule == "closed" and v.denied.action == "error"
        assert v.denied.message.startswith(f"guardrail closed failed ({reason}")
        assert v.denied.message.endswith("; refused because it fails closed")
        assert [(d.rule, d.action, d.enforced) for d in v.decisions] == [("closed", "error", True),
                                                                          ("open", "error", False)]

    asyncio.run(main())


@pytest.mark.integration  # a loopback HTTP stand-in
def test_an_unreachable_or_monitored_guardrail_changes_nothing_when_it_may_not():
    async def main():
        async with GuardrailStandIn() as base:
            port = base.rsplit(":", 1)[1]
        g = guardrails_of(f"http://127.0.0.1:{port}", {"name": "gone", "url": "/deny", "fail": "open"})
        v = await g.evaluate("request", {})
        await g.aclose()
        assert v.allowed and v.decisions[0].action == "error" and "ConnectError" in v.decisions[0].message
        async with GuardrailStandIn() as base:
            g = guardrails_of(base, {"name": "dlp", "url": "/deny"}, mode="monitor")
            v = await g.evaluate("request", {})
            assert await g.evaluate("tool", {}) == Verdict("tool", g.version)  # no guardrail on that hook
            await g.aclose()
        assert v.allowed and [(d.rule, d.action, d.enforced) for d in v.decisions] == [("dlp", "deny", False)]

    asyncio.run(main())


@pytest.mark.integration  # a loopback HTTP stand-in
def test_a_prompt_with_a_lone_surrogate_still_reaches_the_guardrail():
    # "\udc00" is valid JSON a client may send; the provider gets it as sent, so the guardrail must see it too
    # (an encoding failure would follow the guardrail's fail: with fail open, a way around it).
    async def main():
        stand_in = GuardrailStandIn()
        async with stand_in as base:
            g = guardrails_of(base, {"name": "dlp", "url": "/deny", "fail": "open"})
            v = await g.evaluate("request", {"prompt": json.loads('"customer data \\udc00"')})
            await g.aclose()
        assert v.denied is not None and v.denied.rule == "dlp" and v.denied.action == "deny"
        (_, doc, _), = stand_in.received
        assert doc["prompt"] == "customer data \udc00"

    asyncio.run(main())


def test_every_function_a_condition_may_name_exists_in_the_cel_runtime():
    at = 'timestamp("2024-03-05T06:07:08.009Z")'
    conditions = [
        'size("ab") == 2 && "ab".contains("a") && "ab".startsWith("a") && "ab".endsWith("b") && "ab".matches("^a")',
        'int("3") == 3 && uint(3) == 3u && double(1) == 1.0 && string(1) == "1" && bytes("a") == b"a"',
        'type(1) == int && dyn(1) == 1 && duration("1s") == duration("1000ms")',
        f"{at}.getFullYear() == 2024 && {at}.getMonth() == 2 && {at}.getDayOfYear() == 64 "
        f"&& {at}.getDayOfMonth() == 4 && {at}.getDate() == 5 && {at}.getDayOfWeek() == 2 && {at}.getHours() == 6 "
        f"&& {at}.getMinutes() == 7 && {at}.getSeconds() == 8 && {at}.getMilliseconds() == 9",
        "optional.of(1).hasValue() && optional.of(1).value() == 1 && optional.none().orValue(2) == 2 "
        "&& optional.none().or(optional.of(3)).value() == 3",
        'messages.exists(m, m.role == "user") && tools.all(t, t != "")',
    ]
    named = {f for c in conditions for f in compile_condition(c).functions()}
    assert config_model.CEL_FUNCTIONS <= named
    p = policy(*(rule(f"c{n}", c, "tag", tags={f"c{n}": "ok"}) for n, c in enumerate(conditions)))
    v = p.evaluate("request", {"messages": [{"role": "user"}], "tools": ["Bash"]})
    assert v.tags == {f"c{n}": "ok" for n in range(len(conditions))}, v.decisions
