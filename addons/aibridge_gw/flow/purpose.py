"""What a model call was for, and which words of its prompt the person typed.

A coding client makes calls of its own beside the person's turns: a conversation title (opencode, Kilo), a router
that picks the model (Gemini CLI), a memory extraction after each turn (Qwen Code), a history summary, a
next-speaker check. Each is recognised by that client's own markers — the opening of its system prompt or of its
instruction, read from the client's source and seen in its real traffic (`tests/fixtures/clients/`) — never by
guesswork over arbitrary text: a call no marker names is `chat` (a human turn, or its continuation when it carries
tool results). `purpose` is recorded on the interception; auxiliary calls stay in the audit and are left out of
the prompts and their counts by default (docs/sessions.md).

The person's words: clients wrap them in text of their own (Gemini CLI's `<session_context>` part, Kilo's
`<environment_details>`, aider's rules, Claude Code's `<system-reminder>` blocks and command wrappers). The raw
prompt is kept as recorded; `typed_text` gives what the person typed, by the client's own wrappers only.

Both run once per request on the body already parsed, reading a bounded head of at most a few strings: no second
parse, no scan of a large body.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

CHAT = "chat"
TITLE = "title"
ROUTER = "router"
MEMORY = "memory"
SUMMARY = "summary"
SUGGESTION = "suggestion"
OTHER = "other_auxiliary"
WARMUP = "warmup"  # a Responses WebSocket warm-up (`generate: false`, addons/sockets.py): set there, never classified
AUXILIARY = frozenset({TITLE, ROUTER, MEMORY, SUMMARY, SUGGESTION, OTHER, WARMUP})
PURPOSES = (CHAT, *sorted(AUXILIARY))

HEAD = 400  # characters of a system prompt or instruction a marker is looked for in

# Per client: (purpose, where, marker), each found in that client's own code (its installed package here).
# `where`: "system" (the openings of the system prompt's first blocks / instruction), "user" (the openings of the
# last user message's first blocks), "any" (either). A marker is a prefix of an opening (after leading
# whitespace); one starting with "…" is looked for anywhere in the opening's HEAD characters; one starting with
# "=" must be the whole text.
MARKERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    # Gemini CLI 0.61 (packages/core): its model router, chat compression and state snapshots, the session summary,
    # the next-speaker check, the edit corrector, its context memory manager.
    "Gemini CLI": (
        (ROUTER, "system", "You are a specialized Task Routing AI"),
        (SUMMARY, "system", "You are the component that summarizes internal chat history"),
        (SUMMARY, "system", "You are an expert context compressor"),
        (SUMMARY, "system", "You are a specialized context summarizer"),
        (SUMMARY, "system", "You are generating a highly factual state summary"),
        (SUMMARY, "user", "…Summarize the user's primary intent or goal in this conversation in ONE sentence"),
        (OTHER, "user", "Analyze *only* the content and structure of your immediately preceding response"),
        (OTHER, "system", "You are an expert code-editing assistant"),
        (MEMORY, "system", "You are an expert Context Memory Manager"),
    ),
    # Qwen Code 0.15 (a fork of Gemini CLI): managed memory extraction after each turn, chat compression, the
    # next-speaker check.
    "Qwen Code": (
        (MEMORY, "system", "You are now acting as the managed memory extraction subagent"),
        (SUMMARY, "system", "You are the component that summarizes internal chat history"),
        (OTHER, "user", "Analyze *only* the content and structure of your immediately preceding response"),
    ),
    # opencode 1.18 and Kilo CLI 7.7 (its fork): the title agent and the compaction agent.
    "OpenCode": (
        (TITLE, "system", "You are a title generator"),
        (SUMMARY, "system", "You are a context summarization agent"),
    ),
    "Kilo Code": (
        (TITLE, "system", "You are a title generator"),
        (SUMMARY, "system", "You are a context summarization agent"),
    ),
    # Claude Code 2.1: the session title, conversation summaries (compaction), the next-prompt suggestion, and the
    # one-token `quota` probe.
    "Claude Code": (
        (TITLE, "any", "Generate a concise, sentence-case title"),
        (SUMMARY, "system", "You are a helpful AI assistant tasked with summarizing conversations"),
        (SUGGESTION, "user", "[SUGGESTION MODE"),
        (OTHER, "user", "=quota"),
    ),
    # aider 0.86: chat history summaries (ChatSummary) and commit messages.
    "aider": (
        (SUMMARY, "any", "*Briefly* summarize this partial conversation"),
        (OTHER, "system", "…one-line Git commit message"),
    ),
}


BLOCKS = 4  # text blocks of a system prompt looked at, at most (Claude Code's first is its billing header)


def _heads(value: Any, limit: int = HEAD) -> tuple[str, ...]:
    """The openings of a system prompt's or a content's first text blocks: a string, or up to BLOCKS text blocks
    of a list (Gemini's `{"parts": [...]}` too), each stripped of leading whitespace and cut at `limit`."""
    if isinstance(value, str):
        return (value[:limit + 64].lstrip()[:limit],)
    if isinstance(value, dict):
        return _heads(value.get("parts") if "parts" in value else value.get("text"), limit)
    out: list[str] = []
    if isinstance(value, list):
        for n, b in enumerate(value):
            if n >= 2 * BLOCKS or len(out) >= BLOCKS:
                break
            t = b if isinstance(b, str) else b.get("text") if isinstance(b, dict) else None
            if isinstance(t, str) and t.strip():
                out.append(t[:limit + 64].lstrip()[:limit])
    return tuple(out)


def _openings(api: str, body: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(system openings, last user text openings) of a model request."""
    system: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    if api == "anthropic.messages":
        system = _heads(body.get("system"))
        msgs = body.get("messages")
        if isinstance(msgs, list):
            for m in reversed(msgs[-3:]):  # the last user message (Claude Code may append a system message)
                if isinstance(m, dict) and m.get("role") == "user":
                    user = _heads(m.get("content"))
                    break
    elif api == "openai.chat":
        msgs = body.get("messages")
        if isinstance(msgs, list) and msgs:
            first, last = msgs[0], msgs[-1]
            if isinstance(first, dict) and first.get("role") in ("system", "developer"):
                system = _heads(first.get("content"))
            if isinstance(last, dict) and last.get("role") == "user":
                user = _heads(last.get("content"))
    elif api == "openai.responses":
        system = _heads(body.get("instructions"))
        inp = body.get("input")
        if isinstance(inp, str):
            user = _heads(inp)
        elif isinstance(inp, list) and inp:
            first, last = inp[0], inp[-1]
            if not system and isinstance(first, dict) and first.get("role") in ("system", "developer"):
                system = _heads(first.get("content"))
            if isinstance(last, dict) and last.get("role") == "user":
                user = _heads(last.get("content"))
    elif api == "gemini.generate_content":
        system = _heads(body.get("systemInstruction") or body.get("system_instruction"))
        contents = body.get("contents")
        if isinstance(contents, list) and contents:
            last = contents[-1]
            if isinstance(last, dict) and last.get("role", "user") == "user":
                user = _heads(last.get("parts"))
    return system, user


MODEL_CALL_APIS = frozenset({"anthropic.messages", "openai.chat", "openai.responses", "gemini.generate_content"})


def classify(client: str, api: str, body: dict | None) -> str | None:
    """The call's purpose (None: not a conversation API, or no body to read)."""
    if api not in MODEL_CALL_APIS or not isinstance(body, dict):
        return None
    markers = MARKERS.get(client)
    if not markers:
        return CHAT
    system, user = _openings(api, body)
    for purpose, where, marker in markers:
        for text in (system if where == "system" else user if where == "user" else system + user):
            if marker[0] == "…":
                hit = marker[1:] in text
            elif marker[0] == "=":
                hit = text.strip() == marker[1:]
            else:
                hit = text.startswith(marker)
            if hit:
                return purpose
    return CHAT


# --- the person's words ------------------------------------------------------------------------------------------

_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>\s*", re.S)
_SESSION_CONTEXT = re.compile(r"<session_context>.*?</session_context>\s*", re.S)
_TASK = re.compile(r"<task>\s*(.*?)\s*</task>", re.S)
_ENVIRONMENT = re.compile(r"\s*<environment_details>.*?</environment_details>\s*", re.S)
# Claude Code's slash commands: <command-message>…</command-message><command-name>/x</command-name><command-args>…
_COMMAND_ARGS = re.compile(r"<command-args>(.*?)</command-args>", re.S)
_COMMAND_NAME = re.compile(r"<command-name>(.*?)</command-name>", re.S)
_CLAUDE_WRAPPERS = re.compile(r"<(local-command-stdout|local-command-stderr|command-message|command-name|"
                              r"command-args|local-command-caveat)>.*?</\1>\s*", re.S)
_QWEN_CONTEXT = "This is the Qwen Code. We are setting up the context for our chat."
_GEMINI_CONTEXT = "This is the Gemini CLI. We are setting up the context for our chat."


# aider's rules (its edit format's `system_reminder`, aider/coders/*_prompts.py): for a model whose settings say
# `reminder: user` it appends them to the person's message after a blank line.
_AIDER_RULES = ("# *SEARCH/REPLACE block* Rules:", "# V4A Diff Format Rules:", "# File editing rules:",
                "To suggest changes to a file you MUST return the entire content of the updated file.",
                "ONLY return code using the `", "NEVER RETURN CODE!")


def _aider(prompt: str) -> str:
    """The person's message before aider's rules (the earliest of its rule headings after a blank line)."""
    cut = len(prompt)
    for head in _AIDER_RULES:
        at = prompt.find("\n\n" + head)
        if at < 0:
            at = prompt.find("\n\n\n" + head)
        if 0 <= at < cut:
            cut = at
    return prompt[:cut]


def _unquoted(text: str) -> str:
    """`opencode run` (and Kilo's) passes a message word with spaces in double quotes: one such word is the text."""
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        return text[1:-1]
    return text


def typed_text(client: str, prompt: str | None) -> str | None:
    """What the person typed, from the recorded prompt by the client's own wrappers (the prompt itself when the
    client adds nothing known)."""
    if not prompt:
        return prompt
    text = prompt
    if client == "Claude Code":
        text = _REMINDER.sub("", text)
        if "<command-name>" in text:
            name = _COMMAND_NAME.search(text)
            args = _COMMAND_ARGS.search(text)
            text = " ".join(x for x in ((name.group(1).strip() if name else ""),
                                        (args.group(1).strip() if args else "")) if x)
        else:
            text = _CLAUDE_WRAPPERS.sub("", text)
    elif client == "Gemini CLI":
        text = _SESSION_CONTEXT.sub("", text)
        if text.lstrip().startswith("<session_context>"):  # cut before its end (a bounded opening)
            return ""
        if text.lstrip().startswith(_GEMINI_CONTEXT):
            return ""
    elif client in ("Kilo Code", "OpenCode", "Roo Code", "Cline"):
        text = _ENVIRONMENT.sub("\n", text)
        text = _REMINDER.sub("", text)
        task = _TASK.fullmatch(text.strip())  # the extensions' first message: <task>…</task>
        if task:
            text = task.group(1)
        if client in ("Kilo Code", "OpenCode"):
            text = _unquoted(text.strip())
    elif client == "Qwen Code":
        if text.lstrip().startswith(_QWEN_CONTEXT):
            return ""
        text = _REMINDER.sub("", text)
    elif client == "aider":
        text = _aider(text)
    return text.strip()


# --- a conversation for clients that name none ---------------------------------------------------------------------

# Clients that send no session id (docs/clients.md): their calls are grouped by the conversation's opening instead.
UNNAMED_SESSIONS = frozenset({"Gemini CLI", "Qwen Code", "aider"})
OPENING_MAX = 4096  # characters of the conversation's first typed words that key it


def _user_texts(api: str, body: dict):
    """The text of the request's first few user messages, oldest first (bounded: 6 messages, 8 blocks each)."""
    if api == "gemini.generate_content":
        items, role, key = body.get("contents"), "user", "parts"
    elif api == "openai.responses":
        items, role, key = body.get("input"), "user", "content"
    else:
        items, role, key = body.get("messages"), "user", "content"
    if not isinstance(items, list):
        return
    seen = 0
    for m in items[:12]:
        if not isinstance(m, dict) or m.get("role", "user" if api == "gemini.generate_content" else None) != role:
            continue
        seen += 1
        if seen > 6:
            return
        yield _heads(m.get(key), OPENING_MAX)


def conversation_key(client: str, api: str, body: dict | None, user_id: str) -> str | None:
    """For a client that names no session: its conversation, as the hash of the first words the person typed in it
    (each call resends the conversation from its start, so every call of one conversation has the same). Two
    conversations of one user opening with the same words share a key."""
    if client not in UNNAMED_SESSIONS or api not in MODEL_CALL_APIS or not isinstance(body, dict):
        return None
    for blocks in _user_texts(api, body):
        # Block by block: a block cut at OPENING_MAX (a long cwd listing) is still known as the client's own.
        typed = "\n".join(t for b in blocks if (t := typed_text(client, b)))
        if typed:
            digest = hashlib.sha256(f"{user_id}\0{client}\0{typed[:OPENING_MAX]}".encode()).hexdigest()
            return f"conv_{digest[:24]}"
    return None
