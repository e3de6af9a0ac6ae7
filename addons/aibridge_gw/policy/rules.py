"""Policy rules: CEL conditions over a call's facts, evaluated per hook into a `Verdict` of decisions.

A condition is compiled once per distinct source (when the config is validated, by `config_model`, which owns the
conditions' vocabulary; the compiled program is reused across reloads). Handing a value to CEL is the cost of an
evaluation (about 1 µs per string or map key; running ten typical programs costs less than converting one user),
so each hook keeps one `cel.Context` holding only the variables its rules reference, and a
variable is converted again only when its value differs from the previous call's (the same user, model or tool
list in a row costs a comparison). `secrets()` and `pii()` answer from the request's `Scan`, so each text is
scanned once however many rules (and the redaction that follows) ask.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import cel

from ..config_model import (
    CONDITION_VARIABLES,
    PoliciesFile,
    PolicyRuleFile,
    compile_condition,
)
from .detectors import DETECTORS, Scan, types_of

HOOKS = ("request", "tool", "response")

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
        self.functions = functions
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
                try:
                    self.context.add_variable(name, value)
                except ValueError:  # text CEL cannot hold: a lone surrogate (a JSON escape, a header byte not UTF-8)
                    self.context.add_variable(name, _valid_text(value))
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


def _valid_text(value: Any) -> Any:
    """The value with every lone surrogate in its strings replaced by U+FFFD (CEL strings are valid Unicode)."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_text(v) for v in value]
    return value


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
        self._contexts = {hook: _HookContext(
            sorted({v for r in rules for v in r.program.variables() if v in CONDITION_VARIABLES}),
            sorted({f for r in rules for f in r.program.functions() if f in DETECTORS}),
        ) for hook, rules in self._rules.items()}
        self._lock = threading.Lock()  # a hook's context is shared state between calls

    def has_rules(self, hook: str) -> bool:
        return bool(self._rules[hook])

    def uses_detectors(self, hook: str) -> bool:
        """A rule of this hook calls secrets() or pii() (scanning text may cost milliseconds)."""
        return bool(self._contexts[hook].functions)

    def heavy(self, hook: str) -> bool:
        """A rule of this hook scans text or reads the whole conversation (`messages`, converted into CEL at about
        a microsecond per value): milliseconds on a large request."""
        return self.uses_detectors(hook) or "messages" in self._contexts[hook].variables

    def evaluate(self, hook: str, variables: dict[str, Any], scan: Scan | None = None, apart: bool = False
                 ) -> Verdict:
        """The hook's rules in order: allow stops, the first deny wins and stops, routes (the first), redactions
        and tags accumulate; a monitored rule is recorded and changes nothing; a rule whose condition errors
        yields an `error` decision and, failing closed, refuses like a deny. Pass the request's `Scan` to share
        detector results with other hooks and with redaction. `apart`: on a context of its own, without the
        shared one's lock (a worker thread's evaluation: the event loop's never wait for it)."""
        verdict = Verdict(hook, self.version)
        rules = self._rules[hook]
        if not rules:
            return verdict
        redact: dict[str, None] = {}
        shared = self._contexts[hook]
        with self._lock if not apart else contextlib.nullcontext():
            hc = shared if not apart else _HookContext(shared.variables, shared.functions)
            try:
                hc.load(variables, scan or Scan())
            except Exception as e:  # noqa: BLE001 - a value CEL cannot take: every rule fails on it, as its `fail` says
                for rule in rules:
                    if self._failed(verdict, rule, e, ()):
                        break
                return verdict
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
    default = CONDITION_VARIABLES[name]
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
