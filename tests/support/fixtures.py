"""Reads provider traffic fixtures (txtar files): the project's own in tests/fixtures/provider-traffic, written
for these tests in the providers' real wire formats; for a scenario not written yet, the captured traffic in
../shared/fixtures/provider-traffic (skipped when absent)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN = ROOT / "tests" / "fixtures" / "provider-traffic"
TRAFFIC = ROOT.parent / "shared" / "fixtures" / "provider-traffic"


def parse_txtar(text: str) -> dict[str, str]:
    sections: dict[str, str] = {}
    name = None
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("-- ") and line.rstrip().endswith(" --"):
            if name is not None:
                sections[name] = "".join(lines)
            name, lines = line.strip()[3:-3], []
        elif name is not None:
            lines.append(line)
    if name is not None:
        sections[name] = "".join(lines)
    return sections


@dataclass
class Capture:
    name: str
    sections: dict[str, str]

    @property
    def request(self) -> dict:
        return json.loads(self.sections["request"])

    def has(self, section: str) -> bool:
        return section in self.sections


def capture(rel: str) -> Capture:
    """A fixture by relative path: the project's own, else ../shared's (the test skips when neither exists)."""
    path = OWN / rel if (OWN / rel).exists() else TRAFFIC / rel
    if not path.exists():
        pytest.skip(f"provider-traffic fixture {rel} not available (../shared missing)")
    return Capture(rel, parse_txtar(path.read_text()))


def captures(folder: str) -> list[str]:
    """The fixtures of a folder: the project's own, and ../shared's when it is there."""
    return sorted({str(p.relative_to(root)) for root in (OWN, TRAFFIC) for p in (root / folder).glob("*.txtar")})


def sse_events(section: str) -> list[bytes]:
    """Split a captured SSE body into its events, each re-terminated by a blank line."""
    out, cur = [], []
    for line in section.splitlines():
        if line.strip() == "":
            if cur:
                out.append(("\n".join(cur) + "\n\n").encode())
                cur = []
        else:
            cur.append(line)
    if cur:
        out.append(("\n".join(cur) + "\n\n").encode())
    return out


def http_section(section: str) -> tuple[int, dict[str, str], bytes] | None:
    """A section written as a raw HTTP response ('HTTP/2.0 400 Bad Request' ...), else None."""
    if not section.startswith("HTTP/"):
        return None
    head, _, body = section.partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body_bytes = body.strip().encode()
    return status, headers, body_bytes
