"""What may appear in log lines: client-supplied text with control characters escaped (nobody can forge or split
log lines), and never a credential (every record is redacted as it is made, see `install_log_redaction`)."""

from __future__ import annotations

import logging
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


# --- credentials never reach a log line ------------------------------------------------------------------------

# Headers whose value is a credential, wherever they are logged: raw header bytes (`b'...Authorization: Bearer
# x\r\n...'`, as mitmproxy logs a request head a client abandoned), `name: value` lines, dict and tuple reprs, JSON.
# The gateway adds every provider's declared credential headers at load (`install_log_redaction`).
CREDENTIAL_HEADER_NAMES = (
    "proxy-authorization", "authorization", "x-api-key", "x-aibridge-token", "x-coder-ai-governance-token", "cookie",
    "set-cookie",
)
# Credentials recognisable by their shape anywhere in a line: gateway tokens, provider keys (OpenAI and Anthropic
# `sk-…`, Google `AIza…`, GitHub `gh?_…`/`github_pat_…`).
_SHAPED = re.compile(r"(?<![A-Za-z0-9])(?:aib_[A-Za-z0-9_-]{6,}|sk-[A-Za-z0-9_-]{12,}|AIza[A-Za-z0-9_-]{20,}"
                     r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})")
# user:password@ in URLs (proxy URLs, database DSNs).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@'\"]*):([^@\s/'\"]+)@")
# Credentials in query strings (Gemini's `key=`; an OAuth callback's `code=` and `state=`).
_QUERY = re.compile(r"(?i)([?&](?:key|api[_-]?key|token|access_token|refresh_token|auth|code|state|code_verifier"
                    r"|client_secret)=)[^&\s'\"#]+")
# What every credential above has in it, somewhere: a line without any of these is passed over in one scan.
# (Plain substring tests of the lowered text: several times faster than one case-insensitive alternation.)
_MAYBE = ["aib_", "sk-", "aiza", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "://", "key", "token", "auth",
          "cookie", "code=", "state=", "secret", "verifier"]
_SCHEME = re.compile(r"(?i)(?:bearer|basic|token|digest|aws4-hmac-sha256)\s+")
_header_re: re.Pattern | None = None


def _header_pattern(names) -> re.Pattern:
    alternatives = "|".join(re.escape(n) for n in sorted(set(n.lower() for n in names), key=len, reverse=True))
    # name, then `: `, `=`, `': '`, `', b'` or `": "`, then the value up to a quote, a line end (real or escaped)
    # or the end of a repr.
    return re.compile(
        r"(?i)(?:(?<![A-Za-z0-9_-])|(?<=\\[rnt]))(" + alternatives + r")(['\"]?\s*[:=,]\s*(?:(?-i:b)?['\"])?[ \t]*)"
        r"((?:(?!\\[rn])[^'\"\r\n\]})])+)")


def _hint(secret: str) -> str:
    return f"{secret[:4]}…{secret[-4:]}" if len(secret) >= 16 else "…"


def _header_value(m: re.Match) -> str:
    value = m.group(3)
    scheme = _SCHEME.match(value)
    kept = scheme.group() if scheme else ""
    return f"{m.group(1)}{m.group(2)}{kept}<redacted>"


def redact(text: str) -> str:
    """`text` with every credential the gateway can recognise replaced: credential header values, gateway tokens and
    provider keys by their shape, URL passwords and credential query parameters."""
    global _header_re
    lowered = text.lower()
    if not any(m in lowered for m in _MAYBE):
        return text
    if _header_re is None:
        _header_re = _header_pattern(CREDENTIAL_HEADER_NAMES)
    text = _header_re.sub(_header_value, text)
    text = _SHAPED.sub(lambda m: _hint(m.group()), text)
    text = _USERINFO.sub(r"\1:<redacted>@", text)
    return _QUERY.sub(r"\1<redacted>", text)


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a log record in place: its formatted message (arguments included), the text of its exception and
    its stack. The exception's text is folded into the message, as mitmproxy's formatter would print it (that
    formatter formats `exc_info` itself, so a pre-rendered `exc_text` would not be used)."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: logging would print the arguments raw on stderr
        message = f"{record.msg!r} {record.args!r}"
    folded = False
    if record.exc_info:
        try:
            message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
        except Exception:
            pass
        record.exc_info, record.exc_text, folded = None, None, True
    if record.stack_info:
        record.stack_info = redact(str(record.stack_info))
    clean = redact(message)
    if folded or clean != message:
        record.msg, record.args = clean, None
    return record


def install_log_redaction(extra_headers=()) -> None:
    """Every log record this process creates, from any logger (the gateway's, mitmproxy's, libraries'), is redacted
    as it is made, whichever handler prints it later: the record factory is the one place all records pass."""
    global _header_re
    names = tuple(dict.fromkeys(CREDENTIAL_HEADER_NAMES + tuple(h.lower() for h in extra_headers)))
    _header_re = _header_pattern(names)
    for name in names:  # a provider's header named otherwise is looked for too
        if not any(m in name for m in _MAYBE):
            _MAYBE.append(name)
    current = logging.getLogRecordFactory()
    if getattr(current, "aibridge_redacts", False):
        return

    def factory(*args, **kwargs):
        return scrub_record(current(*args, **kwargs))

    factory.aibridge_redacts = True
    logging.setLogRecordFactory(factory)


class RedactingStream:
    """A text stream whose writes are redacted line by line (mitmproxy's flow dumper prints flows, with
    `flow_detail` 2 and above their headers, straight to stdout rather than through logging)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)
