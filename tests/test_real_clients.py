"""Real coding clients, installed from npm and PyPI, run headless against the gateway and a loopback stand-in in
both modes: the answer reaches the client, and the audit row names the client, its session, the exact usage and
the prompt. Installs are cached (see support/clients.py); a client that cannot be installed here is skipped with
the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from aibridge_gw.admin.guides import AIDER_SETTINGS, llm_models
from aibridge_gw.certs import bundle

from tests.support.clients import ANSWER, USAGE, answer, clean_env, npm_bin, pip_bin
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.tls import tls_stand_in

pytestmark = pytest.mark.timeout(600)
ANSWERS_ADDON = Path(__file__).parent / "support" / "answers_log.py"  # what the gateway answered each call
UPSTREAM_KEY = "sk-upstream-real-clients-0123456789"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    mock = tls_stand_in(tmp_path_factory.mktemp("clients-tls"), ["127.0.0.1"])
    mock.check = answer
    mock.default = Reply.json({"object": "list", "data": []})  # listings, settings: nothing to tell
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def cgw(tmp_path_factory, stand_in):
    """One gateway for every client: base-URL prefixes and the public AI hosts in proxy mode, all answered by the
    stand-in."""
    url = stand_in.url
    workdir = tmp_path_factory.mktemp("clients-gw")
    gw = Gateway(workdir, url, env={"AIBRIDGE_TEST_ANSWERS": str(workdir / "answers.log")}, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": url + "/", "key": UPSTREAM_KEY,
         "hosts": ["api.anthropic.com"]},
        {"name": "openai", "type": "openai", "base_url": url + "/v1/", "key": UPSTREAM_KEY, "hosts": ["api.openai.com"]},
        {"name": "gemini", "type": "gemini", "base_url": url + "/", "key": UPSTREAM_KEY},
    ], args=["--set", f"ssl_verify_upstream_trusted_ca={stand_in.ca}", "-s", str(ANSWERS_ADDON)]).start()
    yield gw
    gw.stop()


class Run:
    """One client run: its own user (so its rows are its own), HOME and prompt."""

    def __init__(self, gw: Gateway, tmp_path, name: str, mode: str) -> None:
        self.gw, self.mode = gw, mode
        self.user = f"{name}-{mode}-{uuid.uuid4().hex[:6]}"
        self.token = gw.new_user(self.user)
        self.home = tmp_path / "home"
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.prompt = f"Say hello to {self.user}"
        host = gw.url.split("://")[1]
        self.proxy = f"http://{self.user}:{self.token}@{host}"
        self.ca = str(gw.ca)

    def env(self, **extra: str) -> dict[str, str]:
        if self.mode == "proxy":
            extra = {"HTTPS_PROXY": self.proxy, "https_proxy": self.proxy, "NODE_EXTRA_CA_CERTS": self.ca, **extra}
        return clean_env(self.home, **extra)

    def run(self, argv: list, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
        # PWD too: some clients (opencode) take the project directory from it, not from the process's cwd.
        try:
            return subprocess.run([str(a) for a in argv], env={**env, "PWD": str(self.work)}, cwd=self.work,
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace")[-1500:] + (e.stderr or b"").decode(errors="replace")[-1500:]
            pytest.fail(f"{argv[0]} did not finish in {timeout} s:\n{out}")

    def rows(self) -> list[dict]:
        """Its recorded model calls (the one carrying its prompt first)."""
        rows = self.gw.wait_for(
            "SELECT i.*, p.prompt FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
            f"LEFT JOIN aibridge_user_prompts p ON p.interception_id = i.id WHERE u.name = '{self.user}' "
            "AND i.status <> 'in_progress' ORDER BY i.started_at")
        return sorted(rows, key=lambda r: self.prompt not in (r["prompt"] or ""))

    def assert_recorded(self, client: str, session: bool = True, api: str | None = None) -> dict:
        row = self.rows()[0]
        assert self.prompt in (row["prompt"] or ""), row
        assert (row["client"], row["status"]) == (client, "completed"), row
        assert row["credential_kind"] == "centralized", row  # the gateway token was the key, in both modes
        if api:
            assert row["api"] == api
        if session:
            assert row["client_session_id"], row
        usage = self.gw.sql(f"SELECT input_tokens, output_tokens FROM aibridge_token_usages "
                            f"WHERE interception_id = '{row['id']}'")
        assert [(u["input_tokens"], u["output_tokens"]) for u in usage] == [USAGE]
        return row


MODES = ["base-url", "proxy"]


@pytest.mark.parametrize("mode", MODES)
def test_opencode(cgw, tmp_path, mode):
    exe = npm_bin("opencode-ai", "opencode")
    run = Run(cgw, tmp_path, "opencode", mode)
    if mode == "base-url":  # what `aibridge env opencode` prints
        (run.work / "opencode.json").write_text(json.dumps({"provider": {"anthropic": {"options": {
            "baseURL": cgw.url + "/anthropic/v1", "apiKey": "{env:AIBRIDGE_TOKEN}"}}}}))
    env = run.env(AIBRIDGE_TOKEN=run.token, ANTHROPIC_API_KEY=run.token)
    r = run.run([exe, "run", "-m", "anthropic/claude-sonnet-4-5", run.prompt], env)
    assert ANSWER in r.stdout, r.stdout + r.stderr
    run.assert_recorded("OpenCode")


@pytest.mark.parametrize("mode", MODES)
def test_kilo_cli(cgw, tmp_path, mode):
    exe = npm_bin("@kilocode/cli@7.7.7", "kilo")
    run = Run(cgw, tmp_path, "kilo", mode)
    if mode == "base-url":  # Kilo CLI reads opencode's config format from kilo.json
        (run.work / "kilo.json").write_text(json.dumps(
            {"provider": {"anthropic": {"options": {"baseURL": cgw.url + "/anthropic/v1"}}}}))
    r = run.run([exe, "run", "-m", "anthropic/claude-sonnet-4-5", run.prompt],
                run.env(AIBRIDGE_TOKEN=run.token, ANTHROPIC_API_KEY=run.token))
    assert ANSWER in r.stdout, r.stdout + r.stderr
    run.assert_recorded("Kilo Code")


@pytest.mark.parametrize("mode", MODES)
def test_claude_code(cgw, tmp_path, mode):
    exe = npm_bin("@anthropic-ai/claude-code", "claude", postinstall="install.cjs")
    run = Run(cgw, tmp_path, "claude", mode)
    extra = {"ANTHROPIC_BASE_URL": cgw.url + "/anthropic"} if mode == "base-url" else {}
    r = run.run([exe, "-p", run.prompt], run.env(ANTHROPIC_API_KEY=run.token, **extra))
    assert ANSWER in r.stdout, r.stdout + r.stderr
    row = run.assert_recorded("Claude Code")
    assert row["user_agent"].startswith("claude-cli/")


def test_claude_code_signed_in_with_a_claude_account(cgw, tmp_path):
    """Proxy mode with the user's own subscription login: relayed with it, recorded as subscription."""
    exe = npm_bin("@anthropic-ai/claude-code", "claude", postinstall="install.cjs")
    run = Run(cgw, tmp_path, "claude-sub", "proxy")
    login = "sk-ant-oat01-usersOwnClaudeLogin0123456789abcdefXYZ"
    creds = run.home / ".claude" / ".credentials.json"
    creds.parent.mkdir(parents=True)
    creds.write_text(json.dumps({"claudeAiOauth": {
        "accessToken": login, "refreshToken": "sk-ant-ort01-refresh", "expiresAt": int(time.time() * 1000) + 86_400_000,
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}))
    r = run.run([exe, "-p", run.prompt], run.env())
    assert ANSWER in r.stdout, r.stdout + r.stderr
    row = run.rows()[0]
    assert run.prompt in row["prompt"] and row["client"] == "Claude Code" and row["status"] == "completed"
    assert (row["credential_kind"], row["credential_hint"]) == ("subscription", "sk-a…fXYZ")


@pytest.mark.parametrize("mode", MODES)
def test_codex_cli(cgw, tmp_path, mode):
    exe = npm_bin("@openai/codex", "codex")
    run = Run(cgw, tmp_path, "codex", mode)
    codex_home = run.home / ".codex"
    codex_home.mkdir(parents=True)
    base = cgw.url + "/openai/v1" if mode == "base-url" else "https://api.openai.com/v1"
    (codex_home / "config.toml").write_text(
        'model_provider = "aibridge"\nmodel = "gpt-5"\n\n[model_providers.aibridge]\nname = "aibridge"\n'
        f'base_url = "{base}"\nenv_key = "AIBRIDGE_TOKEN"\nwire_api = "responses"\n')
    env = run.env(AIBRIDGE_TOKEN=run.token, CODEX_HOME=str(codex_home))
    if mode == "proxy":  # Codex (Rust) reads SSL_CERT_FILE, which replaces the trust store: the bundle
        env["SSL_CERT_FILE"] = str(bundle(cgw.workdir / "certs"))
    r = run.run([exe, "exec", "--skip-git-repo-check", run.prompt], env)
    assert ANSWER in r.stdout, r.stdout + r.stderr
    run.assert_recorded("Codex", api="openai.responses")


@pytest.mark.parametrize("mode", MODES)
def test_gemini_cli(cgw, tmp_path, mode):
    exe = npm_bin("@google/gemini-cli", "gemini")
    run = Run(cgw, tmp_path, "gemini", mode)
    extra = {"GOOGLE_GEMINI_BASE_URL": cgw.url + "/gemini"} if mode == "base-url" else {}
    settings = run.home / ".gemini" / "settings.json"  # headless: the API-key login, no first-run dialogs
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"security": {"auth": {"selectedType": "gemini-api-key"}},
                                    "privacy": {"usageStatisticsEnabled": False}}))
    r = run.run([exe, "-p", run.prompt, "-m", "gemini-2.5-flash"],
                run.env(GEMINI_API_KEY=run.token, GEMINI_CLI_TRUST_WORKSPACE="true", **extra))
    assert ANSWER in r.stdout, r.stdout + r.stderr
    run.assert_recorded("Gemini CLI", session=False, api="gemini.generate_content")


