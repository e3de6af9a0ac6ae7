"""What each call of a real client was for, and what the person typed, over the traffic captured from the clients
themselves (tests/fixtures/clients: two human turns each, through a gateway): each human turn is one `chat` call
whose prompt is exactly the typed words; the client's own calls (a title, a router, memory extraction) are marked
with their purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aibridge_gw.apis import WIRE_APIS
from aibridge_gw.flow.clients import detect_client
from aibridge_gw.flow.purpose import AUXILIARY, CHAT, MEMORY, ROUTER, TITLE, classify, typed_text

FIXTURES = Path(__file__).parent / "fixtures" / "clients"
TURNS = ("Say hello to the capture user", "Now say goodbye, briefly")  # what the person typed (capture_clients.py)


def api_of(path: str) -> str:
    if path.endswith("/messages"):
        return "anthropic.messages"
    if path.endswith("/chat/completions"):
        return "openai.chat"
    if path.endswith("/responses"):
        return "openai.responses"
    if "generatecontent" in path.lower():
        return "gemini.generate_content"
    raise AssertionError(path)


def calls(fixture: str) -> list[dict]:
    """Each captured call as the gateway reads it: client, purpose, the recorded prompt and the typed words."""
    out = []
    if "/" not in fixture:
        fixture += "/two-turns.json"
    for c in json.loads((FIXTURES / fixture).read_text()):
        api = api_of(c["path"])
        client = detect_client({k.lower(): v for k, v in c["headers"].items()})
        info = WIRE_APIS[api].parse_request(c["body"], c["path"])
        out.append({"turn": c["turn"], "client": client, "purpose": classify(client, api, c["body"]),
                    "prompt": info.prompt, "typed": typed_text(client, info.prompt)})
    return out


# Per client directory: its name, and per captured call (purpose, typed words; None: no prompt recorded).
EXPECTED = {
    # Gemini CLI (model auto): its router classifier before each turn, retried five times when the stand-in's answer
    # is not the JSON it wants; the first turn's user text follows a <session_context> part.
    "gemini-cli": ("Gemini CLI", [(ROUTER, TURNS[0])] * 5 + [(CHAT, TURNS[0])]
                   + [(ROUTER, TURNS[1])] * 5 + [(CHAT, TURNS[1])]),
    # Qwen Code: a managed-memory extraction call after each turn; its context is a message of its own.
    "qwen-code": ("Qwen Code", [(CHAT, TURNS[0]), (MEMORY, None), (CHAT, TURNS[1]), (MEMORY, None)]),
    # opencode: a title for the conversation (on claude-haiku) before the first turn; `opencode run` quotes a message
    # with spaces.
    "opencode": ("OpenCode", [(TITLE, None), (CHAT, TURNS[0]), (CHAT, TURNS[1])]),
    # Claude Code (-p, then -p --continue): <system-reminder> blocks before the typed words.
    "claude-code": ("Claude Code", [(CHAT, TURNS[0]), (CHAT, TURNS[1])]),
    # Kilo CLI: <environment_details> after the (quoted) words; its title call comes after the second turn.
    "kilo": ("Kilo Code", [(CHAT, TURNS[0]), (CHAT, TURNS[1]), (TITLE, None)]),
    # aider (--message, then --restore-chat-history): its rules in system messages, its examples before the turn.
    "aider": ("aider", [(CHAT, TURNS[0]), (CHAT, TURNS[1])]),
    # aider with `reminder: user` (its settings for many models): its 3 000-character rules follow the words.
    "aider/rules-in-user-message.json": ("aider", [(CHAT, TURNS[0]), (CHAT, TURNS[1])]),
}


def test_every_fixture_is_checked():
    files = {str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("*/*.json")}
    assert files == {k if "/" in k else k + "/two-turns.json" for k in EXPECTED}


@pytest.mark.parametrize("client_dir", sorted(EXPECTED))
def test_each_call_of_a_real_client_has_its_purpose_and_the_typed_words(client_dir):
    name, expected = EXPECTED[client_dir]
    got = calls(client_dir)
    assert {c["client"] for c in got} == {name}
    assert [c["purpose"] for c in got] == [p for p, _ in expected], got
    for c, (purpose, typed) in zip(got, expected):
        if typed is not None:
            assert c["typed"] == typed, c
            assert typed in c["prompt"]  # the raw prompt, as recorded, holds them
    # One prompt per human turn once the client's own calls are left out.
    human = [c["typed"] for c in got if c["purpose"] not in AUXILIARY and c["prompt"]]
    assert human == list(TURNS)


def test_gemini_cli_first_turn_raw_prompt_keeps_the_session_context():
    first = next(c for c in calls("gemini-cli") if c["purpose"] == CHAT)
    assert first["prompt"].startswith("<session_context>") and first["prompt"].endswith(TURNS[0])
    assert first["typed"] == TURNS[0]


@pytest.mark.parametrize("client, raw, typed", [
    ("Claude Code", "<system-reminder>\nctx\n</system-reminder>\nfix the bug", "fix the bug"),
    ("Claude Code", "<command-message>review</command-message>\n<command-name>/review</command-name>\n"
                    "<command-args>the parser</command-args>", "/review the parser"),
    ("Kilo Code", "fix the bug\n\n<environment_details>\n# VSCode Visible Files\nx.py\n</environment_details>",
     "fix the bug"),
    ("Gemini CLI", "<session_context>\ncwd listing\n</session_context>\nfix the bug", "fix the bug"),
    ("Kilo Code", "<task>\nfix the bug\n</task>\n\n<environment_details>\n# Current Time\n</environment_details>",
     "fix the bug"),
    ("Cline", "<task>\nfix the <b> tag\n</task>", "fix the <b> tag"),
    ("OpenCode", '"fix the bug"', "fix the bug"),
    ("OpenCode", 'say "hi" twice', 'say "hi" twice'),
    ("aider", "fix the bug\n\n# *SEARCH/REPLACE block* Rules:\n\nEvery *SEARCH/REPLACE block* must…", "fix the bug"),
    ("aider", "fix the bug\n\n\n# File editing rules:\n\nReturn edits similar to unified diffs", "fix the bug"),
    ("aider", "explain # File editing rules: in one line", "explain # File editing rules: in one line"),
    ("Unknown", "<session_context>kept</session_context> as is", "<session_context>kept</session_context> as is"),
    ("Gemini CLI", None, None),
])
def test_boilerplate_is_stripped_by_the_clients_own_wrappers(client, raw, typed):
    assert typed_text(client, raw) == typed


@pytest.mark.parametrize("client, api, body, purpose", [
    ("Claude Code", "anthropic.messages", {"messages": [{"role": "user", "content": "quota"}]}, "other_auxiliary"),
    ("Claude Code", "anthropic.messages", {"messages": [{"role": "user", "content": "quota is low, why?"}]}, CHAT),
    ("Claude Code", "anthropic.messages", {"system": [{"type": "text", "text": "x-anthropic-billing-header: x"},
                                                      {"type": "text", "text": "You are Claude Code."}],
                                           "messages": [{"role": "user", "content": [{"type": "text", "text":
                                               "[SUGGESTION MODE: Suggest what the user might naturally type next"}]}]},
     "suggestion"),
    ("Claude Code", "anthropic.messages", {"messages": [{"role": "user", "content":
        "Generate a concise, sentence-case title (3-7 words) that captures the main topic"}]}, TITLE),
    ("aider", "openai.chat", {"messages": [{"role": "system", "content": "*Briefly* summarize this partial "
                                            "conversation about programming."}, {"role": "user", "content": "x"}]},
     "summary"),
    ("aider", "openai.chat", {"messages": [{"role": "system", "content": "You are an expert software engineer that "
                                            "generates concise, one-line Git commit messages based on the provided "
                                            "diffs."}, {"role": "user", "content": "diff"}]}, "other_auxiliary"),
    ("OpenCode", "anthropic.messages", {"system": "You are a context summarization agent. You are given",
                                        "messages": [{"role": "user", "content": "x"}]}, "summary"),
    ("Gemini CLI", "gemini.generate_content", {"contents": [{"role": "user", "parts": [{"text":
        "Analyze *only* the content and structure of your immediately preceding response"}]}]}, "other_auxiliary"),
])
def test_markers_from_the_clients_own_code(client, api, body, purpose):
    assert classify(client, api, body) == purpose


def test_unknown_clients_and_other_apis():
    body = {"model": "m", "messages": [{"role": "system", "content": "You are a title generator"},
                                       {"role": "user", "content": "x"}]}
    assert classify("Unknown", "openai.chat", body) == CHAT  # another client's marker names nothing
    assert classify("OpenCode", "openai.chat", body) == TITLE
    assert classify("OpenCode", "openai.embeddings", body) is None
    assert classify("OpenCode", "openai.chat", None) is None


@pytest.mark.parametrize("client_dir", ["gemini-cli", "qwen-code", "aider"])
def test_clients_without_a_session_id_keep_one_conversation_across_their_calls(client_dir):
    from aibridge_gw.flow.purpose import conversation_key

    keys = set()
    for c in json.loads((FIXTURES / client_dir / "two-turns.json").read_text()):
        client = detect_client({k.lower(): v for k, v in c["headers"].items()})
        keys.add(conversation_key(client, api_of(c["path"]), c["body"], "user-1"))
    assert len(keys) == 1 and None not in keys
    (key,) = keys
    assert conversation_key("Gemini CLI", "gemini.generate_content",
                            {"contents": [{"role": "user", "parts": [{"text": "another opening"}]}]}, "user-1") != key
    assert conversation_key("OpenCode", "anthropic.messages", {"messages": []}, "u") is None  # it names its session


def test_a_long_session_context_does_not_split_a_gemini_cli_conversation():
    from aibridge_gw.flow.purpose import conversation_key

    keys = set()
    for c in json.loads((FIXTURES / "gemini-cli" / "two-turns.json").read_text()):
        body = json.loads(json.dumps(c["body"]))
        part = body["contents"][0]["parts"][0]
        part["text"] = part["text"].replace("</session_context>", "x" * 20_000 + "\n</session_context>")
        keys.add(conversation_key("Gemini CLI", "gemini.generate_content", body, "user-1"))
    assert len(keys) == 1 and None not in keys
