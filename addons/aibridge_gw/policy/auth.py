"""Gateway tokens: generated once, stored as SHA-256 hashes, looked up in an in-memory snapshot."""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from ..apis import PROVIDERS

TOKEN_PREFIX = "aib_"
# Headers a client may carry its credential in (the common ones, then each provider's own); all are removed
# before the request goes upstream.
CREDENTIAL_HEADERS = tuple(dict.fromkeys(
    ("authorization", "x-api-key") + tuple(h for p in PROVIDERS.values() for h in p.credential_headers)))
# Headers that carry a gateway token beside the client's own provider credential (BYOK); never forwarded.
GATEWAY_TOKEN_HEADERS = ("x-aibridge-token", "x-coder-ai-governance-token")
# Every header whose value is a secret: redacted from logs and captured flows. Providers declare their own
# (`credential_headers`, and `secret_headers` for secrets that are not the credential, such as AWS session tokens).
SECRET_HEADERS = tuple(dict.fromkeys(
    CREDENTIAL_HEADERS + GATEWAY_TOKEN_HEADERS + ("proxy-authorization", "cookie", "set-cookie")
    + tuple(h for p in PROVIDERS.values() for h in getattr(p, "secret_headers", ()))))
# Who a service account (Coder Agents, a CI bot) acts for: by our user id or name. Ours is never forwarded.
ON_BEHALF_HEADERS = ("x-aibridge-on-behalf-of", "x-coder-owner-id")


@dataclass(frozen=True, slots=True)
class Actor:
    user_id: str
    user_name: str
    role: str
    token_id: str
    token_hint: str
    service_account: bool = False  # may act for another user (X-Coder-Owner-Id, X-AIBridge-On-Behalf-Of)
    # The user's groups (`aibridge users groups set`), sorted; what policies test as `user.groups`.
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Rows from the store carry a list (plain values cross the writer's pipe); the directory holds a sorted
        # tuple, so an Actor stays hashable and two snapshots of the same memberships compare equal.
        if type(self.groups) is not tuple or list(self.groups) != sorted(set(self.groups)):
            object.__setattr__(self, "groups", tuple(sorted(set(self.groups or ()))))


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
    for h in CREDENTIAL_HEADERS[1:]:
        if headers.get(h):
            return headers[h].strip()
    return None


def gateway_like(headers: Mapping[str, str]) -> list[str]:
    """Every credential the client sent in the gateway's own token format, in any credential header."""
    found = []
    for h in CREDENTIAL_HEADERS:
        value = headers.get(h, "").strip()
        if h == "authorization" and value[:7].lower() == "bearer ":
            value = value[7:].strip()
        if value.startswith(TOKEN_PREFIX):
            found.append(value)
    return found


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

    def lookup_hash(self, digest: str | None) -> Actor | None:
        """By a token's hash (kept instead of the token for a connection's proxy credentials)."""
        return self._by_hash.get(digest) if digest else None

    def __len__(self) -> int:
        return len(self._by_hash)


def proxy_token(value: str | None) -> str | None:
    """The gateway token in a Proxy-Authorization header: Basic user:token (the user part is ignored) or Bearer."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return rest.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return (password if sep else user) or None
    return None


@dataclass(frozen=True, slots=True)
class Identity:
    actor: Actor
    byok_credential: str | None  # the user's own provider credential, kept for the upstream
    on_behalf_of: tuple[str, str] | None = None  # (id, name) of the person a service account acts for


def acting_for(actor: Actor, headers: Mapping[str, str], users: Mapping[str, tuple[str, str]]
               ) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """Whom a service account acts for: (the person's (id, name), or None; the claim as sent, (header, value), or
    None). A claim from anyone but a service account, or one naming nobody known (`users`: by id or name), names
    no person."""
    named = next(((h, headers[h].strip()) for h in ON_BEHALF_HEADERS if headers.get(h, "").strip()), None)
    if named is None or not actor.service_account:
        return None, named
    return users.get(named[1]), named


class AuthRefused(Exception):
    """No usable identity; the message is safe to show the client."""


def identify(
    headers: Mapping[str, str], proxy_actor: Actor | None, directory: TokenDirectory, byok: bool
) -> Identity:
    """Who is calling, and with which upstream credential.

    Identity comes from proxy credentials, else an X-AIBridge-Token header, else the provider credential
    itself. When identity came from elsewhere and the provider credential is not a gateway token, it is the
    user's own key (BYOK) and is kept — unless the admin turned BYOK off. A credential in the gateway's own token
    format that does not validate (revoked, unknown, of a deleted user) is refused, whoever the caller is: it is
    never anyone's provider key, and sending it upstream would hand a gateway token to the provider.
    """
    credential = credential_from_headers(headers)
    ours = gateway_like(headers)
    if any(directory.lookup(token) is None for token in ours):
        raise AuthRefused("aibridge: invalid or revoked gateway token")
    header_token = next((headers[h].strip() for h in GATEWAY_TOKEN_HEADERS if headers.get(h)), None)
    header_actor = directory.lookup(header_token) if header_token is not None else None
    if header_token is not None and header_actor is None:  # refused even beside valid proxy credentials
        raise AuthRefused("aibridge: invalid or revoked gateway token in X-AIBridge-Token")
    actor = proxy_actor or header_actor
    if actor is None:
        actor = directory.lookup(credential)
        if actor is None:
            raise AuthRefused(
                "aibridge: invalid or revoked gateway token" if credential
                else "aibridge: missing gateway token (send it as the API key)"
            )
        return Identity(actor, None)
    if credential and byok and not ours and directory.lookup(credential) is None:
        return Identity(actor, credential)
    return Identity(actor, None)  # a gateway token beside the user's own key: central, so it never goes upstream
