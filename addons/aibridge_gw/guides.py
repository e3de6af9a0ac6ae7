"""`aibridge env <client>`: what each coding tool must be told to use the gateway, ready to paste.

Base-URL mode points the tool at `<gateway>/<provider instance>` with the gateway token as its API key; the URL
shape is the one the tool's SDK family expects (Anthropic's SDKs append `/v1/messages` themselves, the AI SDK and
Continue expect the `/v1` in the base URL). Proxy mode sets HTTPS_PROXY with the token as proxy credentials,
trusts the gateway CA the way the tool's runtime reads it, and still sends the token as the API key: a key that
is not a gateway token is taken for the user's own (BYOK). GUI clients get the steps to click through.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Where:
    gateway: str  # e.g. http://127.0.0.1:8080
    token: str
    proxy: str  # http://user:token@host:port
    ca: str  # the gateway CA (PEM)
    bundle: str  # public CAs + the gateway CA (for runtimes whose setting replaces the trust store)

    def url(self, path: str) -> str:
        return self.gateway + path


q = shlex.quote


def _exports(**env: str) -> list[str]:
    return [f"export {k}={q(v)}" for k, v in env.items()]


def _proxy_env(w: Where, runtime: str) -> list[str]:
    """HTTPS_PROXY and the CA setting of the tool's runtime (node, python, rust/go)."""
    lines = _exports(HTTPS_PROXY=w.proxy, https_proxy=w.proxy)
    if runtime == "node":
        return lines + _exports(NODE_EXTRA_CA_CERTS=w.ca)
    if runtime == "python":
        return lines + _exports(SSL_CERT_FILE=w.bundle, REQUESTS_CA_BUNDLE=w.bundle)
    return lines + _exports(SSL_CERT_FILE=w.bundle)


def _comment(text: str) -> list[str]:
    return [f"# {line}" if line else "#" for line in text.splitlines()]


def _file(path: str, text: str, note: str = "") -> list[str]:
    """A heredoc that writes the file (merge by hand if you already have one)."""
    head = _comment(f"writes {path}{note}; merge by hand if you already have one")
    parent = str(Path(path).parent)  # double quotes: the path may name $CODEX_HOME
    mkdir = f'mkdir -p "{parent}" && ' if parent != "." else ""
    return head + [f'{mkdir}cat > "{path}" <<\'EOF\'', text, "EOF"]


def _json_file(path: str, obj: dict) -> list[str]:
    return _file(path, json.dumps(obj, indent=2))


# --- terminal clients: (base-URL lines, proxy lines) ------------------------------------------------


def claude_code(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(ANTHROPIC_BASE_URL=w.url("/anthropic"), ANTHROPIC_API_KEY=w.token)
    return _proxy_env(w, "node") + _exports(ANTHROPIC_API_KEY=w.token)


def codex(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(AIBRIDGE_TOKEN=w.token) + _file(
            "${CODEX_HOME:-$HOME/.codex}/config.toml",
            'model_provider = "aibridge"\n\n[model_providers.aibridge]\nname = "aibridge"\n'
            f'base_url = "{w.url("/openai/v1")}"\nenv_key = "AIBRIDGE_TOKEN"\nwire_api = "responses"')
    return _proxy_env(w, "rust") + _exports(OPENAI_API_KEY=w.token) + _comment(
        "signed in with ChatGPT instead: the gateway needs a `type: chatgpt` provider (recorded as subscription)")


def _ai_sdk_config(w: Where, env_name: str) -> dict:
    return {"provider": {
        "anthropic": {"options": {"baseURL": w.url("/anthropic/v1"), "apiKey": f"{{env:{env_name}}}"}},
        "openai": {"options": {"baseURL": w.url("/openai/v1"), "apiKey": f"{{env:{env_name}}}"}},
    }}


def opencode(w: Where, mode: str) -> list[str]:
    if mode == "base-url":  # the AI SDK wants the /v1 in the base URL
        return _exports(AIBRIDGE_TOKEN=w.token) + _json_file(
            "opencode.json",
            {"$schema": "https://opencode.ai/config.json", **_ai_sdk_config(w, "AIBRIDGE_TOKEN")})
    return _proxy_env(w, "node") + _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token)


def kilo(w: Where, mode: str) -> list[str]:
    if mode == "base-url":  # Kilo CLI reads opencode's format from kilo.json, but drops a file with {env:…} in it
        return _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token) + _json_file("kilo.json", {"provider": {
            api: {"options": {"baseURL": w.url(f"/{api}/v1")}} for api in ("anthropic", "openai")}})
    return _proxy_env(w, "node") + _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token)