@pytest.mark.parametrize("mode", MODES)
def test_aider(cgw, tmp_path, mode):
    exe = pip_bin(("aider-chat",), "aider")
    run = Run(cgw, tmp_path, "aider", mode)
    env = run.env(OPENAI_API_KEY=run.token, AIDER_CHECK_UPDATE="false", AIDER_ANALYTICS="false")
    if mode == "base-url":
        env["OPENAI_API_BASE"] = cgw.url + "/openai/v1"
    else:  # Python's requests/httpx: a bundle that replaces the trust store
        env["SSL_CERT_FILE"] = env["REQUESTS_CA_BUNDLE"] = str(bundle(cgw.workdir / "certs"))
    # aider (through litellm) sends only the OpenAI SDK's headers; the settings `aibridge env aider` writes name it.
    (run.work / ".aider.model.settings.yml").write_text(AIDER_SETTINGS)
    r = run.run([exe, "--model", "openai/gpt-4.1", "--message", run.prompt, "--no-git", "--yes-always",
                 "--no-show-model-warnings", "--no-pretty", "--stream"], env)
    assert ANSWER in r.stdout, r.stdout + r.stderr
    row = run.assert_recorded("aider", session=False, api="openai.chat")
    assert row["user_agent"].startswith("OpenAI/Python")


