"""Capture real clients' model calls for tests/fixtures/clients: each installed client is run headless through a
real gateway (base-URL mode) against the loopback stand-in for two human turns (a first prompt and a follow-up in
the same session), and every model call the stand-in received is written as JSON, redacted and normalised.

    PYTHONPATH=addons python -m tests.support.capture_clients tests/fixtures/clients [client ...]
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aibridge_gw.admin.guides import AIDER_SETTINGS

from tests.support.clients import CACHE, answer, clean_env, npm_bin, pip_bin
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.tls import tls_stand_in

KEY = "sk-upstream-capture-0123456789"
TURNS = ("Say hello to the capture user", "Now say goodbye, briefly")
KEEP_HEADERS = ("user-agent", "x-title", "x-session-id", "x-claude-code-session-id", "anthropic-beta",
                "anthropic-version", "x-stainless-lang", "originator")
MODEL_PATHS = ("/v1/messages", "/chat/completions", "/responses", ":generateContent", ":streamGenerateContent")


def _skip(exc: BaseException) -> bool:
    return type(exc).__name__ in ("Skipped", "OutcomeException")




def main(out: Path, only: list[str]) -> None:
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="aibridge-capture-"))
    stand_in = tls_stand_in(tmp / "tls", ["127.0.0.1"])
    stand_in.check = answer
    stand_in.default = Reply.json({"object": "list", "data": []})
    gw = Gateway(tmp / "gw", stand_in.url, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": stand_in.url + "/", "key": KEY},
        {"name": "openai", "type": "openai", "base_url": stand_in.url + "/v1/", "key": KEY},
        {"name": "gemini", "type": "gemini", "base_url": stand_in.url + "/", "key": KEY},
    ], args=["--set", f"ssl_verify_upstream_trusted_ca={stand_in.ca}"]).start()
    try:
        for client in only or list(CLIENTS):
            try:
                exe = CLIENTS[client]["install"]()
            except BaseException as e:  # noqa: BLE001 — pytest.skip raised by the installers
                if _skip(e):
                    print(f"{client}: not installed here: {e}")
                    continue
                raise
            user = f"capture-{client}-{uuid.uuid4().hex[:6]}"
            token = gw.new_user(user)
            root = tmp / client
            home, work = root / "home", root / "work"
            work.mkdir(parents=True)
            env = clean_env(home, PWD=str(work), **CLIENTS[client]["env"](gw, token))
            CLIENTS[client].get("setup", lambda *a: None)(gw, home, work)
            calls = []
            for turn, prompt in enumerate(TURNS, 1):
                mark = len(stand_in.seen)
                argv = [str(exe), *CLIENTS[client]["argv"](prompt, turn)]
                r = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True, timeout=300,
                                   stdin=subprocess.DEVNULL)
                print(f"{client} turn {turn}: rc={r.returncode} {r.stdout[-200:]!r} {r.stderr[-300:]!r}")
                time.sleep(1)
                for seen in stand_in.seen[mark:]:
                    if seen.method != "POST" or not any(p in seen.path for p in MODEL_PATHS):
                        continue
                    calls.append({"turn": turn, "method": seen.method, "path": seen.path.split("?")[0],
                                  "headers": {h: v for h, v in seen.headers.items() if h.lower() in KEEP_HEADERS},
                                  "body": seen.json()})
            text = json.dumps(calls, indent=1, ensure_ascii=False)
            text = normalise(text, {str(work): "/work/project", str(home): "/home/user", str(root): "/capture",
                                    str(tmp): "/tmp/capture", token: "<gateway-token>", KEY: "<upstream-key>",
                                    user: "capture-user", str(CACHE): "/opt/clients"})
            dest = out / client
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "two-turns.json").write_text(text + "\n")
            print(f"{client}: {len(calls)} calls -> {dest / 'two-turns.json'}")
    finally:
        gw.stop()
        stand_in.stop()


def normalise(text: str, replace: dict[str, str]) -> str:
    for old, new in sorted(replace.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(old, new)
    text = re.sub(r"/tmp/aibridge-capture-[A-Za-z0-9_]+", "/tmp/capture", text)
    text = re.sub(r"-tmp-aibridge-capture-[A-Za-z0-9_]+-", "-tmp-capture-", text)
    return text


def _aider_setup(gw, home, work):
    (work / ".aider.model.settings.yml").write_text(AIDER_SETTINGS)


def _aider_rules_setup(gw, home, work):
    """aider with a model whose settings put its rules into the user message (`reminder: user`, as aider's own
    settings have for many models)."""
    (work / ".aider.model.settings.yml").write_text(
        AIDER_SETTINGS + "\n- name: openai/gpt-4.1\n  edit_format: diff\n  reminder: user\n")


def _gemini_setup(gw, home, work):
    s = home / ".gemini" / "settings.json"
    s.parent.mkdir(parents=True, exist_ok=True)
    s.write_text(json.dumps({"security": {"auth": {"selectedType": "gemini-api-key"}},
                             "privacy": {"usageStatisticsEnabled": False}}))


def _opencode_setup(config_name):
    def setup(gw, home, work):
        options = {"baseURL": gw.url + "/anthropic/v1"}
        if config_name == "opencode.json":  # Kilo takes the key from ANTHROPIC_API_KEY (as test_real_clients does)
            options["apiKey"] = "{env:AIBRIDGE_TOKEN}"
        (work / config_name).write_text(json.dumps({"provider": {"anthropic": {"options": options}}}))
    return setup


_AIDER = {
    "install": lambda: pip_bin(("aider-chat",), "aider"),
    "env": lambda gw, t: {"OPENAI_API_KEY": t, "OPENAI_API_BASE": gw.url + "/openai/v1",
                          "AIDER_CHECK_UPDATE": "false", "AIDER_ANALYTICS": "false"},
    "argv": lambda p, turn: ["--model", "openai/gpt-4.1", "--message", p, "--no-git", "--yes-always",
                             "--no-show-model-warnings", "--no-pretty", "--stream",
                             *(["--restore-chat-history"] if turn > 1 else [])],
}


CLIENTS = {
    "claude-code": {
        "install": lambda: npm_bin("@anthropic-ai/claude-code", "claude", postinstall="install.cjs"),
        "env": lambda gw, t: {"ANTHROPIC_API_KEY": t, "ANTHROPIC_BASE_URL": gw.url + "/anthropic"},
        "argv": lambda p, turn: ["-p", p] if turn == 1 else ["-p", "--continue", p],
    },
    "gemini-cli": {
        "install": lambda: npm_bin("@google/gemini-cli", "gemini"),
        "env": lambda gw, t: {"GEMINI_API_KEY": t, "GEMINI_CLI_TRUST_WORKSPACE": "true",
                              "GOOGLE_GEMINI_BASE_URL": gw.url + "/gemini"},
        "setup": _gemini_setup,
        "argv": lambda p, turn: ["-p", p, *(["--resume", "latest"] if turn > 1 else [])],  # model auto: its router runs
    },
    "opencode": {
        "install": lambda: npm_bin("opencode-ai", "opencode"),
        "env": lambda gw, t: {"AIBRIDGE_TOKEN": t, "ANTHROPIC_API_KEY": t},
        "setup": _opencode_setup("opencode.json"),
        "argv": lambda p, turn: ["run", "-m", "anthropic/claude-sonnet-4-5", *(["-c"] if turn > 1 else []), p],
    },
    "kilo": {
        "install": lambda: npm_bin("@kilocode/cli@7.7.7", "kilo"),
        "env": lambda gw, t: {"AIBRIDGE_TOKEN": t, "ANTHROPIC_API_KEY": t},
        "setup": _opencode_setup("kilo.json"),
        "argv": lambda p, turn: ["run", "-m", "anthropic/claude-sonnet-4-5", *(["-c"] if turn > 1 else []), p],
    },
    "aider": {**_AIDER, "setup": _aider_setup},
    "aider-rules": {**_AIDER, "setup": _aider_rules_setup},  # a rules file appended to every message
    "qwen-code": {
        "install": lambda: npm_bin("@qwen-code/qwen-code", "qwen"),
        "env": lambda gw, t: {"OPENAI_API_KEY": t, "OPENAI_BASE_URL": gw.url + "/openai/v1",
                              "OPENAI_MODEL": "gpt-4.1"},
        "argv": lambda p, turn: ["-p", p, "--auth-type", "openai", *(["--continue"] if turn > 1 else [])],
    },
}


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
