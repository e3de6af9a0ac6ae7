"""OAuth 2.1 sign-in to upstream MCP servers (`oauth: true`): each user signs in once, the gateway keeps their
tokens (encrypted, in the shared store) and uses and refreshes them on every call to that server.

Built from the `mcp` package's client-auth pieces (protected-resource and authorization-server metadata discovery,
dynamic client registration, PKCE, token-response parsing) driven by httpx here, rather than its in-memory
`OAuthClientProvider`: the gateway runs as several workers and machines, so everything a sign-in needs between its
start and the browser's return (state, PKCE verifier, client, user, server; one-time, ten minutes) is in the store,
and the callback may land on any process.

1. `start` (the CLI's `aibridge mcp login`, the dashboard's Sign in): discovery → the gateway's client at the
   authorization server (registered once per server, issuer and callback URL, by dynamic client registration, and
   reused; or `oauth_client_id`) → PKCE S256, `state`, RFC 8707 `resource` → the authorization URL.
2. `callback` (GET /aibridge/mcp/oauth/callback?code&state, no gateway token: the one-time state is the credential)
   → the code exchanged with the verifier → the tokens stored encrypted for (user, server) → a small page.
3. `token` (the registry's `_headers`): the user's access token, refreshed with the refresh token when it expires
   within REFRESH_MARGIN seconds (bounded by REFRESH_TIMEOUT); versioned in the store, so of processes refreshing
   together the first write wins and the others read it. No token, or a refresh the server refused: None, and the
   call gets the sign-in-needed error (`SIGN_IN` outcome).

Secrets (tokens, codes, verifiers, state, client secrets) are only ever in memory here, in the encrypted column, and
on the wire to the authorization server: never in a log line, an error, a page, a record or the CLI's output.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import html
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, urlencode, urlparse

from ..config import McpServer
from ..logsafe import printable
from .registry import Unavailable

log = logging.getLogger("aibridge.mcp")

CALLBACK_PATH = "/aibridge/mcp/oauth/callback"
SIGN_IN = "sign_in"  # the outcome of a call that needs the user to sign in first
LOGIN_SECONDS = 600  # a login's state is good for this long, once
REFRESH_MARGIN = 60.0  # an access token expiring within this is refreshed before use
REFRESH_TIMEOUT = 8.0  # a refresh never holds a call longer than this
HTTP_TIMEOUT = 10.0  # discovery, registration, the code exchange
CACHE_SECONDS = 5.0  # a process re-reads a user's tokens from the store at least this often (logouts, sign-ins)
CLIENT_NAME = "aibridge MCP gateway"


class OAuthError(Exception):
    """A sign-in that cannot be started or completed; the message is safe to show (no secret)."""


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _fernet():
    from ..store.ops import SECRET_KEY_ENV, OpError, _fernet

    try:
        f = _fernet()
    except OpError as e:
        raise OAuthError(str(e)) from None
    if f is None:
        raise OAuthError(f"OAuth sign-in stores each user's tokens encrypted: set {SECRET_KEY_ENV} for the gateway "
                         "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')")
    return f


def seal(value: dict) -> str:
    return _fernet().encrypt(json.dumps(value).encode()).decode()


def unseal(ciphertext: str) -> dict | None:
    from cryptography.fernet import InvalidToken

    try:
        return json.loads(_fernet().decrypt(ciphertext.encode()))
    except (InvalidToken, OAuthError, ValueError):
        return None


def _margin(blob: dict) -> float:
    """How long before it expires an access token is refreshed: REFRESH_MARGIN, or a quarter of a shorter
    lifetime (a token that lives two minutes is not refreshed on every use)."""
    lifetime = blob.get("lifetime")
    return min(REFRESH_MARGIN, lifetime / 4) if lifetime else REFRESH_MARGIN


@dataclass
class _Tokens:
    access: str
    refresh: str | None
    expires_at: float | None  # epoch seconds
    version: int
    blob: dict  # everything stored (the client, the token endpoint, the resource)
    read_at: float  # monotonic
    stale: bool = False  # the server refused the access token: refresh before the next use


class McpOAuth:
    """The gateway's OAuth client for every `oauth: true` server. `store()` runs the store's operations
    (store/mcp_oauth.py) in the writer process; `callback_url()` is where browsers come back; `user_name` names a
    user id for messages and pages."""

    def __init__(self, store: Callable[[], Any], callback_url: Callable[[], str],
                 user_name: Callable[[str], str | None] = lambda uid: None) -> None:
        self._store = store
        self._callback_url = callback_url
        self.user_name = user_name
        self._tokens: dict[tuple[str, str], _Tokens | None] = {}
        self._read_at: dict[tuple[str, str], float] = {}
        self._refreshing: dict[tuple[str, str], asyncio.Task] = {}

    @property
    def callback_url(self) -> str:
        return self._callback_url()

    async def _op(self, name: str, writes: bool = False, **args) -> Any:
        store = self._store()
        if store is None:
            raise Unavailable("aibridge: the gateway's store is not open")
        try:
            return await asyncio.wrap_future(store.run(name, writes, **args))
        except Exception as e:  # the store away: a call is answered that it cannot be signed in now, never hangs
            raise Unavailable(f"aibridge: the gateway's store cannot be used for sign-ins now ({type(e).__name__})"
                              ) from None

    # --- 1. starting a sign-in ------------------------------------------------------------------------------

    async def start(self, server: McpServer, user_id: str, reuse: bool = False) -> dict:
        """A new login for (user, server): {id, url, expires_at}. `reuse`: a login under way with time left is
        handed out again rather than a new one made."""
        _fernet()
        if reuse:
            pending = await self._op("mcp_oauth.login_pending", user_id=user_id, server=server.name)
            if pending is not None:
                blob = unseal(pending[1])
                if blob is not None:
                    return {"id": pending[0], "url": blob["url"], "expires_at": pending[2]}
        import httpx

        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, trust_env=False) as http:
                meta = await self._discover(http, server)
                client = await self._client(http, server, meta)
        except httpx.HTTPError as e:
            raise OAuthError(f"MCP server {server.name}: its authorization server could not be reached "
                             f"({type(e).__name__})") from None
        from mcp.client.auth.oauth2 import PKCEParameters

        pkce = PKCEParameters.generate()
        state = secrets.token_urlsafe(32)
        params = {"response_type": "code", "client_id": client["client_id"], "redirect_uri": self.callback_url,
                  "state": state, "code_challenge": pkce.code_challenge, "code_challenge_method": "S256",
                  "resource": meta["resource"]}
        if meta["scope"]:
            params["scope"] = meta["scope"]
        endpoint = meta["authorization_endpoint"]
        url = endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)
        login_id = secrets.token_urlsafe(12)
        expires = time.time() + LOGIN_SECONDS
        blob = {"verifier": pkce.code_verifier, "url": url, "client": client, "issuer": meta["issuer"],
                "token_endpoint": meta["token_endpoint"], "resource": meta["resource"], "scope": meta["scope"],
                "redirect_uri": self.callback_url}
        await self._op("mcp_oauth.login_put", True, id=login_id, state_hash=state_hash(state), user_id=user_id,
                       server=server.name, ciphertext=seal(blob),
                       expires_at=dt.datetime.fromtimestamp(expires, dt.UTC).isoformat())
        log.info("mcp oauth: sign-in to %s started for user %s (login %s)", server.name,
                 self.user_name(user_id) or user_id, login_id)
        return {"id": login_id, "url": url, "expires_at": expires}

    async def start_named(self, registry, server: str, user: str, reuse: bool = False) -> dict:
        """`start` by names (the CLI's and the admin API's): {id, url, expires_at, server, user}."""
        found = registry.server(server) if registry is not None else None
        if found is None or not found.oauth:
            raise OAuthError(f"{server!r} is not an oauth MCP server here")
        users = await self._op("users.list")
        cols = users["columns"]
        row = next((dict(zip(cols, r)) for r in users["rows"] if r[cols.index("name")] == user), None)
        if row is None:
            raise OAuthError(f"no user {user!r}")
        login = await self.start(found, str(row["id"]), reuse)
        return {**login, "server": server, "user": row["name"]}

    async def _discover(self, http, server: McpServer) -> dict:
        """The server's protected-resource metadata (RFC 9728) and its authorization server's metadata (RFC 8414),
        found as the MCP spec says: the 401's WWW-Authenticate first, then the well-known URLs."""
        from mcp.client.auth.utils import (
            build_oauth_authorization_server_metadata_discovery_urls,
            build_protected_resource_metadata_discovery_urls,
            create_oauth_metadata_request,
            extract_resource_metadata_from_www_auth,
            extract_scope_from_www_auth,
            get_client_metadata_scopes,
            handle_auth_metadata_response,
            handle_protected_resource_response,
            issuers_match,
        )

        probe = await http.post(server.url, json={"jsonrpc": "2.0", "id": 0, "method": "ping"},
                                headers={"accept": "application/json, text/event-stream"})
        www_url = extract_resource_metadata_from_www_auth(probe)
        www_scope = extract_scope_from_www_auth(probe) if probe.status_code in (401, 403) else None
        prm = None
        for url in build_protected_resource_metadata_discovery_urls(www_url, server.url):
            prm = await handle_protected_resource_response(await http.send(create_oauth_metadata_request(url)))
            if prm is not None:
                break
        auth_server = str(prm.authorization_servers[0]) if prm is not None and prm.authorization_servers else None
        asm = None
        for url in build_oauth_authorization_server_metadata_discovery_urls(auth_server, server.url):
            go_on, asm = await handle_auth_metadata_response(await http.send(create_oauth_metadata_request(url)))
            if asm is not None or not go_on:
                break
        origin = "{0.scheme}://{0.netloc}".format(urlparse(auth_server or server.url))
        if asm is not None:
            if auth_server and not issuers_match(str(asm.issuer), auth_server):
                raise OAuthError(f"MCP server {server.name}: its authorization server's metadata names another "
                                 f"issuer ({printable(str(asm.issuer), 100)})")
            issuer = str(asm.issuer)
            authorize, token = str(asm.authorization_endpoint), str(asm.token_endpoint)
            registration = str(asm.registration_endpoint) if asm.registration_endpoint else None
            if asm.code_challenge_methods_supported and "S256" not in asm.code_challenge_methods_supported:
                raise OAuthError(f"MCP server {server.name}: its authorization server does not support PKCE S256")
        elif prm is None and probe.status_code not in (401, 403):
            raise OAuthError(f"MCP server {server.name} did not ask for a sign-in (answered {probe.status_code}) "
                             "and publishes no OAuth metadata")
        else:  # the 2025-03-26 spec's defaults, for servers without metadata
            issuer, authorize, token, registration = origin, origin + "/authorize", origin + "/token", \
                origin + "/register"
        if server.oauth_scopes is not None:
            scope = " ".join(server.oauth_scopes) or None
        else:
            scope = get_client_metadata_scopes(www_scope, prm, asm)
        resource = str(prm.resource) if prm is not None else server.url
        return {"issuer": issuer, "authorization_endpoint": authorize, "token_endpoint": token,
                "registration_endpoint": registration, "resource": resource, "scope": scope}

    async def _client(self, http, server: McpServer, meta: dict) -> dict:
        """The gateway's client at the authorization server: configured, registered before (the store's), or
        registered now by dynamic client registration (RFC 7591) and kept for every later sign-in."""
        if server.oauth_client_id:
            return {"client_id": server.oauth_client_id, "client_secret": server.oauth_client_secret,
                    "token_endpoint_auth_method": "client_secret_post" if server.oauth_client_secret else "none"}
        key = {"server": server.name, "issuer": meta["issuer"], "redirect_uri": self.callback_url}
        stored = await self._op("mcp_oauth.client_get", **key)
        client = unseal(stored) if stored else None
        if client is not None:
            return client
        if not meta["registration_endpoint"]:
            raise OAuthError(f"MCP server {server.name}: its authorization server offers no dynamic client "
                             "registration; register the gateway there and set oauth_client_id (and "
                             "oauth_client_secret) on the server")
        from mcp.client.auth import OAuthRegistrationError
        from mcp.client.auth.utils import create_client_registration_request, handle_registration_response
        from mcp.shared.auth import OAuthClientMetadata, OAuthMetadata

        metadata = OAuthClientMetadata(redirect_uris=[self.callback_url], client_name=CLIENT_NAME,
                                       grant_types=["authorization_code", "refresh_token"], response_types=["code"],
                                       token_endpoint_auth_method="client_secret_post", scope=meta["scope"])
        asm = OAuthMetadata(issuer=meta["issuer"], authorization_endpoint=meta["authorization_endpoint"],
                            token_endpoint=meta["token_endpoint"], registration_endpoint=meta["registration_endpoint"])
        try:
            info = await handle_registration_response(
                await http.send(create_client_registration_request(asm, metadata, meta["issuer"])))
        except OAuthRegistrationError:
            raise OAuthError(f"MCP server {server.name}: its authorization server refused to register the gateway "
                             "as a client") from None
        client = {"client_id": info.client_id, "client_secret": info.client_secret,
                  "token_endpoint_auth_method": info.token_endpoint_auth_method or "client_secret_post"}
        kept = await self._op("mcp_oauth.client_put", True, client_id=info.client_id, ciphertext=seal(client), **key)
        log.info("mcp oauth: the gateway registered as a client of %s's authorization server", server.name)
        return unseal(kept) or client

    # --- 2. the browser comes back --------------------------------------------------------------------------

    async def callback(self, query: dict[str, str], servers: dict[str, McpServer]) -> tuple[int, str]:
        """The callback's answer: (status, HTML page). Every outcome is reported to the login (the CLI waits)."""
        state = query.get("state")
        if not state:
            return 400, page("Sign-in failed", "This address lacks the sign-in's state. Start the sign-in again.")
        taken = await self._op("mcp_oauth.login_take", True, state_hash=state_hash(state))
        if not taken["found"]:
            why = "was used already" if taken["why"] == "used" else "is not one this gateway started"
            return 400, page("Sign-in failed", f"This sign-in link {why}. Start the sign-in again "
                                               "(aibridge mcp login, or Sign in in the dashboard's Tools view).")
        login_id, user_id, server_name = taken["id"], taken["user_id"], taken["server"]
        who = self.user_name(user_id) or user_id

        async def failed(message: str, status: int = 400) -> tuple[int, str]:
            await self._op("mcp_oauth.login_finish", True, id=login_id, status="failed", error=message)
            log.warning("mcp oauth: sign-in of %s to %s failed: %s", who, server_name, message)
            return status, page("Sign-in failed", f"Signing in to {server_name} as {who} failed: {message}")

        try:
            return await self._complete(taken, query, servers, failed, who)
        except Exception as e:  # the login never stays half done: the waiting CLI hears of it
            log.warning("mcp oauth: completing a sign-in failed (%s)", type(e).__name__)
            try:
                await failed("the gateway could not complete the sign-in; try again in a moment", 503)
            except Exception:
                pass
            raise

    async def _complete(self, taken: dict, query: dict[str, str], servers: dict[str, McpServer], failed,
                        who: str) -> tuple[int, str]:
        code, error = query.get("code"), query.get("error")
        login_id, user_id, server_name = taken["id"], taken["user_id"], taken["server"]
        if taken["expires_at"] is not None and taken["expires_at"] < time.time():
            return await failed("the sign-in expired (it lasts ten minutes); start it again")
        blob = unseal(taken["ciphertext"])
        if blob is None:
            return await failed("the gateway cannot read the sign-in it stored (was AIBRIDGE_SECRET_KEY changed?)",
                                500)
        if error:
            text = printable(error, 60)
            description = query.get("error_description")
            if description:
                text += f" ({printable(description, 200)})"
            return await failed(f"the authorization server answered {text}")
        if not code:
            return await failed("the authorization server sent no code")
        server = servers.get(server_name)
        if server is None or not server.oauth:
            return await failed(f"{server_name} is no longer an oauth MCP server here")
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": blob["redirect_uri"],
                "code_verifier": blob["verifier"], "resource": blob["resource"]}
        try:
            token = await self._token_request(blob, data)
        except OAuthError as e:
            if not server.oauth_client_id and ("invalid_client" in str(e) or "unauthorized_client" in str(e)):
                # the authorization server forgot the gateway's registration: the next sign-in registers again
                await self._op("mcp_oauth.client_forget", True, server=server_name, issuer=blob["issuer"],
                               redirect_uri=blob["redirect_uri"])
            return await failed(str(e))
        stored = self._stored(blob, token, None)
        await self._op("mcp_oauth.token_put", True, user_id=user_id, server=server_name, ciphertext=seal(stored),
                       expires_at=_iso(stored["expires_at"]), scope=token.scope)
        self._forget(user_id, server_name)
        await self._op("mcp_oauth.login_finish", True, id=login_id, status="done")
        log.info("mcp oauth: %s signed in to %s", who, server_name)
        return 200, page("Signed in", f"Signed in to {server_name} as {who}. You can close this window.")

    async def status(self, login_id: str) -> dict:
        found = await self._op("mcp_oauth.login_status", id=login_id)
        if found is None:
            raise OAuthError(f"no sign-in {login_id!r}")
        return found

    async def _token_request(self, blob: dict, data: dict[str, str]):
        """POST to the token endpoint with the client's authentication; the parsed token or OAuthError (with the
        error code the server gave, never a token)."""
        import httpx
        from mcp.client.auth import OAuthTokenError
        from mcp.client.auth.utils import handle_token_response_scopes

        client = blob["client"]
        data = {**data, "client_id": client["client_id"]}
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        if client.get("client_secret"):
            if client.get("token_endpoint_auth_method") == "client_secret_basic":
                raw = f"{quote(client['client_id'], safe='')}:{quote(client['client_secret'], safe='')}"
                headers["authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
            else:
                data["client_secret"] = client["client_secret"]
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, trust_env=False) as http:
                response = await http.post(blob["token_endpoint"], data=data, headers=headers)
                if response.status_code != 200:
                    raise OAuthError(f"the token endpoint refused ({response.status_code} {_error_code(response)})")
                return await handle_token_response_scopes(response)
        except httpx.HTTPError as e:
            raise OAuthError(f"the token endpoint could not be reached ({type(e).__name__})") from None
        except OAuthTokenError:
            raise OAuthError("the token endpoint answered something that is not a token") from None

    @staticmethod
    def _stored(blob: dict, token, old: dict | None) -> dict:
        expires = time.time() + token.expires_in if token.expires_in else None
        return {"access_token": token.access_token,
                "refresh_token": token.refresh_token or (old or {}).get("refresh_token"),
                "expires_at": expires, "lifetime": token.expires_in, "scope": token.scope or (old or {}).get("scope"),
                "client": blob["client"], "token_endpoint": blob["token_endpoint"], "resource": blob["resource"]}

    # --- 3. using and refreshing ----------------------------------------------------------------------------

    def forget_all(self) -> None:
        """Read every user's tokens from the store again at their next use (after a logout here)."""
        self._tokens.clear()
        self._read_at.clear()

    def _forget(self, user_id: str, server: str) -> None:
        self._tokens.pop((user_id, server), None)
        self._read_at.pop((user_id, server), None)

    async def _read(self, user_id: str, server: str) -> _Tokens | None:
        found = await self._op("mcp_oauth.token_get", user_id=user_id, server=server)
        tokens = None
        if found is not None:
            blob = unseal(found[0])
            if blob is not None and blob.get("access_token"):
                tokens = _Tokens(blob["access_token"], blob.get("refresh_token"), blob.get("expires_at"), found[1],
                                 blob, time.monotonic())
            elif blob is None:
                log.warning("mcp oauth: the tokens of user %s for %s cannot be decrypted with AIBRIDGE_SECRET_KEY",
                            user_id, server)
        self._tokens[(user_id, server)] = tokens
        self._read_at[(user_id, server)] = time.monotonic()
        return tokens

    async def token(self, server: McpServer, user_id: str) -> str | None:
        """The user's access token for the server, refreshed first when it expires soon; None when they must sign
        in (never signed in, signed out, or the refresh was refused). Raises `Unavailable` when the authorization
        server cannot be reached to refresh it."""
        key = (user_id, server.name)
        tokens = self._tokens.get(key)
        if key not in self._read_at or time.monotonic() - self._read_at[key] > CACHE_SECONDS:
            refused = tokens.version if tokens is not None and tokens.stale else None
            tokens = await self._read(user_id, server.name)
            if tokens is not None and tokens.version == refused:
                tokens.stale = True  # the token the server refused is still the stored one
        if tokens is None:
            return None
        if not tokens.stale and (tokens.expires_at is None or tokens.expires_at - time.time() > _margin(tokens.blob)):
            return tokens.access
        # One refresh per (user, server) in this process, as a task of its own: a caller that stops waiting (its
        # bound, a cancelled call) never cancels it halfway, when the server may have rotated the refresh token
        # already and the new one must still be stored. Other processes are ordered by the stored version.
        task = self._refreshing.get(key)
        if task is None or task.done():
            task = self._refreshing[key] = asyncio.create_task(self._refresh(server, user_id, tokens))
        try:
            return await asyncio.wait_for(asyncio.shield(task), REFRESH_TIMEOUT)
        except TimeoutError:
            raise Unavailable(f"MCP server {server.name}: refreshing the sign-in of "
                              f"{self.user_name(user_id) or user_id} took longer than {REFRESH_TIMEOUT:g}s",
                              "timeout") from None

    async def _refresh(self, server: McpServer, user_id: str, tokens: _Tokens) -> str | None:
        key = (user_id, server.name)
        stored = await self._read(user_id, server.name)  # another process may have refreshed it already
        if stored is None:
            return None
        if stored.version != tokens.version and (stored.expires_at is None or
                                                 stored.expires_at - time.time() > _margin(stored.blob)):
            return stored.access
        if not stored.refresh:
            await self._op("mcp_oauth.token_drop", True, user_id=user_id, server=server.name, version=stored.version)
            self._forget(user_id, server.name)
            return None
        data = {"grant_type": "refresh_token", "refresh_token": stored.refresh, "resource": stored.blob["resource"]}
        try:
            token = await self._token_request(stored.blob, data)
        except OAuthError as e:
            again = await self._read(user_id, server.name)  # a concurrent refresh elsewhere rotated it: use theirs
            if again is not None and again.version != stored.version:
                return again.access
            if "could not be reached" in str(e) or "(5" in str(e):
                raise Unavailable(f"MCP server {server.name}: the sign-in could not be refreshed: {e}") from None
            log.warning("mcp oauth: the sign-in of %s to %s could not be refreshed (%s): signing in again is needed",
                        self.user_name(user_id) or user_id, server.name, e)
            await self._op("mcp_oauth.token_drop", True, user_id=user_id, server=server.name, version=stored.version)
            self._forget(user_id, server.name)
            return None
        fresh = self._stored(stored.blob, token, stored.blob)
        written = await self._op("mcp_oauth.token_put", True, user_id=user_id, server=server.name,
                                 ciphertext=seal(fresh), expires_at=_iso(fresh["expires_at"]), scope=token.scope,
                                 version=stored.version)
        if written["written"]:
            self._tokens[key] = _Tokens(fresh["access_token"], fresh["refresh_token"], fresh["expires_at"],
                                        written["version"], fresh, time.monotonic())
            self._read_at[key] = time.monotonic()
        else:  # another process refreshed meanwhile: theirs is stored; this fresh token is good for this call
            await self._read(user_id, server.name)
        log.info("mcp oauth: refreshed the sign-in of %s to %s", self.user_name(user_id) or user_id, server.name)
        return fresh["access_token"]

    def rejected(self, server: McpServer, user_id: str) -> None:
        """The server answered 401 to this user's access token: refresh it before its next use."""
        t = self._tokens.get((user_id, server.name))
        if t is not None:
            t.stale = True

    def sign_in_message(self, server: McpServer, user_id: str) -> str:
        who = self.user_name(user_id) or user_id
        return (f"aibridge: sign-in needed: MCP server {server.name} needs {who} to sign in first (OAuth). Sign in "
                f"from the aibridge dashboard (Tools: Sign in), or ask an administrator to run: "
                f"aibridge mcp login --server {server.name} --user {who}")


def _iso(epoch: float | None) -> str | None:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat() if epoch else None


def _error_code(response) -> str:
    """The OAuth error code of a refusal (`invalid_grant`), never its body (which might echo what was sent)."""
    try:
        code = response.json().get("error")
    except (ValueError, AttributeError):
        code = None
    return printable(code, 60) if isinstance(code, str) else "no error code"


def page(title: str, message: str) -> str:
    t, m = html.escape(title), html.escape(message)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>aibridge: {t}</title><style>body{{font-family:"
            f"system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em}}</style></head><body><h1>{t}</h1>"
            f"<p>{m}</p></body></html>")
