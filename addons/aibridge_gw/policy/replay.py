"""`aibridge policy check FILE` and `aibridge policy replay FILE`: a candidate policy compiled, and rehearsed on the
recorded audit before it goes live.

Replay evaluates the candidate's request and response rules against each recorded interception (who, which client,
session, provider, API, model, the recorded prompt, the usage) and its tool rules against each recorded tool call,
and reports what it would have denied, routed, redacted or tagged, per rule and user. No traffic, no provider call,
no guardrail call (guardrails are external services: listed, not run). The audit holds less than a live request:
no headers, offered tools or whole conversation (those variables are empty), and a prompt stored masked is
replayed masked; the report says so.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_policies
from ..config_model import PoliciesFile
from .rules import Policy

CALLS_SQL = """
SELECT i.id, i.started_at, i.provider_name, i.api, i.model, i.client, i.client_session_id, i.status,
       u.id AS user_id, u.name AS user_name, u.role AS user_role,
       (SELECT string_agg(g.group_name, ',') FROM aibridge_user_groups g WHERE g.user_id = u.id) AS user_groups,
       (SELECT p.prompt FROM aibridge_user_prompts p WHERE p.interception_id = i.id LIMIT 1) AS prompt,
       (SELECT sum(t.input_tokens) FROM aibridge_token_usages t WHERE t.interception_id = i.id) AS input_tokens,
       (SELECT sum(t.output_tokens) FROM aibridge_token_usages t WHERE t.interception_id = i.id) AS output_tokens,
       (SELECT sum(t.cache_read_input_tokens) FROM aibridge_token_usages t WHERE t.interception_id = i.id)
           AS cache_read_input_tokens,
       (SELECT sum(t.cache_write_input_tokens) FROM aibridge_token_usages t WHERE t.interception_id = i.id)
           AS cache_write_input_tokens
FROM aibridge_interceptions i LEFT JOIN aibridge_users u ON u.id = i.initiator_id
WHERE i.started_at >= TIMESTAMPTZ '{since}' AND i.status <> 'rejected'
ORDER BY i.started_at
"""
TOOLS_SQL = """
SELECT t.interception_id, t.tool, t.input, t.injected, t.provider_tool_call_id
FROM aibridge_tool_usages t JOIN aibridge_interceptions i ON i.id = t.interception_id
WHERE i.started_at >= TIMESTAMPTZ '{since}'
"""


def load_candidate(path: str | Path) -> PoliciesFile:
    """A candidate policy: a policies file, or a config file with `policies:`; raises ConfigError naming what is
    wrong (a rule's condition that does not compile: its name and the error)."""
    return load_policies(Path(path))


def describe(policies: PoliciesFile) -> list[dict]:
    """The rules and guardrails as `policy check` lists them."""
    out = [{"kind": "rule", "name": r.name, "hook": r.hook, "action": r.action, "mode": r.mode or policies.mode,
            "fail": r.fail, "when": r.when} for r in policies.rules]
    out += [{"kind": "guardrail", "name": g.name, "hook": g.hook, "action": "external", "mode": g.mode or policies.mode,
             "fail": g.fail, "when": g.url} for g in policies.guardrails]
    return out


@dataclass
class ReplayReport:
    version: str
    calls: int = 0
    tool_calls: int = 0
    # (rule, action, enforced) -> users -> count
    outcomes: dict = field(default_factory=lambda: defaultdict(Counter))
    errors: Counter = field(default_factory=Counter)  # rule -> evaluations that failed
    examples: dict = field(default_factory=dict)  # (rule, action) -> one interception id
    guardrails: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        out = []
        for (rule, hook, action, enforced), users in sorted(self.outcomes.items()):
            for user, n in users.most_common():
                out.append({"rule": rule, "hook": hook, "action": action, "enforced": enforced, "user": user,
                            "calls": n, "example": self.examples.get((rule, action))})
        return out


def replay(policies: PoliciesFile, calls: list[dict], tools: list[dict]) -> ReplayReport:
    """Evaluate `policies` on recorded calls (rows of CALLS_SQL) and tool calls (rows of TOOLS_SQL)."""
    policy = Policy(policies)
    report = ReplayReport(policy.version, guardrails=[g.name for g in policies.guardrails])
    by_id: dict[str, dict] = {}
    for row in calls:
        facts = _facts(row)
        by_id[str(row["id"])] = facts
        report.calls += 1
        for hook, extra in (("request", {}), ("response", {"usage": _usage(row)})):
            _count(report, policy.evaluate(hook, {**facts, **extra}), facts, row["id"])
    for t in tools:
        facts = by_id.get(str(t["interception_id"]))
        if facts is None:
            continue
        report.tool_calls += 1
        tool = {"name": t["tool"], "input": t["input"] or "", "injected": bool(t["injected"])}
        _count(report, policy.evaluate("tool", {**facts, "tool": tool}), facts, t["interception_id"])
    return report


def _facts(row: dict) -> dict:
    groups = [g for g in (row.get("user_groups") or "").split(",") if g]
    return {"user": {"name": row.get("user_name") or "", "id": str(row.get("user_id") or ""),
                     "role": row.get("user_role") or "", "groups": sorted(groups)},
            "client": row.get("client") or "", "session": row.get("client_session_id") or "",
            "provider": row.get("provider_name") or "", "api": row.get("api") or "", "model": row.get("model") or "",
            "prompt": row.get("prompt") or ""}


def _usage(row: dict) -> dict:
    return {k: int(row.get(k) or 0) for k in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                                              "cache_write_input_tokens")}


def _count(report: ReplayReport, verdict, facts: dict, interception_id) -> None:
    for d in verdict.decisions:
        if d.action == "error":
            report.errors[d.rule] += 1
        report.outcomes[(d.rule, d.hook, d.action, d.enforced)][facts["user"]["name"] or "?"] += 1
        report.examples.setdefault((d.rule, d.action), str(interception_id))


def render(report: ReplayReport, since: str) -> str:
    lines = [f"policy {report.version}: {report.calls} recorded call(s) and {report.tool_calls} tool call(s) since "
             f"{since}; nothing was sent anywhere"]
    rows = report.rows()
    if not rows:
        lines.append("no rule would have matched")
    for r in rows:
        mode = "" if r["enforced"] else " (monitor)"
        lines.append(f"  {r['rule']} [{r['hook']}] would {r['action']}{mode}: {r['calls']} call(s) of {r['user']}"
                     f" (e.g. interception {r['example']})")
    for rule, n in report.errors.items():
        lines.append(f"  {rule}: the condition failed on {n} call(s) (see its `fail`)")
    if report.guardrails:
        lines.append(f"guardrails not called in a replay: {', '.join(report.guardrails)}")
    lines.append("the audit has no headers, offered tools or whole conversations: rules reading them see empty values")
    return "\n".join(lines)


def as_json(report: ReplayReport) -> str:
    return json.dumps({"policy_version": report.version, "calls": report.calls, "tool_calls": report.tool_calls,
                       "outcomes": report.rows(), "errors": dict(report.errors),
                       "guardrails_not_called": report.guardrails}, indent=2)