@pytest.mark.parametrize("mode", MODES)
def test_llm(cgw, tmp_path, mode):
    exe = pip_bin(("llm",), "llm")
    run = Run(cgw, tmp_path, "llm", mode)
    user_path = run.home / "llm"
    user_path.mkdir(parents=True)
    env = run.env(OPENAI_API_KEY=run.token, LLM_USER_PATH=str(user_path))
    if mode == "proxy":
        env["SSL_CERT_FILE"] = env["REQUESTS_CA_BUNDLE"] = str(bundle(cgw.workdir / "certs"))
    # llm too sends only the OpenAI SDK's headers: the models `aibridge env llm` defines add one that names it.
    base = cgw.url + "/openai/v1" if mode == "base-url" else "https://api.openai.com/v1"
    (user_path / "extra-openai-models.yaml").write_text(llm_models(base))
    r = run.run([exe, "-m", "aibridge-gpt-4.1-mini", run.prompt], env)
    assert ANSWER in r.stdout, r.stdout + r.stderr
    row = run.assert_recorded("llm", session=False, api="openai.chat")
    assert row["user_agent"].startswith("OpenAI/Python")
    plain = run.run([exe, "-m", "gpt-4.1-mini", "a plain model"], {**env, "OPENAI_BASE_URL": base})
    assert ANSWER in plain.stdout  # its built-in models work too, recorded as Unknown (nothing names them)


