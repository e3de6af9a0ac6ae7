"""Gateway tokens: generated once, stored as SHA-256 hashes, looked up in an in-memory snapshot."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

TOKEN_PREFIX = "aib_"
# Headers a client may carry its credential in; all are removed before the request goes upstream.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


@dataclass(frozen=True, slots=True)
class Actor:
    user_id: str
    user_name: str
    role: str
    token_id: str
    token_hint: str


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def mask(secret: str | None) -> str | None:
    """A hint that identifies a credential without revealing it: 'sk-a…wxyz'."""
    if not secret:
        return None
    if len(secret) <= 12:
        return secret[:2] + "…"
    return f"{secret[:4]}…{secret[-4:]}"


def credential_from_headers(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    for h in ("x-api-key", "api-key"):
        if headers.get(h):
            return headers[h].strip()
    return None


class TokenDirectory:
    """Hash -> Actor snapshot. Replaced whole on change, so lookups on the event loop never lock."""

    def __init__(self) -> None:
        self._by_hash: dict[str, Actor] = {}

    def replace(self, by_hash: dict[str, Actor]) -> None:
        self._by_hash = by_hash

    def lookup(self, token: str | None) -> Actor | None:
        if not token:
            return None
        return self._by_hash.get(hash_token(token))

    def __len__(self) -> int:
        return len(self._by_hash)
