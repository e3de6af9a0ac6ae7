"""Policy rules: CEL conditions over a call's facts, evaluated per hook into a `Verdict` of decisions.

A condition is compiled once per distinct source (when the config is validated; the compiled program is reused
across reloads) and refused then if it uses a variable or function the engine does not provide. Handing a value to
CEL is the cost of an evaluation (about 1 µs per string or map key; running ten typical programs costs less than
converting one user), so each hook keeps one `cel.Context` holding only the variables its rules reference, and a
variable is converted again only when its value differs from the previous call's (the same user, model or tool
list in a row costs a comparison). `secrets()` and `pii()` answer from the request's `Scan`, so each text is
scanned once however many rules (and the redaction that follows) ask.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cel
import yaml

from ..config_model import PoliciesFile, PolicyRuleFile, validate_policies
from .detectors import DETECTORS, Scan, types_of

HOOKS = ("request", "tool", "response")

VARIABLES: dict[str, Any] = {
    "user": {"name": "", "id": "", "role": "", "groups": []},
    "client": "",
    "session": "",
    "provider": "",
    "api": "",
    "model": "",
    "prompt": "",  # the last user text
    "messages": [],
    "tools": [],  # names of the tools the request offers
    "headers": {},  # lower-case names
    "tool": {"name": "", "input": {}, "injected": False},
    "usage": {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_write_input_tokens": 0},
}
"""Every variable a condition may use, with the value it has when the caller does not know it (a map's missing
fields too), so a condition never meets an undefined variable."""

CEL_FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string", "bytes", "type",
    "dyn", "timestamp", "duration", "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate",
    "getDayOfWeek", "getHours", "getMinutes", "getSeconds", "getMilliseconds", "of", "none", "hasValue", "value",
    "orValue", "or",
})
"""The standard functions of the cel library's runtime (its operators and macros aside)."""
CEL_NAMES = frozenset({"int", "uint", "double", "string", "bytes", "bool", "list", "map", "null_type", "type",
                       "optional"})
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")


@lru_cache(maxsize=4096)
def compile_condition(source: str) -> cel.Program:
    return cel.compile(source)


def check_condition(source: str) -> str | None:
    """Why a condition cannot be used (it does not compile, or names an unknown variable or function), or None."""
    try:
        program = compile_condition(source)
    except ValueError as e:
        return f"CEL does not compile: {_syntax_error(str(e))}"
    bound = set(_BOUND.findall(source))
    for name in program.variables():
        if name not in VARIABLES and name not in bound and name not in CEL_NAMES:
            return f"unknown variable `{name}`{_hint(name, VARIABLES)}"
    for name in program.functions():
        if name[0] not in "_@!-" and name not in CEL_FUNCTIONS and name not in DETECTORS:
            return f"unknown function `{name}`{_hint(name, [*DETECTORS, *CEL_FUNCTIONS])}"
    return None


def _syntax_error(text: str) -> str:
    """The cel library's parse error without its echo of the source: `1:14: Syntax error: …`."""
    first = text.split("\n", 1)[0]
    first = first.split("ERROR: <input>:", 1)[-1]
    return first.split(" expecting ", 1)[0].strip()


def _hint(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(sorted(known))})"


@dataclass(frozen=True, slots=True)
class Decision:
    """What one rule (or guardrail) decided for one call: recorded, and applied when `enforced`. `detectors` are
    the finding types that fired, never the text found."""

    rule: str
    hook: str
    action: str  # allow | deny | route | redact | tag | error
    enforced: bool
    detectors: tuple[str, ...] = ()
    message: str | None = None

    def as_record(self) -> dict:
        return {"rule": self.rule, "hook": self.hook, "action": self.action, "enforced": self.enforced,
                "detectors": list(self.detectors), "message": self.message}


@dataclass(slots=True)
class Verdict:
    """The outcome of one hook: every decision, and the effects of the enforced ones."""

    hook: str
    policy_version: str
    decisions: list[Decision] = field(default_factory=list)
    denied: Decision | None = None  # the deny (or failed closed rule) that refuses the call
    model: str | None = None  # route target
    provider: str | None = None  # route target
    redact: tuple[str, ...] = ()  # detectors whose findings are masked, upstream and in the record
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.denied is None


@dataclass(frozen=True, slots=True)
class _Rule:
    """A validated rule ready to run: its program, and its mode and failure behaviour resolved."""

    spec: PolicyRuleFile
    program: cel.Program
    enforced: bool
    detectors: tuple[str, ...]  # what a redact rule masks: the detectors its condition calls, else all


class _HookContext:
    """One hook's cel.Context, kept across evaluations: its variables are replaced only when their value changed
    since the previous call. secrets() and pii() answer from the current call's Scan (texts inside lists and maps
    included) and remember which finding types fired for the rule being evaluated."""

    def __init__(self, variables: list[str], functions: list[str]) -> None:
        self.context = cel.Context()
        self.variables = variables
        self._seen: dict[str, Any] = {}
        self.scan = Scan()
        self.fired: dict[str, None] = {}
        for name in functions:
            self.context.add_function(name, self._detector(name))

    def load(self, variables: dict[str, Any], scan: Scan) -> None:
        self.scan = scan
        for name in self.variables:
            value = variable_value(name, variables.get(name))
            seen = _fingerprint(value)
            if seen is None or self._seen.get(name, _UNSEEN) != seen:
                self.context.add_variable(name, value)
                self._seen[name] = seen

    def _detector(self, detector: str):
        def call(value: Any) -> list[str]:
            types = types_of([f for text in _texts(value) for f in self.scan.findings(detector, text)])
            self.fired.update(dict.fromkeys(types))
            return types
        return call


