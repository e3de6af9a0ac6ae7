"""The admin's policies applied to calls: the pipeline asks here at each hook (request, tool, response) and gets
what to do; every decision is recorded as it is made.

The rules (`rules.Policy`) cost microseconds and run on the event loop. What may cost more goes to a thread:
detectors over a large request (a conversation of hundreds of KB), and masking a body. Guardrails are awaited
with their own timeouts. One `Policing` is built per configuration and replaced whole on reload; a call keeps the
one it started with, so its decisions all name one policy version.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from ..config_model import PoliciesFile
from ..flow.exchange import ResponseSummary, json_text
from .auth import SECRET_HEADERS
from .detectors import Scan
from .guardrails import Guardrails
from .redact import DEFAULT_DETECTORS, Redactor
from .rules import Decision, Policy, Verdict

log = logging.getLogger("aibridge")

OFF_LOOP_TEXT = 32 * 1024  # detectors over more text than this (bytes of the request body) run on a thread

# Records one decision: (decision, policy version, interception id, user id, tool name, tool call id, and for a
# tool call without an id its number among the call's such tool calls, from 1; else 0).
DecisionSink = Callable[[Decision, str, str, "str | None", "str | None", "str | None", int], None]


@dataclass(slots=True)
class CallFacts:
    """What the rules may ask about one call (see config_model.CONDITION_VARIABLES), gathered once per call."""

    interception_id: str
    user: dict
    client: str
    session: str
    provider: str
    api: str
    model: str
    prompt: str
    messages: list
    tools: list[str]
    headers: dict[str, str]
    scan: Scan = field(default_factory=Scan)  # detector results, shared by every hook and redaction of the call
    size: int = 0  # the request body's bytes: over OFF_LOOP_TEXT, the costly work of a hook runs on a thread
    tags: dict[str, str] = field(default_factory=dict)  # labels the call's rules gave it
    unnamed_tool_calls: int = 0  # tool calls decided without a call id (Gemini's): each gets decisions of its own

    def variables(self, **more: Any) -> dict[str, Any]:
        return {"user": self.user, "client": self.client, "session": self.session, "provider": self.provider,
                "api": self.api, "model": self.model, "prompt": self.prompt, "messages": self.messages,
                "tools": self.tools, "headers": self.headers, **more}


@dataclass(slots=True)
class CallPolicing:
    """One call's policing, kept on its FlowState: the configuration's policies it started under (a reload does
    not change them mid-call), its facts, and the detectors whose findings are masked in what it stores."""

    policing: "Policing"
    facts: CallFacts
    stored: tuple[str, ...] = ()


@dataclass(slots=True)
class RequestOutcome:
    verdict: Verdict
    body: dict | None = None  # the body to send instead (masked, or routed to another model)
    redacted: tuple[str, ...] = ()  # finding types masked in it


class Policing:
    """One configuration's policies and guardrails at work."""

    def __init__(self, policies: PoliciesFile, sink: DecisionSink, client: httpx.AsyncClient) -> None:
        self.policy = Policy(policies)
        self.guardrails = Guardrails(policies, client)
        self.version = self.policy.version
        self.sink = sink
        self.redact_stored = policies.redact_stored
        self.hooks = {hook: any(r.hook == hook for r in policies.rules) or
                      any(g.hook == hook for g in policies.guardrails) for hook in ("request", "tool", "response")}
        self.active = self.redact_stored or any(self.hooks.values())

    # --- request ---------------------------------------------------------------------------------------

    async def request(self, facts: CallFacts, body: dict | None, size: int) -> RequestOutcome:
        """The request hook's verdict, with the body to send when a rule masks or routes it. `size`: the
        request's bytes (detectors over a large one run on a thread)."""
        if not self.hooks["request"]:
            return RequestOutcome(Verdict("request", self.version))
        variables = facts.variables()
        verdict = await self._evaluate("request", variables, facts.scan, size)
        if verdict.denied is None:
            verdict = await self.guardrails.evaluate("request", variables, verdict)
        self._record(facts, verdict)
        outcome = RequestOutcome(verdict)
        facts.tags.update(verdict.tags)
        if verdict.denied is not None or body is None or not verdict.redact:
            return outcome
        redactor = Redactor(verdict.redact, facts.scan)
        outcome.body = await asyncio.to_thread(redactor.value, body) if size > OFF_LOOP_TEXT else redactor.value(body)
        outcome.redacted = tuple(redactor.types)
        return outcome

    # --- tool calls ------------------------------------------------------------------------------------

    def tool(self, facts: CallFacts, name: str, arguments: str, call_id: str | None, injected: bool
             ) -> Decision | None:
        """The tool hook for one complete tool call the model emitted: the enforced refusal, or None to let it
        through. Sync and quick (rules only: a stream waits on it)."""
        if not self.policy.has_rules("tool"):
            return None
        tool = {"name": name, "input": arguments, "injected": injected}
        verdict = self.policy.evaluate("tool", facts.variables(tool=tool), facts.scan)
        ordinal = 0
        if not call_id:
            facts.unnamed_tool_calls += 1
            ordinal = facts.unnamed_tool_calls
        self._record(facts, verdict, name, call_id, ordinal)
        facts.tags.update(verdict.tags)
        return verdict.denied

    # --- response --------------------------------------------------------------------------------------

    async def response(self, facts: CallFacts, usage: dict, model: str | None) -> Verdict:
        """The response hook, once the call ended: tags, monitored rules, redaction of what is stored."""
        verdict = Verdict("response", self.version)
        if not self.hooks["response"]:
            return verdict
        variables = facts.variables(usage=usage, model=model or facts.model)
        verdict = await self._evaluate("response", variables, facts.scan, facts.size)
        verdict = await self.guardrails.evaluate("response", variables, verdict)
        self._record(facts, verdict)
        facts.tags.update(verdict.tags)
        return verdict

    async def _evaluate(self, hook: str, variables: dict, scan: Scan, size: int) -> Verdict:
        """The hook's rules: on a worker thread, apart from the event loop's evaluations, when the request is large
        and a rule scans text or reads the whole conversation; on the event loop otherwise (microseconds)."""
        if size > OFF_LOOP_TEXT and self.policy.heavy(hook):
            return await asyncio.to_thread(self.policy.evaluate, hook, variables, scan, True)
        return self.policy.evaluate(hook, variables, scan)

    def stored_redactor(self, facts: CallFacts, *decided: tuple[str, ...]) -> Redactor | None:
        """What masks the texts a call stores (prompt, tool inputs, thoughts): the detectors its redact decisions
        named, and with `redact_stored` every detector; None when nothing is to be masked."""
        detectors = [d for named in decided for d in named]
        if self.redact_stored:
            detectors += DEFAULT_DETECTORS
        return Redactor(tuple(dict.fromkeys(detectors)), facts.scan) if detectors else None

    def _record(self, facts: CallFacts, verdict: Verdict, tool: str | None = None, call_id: str | None = None,
                ordinal: int = 0) -> None:
        for decision in verdict.decisions:
            try:
                self.sink(decision, verdict.policy_version, facts.interception_id, facts.user.get("id") or None,
                          tool, call_id, ordinal)
            except Exception:  # a record that cannot be queued must not turn into a refusal of the call
                log.exception("aibridge: recording a policy decision failed")