def crush(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(AIBRIDGE_TOKEN=w.token) + _json_file("crush.json", {
            "providers": {
                "aibridge-anthropic": {"type": "anthropic", "base_url": w.url("/anthropic"),
                                       "api_key": "$AIBRIDGE_TOKEN", "models": [{"id": "claude-sonnet-4-5"}]},
                "aibridge-openai": {"type": "openai", "base_url": w.url("/openai/v1"), "api_key": "$AIBRIDGE_TOKEN",
                                    "models": [{"id": "gpt-4.1"}]}}})
    return _proxy_env(w, "go") + _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token)


def goose(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(GOOSE_PROVIDER="anthropic", ANTHROPIC_HOST=w.url("/anthropic"), ANTHROPIC_API_KEY=w.token) + \
            _comment(f"or OpenAI models: GOOSE_PROVIDER=openai OPENAI_HOST={w.url('/openai')} OPENAI_API_KEY=<token>")
    return _proxy_env(w, "rust") + _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token)


# aider sends only the OpenAI SDK's headers: this names it (X-Title), for every model, so the record does too.
AIDER_SETTINGS = "- name: aider/extra_params\n  extra_params:\n    extra_headers:\n      X-Title: aider"


def aider(w: Where, mode: str) -> list[str]:
    named = _file(".aider.model.settings.yml", AIDER_SETTINGS, " (names aider in the record)")
    if mode == "base-url":  # litellm underneath
        return _exports(ANTHROPIC_API_BASE=w.url("/anthropic"), ANTHROPIC_API_KEY=w.token,
                        OPENAI_API_BASE=w.url("/openai/v1"), OPENAI_API_KEY=w.token) + named
    return _proxy_env(w, "python") + _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token) + named


def llm_models(base: str) -> str:
    """llm's extra-openai-models.yaml: OpenAI models through the gateway, with a header that names llm."""
    return "\n".join(f"- model_id: aibridge-{m}\n  model_name: {m}\n  api_base: {base}\n  api_key_name: openai\n"
                     "  headers:\n    X-Title: llm" for m in ("gpt-4.1", "gpt-4.1-mini", "gpt-5"))


def llm(w: Where, mode: str) -> list[str]:
    base = w.url("/openai/v1") if mode == "base-url" else "https://api.openai.com/v1"
    lines = _exports(OPENAI_API_KEY=w.token) if mode == "base-url" else \
        _proxy_env(w, "python") + _exports(OPENAI_API_KEY=w.token)
    return lines + _file('${LLM_USER_PATH:-$HOME/.config/io.datasette.llm}/extra-openai-models.yaml',
                         llm_models(base), "; then: llm -m aibridge-gpt-4.1 '…'")


