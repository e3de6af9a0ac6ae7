"""Which coding tool sent a request, and which of its sessions, from headers and body hints."""

from __future__ import annotations

from collections.abc import Mapping

# (client name, substrings of the lower-cased User-Agent / originator / X-Title); first match wins.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Claude Code", ("claude-cli/", "claude-code", "claude_code")),
    ("Codex", ("codex_cli", "codex_exec", "codex-cli", "codex_vscode", "codex/", "codex_")),
    ("Kilo Code", ("kilo-code", "kilocode", "kilo code")),
    ("Roo Code", ("roo-code", "roocode", "roo code")),
    ("GitHub Copilot", ("githubcopilot", "copilot/", "copilot-chat")),
    ("Cursor", ("cursor/", "cursor-")),
    ("Zed", ("zed/", "zed-editor", "zed ")),
    ("Crush", ("crush/", "charm-crush", "charmbracelet/crush")),
    ("Mux", ("mux/", "coder-mux", "mux-")),
    ("Gemini CLI", ("geminicli", "gemini-cli")),  # "GeminiCLI-tui/0.61.0/gemini-2.5-flash (linux; x64; terminal)"
)

_SESSION_HEADERS = (
    "x-claude-code-session-id",
    "session_id",
    "session-id",
    "x-session-id",
    "conversation_id",
    "x-conversation-id",
)


def detect_client(headers: Mapping[str, str]) -> str:
    hay = " ".join(
        headers.get(h, "") for h in ("user-agent", "originator", "x-title", "http-referer", "copilot-integration-id")
    ).lower()
    for name, needles in _SIGNATURES:
        if any(n in hay for n in needles):
            return name
    if headers.get("copilot-integration-id"):
        return "GitHub Copilot"
    return "Unknown"


def detect_session(headers: Mapping[str, str], body_hint: str | None) -> str | None:
    for h in _SESSION_HEADERS:
        v = headers.get(h)
        if v:
            return v[:200]
    return body_hint