# --- as printed: `aibridge env <client>` pasted into a shell, then the client run as its guide says ----------------


def as_printed(run: Run, client: str, path_to: str) -> dict[str, str]:
    """What `aibridge env <client> [--mode proxy]` prints for the run's user, pasted into bash (stopping at the first
    line that fails) in the run's work directory, with its HOME and the client's install on PATH as a user has it:
    the environment it leaves (the files it writes stay in HOME)."""
    args = ["env", client, "--token", run.token, "--user", run.user, "--confdir", str(run.gw.workdir / "certs")]
    printed = run.gw.cli(*args, *(["--mode", "proxy"] if run.mode == "proxy" else []))
    assert printed.returncode == 0, printed.stderr
    env = clean_env(run.home, PATH=f"{path_to}:{os.environ['PATH']}", PWD=str(run.work))
    r = subprocess.run(["bash", "-ec", printed.stdout + "\nenv -0"], env=env, cwd=run.work, capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"as printed:\n{printed.stdout}\nfailed: {r.stderr.decode(errors='replace')[-1500:]}"
    return dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if "=" in item)


@pytest.mark.parametrize("mode", MODES)
def test_gemini_cli_as_printed(cgw, tmp_path, mode):
    """Without the login method and the trust the guide sets, Gemini CLI exits 41, then 55."""
    exe = npm_bin("@google/gemini-cli", "gemini")
    run = Run(cgw, tmp_path, "gemini-printed", mode)
    env = as_printed(run, "gemini-cli", str(exe.parent))
    r = run.run([exe, "-p", run.prompt, "-m", "gemini-2.5-flash"], env)
    assert r.returncode == 0 and ANSWER in r.stdout, r.stdout + r.stderr
    run.assert_recorded("Gemini CLI", session=False, api="gemini.generate_content")


@pytest.mark.parametrize("mode", MODES)
def test_continue_cli_as_printed(cgw, tmp_path, mode):
    """Continue's `cn` sends `node-fetch` as its user agent: the guide's config names it (X-Title)."""
    exe = npm_bin("@continuedev/cli", "cn")
    run = Run(cgw, tmp_path, "cn-printed", mode)
    env = as_printed(run, "continue", str(exe.parent))
    r = run.run([exe, "-p", run.prompt], env)
    assert r.returncode == 0 and ANSWER in r.stdout, r.stdout + r.stderr
    row = run.assert_recorded("Continue", session=False, api="anthropic.messages")
    assert row["user_agent"] == "node-fetch"


def _stop_cline_hub(work) -> None:
    """The Cline CLI leaves a hub daemon serving `work` behind each run: stop the ones this test started."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--cline-hub-daemon" in argv and str(work).encode() in argv:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.mark.parametrize("mode", MODES)
def test_cline_cli_as_printed(cgw, tmp_path, mode):
    """`cline auth openai -k … -b …` as printed, and the header that names Cline (it sends only the AI SDK's user
    agent)."""
    exe = npm_bin("cline", "cline")
    run = Run(cgw, tmp_path, "cline-printed", mode)
    try:
        env = as_printed(run, "cline", str(exe.parent))
        r = run.run([exe, run.prompt], env)
    finally:
        _stop_cline_hub(run.work)
    assert r.returncode == 0 and ANSWER in r.stdout, r.stdout + r.stderr
    row = run.assert_recorded("Cline", session=False, api="openai.chat")
    assert row["user_agent"].startswith("ai-sdk/openai-compatible/")


@pytest.mark.parametrize("mode", MODES)
def test_qwen_code_as_printed(cgw, tmp_path, mode):
    """Qwen Code through OpenAI's API (its own default, DashScope, is not intercepted), named by its user agent."""
    exe = npm_bin("@qwen-code/qwen-code", "qwen")
    run = Run(cgw, tmp_path, "qwen-printed", mode)
    env = as_printed(run, "qwen", str(exe.parent))
    r = run.run([exe, "-p", run.prompt], env)
    assert r.returncode == 0 and ANSWER in r.stdout, r.stdout + r.stderr
    row = run.assert_recorded("Qwen Code", session=False, api="openai.chat")
    assert row["user_agent"].startswith("QwenCode/")


