"""The project CA (mitmproxy's confdir) and what each client must set to use the gateway."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .config import aibridge_home

CA_CERT = "mitmproxy-ca-cert.pem"
CA_P12 = "mitmproxy-ca-cert.p12"
BUNDLE = "aibridge-ca-bundle.pem"
CLIENTS = ("claude-code", "codex", "python", "node", "system")


def default_confdir() -> Path:
    """The CA's directory when --confdir is not given: the one scripts/run passes to mitmproxy as its confdir."""
    return aibridge_home() / "certs"


def ensure_ca(confdir: Path) -> Path:
    """Create the CA if the gateway has not yet (mitmproxy writes private keys with mode 0600)."""
    confdir = Path(confdir)
    cert = confdir / CA_CERT
    if not cert.exists():
        from mitmproxy.certs import CertStore

        confdir.mkdir(parents=True, exist_ok=True)
        CertStore.from_store(str(confdir), "mitmproxy", 2048)
    return cert


def bundle(confdir: Path) -> Path:
    """Public CAs plus the gateway CA, for clients whose CA setting replaces the default trust store
    (SSL_CERT_FILE, REQUESTS_CA_BUNDLE): tunnelled non-AI hosts still present their real certificates."""
    import certifi

    cert = ensure_ca(confdir)
    out = Path(confdir) / BUNDLE
    data = Path(certifi.where()).read_text() + "\n# aibridge gateway CA\n" + cert.read_text()
    if not out.exists() or out.read_text() != data:
        out.write_text(data)
    return out


def gateway_url(db_path: Path, default: str = "http://127.0.0.1:8080") -> str:
    from .control import runtime_file

    try:
        return json.loads(runtime_file(db_path).read_text())["url"]
    except (OSError, ValueError, KeyError):
        return default


def env_lines(client: str, mode: str, gateway: str, token: str, confdir: Path, user: str = "user") -> list[str]:
    """Shell lines that configure `client` for the gateway; the token stays a placeholder unless given."""
    gateway = gateway.rstrip("/")
    q = shlex.quote
    if mode == "base-url":
        lines = {
            "claude-code": [f"export ANTHROPIC_BASE_URL={q(gateway + '/anthropic')}", f"export ANTHROPIC_API_KEY={q(token)}"],
            "python": [
                f"export ANTHROPIC_BASE_URL={q(gateway + '/anthropic')}", f"export ANTHROPIC_API_KEY={q(token)}",
                f"export OPENAI_BASE_URL={q(gateway + '/openai/v1')}", f"export OPENAI_API_KEY={q(token)}",
            ],
            "node": [
                f"export ANTHROPIC_BASE_URL={q(gateway + '/anthropic')}", f"export ANTHROPIC_API_KEY={q(token)}",
                f"export OPENAI_BASE_URL={q(gateway + '/openai/v1')}", f"export OPENAI_API_KEY={q(token)}",
            ],
            "codex": [
                f"export AIBRIDGE_TOKEN={q(token)}",
                "# in $CODEX_HOME/config.toml (default ~/.codex/config.toml):",
                '#   model_provider = "aibridge"',
                "#   [model_providers.aibridge]",
                '#   name = "aibridge"',
                f'#   base_url = "{gateway}/openai/v1"',
                '#   env_key = "AIBRIDGE_TOKEN"',
                '#   wire_api = "responses"',
            ],
            "system": [f"# base-URL mode needs no CA: point the tool at {gateway}/<provider> with the token as API key"],
        }
        return lines[client]
    host = gateway.split("://", 1)[-1]
    proxy = f"http://{user}:{token}@{host}"
    ca = Path(confdir) / CA_CERT
    proxies = [f"export HTTPS_PROXY={q(proxy)}", f"export https_proxy={q(proxy)}"]
    full = str(Path(confdir) / BUNDLE)
    lines = {
        "claude-code": proxies + [f"export NODE_EXTRA_CA_CERTS={q(str(ca))}"],
        "node": proxies + [f"export NODE_EXTRA_CA_CERTS={q(str(ca))}"],
        "codex": proxies + [f"export SSL_CERT_FILE={q(full)}"],
        "python": proxies + [f"export SSL_CERT_FILE={q(full)}", f"export REQUESTS_CA_BUNDLE={q(full)}"],
        "system": proxies + [
            f"export SSL_CERT_FILE={q(full)}", f"export CURL_CA_BUNDLE={q(full)}",
            f"# or install the CA system-wide: sudo cp {q(str(ca))} /usr/local/share/ca-certificates/aibridge.crt "
            "&& sudo update-ca-certificates",
        ],
    }
    return lines[client]