def mask_stored(redactor: Redactor, summary: ResponseSummary) -> None:
    """Tool inputs, injected tools' errors and thoughts masked; an input a provider sent as an object rather than
    text is masked as JSON text."""
    for c in summary.tool_calls:
        c.input = redactor.text(json_text(c.input))
        if c.error:
            c.error = redactor.text(c.error)
    for th in summary.thoughts:
        th.content = redactor.text(json_text(th.content))


def offered_tools(body: dict | None) -> list[str]:
    """Names of the tools a request offers, in any wire API's shape (Anthropic and Responses `name`, Chat
    `function.name`, Gemini `functionDeclarations[].name`, the tools of a Responses `namespace`)."""
    names: list[str] = []
    tools = body.get("tools") if isinstance(body, dict) else None
    if not isinstance(tools, list):
        return names
    for t in tools:
        if not isinstance(t, dict):
            continue
        if isinstance(t.get("name"), str):
            names.append(t["name"])
        elif isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str):
            names.append(t["function"]["name"])
        decls = t.get("functionDeclarations") or t.get("function_declarations")
        for decl in decls if isinstance(decls, list) else ():
            if isinstance(decl, dict) and isinstance(decl.get("name"), str):
                names.append(decl["name"])
        if t.get("type") == "namespace" and isinstance(t.get("tools"), list):  # Responses: a namespace's tools
            names += [sub["name"] for sub in t["tools"] if isinstance(sub, dict) and isinstance(sub.get("name"), str)]
    return names


def conversation(body: dict | None) -> list:
    """The request's conversation as its API holds it (`messages`, Responses `input`, Gemini `contents`)."""
    if not isinstance(body, dict):
        return []
    for key in ("messages", "input", "contents"):
        value = body.get(key)
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
    return []


def variable_headers(headers: dict[str, str]) -> dict[str, str]:
    """The request's headers as rules see them: lower-case names, credentials left out."""
    return {k: v for k, v in headers.items() if k not in SECRET_HEADERS}