def gemini_cli(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(GOOGLE_GEMINI_BASE_URL=w.url("/gemini"), GEMINI_API_KEY=w.token)
    return _proxy_env(w, "node") + _exports(GEMINI_API_KEY=w.token)


def continue_dev(w: Where, mode: str) -> list[str]:
    model = {"name": "Claude via aibridge", "provider": "anthropic", "model": "claude-sonnet-4-5",
             "apiKey": w.token}
    if mode == "base-url":
        return _comment("in ~/.continue/config.yaml, under models:\n  - " + "\n    ".join(
            f"{k}: {v}" for k, v in {**model, "apiBase": w.url("/anthropic/v1/")}.items()))
    return _ide_proxy(w, "Continue runs inside VS Code or JetBrains") + _comment(
        "and keep its model's apiKey the gateway token")


def python(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(ANTHROPIC_BASE_URL=w.url("/anthropic"), ANTHROPIC_API_KEY=w.token,
                        OPENAI_BASE_URL=w.url("/openai/v1"), OPENAI_API_KEY=w.token)
    return _proxy_env(w, "python") + _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token)


def node(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(ANTHROPIC_BASE_URL=w.url("/anthropic"), ANTHROPIC_API_KEY=w.token,
                        OPENAI_BASE_URL=w.url("/openai/v1"), OPENAI_API_KEY=w.token)
    return _proxy_env(w, "node") + _exports(ANTHROPIC_API_KEY=w.token, OPENAI_API_KEY=w.token)


def system(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _comment(f"base-URL mode needs no CA: point the tool at {w.gateway}/<provider> with the token as API key")
    return _proxy_env(w, "system") + _exports(CURL_CA_BUNDLE=w.bundle) + _comment(
        f"or install the CA system-wide: sudo cp {q(w.ca)} /usr/local/share/ca-certificates/aibridge.crt "
        "&& sudo update-ca-certificates")


# --- GUI clients: steps to click through ------------------------------------------------------------


def _ide_proxy(w: Where, where: str) -> list[str]:
    return _comment(f"{where}: set the HTTP proxy to {w.proxy}\n"
                    f"and trust the gateway CA ({w.ca}) in the OS or the IDE's certificate settings")


def zed(w: Where, mode: str) -> list[str]:
    if mode == "proxy":
        return _ide_proxy(w, "Zed settings.json: \"proxy\"")
    return _comment("in Zed's settings.json:\n" + json.dumps({"language_models": {
        "anthropic": {"api_url": w.url("/anthropic")},
        "openai": {"api_url": w.url("/openai/v1")}}}, indent=2)) + _comment(
        f"then Agent Panel → Settings → Anthropic / OpenAI: paste the gateway token as the API key: {w.token}")


def cline(w: Where, mode: str, name: str = "Cline") -> list[str]:
    if mode == "proxy":
        return _ide_proxy(w, "VS Code settings (http.proxy)") + _comment(f"{name}: API key = the gateway token")
    return _comment(f"{name} → Settings → API Provider: Anthropic, check \"Use custom base URL\": "
                    f"{w.url('/anthropic')}\nAPI key: {w.token}\n"
                    f"or API Provider: OpenAI Compatible, Base URL {w.url('/openai/v1')}, API key the same")


def roo(w: Where, mode: str) -> list[str]:
    return cline(w, mode, "Roo Code")


def vscode(w: Where, mode: str) -> list[str]:
    if mode == "proxy":
        return _ide_proxy(w, "VS Code settings (http.proxy)")
    return _comment("in VS Code (Insiders) settings.json, GitHub Copilot Chat with an OpenAI-compatible model:\n" +
                    json.dumps({"github.copilot.chat.customOAIModels": {"gpt-4.1": {
                        "name": "gpt-4.1 via aibridge", "url": w.url("/openai/v1"), "toolCalling": True,
                        "vision": False, "thinking": False, "maxInputTokens": 128000, "maxOutputTokens": 16000,
                        "requiresAPIKey": True}}}, indent=2)) + \
        _comment(f"then Chat → Manage Models → the model above: paste the gateway token as its API key: {w.token}")


def jetbrains(w: Where, mode: str) -> list[str]:
    if mode == "proxy":
        return _ide_proxy(w, "Settings → Appearance & Behavior → System Settings → HTTP Proxy")
    return _comment(f"Settings → Tools → AI Assistant → Models → Third-party AI providers: OpenAI-compatible,\n"
                    f"URL {w.url('/openai/v1')}, API key {w.token}")


GUIDES: dict[str, Callable[[Where, str], list[str]]] = {
    "claude-code": claude_code, "codex": codex, "opencode": opencode, "kilo": kilo, "crush": crush,
    "goose": goose, "aider": aider, "llm": llm, "gemini-cli": gemini_cli, "continue": continue_dev,
    "zed": zed, "cline": cline, "roo": roo, "vscode": vscode, "jetbrains": jetbrains,
    "python": python, "node": node, "system": system,
}


def env_lines(client: str, mode: str, gateway: str, token: str, confdir: Path, user: str = "user") -> list[str]:
    """Shell lines (and commented config) that set `client` up for the gateway; the token stays a placeholder
    unless given."""
    from .certs import BUNDLE, CA_CERT

    gateway = gateway.rstrip("/")
    host = gateway.split("://", 1)[-1]
    where = Where(gateway, token, f"http://{user}:{token}@{host}", str(Path(confdir) / CA_CERT),
                  str(Path(confdir) / BUNDLE))
    return GUIDES[client](where, mode)
