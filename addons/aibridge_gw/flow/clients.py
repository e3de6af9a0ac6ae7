"""Which coding tool sent a request, which of its sessions, and what else it says about itself.

Names follow Coder's AI Bridge wherever it has one (its dashboards and API filters use them); the others are
ours. Each client is recognised by what it really sends — read from its source or seen by running it: a
User-Agent prefix (a prefix, not a substring: `ccclaude-cli/…` is not Claude Code), an `originator`, an
OpenRouter-style title, a header only it sends, or a Copilot integration id. Its session id comes from its own
header only (another client's `session_id` means something else). Unknown clients stay `Unknown`; the raw
User-Agent is kept in the record either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

UNKNOWN = "Unknown"


@dataclass(frozen=True)
class Client:
    name: str
    agents: tuple[str, ...] = ()  # lower-case User-Agent prefixes
    originators: tuple[str, ...] = ()  # lower-case `originator` prefixes (OpenAI's clients)
    titles: tuple[str, ...] = ()  # lower-case X-Title / X-OpenRouter-Title values
    markers: tuple[str, ...] = ()  # headers only this client sends
    integrations: tuple[str, ...] = ()  # Copilot-Integration-Id values
    sessions: tuple[str, ...] = ()  # headers carrying its session (conversation, task) id, preferred first
    body_session: bool = False  # its session may also be in the body (Claude Code's metadata.user_id)


# First match wins; more specific clients first.
CLIENTS: tuple[Client, ...] = (
    Client("Coder Agents", agents=("coder-agents/",), markers=("x-coder-chat-id",), sessions=("x-coder-chat-id",)),
    Client("Claude Code", agents=("claude-cli/", "claude-code/"), markers=("x-claude-code-session-id",),
           sessions=("x-claude-code-session-id",), body_session=True),
    Client("Codex", agents=("codex_cli_rs/", "codex_exec/", "codex_vscode/", "codex-tui/", "codex_sdk"),
           originators=("codex",), sessions=("session_id", "session-id", "conversation_id")),
    Client("GitHub Copilot (VS Code)", agents=("githubcopilotchat/",), integrations=("vscode-chat",),
           sessions=("x-interaction-id",)),
    Client("GitHub Copilot (CLI)", agents=("copilot/",), integrations=("copilot-developer-cli",),
           sessions=("x-client-session-id",)),
    Client("Kilo Code", agents=("kilo-code/", "kilocode/", "kilo/"), originators=("kilo-code",),
           titles=("kilo code",), markers=("x-kilocode-taskid", "x-kilocode-version"),
           sessions=("x-kilocode-taskid", "x-session-id")),  # the extension's task; Kilo CLI (opencode's fork)
    Client("Roo Code", agents=("roo-code/", "roocode/"), originators=("roo-code",), titles=("roo code",)),
    # The Cline CLI sends only the AI SDK's user agent (`ai-sdk/openai-compatible/… runtime/bun/…`, as any AI SDK
    # program on bun does): it is named by the X-Title `aibridge env cline` adds to its provider settings.
    Client("Cline", agents=("cline/",), titles=("cline",), sessions=("x-task-id",)),
    Client("Charm Crush", agents=("charm crush/", "charm-crush/", "crush/")),
    Client("Cursor", agents=("cursor/",), markers=("x-cursor-client-version",)),
    Client("Mux", agents=("mux/", "xum/"), markers=("x-mux-workspace-id",), sessions=("x-mux-workspace-id",)),
    Client("Zed", agents=("zed/",)),
    Client("OpenCode", agents=("opencode/",), originators=("opencode",), sessions=("x-session-id",)),
    Client("Gemini CLI", agents=("geminicli",), markers=("x-gemini-api-privileged-user-id",)),
    Client("Qwen Code", agents=("qwencode", "qwen-code/")),
    Client("Factory Droid", agents=("factory-cli/", "droid/")),
    Client("Goose", agents=("goose/",)),
    # Continue's `cn` sends `node-fetch` (Anthropic) or the OpenAI SDK's agent: named by its guide's X-Title.
    Client("Continue", agents=("continue/",), titles=("continue",)),
    Client("Junie", agents=("junie",)),
    Client("Kiro", agents=("kiro-ide/", "kiro/")),
    Client("Amazon Q", agents=("amazonq-for-cli",)),
    Client("Antigravity", agents=("antigravity/",)),
    Client("Sourcegraph Amp", agents=("amp/", "amp-cli/")),
    Client("Windsurf", agents=("windsurf/",)),
    # aider and Simon Willison's llm send only the OpenAI SDK's headers (User-Agent `OpenAI/Python …`): they are
    # named by the X-Title that `aibridge env aider|llm` configures, and stay Unknown without it.
    Client("aider", agents=("aider/",), titles=("aider",)),
    Client("llm", agents=("llm/",), titles=("llm",)),
)
_BY_NAME = {c.name: c for c in CLIENTS}
_MARKERS = tuple(dict.fromkeys(m for c in CLIENTS for m in c.markers))  # every client-only header, looked up once
# Sessions of clients we cannot name: the headers any of them uses for a conversation.
_GENERIC_SESSIONS = ("x-session-id", "session_id", "session-id", "x-conversation-id", "conversation_id")
# What Coder Agents says about the chat it serves (kept in the interception's metadata).
CODER_HEADERS = ("x-coder-owner-id", "x-coder-chat-id", "x-coder-subchat-id", "x-coder-workspace-id")


def detect_client(headers: Mapping[str, str]) -> str:
    """`headers`: lower-case names (the pipeline's header view)."""
    agent = headers.get("user-agent", "").strip().lower()
    originator = headers.get("originator", "").strip().lower()
    title = (headers.get("x-title") or headers.get("x-openrouter-title") or "").strip().lower()
    integration = headers.get("copilot-integration-id", "").strip().lower()
    markers = {m for m in _MARKERS if headers.get(m)}
    for c in CLIENTS:
        if ((agent and agent.startswith(c.agents)) or (originator and originator.startswith(c.originators))
                or (title and title in c.titles) or (integration and integration in c.integrations)
                or (markers and not markers.isdisjoint(c.markers))):
            return c.name
    return UNKNOWN


def detect_session(client: str, headers: Mapping[str, str], body_hint: str | None) -> str | None:
    """The client's session id from its own header (else, for Claude Code, the body's)."""
    known = _BY_NAME.get(client)
    names = known.sessions if known is not None else _GENERIC_SESSIONS
    for h in names:
        v = headers.get(h, "").strip()
        if v:
            return v[:200]
    if known is None or known.body_session:
        return body_hint
    return None


def client_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """Facts a client sends about its context that the record keeps (Coder Agents' owner, chat, workspace)."""
    return {h[2:].replace("-", "_"): headers[h].strip()[:200] for h in CODER_HEADERS if headers.get(h, "").strip()}
