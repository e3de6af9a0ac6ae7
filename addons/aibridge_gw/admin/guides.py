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
    """A heredoc that writes the file; one already there is left alone (noclobber: merge it by hand)."""
    head = _comment(f"writes {path}{note}; if you already have one, this stops: merge by hand")
    parent = str(Path(path).parent)  # double quotes: the path may name $CODEX_HOME
    mkdir = f'mkdir -p "{parent}" && ' if parent != "." else ""
    return head + [f'{mkdir}(set -C; cat > "{path}") <<\'EOF\'', text, "EOF"]


def _json_file(path: str, obj: dict) -> list[str]:
    return _file(path, json.dumps(obj, indent=2))


# Deep-merges a JSON object into a JSON file (made if missing) with node, which every node client brings along.
_MERGE_JS = ('const fs=require("fs"),path=require("path"),[f,add]=process.argv.slice(1);let c={};'
             'try{c=JSON.parse(fs.readFileSync(f,"utf8"))}catch(e){if(e.code!=="ENOENT")throw e}'
             'const m=(a,b)=>{for(const[k,v]of Object.entries(b))a[k]=v&&typeof v==="object"&&!Array.isArray(v)'
             '&&a[k]&&typeof a[k]==="object"&&!Array.isArray(a[k])?m(a[k],v):v;return a};'
             'fs.mkdirSync(path.dirname(f),{recursive:true});'
             'fs.writeFileSync(f,JSON.stringify(m(c,JSON.parse(add)),null,2)+"\\n")')


def _json_merge(path: str, obj: dict, why: str) -> list[str]:
    """A node one-liner that sets `obj`'s keys in the JSON file at `path` and keeps everything else in it."""
    return _comment(f"sets in {path}: {json.dumps(obj)} ({why}); the rest of the file is kept") + [
        f"node -e {q(_MERGE_JS)} \"{path}\" {q(json.dumps(obj))}"]


# --- terminal clients: (base-URL lines, proxy lines) ------------------------------------------------


MCP_PATH = "/aibridge/mcp"  # the MCP gateway: every central tool, behind the gateway token


def claude_code_mcp(w: Where) -> list[str]:
    """The MCP gateway as one Claude Code server named aibridge (its tools: mcp__aibridge__<server>__<tool>)."""
    return _comment("the central MCP tools (the MCP gateway), for every project of this user:") + [
        f"claude mcp add --transport http --scope user aibridge {q(w.url(MCP_PATH))} "
        f"--header {q('Authorization: Bearer ' + w.token)}"]


def codex_mcp(w: Where) -> str:
    """config.toml's MCP gateway entry: streamable HTTP with the gateway token read from AIBRIDGE_TOKEN."""
    return (f'[mcp_servers.aibridge]\nurl = "{w.url(MCP_PATH)}"\nbearer_token_env_var = "AIBRIDGE_TOKEN"\n'
            "# the gateway's access rules decide who may call what; to let `codex exec` run them without asking:\n"
            '# default_tools_approval_mode = "approve"')


