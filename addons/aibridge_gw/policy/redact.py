"""Masking what the detectors find: in a JSON request body on its way upstream, and in the texts the gateway stores.

Every finding becomes `[REDACTED:<type>]`; overlapping findings merge into one mask, named after the most
specific detector (a known credential format before a keyword-assigned value). In a body, every string value is
masked, at any depth; keys are never changed, and neither are the values that are not text a person wrote:
identifiers and enumerations (`SKIP_KEYS`), base64 payloads (images, documents, data: URIs) and signed thinking
blocks, which the provider refuses when they come back altered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .detectors import Finding, Scan

DEFAULT_DETECTORS = ("secrets", "pii")
SKIP_KEYS = frozenset({
    "model", "id", "type", "role", "name", "tool_use_id", "tool_call_id", "call_id", "signature",
    "encrypted_content", "media_type", "mime_type", "mimeType", "inline_data", "inlineData", "cache_control",
})
SIGNED_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def mask(text: str, findings: Iterable[Finding]) -> str:
    """`text` with each finding (merged where they overlap) replaced by its mask."""
    out: list[str] = []
    pos = 0
    for start, end, kind in merge(findings):
        out.append(text[pos:start])
        out.append(f"[REDACTED:{kind}]")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def merge(findings: Iterable[Finding]) -> list[tuple[int, int, str]]:
    """Overlapping findings as one span, typed by its earliest finding of a named format (a keyword-assigned
    `high-entropy` value only when nothing more specific overlaps it)."""
    spans: list[tuple[int, int, str]] = []
    for f in sorted(findings, key=lambda f: (f.start, -f.end)):
        if spans and f.start < spans[-1][1]:
            start, end, kind = spans[-1]
            spans[-1] = (start, max(end, f.end), f.type if kind == "high-entropy" else kind)
        else:
            spans.append((f.start, f.end, f.type))
    return spans


class Redactor:
    """Masks texts and bodies with the chosen detectors, sharing one request's `Scan` so a text the policy already
    tested is not scanned again; `types` collects every finding type seen, for the decision record."""

    def __init__(self, detectors: Iterable[str] = DEFAULT_DETECTORS, scan: Scan | None = None) -> None:
        self.detectors = tuple(detectors)
        self.scan = scan or Scan()
        self.types: dict[str, None] = {}

    def text(self, text: str) -> str:
        findings = [f for d in self.detectors for f in self.scan.findings(d, text)]
        if not findings:
            return text
        self.types.update(dict.fromkeys(f.type for f in findings))
        return mask(text, findings)

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return value if value.startswith("data:") else self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            if value.get("type") in SIGNED_BLOCKS or value.get("type") == "base64":
                return value
            return {k: v if k in SKIP_KEYS else self.value(v) for k, v in value.items()}
        return value


def redact_text(text: str, detectors: Iterable[str] = DEFAULT_DETECTORS,
                scan: Scan | None = None) -> tuple[str, list[str]]:
    """A stored text (prompt, tool input) masked, and the finding types in it."""
    r = Redactor(detectors, scan)
    return r.text(text), list(r.types)


def redact_body(body: dict, detectors: Iterable[str] = DEFAULT_DETECTORS,
                scan: Scan | None = None) -> tuple[dict, list[str]]:
    """A new JSON request body with every finding masked (the given one is not changed), and the finding types."""
    r = Redactor(detectors, scan)
    return r.value(body), list(r.types)
