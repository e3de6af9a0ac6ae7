"""The project CA (mitmproxy's confdir): created once, exported, and bundled with the public CAs."""

from __future__ import annotations

import json
from pathlib import Path

from .config import aibridge_home

CA_CERT = "mitmproxy-ca-cert.pem"
CA_P12 = "mitmproxy-ca-cert.p12"
BUNDLE = "aibridge-ca-bundle.pem"


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
    from .admin.gateway_client import runtime_file

    try:
        return json.loads(runtime_file(db_path).read_text())["url"]
    except (OSError, ValueError, KeyError):
        return default
