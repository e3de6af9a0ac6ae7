"""Client-supplied text in log lines: control characters escaped, so nobody can forge or split log lines."""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else (f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}")


def printable(value, limit: int = 200) -> str:
    """A value as it may appear in a log line: control characters and lone surrogates escaped, length capped."""
    s = value if isinstance(value, str) else str(value)
    if len(s) > limit:
        s = s[:limit] + "…"
    return _UNSAFE.sub(_escape, s)
