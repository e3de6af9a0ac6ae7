"""Guardrails: external checks called at a hook, answering in the rules' decision shape.

The gateway POSTs a JSON document of the call's facts to each guardrail of the hook (all at once, each bounded by
its `timeout_ms`) and expects `{"action": "allow" | "deny" | "redact" | "tag", "message": …, "tags": {…},
"detectors": ["secrets" | "pii", …]}` (tags for tag; for redact, the detectors to mask with, default both). A
timeout, a connection error, a non-2xx status or an answer of another shape is the guardrail's failure and follows
its `fail`: closed refuses the call like a deny, open lets it through; both are recorded as an `error` decision. The document leaves out `messages` and `headers`: the whole conversation is
large, and headers carry credentials.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from ..config_model import GuardrailFile, PoliciesFile
from .detectors import DETECTORS
from .rules import Decision, Verdict, policy_version, variable_value

SENT = ("user", "client", "session", "provider", "api", "model", "prompt", "tools", "tool", "usage")
ANSWERS = ("allow", "deny", "redact", "tag")


class GuardrailFailed(Exception):
    """The guardrail gave no usable answer."""


class Guardrails:
    """The guardrails of one configuration, sharing one HTTP client (close it with `aclose`)."""

    def __init__(self, policies: PoliciesFile, client: httpx.AsyncClient | None = None) -> None:
        self.policies = policies
        self.version = policy_version(policies)
        self.client = client or httpx.AsyncClient(trust_env=False)
        self._by_hook: dict[str, list[GuardrailFile]] = {}
        for g in policies.guardrails:
            self._by_hook.setdefault(g.hook, []).append(g)

    async def evaluate(self, hook: str, variables: dict[str, Any], verdict: Verdict | None = None) -> Verdict:
        """Calls the hook's guardrails concurrently and applies their answers, in configuration order, to
        `verdict` (the rules' verdict of the same hook, or a new one): the first deny wins, redactions and tags
        accumulate; a monitored guardrail's answer is recorded only."""
        verdict = verdict or Verdict(hook, self.version)
        guardrails = self._by_hook.get(hook, [])
        if not guardrails:
            return verdict
        document = {"hook": hook, **{name: variable_value(name, variables.get(name)) for name in SENT}}
        answers = await asyncio.gather(*(self._ask(g, document) for g in guardrails), return_exceptions=True)
        redact = dict.fromkeys(verdict.redact)
        for g, answer in zip(guardrails, answers, strict=True):
            self._apply(verdict, g, answer, redact)
        verdict.redact = tuple(redact)
        return verdict

    async def _ask(self, g: GuardrailFile, document: dict) -> dict:
        try:
            async with asyncio.timeout(g.timeout_ms / 1000):
                # Encoded here, ASCII-escaped: httpx's own encoding fails on a lone surrogate, which is valid JSON a
                # client may send (the guardrail then sees the text as the provider does, "\udc00").
                body = json.dumps({**document, "guardrail": g.name}).encode()
                response = await self.client.post(g.url, content=body,
                                                  headers={"content-type": "application/json", **g.headers})
                response.raise_for_status()
                answer = response.json()
        except TimeoutError:
            raise GuardrailFailed(f"no answer within {g.timeout_ms} ms") from None
        except httpx.HTTPStatusError as e:
            raise GuardrailFailed(f"status {e.response.status_code}") from None
        except (httpx.HTTPError, ValueError) as e:
            raise GuardrailFailed(type(e).__name__) from None
        return _checked(answer)

    def _apply(self, verdict: Verdict, g: GuardrailFile, answer: dict | BaseException,
               redact: dict[str, None]) -> None:
        enforced = (g.mode or self.policies.mode) == "enforce"
        if isinstance(answer, BaseException):
            closed = g.fail == "closed"
            reason = str(answer) if isinstance(answer, GuardrailFailed) else type(answer).__name__
            decision = Decision(g.name, verdict.hook, "error", enforced and closed, (),
                                f"guardrail {g.name} failed ({reason})"
                                + ("; refused because it fails closed" if closed else ""))
            verdict.decisions.append(decision)
            if decision.enforced and verdict.denied is None:
                verdict.denied = decision
            return
        action = answer["action"]
        message = answer.get("message") or (f"denied by guardrail {g.name}" if action == "deny" else None)
        decision = Decision(g.name, verdict.hook, action, enforced, (), message)
        verdict.decisions.append(decision)
        if not enforced:
            return
        if action == "deny" and verdict.denied is None:
            verdict.denied = decision
        elif action == "redact":
            redact.update(dict.fromkeys(answer.get("detectors") or DETECTORS))
        elif action == "tag":
            for name, value in answer.get("tags", {}).items():
                verdict.tags.setdefault(name, value)

    async def aclose(self) -> None:
        await self.client.aclose()


def _checked(answer: Any) -> dict:
    """The answer when it has the decision shape; GuardrailFailed otherwise."""
    if not isinstance(answer, dict) or answer.get("action") not in ANSWERS:
        raise GuardrailFailed(f"an answer without an action among {', '.join(ANSWERS)}")
    message, tags, detectors = answer.get("message"), answer.get("tags", {}), answer.get("detectors", [])
    if message is not None and not isinstance(message, str):
        raise GuardrailFailed("a message that is not a string")
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise GuardrailFailed("tags that are not a mapping of strings")
    if not isinstance(detectors, list) or not all(d in DETECTORS for d in detectors):
        raise GuardrailFailed(f"detectors other than {', '.join(DETECTORS)}")
    return answer
