"""Real coding clients for the end-to-end tests: installed from the registries into a cache kept between runs,
and a stand-in answer for whatever API a client calls.

The cache is `$AIBRIDGE_CLIENT_CACHE`, else `~/.cache/aibridge/clients`; each install is keyed by the package
list, so a second run reuses it. A client that cannot be installed here is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .mock_upstream import Reply, Seen
from .wire import anthropic_message, anthropic_stream, chat_completion, chat_stream, responses_stream

CACHE = Path(os.environ.get("AIBRIDGE_CLIENT_CACHE") or Path.home() / ".cache" / "aibridge" / "clients")
ANSWER = "The gateway relayed this answer."
USAGE = (31, 9)


def _key(packages: tuple[str, ...]) -> str:
    return hashlib.sha256(" ".join(packages).encode()).hexdigest()[:12]


def npm_bin(package: str, binary: str, postinstall: str | None = None) -> Path:
    """`binary` from npm `package`, installed once into the cache (skip when npm or the install fails)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed here")
    prefix = CACHE / "npm" / _key((package,))
    exe = prefix / "node_modules" / ".bin" / binary
    if not exe.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), package],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"npm install {package} failed here: {r.stderr.strip()[-300:]}")
        if postinstall:  # npm 11 skips install scripts: run the package's own, which places the binary
            pkg_dir = prefix / "node_modules" / package.rsplit("@", 1)[0] if package.count("@") > 1 else \
                prefix / "node_modules" / package
            subprocess.run(["node", postinstall], cwd=pkg_dir, capture_output=True, timeout=300)
    if not exe.exists():
        pytest.skip(f"{package} installed without its {binary} binary")
    return exe


def pip_bin(packages: tuple[str, ...], binary: str) -> Path:
    """`binary` from a virtualenv (the suite's Python) holding `packages`, created once in the cache."""
    venv = CACHE / "py" / _key(packages)
    exe = venv / "bin" / binary
    if not exe.exists():
        shutil.rmtree(venv, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode == 0:
            r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                                *packages], capture_output=True, text=True, timeout=1200)
        if r.returncode != 0 or not exe.exists():
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"pip install {' '.join(packages)} failed here: {(r.stderr or r.stdout).strip()[-300:]}")
    return exe


def answer(seen: Seen) -> Reply | None:
    """MockUpstream.check: the stand-in provider's answer for any model call a client makes (None: fall through to
    the default answers for listings and the like)."""
    path = seen.path.split("?")[0]
    if seen.method != "POST":
        return None
    try:
        body = json.loads(seen.body or b"{}")
    except ValueError:
        body = {}
    stream = body.get("stream") is True
    if path.endswith("/v1/messages"):
        return Reply.sse(anthropic_stream(ANSWER, USAGE)) if stream else Reply.json(anthropic_message(ANSWER, USAGE))
    if path.endswith("/chat/completions"):
        model = str(body.get("model") or "gpt-4.1")
        if stream:
            return Reply.sse(chat_stream(ANSWER, USAGE, model))
        return Reply.json(chat_completion(ANSWER, USAGE, model))
    if path.endswith("/responses"):
        return Reply.sse(responses_stream(ANSWER, USAGE))
    if ":streamGenerateContent" in path:
        return Reply.sse([b"data: " + json.dumps(gemini_response()).encode() + b"\r\n\r\n"])
    if ":generateContent" in path:
        return Reply.json(gemini_response())
    return None


def gemini_response() -> dict:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": ANSWER}]}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": USAGE[0], "candidatesTokenCount": USAGE[1],
                              "totalTokenCount": sum(USAGE)},
            "modelVersion": "gemini-2.5-flash", "responseId": "standin-gemini-1"}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A client's environment: its own HOME (no user config leaks in), no proxy unless given, no telemetry."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("ANTHROPIC_", "OPENAI_", "GEMINI_", "AWS_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_CACHE_HOME=str(home / ".cache"), NO_COLOR="1", CI="1", DISABLE_AUTOUPDATER="1",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DO_NOT_TRACK="1", NO_PROXY="")
    env.update(extra)
    return env