def claude_code(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(ANTHROPIC_BASE_URL=w.url("/anthropic"), ANTHROPIC_API_KEY=w.token) + claude_code_mcp(w)
    return _proxy_env(w, "node") + _exports(ANTHROPIC_API_KEY=w.token) + claude_code_mcp(w)


def codex(w: Where, mode: str) -> list[str]:
    if mode == "base-url":
        return _exports(AIBRIDGE_TOKEN=w.token) + _file(
            "${CODEX_HOME:-$HOME/.codex}/config.toml",
            'model_provider = "aibridge"\n\n[model_providers.aibridge]\nname = "aibridge"\n'
            f'base_url = "{w.url("/openai/v1")}"\nenv_key = "AIBRIDGE_TOKEN"\nwire_api = "responses"\n'
            # The Responses API over a WebSocket (docs/responses-websocket.md), as Codex speaks it to OpenAI.
            'supports_websockets = true\n\n'
            + codex_mcp(w), " (the model through the gateway, and its MCP tools)")
    return _proxy_env(w, "rust") + _exports(OPENAI_API_KEY=w.token, AIBRIDGE_TOKEN=w.token) + _comment(
        "signed in with ChatGPT instead: the gateway needs a `type: chatgpt` provider (recorded as subscription)"
    ) + _file("${CODEX_HOME:-$HOME/.codex}/config.toml", codex_mcp(w), " (the central MCP tools)")


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


# Gemini CLI exits 41 without a login method chosen (the API key: the gateway token) and, headless, 55 in a
# directory it was not told to trust.
GEMINI_SETTINGS = {"security": {"auth": {"selectedType": "gemini-api-key"}}}


def gemini_cli(w: Where, mode: str) -> list[str]:
    lines = _exports(GOOGLE_GEMINI_BASE_URL=w.url("/gemini"), GEMINI_API_KEY=w.token) if mode == "base-url" else \
        _proxy_env(w, "node") + _exports(GEMINI_API_KEY=w.token)
    return lines + _comment("headless runs (gemini -p) need the workspace trusted: this trusts every folder in this "
                            "shell;\ninteractive runs can instead trust folders one by one when asked") + \
        _exports(GEMINI_CLI_TRUST_WORKSPACE="true") + _json_merge(
        "$HOME/.gemini/settings.json", GEMINI_SETTINGS, "log in with the API key, the gateway token")


def continue_config(api_base: str | None, token: str) -> str:
    """~/.continue/config.yaml (read by the `cn` CLI and the IDE extensions): a Claude model through the gateway,
    with the header that names Continue (its requests carry only `node-fetch` or the OpenAI SDK's user agent)."""
    base = f"\n    apiBase: {api_base}" if api_base else ""  # proxy mode: the provider's own host, intercepted
    return ("name: aibridge\nversion: 0.0.1\nschema: v1\nmodels:\n  - name: Claude via aibridge\n"
            f"    provider: anthropic\n    model: claude-sonnet-4-5{base}\n    apiKey: {json.dumps(token)}\n"
            "    requestOptions:\n      headers:\n        X-Title: Continue")


def continue_dev(w: Where, mode: str) -> list[str]:
    config = _file("$HOME/.continue/config.yaml",
                   continue_config(w.url("/anthropic/v1/") if mode == "base-url" else None, w.token),
                   " (the cn CLI and the IDE extensions read it)")
    if mode == "base-url":
        return config + _comment("then: cn -p '…' (or pick \"Claude via aibridge\" in the IDE)")
    return _proxy_env(w, "node") + config + _comment("then: cn -p '…'") + _ide_proxy(
        w, "in VS Code or JetBrains instead (the extension)")


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


def _cline_extension(w: Where, mode: str, name: str) -> list[str]:
    if mode == "proxy":
        return _ide_proxy(w, "VS Code settings (http.proxy)") + _comment(f"{name}: API key = the gateway token")
    return _comment(f"{name} → Settings → API Provider: Anthropic, check \"Use custom base URL\": "
                    f"{w.url('/anthropic')}\nAPI key: {w.token}\n"
                    f"or API Provider: OpenAI Compatible, Base URL {w.url('/openai/v1')}, API key the same")


# The Cline CLI sends only the AI SDK's user agent (any AI SDK program on bun sends the same): this header, kept
# in its provider settings, names it.
CLINE_HEADERS = {"providers": {"openai-compatible": {"settings": {"headers": {"X-Title": "Cline"}}}}}


def cline(w: Where, mode: str) -> list[str]:
    """The Cline CLI (`npm i -g cline`): `cline auth` takes a base URL for OpenAI-compatible providers only (it
    refuses one for anthropic), so the gateway's OpenAI API; then the extension's steps."""
    base = w.url("/openai/v1") if mode == "base-url" else "https://api.openai.com/v1"
    cli = _proxy_env(w, "node") if mode == "proxy" else []
    cli += [f"cline auth openai -k {q(w.token)} -m gpt-4.1 -b {q(base)}"] + _json_merge(
        "${CLINE_DIR:-$HOME/.cline}/data/settings/providers.json", CLINE_HEADERS, "names Cline in the record")
    return _comment("the Cline CLI:") + cli + _comment("then: cline '…'\n\nthe VS Code extension:") + \
        _cline_extension(w, mode, "Cline")


def roo(w: Where, mode: str) -> list[str]:
    return _cline_extension(w, mode, "Roo Code")


def qwen(w: Where, mode: str) -> list[str]:
    """Qwen Code speaks OpenAI's chat API; its own default endpoint is DashScope, which the gateway does not
    intercept (nor relay), so proxy mode too names OpenAI's host."""
    base = w.url("/openai/v1") if mode == "base-url" else "https://api.openai.com/v1"
    lines = _proxy_env(w, "node") if mode == "proxy" else []
    return lines + _exports(OPENAI_BASE_URL=base, OPENAI_API_KEY=w.token, OPENAI_MODEL="gpt-4.1") + _comment(
        "then: qwen --auth-type openai (or qwen -p '…')")


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
    "goose": goose, "aider": aider, "llm": llm, "gemini-cli": gemini_cli, "qwen": qwen, "continue": continue_dev,
    "zed": zed, "cline": cline, "roo": roo, "vscode": vscode, "jetbrains": jetbrains,
    "python": python, "node": node, "system": system,
}


def env_lines(client: str, mode: str, gateway: str, token: str, confdir: Path, user: str = "user") -> list[str]:
    """Shell lines (and commented config) that set `client` up for the gateway; the token stays a placeholder
    unless given."""
    from ..certs import BUNDLE, CA_CERT

    gateway = gateway.rstrip("/")
    host = gateway.split("://", 1)[-1]
    where = Where(gateway, token, f"http://{user}:{token}@{host}", str(Path(confdir) / CA_CERT),
                  str(Path(confdir) / BUNDLE))
    return GUIDES[client](where, mode)