# What the gateway itself may send upstream under its central key for Claude Code: the model calls and the managed
# settings (apis/anthropic); its telemetry, bootstrap and feature flags it answers itself (docs/clients-endpoints.md).
CLAUDE_REVIEWED = ("/v1/messages", "/api/claude_code/settings", "/api/claude_code/policy_limits")


@pytest.mark.parametrize("mode", MODES)
def test_claude_code_as_printed(cgw, stand_in, tmp_path, mode):
    """As printed, with its non-essential traffic on (bootstrap, fast mode, MCP directory, telemetry, the connectivity
    check): every call it makes gets an answer, none refused, and the central key reaches only reviewed endpoints."""
    exe = npm_bin("@anthropic-ai/claude-code", "claude", postinstall="install.cjs")
    run = Run(cgw, tmp_path, "claude-printed", mode)
    env = as_printed(run, "claude-code", str(exe.parent))
    env.pop("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC")  # the user's shell does not have it
    answers = cgw.workdir / "answers.log"
    mark, upstream_mark = answers.stat().st_size, len(stand_in.seen)
    r = run.run([exe, "-p", run.prompt], env)
    assert r.returncode == 0 and ANSWER in r.stdout, r.stdout + r.stderr
    row = run.assert_recorded("Claude Code")
    assert row["user_agent"].startswith("claude-cli/")
    with answers.open() as f:
        f.seek(mark)
        calls = [line.split() for line in f if " /aibridge/" not in line]
    assert [c for c in calls if int(c[3]) >= 400] == [], calls  # nothing it asked was refused
    assert len(calls) > 2, calls  # more than its model call: its service endpoints were exercised
    central = {s.path.split("?")[0] for s in stand_in.seen[upstream_mark:]
               if s.headers.get("x-api-key") == UPSTREAM_KEY}
    assert central and central <= set(CLAUDE_REVIEWED), central


# The other terminal clients' guides, run as printed too: (install, argv after the guide, recorded as).
PRINTED = {
    "codex": (lambda: npm_bin("@openai/codex", "codex"), lambda p: ["exec", "--skip-git-repo-check", p], "Codex"),
    "opencode": (lambda: npm_bin("opencode-ai", "opencode"),
                 lambda p: ["run", "-m", "anthropic/claude-sonnet-4-5", p], "OpenCode"),
    "kilo": (lambda: npm_bin("@kilocode/cli@7.7.7", "kilo"),
             lambda p: ["run", "-m", "anthropic/claude-sonnet-4-5", p], "Kilo Code"),
    "aider": (lambda: pip_bin(("aider-chat",), "aider"),
              lambda p: ["--model", "openai/gpt-4.1", "--message", p, "--no-git", "--yes-always",
                         "--no-show-model-warnings", "--no-pretty", "--stream", "--no-check-update",
                         "--analytics-disable"], "aider"),
    "llm": (lambda: pip_bin(("llm",), "llm"), lambda p: ["-m", "aibridge-gpt-4.1-mini", p], "llm"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("client", list(PRINTED))
def test_terminal_client_as_printed(cgw, tmp_path, client, mode):
    install, argv, name = PRINTED[client]
    exe = install()
    run = Run(cgw, tmp_path, f"{client}-printed", mode)
    env = as_printed(run, client, str(exe.parent))
    r = run.run([exe, *argv(run.prompt)], env)
    assert ANSWER in r.stdout, r.stdout + r.stderr
    run.assert_recorded(name, session=False)