_UNSEEN = object()


def _fingerprint(value: Any, room: int = 64) -> Any:
    """A hashable copy of a small value (a scalar, or lists and maps of at most `room` scalars in all) to compare
    the next call's value with; None for anything larger, which is converted every time."""
    budget = [room]

    def freeze(v: Any) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise OverflowError
        if isinstance(v, dict):
            return ("map", tuple((k, freeze(x)) for k, x in v.items()))
        if isinstance(v, list):
            return ("list", tuple(freeze(x) for x in v))
        return (type(v), v)

    try:
        return freeze(value)
    except OverflowError:
        return None


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


class Policy:
    """The policies of one configuration, compiled: `evaluate(hook, variables)` applies its rules to a call."""

    def __init__(self, policies: PoliciesFile) -> None:
        self.policies = policies
        self.version = policy_version(policies)
        self.redact_stored = policies.redact_stored
        self._rules: dict[str, list[_Rule]] = {hook: [] for hook in HOOKS}
        for spec in policies.rules:
            program = compile_condition(spec.when)
            called = tuple(d for d in DETECTORS if d in program.functions())
            self._rules[spec.hook].append(
                _Rule(spec, program, (spec.mode or policies.mode) == "enforce", called or tuple(DETECTORS)))
        self._contexts = {
            hook: _HookContext(sorted({v for r in rules for v in r.program.variables() if v in VARIABLES}),
                               sorted({f for r in rules for f in r.program.functions() if f in DETECTORS}))
            for hook, rules in self._rules.items()}
        self._lock = threading.Lock()  # a hook's context is shared state between calls

    def evaluate(self, hook: str, variables: dict[str, Any], scan: Scan | None = None) -> Verdict:
        """The hook's rules in order: allow stops, the first deny wins and stops, routes (the first), redactions
        and tags accumulate; a monitored rule is recorded and changes nothing; a rule whose condition errors
        yields an `error` decision and, failing closed, refuses like a deny. Pass the request's `Scan` to share
        detector results with other hooks and with redaction."""
        verdict = Verdict(hook, self.version)
        rules = self._rules[hook]
        if not rules:
            return verdict
        redact: dict[str, None] = {}
        with self._lock:
            hc = self._contexts[hook]
            hc.load(variables, scan or Scan())
            for rule in rules:
                hc.fired.clear()
                try:
                    matched = rule.program.execute(hc.context)
                    if not isinstance(matched, bool):
                        raise TypeError(f"the condition gave a {type(matched).__name__}, not a boolean")
                except Exception as e:  # noqa: BLE001 - any failure of a condition is the rule's failure
                    if self._failed(verdict, rule, e, tuple(hc.fired)):
                        break
                    continue
                if matched and self._apply(verdict, rule, tuple(hc.fired), redact):
                    break
        verdict.redact = tuple(redact)
        return verdict

    @staticmethod
    def _failed(verdict: Verdict, rule: _Rule, error: Exception, fired: tuple[str, ...]) -> bool:
        closed = rule.spec.fail == "closed"
        decision = Decision(rule.spec.name, verdict.hook, "error", rule.enforced and closed, fired,
                            f"policy rule {rule.spec.name} failed ({_reason(error)})"
                            + ("; refused because it fails closed" if closed else ""))
        verdict.decisions.append(decision)
        if decision.enforced:
            verdict.denied = decision
        return decision.enforced

    @staticmethod
    def _apply(verdict: Verdict, rule: _Rule, fired: tuple[str, ...], redact: dict[str, None]) -> bool:
        """Records the matched rule's decision and applies it when enforced; True when evaluation stops."""
        spec, enforced = rule.spec, rule.enforced
        if spec.action == "route" and (verdict.model or verdict.provider):
            enforced = False  # the first route won
        message = spec.message or (f"denied by policy rule {spec.name}" if spec.action == "deny" else None)
        decision = Decision(spec.name, verdict.hook, spec.action, enforced, fired, message)
        verdict.decisions.append(decision)
        if not enforced:
            return False
        if spec.action == "deny":
            verdict.denied = decision
        elif spec.action == "route":
            verdict.model, verdict.provider = spec.model, spec.provider
        elif spec.action == "redact":
            redact.update(dict.fromkeys(rule.detectors))
        elif spec.action == "tag":
            for name, value in spec.tags.items():
                verdict.tags.setdefault(name, value)
        return spec.action in ("allow", "deny")


def variable_value(name: str, given: Any) -> Any:
    """A variable as CEL sees it: the default when unknown; a map's missing or null fields filled in; headers
    with lower-case names; a tool's input as the JSON object it holds when it parses, else the raw string."""
    default = VARIABLES[name]
    if given is None:
        return default
    if name == "headers":
        return {str(k).lower(): v for k, v in given.items()}
    if isinstance(default, dict) and default:
        out = {**default, **{k: v for k, v in given.items() if v is not None}}
        if name == "tool":
            out["input"] = _tool_input(out["input"])
        return out
    return given


def _tool_input(raw: Any) -> Any:
    if isinstance(raw, (bytes, str)):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        return parsed if isinstance(parsed, dict) else raw
    return raw


def _reason(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"no field {error}"
    return str(error).split(". ", 1)[0][:200]


def policy_version(policies: PoliciesFile) -> str:
    """A content hash of the policies (defaults included, key order irrelevant): which rules a decision ran under."""
    canonical = json.dumps(policies.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def load_policies_file(path: str | Path) -> PoliciesFile:
    """A policies_file: YAML holding what `policies:` would; raises config_model.ConfigProblems."""
    return validate_policies(yaml.safe_load(Path(path).read_text()))
