"""The `Pipeline` addon: one way through for every provider call.

request:  route (which provider, endpoint and wire API) → identify (gateway token, proxy credentials or the
          user's own key) → admit (body limits, circuit breaker, budget) → inject (central MCP tools) →
          upstream (canonical path, swapped credentials) or the injected-tool loop
response: tap (streams are read as they pass, never buffered) → record (one row per call, always ended)

Everything it learns about a flow lives in one `FlowState` in `flow.metadata`; the wire formats are in `apis/`,
the rows in `flow/recorder.py`. Observation and capture run after it and read what it decided.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
from urllib.parse import unquote_plus

from mitmproxy import http
from mitmproxy.net.http.url import hostport

from ..apis import MODEL_APIS, PROVIDERS, WIRE_APIS
from ..apis.base import LocalAnswer
from ..apis.wire.results import ResultsTap
from ..flow import bodies
from ..flow.clients import client_metadata, detect_client, detect_session
from ..flow.errors import error_response
from ..flow.exchange import BadRequest, ResponseSummary, TokenTotals, json_text, summary_from_dict, summary_to_dict
from ..flow.objects import CREATED, WATCH_LIMIT, WATCHED, Objects, client_base
from ..flow.purpose import WARMUP, conversation_key
from ..flow.purpose import classify as classify_purpose
from ..flow.recorder import COMPLETED, META_KEY, NOT_JSON, NOT_OBJECT, Interception, at, conclude, is_json, is_sse
from ..flow.relay import RelayJob
from ..flow.routing import Route
from ..flow.state import HANDED_OFF, STATE_KEY, FlowState, Outcome, state_of
from ..flow.tap import StreamTap
from ..flow.toolgate import Decide, GateCall, Refusal, gate_body, stream_gate
from ..flow.upstream_faults import ClientEnding
from ..logsafe import printable
from ..mcp.access import Caller
from ..mcp.gateway import offers_gateway_tools
from ..mcp.loop import LoopJob, upstream_headers
from ..policy.auth import (
    CREDENTIAL_HEADERS,
    GATEWAY_TOKEN_HEADERS,
    AuthRefused,
    Identity,
    acting_for,
    identify,
    mask,
)
from ..policy.breaker import is_failure
from ..policy.policing import (
    OFF_LOOP_TEXT,
    CallFacts,
    CallPolicing,
    conversation,
    mask_stored,
    offered_tools,
    variable_headers,
)
from . import patches
from .proxy_mode import PROXY_AUTH_REQUIRED, ProxyMode
from .runtime import Runtime
from .sockets import ResponsesSockets

log = logging.getLogger("aibridge")
OFF_LOOP_BYTES = 256 * 1024  # request bodies larger than this are decoded and parsed on a worker thread
MAX_HEADER_FIELDS = 256  # real clients send 10-40; more is refused 431 before any per-header work
MAX_HEADER_BYTES = 64 * 1024
DRAIN_SETTLE = 5.0  # seconds past a drain's deadline for its ending to be recorded before mitmproxy closes it
REALTIME_API = "openai.realtime"  # refused unless the instance sets allow_realtime


class _Refused:
    """The call was answered and recorded here (see Pipeline._police)."""


REFUSED = _Refused()


class Pipeline:
    def __init__(self, runtime: Runtime, proxy: ProxyMode) -> None:
        self.rt = runtime
        self.proxy = proxy
        self._noted: set[tuple] = set()  # warnings already logged (see _note_once)
        self.draining: set[FlowState] = set()  # streams read on after their client went away
        self.objects = Objects(runtime)  # batches, their output files, background responses: who created them
        self.sockets = ResponsesSockets(self, header_view, _tool_decider)  # the Responses API over a WebSocket

    def load(self, loader) -> None:
        patches.install(self._client_ending, self._client_left, self.sockets.hold, self.sockets.message_limit)

    # --- request -----------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse oversized header sets and bodies before any per-header work or reading the body."""
        if self.rt.router is None or not flow.live:
            return
        fields = flow.request.headers.fields
        if len(fields) > MAX_HEADER_FIELDS or sum(len(k) + len(v) for k, v in fields) > MAX_HEADER_BYTES:
            # One request with 100 000 repeats of a header must not cost everyone else on this event loop.
            flow.response = error_response(
                self.proxy.provider_type(flow), 431,
                f"aibridge: request headers too large (at most {MAX_HEADER_FIELDS} fields and "
                f"{MAX_HEADER_BYTES // 1024} KiB)", {"connection": "close"})
            return
        limit = self.rt.config.limits.max_request_body_bytes
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            flow.response = error_response(
                self.proxy.provider_type(flow), 413,
                f"aibridge: request body of {int(length)} bytes exceeds the {limit} byte limit")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self.rt.router is None or not flow.live or HANDED_OFF in flow.metadata:
            return
        try:
            await self._request(flow)
        except Exception as e:  # a hostile request must get an answer, never a traceback in a hook
            deep = isinstance(e, RecursionError)
            if not deep:
                log.exception("aibridge: handling a request failed")
            self._abandon(flow)
            try:
                ptype = self.proxy.provider_type(flow)
            except Exception:
                ptype = None
            flow.response = error_response(
                ptype, 400 if deep else 500,
                "aibridge: the request body is nested too deeply" if deep else "aibridge: internal error")

    def _abandon(self, flow: http.HTTPFlow) -> None:
        """Forget a flow the pipeline gave up on; an interception already started ends failed."""
        state = state_of(flow)
        if state is None or state not in self.rt.inflight:
            return
        self.rt.inflight.discard(state)
        error, ended_at = "aibridge: internal error", at(None)
        status = self.rt.recorder.ended(state.interception, ResponseSummary(), None, error, ended_at)
        state.outcome = Outcome(status, ResponseSummary(), None, error, ended_at)

    async def _request(self, flow: http.HTTPFlow) -> None:
        route = self._route(flow)
        if route is None:
            return
        req = flow.request
        hv = header_view(req.headers)
        if hv.get("upgrade", "").lower() == "websocket":
            # Codex CLI opens the Responses API over a WebSocket first: served turn by turn (addons/sockets.py).
            # Any other WebSocket (the Realtime API speaks nothing else) would bypass recording, budgets and MCP
            # injection; 426 is the one answer Codex takes as "use HTTP" at once.
            if not await self.sockets.upgrade(flow, route, hv):
                flow.response = error_response(
                    route.provider.type, 426,
                    "aibridge: the WebSocket transport is not supported here; send the request over HTTP (SSE)")
            return
        if route.local is not None and route.local.anyone:  # a connectivity check: no key, nothing upstream
            flow.response = _local_answer(route.local)
            return
        route, key_in_query = _credential_from_query(route, hv)
        ident = self._identify(flow, route, hv)
        if ident is None:
            return
        if route.local is not None and ident.byok_credential is None:
            # A client's service endpoint (telemetry, feature flags) on the central key: the gateway answers it, the
            # way the client takes "nothing to tell"; the user's own credential would have taken it upstream.
            flow.response = _local_answer(route.local)
            return
        if not self._admissible(flow, route, ident):
            return
        state = flow.metadata[STATE_KEY] = FlowState(flow, route)
        if route.api is None:
            state.watch = WATCHED.get((route.provider.type, route.label))
            if state.watch is not None and self.proxy.is_ours(flow):
                state.client_base = client_base(flow, route.provider.name)
        adapter = None
        if route.api:
            adapter = await self._open(flow, state, ident, hv)
            if adapter is REFUSED:
                return
            route = state.route
        elif not route.known:
            log.info("aibridge: relaying %s %s unrecorded with the user's own credential (user %s)",
                     req.method, printable(route.upstream_path.split("?")[0]), ident.actor.user_name)
        pool = self.rt.pools.get(route.provider.name) if ident.byok_credential is None and self.rt.loopback else None
        self._to_upstream(flow, state, ident, key_in_query, pool is not None)
        if adapter is not None:
            self._to_loop(flow, state, ident, adapter, hv, pool)
        elif pool is not None:
            self._to_relay(flow, state, pool)
        state.forwarded_at = time.time()

    async def _open(self, flow: http.HTTPFlow, state: FlowState, ident: Identity, hv: dict[str, str],
                    inject: bool = True, warmup: bool = False):
        """Open a recorded call's interception: read the request, police, admit (breaker, budget), inject central
        MCP tools (`inject`), and queue its start record. A Responses WebSocket warm-up (`warmup`) is policed and
        recorded like any call, but counts toward no request budget (it generates nothing; Codex sends one per turn). Returns the tool loop's adapter (None: no injected tools);
        `REFUSED` when the call was answered here (the answer is on the flow)."""
        route = state.route
        begun = await self._begin(flow, route, ident, hv)
        if begun is None:
            return REFUSED
        ic, body = begun
        state.interception = ic
        if warmup:
            ic.purpose = WARMUP
            ic.facts["warmup"] = True
        if self.rt.policing is not None and self.rt.policing.active:
            policed = await self._police(flow, state, ident, body, hv)
            if policed is REFUSED:
                return REFUSED
            body, route = policed, state.route
        if not await self._admit(flow, state, budget=not warmup):
            return REFUSED
        adapter = None
        if inject and body is not None and ic.api in MODEL_APIS:
            adapter = await self._injection(flow, ic, body, ident.actor)
        if route.provider.transport is not None and not await self._transport(flow, state, ident, body, adapter, hv):
            return REFUSED
        self.rt.recorder.started(ic)
        self.rt.inflight.add(state)
        flow.metadata[META_KEY] = ic.to_metadata()
        return adapter

    async def _socket_turn(self, flow: http.HTTPFlow, route: Route, warmup: bool, relayed_to: str | None
                           ) -> tuple[FlowState, Identity, object] | None:
        """One `response.create` on a Responses WebSocket (addons/sockets.py), made a request flow and governed as
        its HTTP call is, up to the upstream: the token checked again, limits, policies, breaker, budget, the start
        record, central MCP tools (the tool loop's adapter, or None). A refusal is left on the flow (the HTTP answer
        it would be); None then. A warm-up (`generate: false`) goes through the same steps (no MCP tools injected) and is
        recorded with purpose `warmup`: its content reaches the provider too. `relayed_to`: the provider instance a
        relayed socket is connected to (a policy cannot route its turns elsewhere)."""
        hv = header_view(flow.request.headers)
        ident = self._identify(flow, route, hv)
        if ident is None:
            if flow.response is None:
                flow.response = error_response(route.provider.type, 401, "aibridge: not authorized")
            return None
        if not self._admissible(flow, route, ident):
            return None
        state = flow.metadata[STATE_KEY] = FlowState(flow, route)
        adapter = await self._open(flow, state, ident, hv, inject=not warmup, warmup=warmup)
        if adapter is REFUSED:
            return None
        state.interception.facts["transport"] = "websocket"  # in the record's metadata
        if relayed_to is not None and state.route.provider.name != relayed_to:
            message = (f"aibridge policy: this WebSocket is relayed to provider {relayed_to!r}; a turn cannot be "
                       f"routed to {state.route.provider.name!r}")
            self.rt.inflight.discard(state)
            self.rt.recorder.rejected(state.interception, 403, message)
            flow.response = error_response(route.provider.type, 403, message)
            return None
        return state, ident, adapter

    def _route(self, flow: http.HTTPFlow) -> Route | None:
        """The provider endpoint this request is for; None (with an answer on the flow, unless it is not the
        pipeline's: the gateway's own endpoints, or proxied traffic to other hosts) when there is none."""
        target = self.proxy.target(flow)
        if target.bad_path is not None:
            flow.response = error_response(target.provider_type, 400, f"aibridge: bad request path: {target.bad_path}")
            return None
        if target.route is None and target.ours:
            flow.response = error_response(
                None, 404, f"no provider is served at {printable(flow.request.path.split('?')[0])!r}; use "
                f"/<provider>/… (configured: {', '.join('/' + p.name for p in self.rt.config.providers)})")
        return target.route

    def _identify(self, flow: http.HTTPFlow, route: Route, hv: dict[str, str]) -> Identity | None:
        proxy_actor = self.proxy.actor(flow)
        if flow.response is not None:
            return None
        config = self.rt.config
        if proxy_actor is None and config.proxy.require_auth is True and not self.proxy.is_ours(flow):
            flow.response = http.Response.make(407, b"aibridge: proxy credentials required\n", PROXY_AUTH_REQUIRED)
            return None
        try:
            ident = identify(hv, proxy_actor, self.rt.tokens, config.proxy.byok)
        except AuthRefused as e:
            if not self.rt.auth_failed(flow, route.provider.type):
                flow.response = error_response(route.provider.type, 401, str(e))
            return None
        transport = route.provider.transport
        if transport is not None:  # a signed provider: the user's own signature, when kept, else the instance's
            ident = Identity(ident.actor, transport.client_credential(hv))
        return self._acting_for(ident, hv)

    def _acting_for(self, ident: Identity, hv: dict[str, str]) -> Identity:
        """A service account may name the person it acts for; from anyone else the claim is ignored (and logged)."""
        actor = ident.actor
        person, named = acting_for(actor, hv, self.rt.users)
        if named is None:
            return ident
        if not actor.service_account:
            self._note_once((actor.user_id, named[0]), "aibridge: %s from user %s ignored: not a service account",
                            named[0], actor.user_name)
            return ident
        if person is None:
            self._note_once((actor.user_id, named[1]), "aibridge: service account %s acts for unknown user %s (%s); "
                            "recorded as its own call", actor.user_name, printable(named[1][:80]), named[0])
            return ident
        return dataclasses.replace(ident, on_behalf_of=person)

    def _note_once(self, key: tuple, message: str, *args) -> None:
        """A warning an agent platform would repeat on every call: logged once per caller and value."""
        if key in self._noted:
            return
        if len(self._noted) > 10_000:
            self._noted.clear()
        self._noted.add(key)
        log.warning(message, *args)

    def _admissible(self, flow: http.HTTPFlow, route: Route, ident: Identity) -> bool:
        """Checks that need no body: size, a reviewed endpoint, a key to send."""
        req = flow.request
        if len(req.raw_content or b"") > self.rt.config.limits.max_request_body_bytes:  # chunked: no length header
            flow.response = error_response(route.provider.type, 413, "aibridge: request body too large")
            return False
        if route.api is None and not route.known and (ident.byok_credential is None or route.provider.transport):
            # Nobody reviewed this endpoint: it may spend money unrecorded, so the central key never goes there
            # (nor, for a signed provider, whose every model call the gateway can read, a user's own signature).
            flow.response = error_response(
                route.provider.type, 404,
                f"aibridge: {req.method} {printable(route.upstream_path.split('?')[0])} is not an endpoint this "
                f"gateway relays (provider {route.provider.name!r})")
            return False
        if route.api == REALTIME_API and not route.provider.allow_realtime:
            # The session's ephemeral key is billed to the central key and used straight against the provider:
            # nothing it spends would pass the gateway again.
            flow.response = error_response(
                route.provider.type, 403,
                f"aibridge: realtime sessions are not allowed through provider {route.provider.name!r}: their "
                "client secret is billed to the gateway's key and bypasses it (an admin may set allow_realtime: true)")
            return False
        if credential_kind(route, ident) == "subscription" and self.rt.config.proxy.subscriptions == "refuse":
            flow.response = error_response(
                route.provider.type, 403,
                "aibridge: subscription logins are not allowed through this gateway; use the gateway token as the "
                "API key (or an API key of your own)")
            return False
        if ident.byok_credential is None and PROVIDERS[route.provider.type].own_credentials_only:
            flow.response = error_response(
                route.provider.type, 401,
                f"aibridge: provider {route.provider.name!r} takes each user's own credential: send it as the API "
                "key and the gateway token in X-AIBridge-Token (or as proxy credentials)")
            return False
        transport = route.provider.transport
        if ident.byok_credential is None and transport is not None and transport.hint() is None:
            flow.response = error_response(
                route.provider.type, 401,
                f"aibridge: provider {route.provider.name!r} sends each user's own signed request upstream; this "
                "request carries no AWS signature")
            return False
        if ident.byok_credential is None and not route.provider.key and transport is None:
            flow.response = error_response(
                route.provider.type, 500, f"aibridge: no upstream key configured for provider {route.provider.name!r}"
            )
            return False
        return True

    async def _police(self, flow: http.HTTPFlow, state: FlowState, ident: Identity, body: dict | None,
                      hv: dict[str, str]) -> dict | None | _Refused:
        """The admin's request rules and guardrails: deny (answered 403 in the provider's format, recorded
        `rejected` with the rule), route (another model or provider instance), redact (the body sent upstream and
        the prompt stored are masked), tag. Returns the body to go on with; `REFUSED` when the call stops here."""
        rt, route, ic = self.rt, state.route, state.interception
        policing = rt.policing
        actor = ident.actor
        facts = CallFacts(
            ic.id, {"name": actor.user_name, "id": actor.user_id, "role": actor.role,
                    "groups": list(actor.groups)},
            ic.client or "", ic.session_id or "", route.provider.name, ic.api, ic.info.model or "",
            ic.info.prompt or "", conversation(body), offered_tools(body), variable_headers(hv),
            size=len(flow.request.raw_content or b""))
        state.police = CallPolicing(policing, facts)
        outcome = await policing.request(facts, body, facts.size)
        verdict = outcome.verdict
        if verdict.decisions:
            ic.facts["policy_version"] = verdict.policy_version
        if verdict.denied is not None:
            message = f"aibridge policy {verdict.denied.rule}: {verdict.denied.message or 'denied'}"
            if facts.tags:
                ic.facts["tags"] = dict(facts.tags)
            rt.recorder.rejected(ic, 403, message)
            flow.response = error_response(route.provider.type, 403, message)
            log.info("interception %s user=%s denied by policy rule %s", ic.id, ic.user_name, verdict.denied.rule)
            return REFUSED
        state.police.stored = verdict.redact
        changed = outcome.body
        if outcome.redacted:
            ic.facts["redacted"] = list(outcome.redacted)
        if verdict.model or verdict.provider:
            changed = self._reroute(flow, state, ident, changed if changed is not None else body, verdict)
            if changed is REFUSED:
                return REFUSED
        if changed is not None and changed is not body:
            if route.provider.transport is not None and ident.byok_credential is not None:
                # Signed by the client itself (Bedrock, client_signature: keep): a changed body would fail its
                # signature at the provider. The call is refused here, and what was to be masked never leaves.
                message = ("aibridge policy: this request is signed by the client, so the gateway cannot change it "
                           "as a policy requires (redact or route)")
                rt.recorder.rejected(ic, 403, message)
                flow.response = error_response(route.provider.type, 403, message)
                return REFUSED
            flow.request.content = json.dumps(changed, ensure_ascii=False).encode()
            body = changed
            try:
                ic.info = ic.codec.parse_request(body, state.route.upstream_path.split("?")[0])
            except BadRequest:  # what the gateway made of a valid request stays valid; keep the first reading
                pass
        redactor = policing.stored_redactor(facts, verdict.redact)
        if redactor is not None and ic.info.prompt:
            size = len(ic.info.prompt)
            ic.info.prompt = await asyncio.to_thread(redactor.text, ic.info.prompt) if size > OFF_LOOP_TEXT \
                else redactor.text(ic.info.prompt)
        return body

    def _reroute(self, flow: http.HTTPFlow, state: FlowState, ident: Identity, body: dict | None, verdict
                 ) -> dict | None | _Refused:
        """A route decision: the model the request names (in its body, or its path for Gemini) and/or the provider
        instance it goes to (one that serves the same API, on the central key)."""
        rt, route, ic = self.rt, state.route, state.interception
        if verdict.provider and verdict.provider != route.provider.name:
            source = route.provider.name
            target = next((p for p in rt.config.providers if p.name == verdict.provider), None)
            moved = rt.router.reroute(route, target, flow.request.method) if target is not None else None
            why = ("it is no longer configured" if target is None
                   else f"it does not serve this {ic.api} endpoint" if moved is None
                   else "the call uses the user's own credential" if ident.byok_credential is not None
                   else "it takes only users' own credentials" if PROVIDERS[target.type].own_credentials_only
                   else "it has no upstream key" if target.transport is None and not target.key else None)
            if why is not None:
                rule = next(d.rule for d in verdict.decisions if d.action == "route" and d.enforced)
                message = f"aibridge policy {rule}: cannot route to provider {verdict.provider}: {why}"
                rt.recorder.rejected(ic, 403, message)
                flow.response = error_response(route.provider.type, 403, message)
                return REFUSED
            route = state.route = moved
            ic.provider_type, ic.provider_name = target.type, target.name
            ic.upstream_path = moved.upstream_path.split("?")[0]
            ic.credential_hint = mask(target.transport.hint() if target.transport else target.key)
            ic.facts["routed_from"] = source
        if verdict.model and body is not None and verdict.model != ic.info.model:
            with_model = getattr(ic.codec, "with_model", None)
            if with_model is not None:
                ic.requested_model = ic.requested_model or ic.info.model
                body, path = with_model(body, route.upstream_path, verdict.model)
                ic.info.model = verdict.model
                if path != route.upstream_path:
                    state.route = dataclasses.replace(route, upstream_path=path)
                    ic.upstream_path = path.split("?")[0]
        return body

    async def _admit(self, flow: http.HTTPFlow, state: FlowState, budget: bool = True) -> bool:
        """The circuit breaker and the user's budget; a refusal is answered (and a budget refusal recorded)."""
        rt, route, ic = self.rt, state.route, state.interception
        if rt.config.storage.on_failure == "refuse" and rt.store_health()["refusing"]:
            # The operator chose: no model call the audit cannot hold. Refused, recorded (held, like every record).
            message = "aibridge: the audit store cannot record calls right now; refusing them (storage.on_failure)"
            rt.recorder.rejected(ic, 503, message)
            flow.response = error_response(route.provider.type, 503, message, {"retry-after": "5"})
            return False
        key = (route.provider.name, route.label, rt.metrics.model_label(ic.info.model))
        wait = rt.breakers.allow(key)
        if wait is not None:
            msg = f"aibridge: {route.provider.name} {route.label} {key[2]} is failing; circuit open"
            flow.response = error_response(route.provider.type, 503, msg, {"retry-after": str(wait)})
            return False
        state.breaker_key = key
        await rt.recorder.link_thread(ic)
        if budget and rt.budgets is not None and not getattr(ic.codec, "retrieval", None):
            # A retrieval spends nothing more: the work was paid for when it ran (and is charged to its creator).
            refusal = rt.budgets.check(*ic.charged, rt.groups_of(ic.charged[0]))
            if refusal is None and rt.budgets.fleet:
                refusal = await rt.fleet_rate_refusal(*ic.charged)
            if refusal is not None:
                message = refusal.message
                if ic.on_behalf_of_name:
                    message += f" (the budget of {ic.on_behalf_of_name}, for whom {ic.user_name} acts)"
                rt.recorder.rejected(ic, 429, message)
                flow.response = error_response(route.provider.type, 429, message,
                                               {"retry-after": str(refusal.retry_after)})
                log.info("interception %s user=%s rejected: %s", ic.id, ic.user_name, message)
                return False
        return True

    async def _begin(self, flow: http.HTTPFlow, route: Route, ident: Identity, hv: dict[str, str]
                     ) -> tuple[Interception, dict | None] | None:
        """Read the request (decoded with a cap, off the event loop when large) and open its interception."""
        req = flow.request
        codec = WIRE_APIS[route.api]
        limit = self.rt.config.limits.max_request_body_bytes
        raw = req.raw_content or b""
        encoding = hv.get("content-encoding", "")
        ctype = hv.get("content-type", "").lower()
        multipart = ctype.startswith("multipart/form-data")

        def read():
            data = bodies.decode(raw, encoding, limit) if encoding else raw
            if multipart:
                return data, bodies.form_fields(hv.get("content-type", ""), data)
            if not data.strip() and not codec.model_api:
                return data, {}
            return data, bodies.parse_json(data)

        try:
            # Decompression output is bounded by the limit, not the input: any encoded body goes to a thread.
            data, body = await asyncio.to_thread(read) if encoding or len(raw) > OFF_LOOP_BYTES else read()
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object")
            info = codec.parse_request(body, route.upstream_path.split("?")[0])
            changed = None if multipart else codec.prepare_request(body)
        except bodies.BodyTooLarge as e:
            flow.response = error_response(route.provider.type, 413, f"aibridge: {e}")
            return None
        except (bodies.BadBody, BadRequest) as e:
            flow.response = error_response(route.provider.type, 400, f"aibridge: {e}")
            return None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:  # a field of the wrong type
            flow.response = error_response(route.provider.type, 400,
                                           f"aibridge: the request body has an unexpected shape ({type(e).__name__})")
            return None
        if encoding:  # forward what was parsed: the provider sees exactly the body the gateway recorded
            req.headers.pop("content-encoding", None)
            req.content = data
        if multipart:
            body = None  # forwarded as sent; only its fields were read
        elif changed is not None:
            req.content = json.dumps(changed, ensure_ascii=False).encode()
            body = changed
        byok = ident.byok_credential
        client = detect_client(hv)
        ic = Interception(
            id=flow.id,
            user_id=ident.actor.user_id,
            user_name=ident.actor.user_name,
            provider_type=route.provider.type,
            provider_name=route.provider.name,
            api=route.api,
            client=client,
            user_agent=hv.get("user-agent"),
            session_id=detect_session(client, hv, info.session_hint),
            purpose=classify_purpose(client, route.api, body),
            client_metadata=client_metadata(hv),
            on_behalf_of_id=ident.on_behalf_of[0] if ident.on_behalf_of else None,
            on_behalf_of_name=ident.on_behalf_of[1] if ident.on_behalf_of else None,
            credential_kind=credential_kind(route, ident),
            credential_hint=mask(byok or (route.provider.transport.hint() if route.provider.transport
                                          else route.provider.key)),
            upstream_path=route.upstream_path.split("?")[0],
            started_at=at(req.timestamp_start),
            route=route.label,
            info=info,
            facts=dict(info.facts or {}),
            deferred=bool(getattr(codec, "retrieval", None)),
            traceparent=hv.get("traceparent"),
            tracestate=hv.get("tracestate"),
        )
        if ic.session_id is None and (conversation := conversation_key(client, route.api, body, ic.user_id)):
            ic.facts["conversation"] = conversation  # a client that names no session: its conversation's opening
        return ic, body

    async def _transport(self, flow: http.HTTPFlow, state: FlowState, ident: Identity, body: dict | None,
                         adapter, hv: dict[str, str]) -> bool:
        """A provider reached through a transport (Bedrock): the upstream path and body it needs, and the model it
        names, recorded as the model (the client's own choice kept beside it)."""
        route, ic, req = state.route, state.interception, flow.request
        transport = route.provider.transport
        if ident.byok_credential is None:
            try:
                await transport.ready()
            except Exception as e:
                log.warning("provider %s: credentials unavailable: %s", route.provider.name, e)
                flow.response = error_response(route.provider.type, 502,
                                               "aibridge: the provider's credentials could not be refreshed")
                return False
        out = transport.outbound(ic.api, route.provider.base_path, route.upstream_path,
                                 adapter.body if adapter is not None else body, req.content, hv)
        if out.content is not req.content:
            req.content = out.content
        state.route = dataclasses.replace(route, upstream_path=out.path)
        ic.upstream_path = out.path.split("?")[0]
        ic.info.model, ic.requested_model = out.model, ic.requested_model or out.requested  # a route's: the client's
        return True

    async def _injection(self, flow: http.HTTPFlow, ic: Interception, body: dict, actor):
        """Add the admin's MCP tools the caller may use (mcp_access) to the request; returns the loop adapter, or
        None if none apply."""
        rt = self.rt
        if rt.mcp is None or rt.tool_loop is None:
            return None
        if ic.codec.adapter is None:
            return None  # this API has no tool loop (yet): the request goes out as the client sent it
        if offers_gateway_tools(offered_tools(body), rt.mcp.servers):
            return None  # the client uses the MCP gateway: its tools are offered already
        access, caller = rt.mcp_access, Caller(actor.user_name, actor.groups)
        tools = await rt.mcp.tools_for(ic.user_id, lambda server, tool: access.decide(server, tool, caller).allowed)
        if not tools:
            return None
        client_usage = bool((ic.info.raw_stream_options or {}).get("include_usage"))
        max_tools = rt.config.mcp.max_tools
        adapter = ic.codec.adapter(body, tools, ic.info.stream, max_tools=max_tools, client_wants_usage=client_usage)
        flow.request.content = json.dumps(adapter.inject(), ensure_ascii=False).encode()
        if adapter.trimmed:
            log.warning("interception %s: %d injected tool(s) left out to stay within %d tools",
                        ic.id, adapter.trimmed, max_tools)
        return adapter

    def _to_upstream(self, flow: http.HTTPFlow, state: FlowState, ident: Identity, key_in_query: bool = False,
                     pooled: bool = False) -> None:
        """Point the request at the provider and swap credentials, in one pass over the raw request data:
        mitmproxy's property setters and Headers API re-derive Host/authority and re-scan headers per call.
        A user's own key that came in the query (`key_in_query`) goes upstream as the provider's key header; a
        `pooled` request gets its key from the relay, per attempt."""
        route = state.route
        req, prov = flow.request, route.provider
        host = hostport(prov.scheme, prov.host, prov.port).encode()
        d = req.data
        d.scheme, d.host, d.port = prov.scheme.encode(), prov.host, prov.port
        d.path = route.upstream_path.encode("utf-8", "surrogateescape")
        h2 = req.is_http2 or req.is_http3
        recorded = state.interception is not None
        # A request the client signed itself reaches the provider with its signed headers as they were (Host too:
        # the connection still goes to the configured base_url, never to an address the client names).
        client_signed = prov.transport is not None and ident.byok_credential is not None
        recoded = (recorded or state.watch is not None) and not client_signed
        results = recorded and getattr(state.interception.codec, "retrieval", None) == "results"
        if (h2 or d.authority) and not client_signed:
            d.authority = host  # HTTP/2's :authority (and absolute-form HTTP/1 targets)
        drop = _DROP_CENTRAL if ident.byok_credential is None else _DROP_BYOK
        fields, had_host = [], False
        for f in d.headers.fields:
            name = f[0].lower()
            if name == b"host":
                fields.append(f if client_signed else (f[0], host))
                had_host = True
            elif name not in drop and not (recoded and name == b"accept-encoding") and not (
                    results and name in (b"range", b"if-range")):  # a results file is read, and metered, whole
                fields.append(f)
        if not had_host and not h2:
            fields.insert(0, (b"host", host))
        transport = prov.transport
        if transport is not None:
            if ident.byok_credential is None:  # signed over exactly these bytes, after every change above
                signed = transport.sign(f"{prov.scheme}://{host.decode()}{route.upstream_path}", host.decode(),
                                        req.raw_content or b"", bool(recorded and state.interception.info.stream))
                names = {k for k, _ in signed} | transport.replaced_headers
                fields = [f for f in fields if f[0].lower() not in names]
                fields += [(k, v) for k, v in signed if not (h2 and k == b"host")]
        elif ident.byok_credential is None:
            if not pooled:
                fields.append(prov.auth_header)
        elif key_in_query:
            fields.append(PROVIDERS[prov.type].auth_header(ident.byok_credential))
        if recoded:
            fields.append((b"accept-encoding", b"identity"))  # the stream tap parses bytes as they pass
        d.headers.fields = tuple(fields)

    def _to_loop(self, flow: http.HTTPFlow, state: FlowState, ident: Identity, adapter, hv: dict[str, str],
                 pool=None) -> None:
        """Hand the flow to the injected-tool loop, through the loopback server; mitmproxy relays what it produces."""
        job = self._loop_job(flow, state, ident, adapter, hv, pool)
        self._to_loopback(flow, job)
        state.via_loop = True
        state.loop_job = job

    def _loop_job(self, flow: http.HTTPFlow, state: FlowState, ident: Identity, adapter, hv: dict[str, str],
                  pool=None) -> LoopJob:
        """The injected-tool loop's job for a flow pointed upstream (`_to_upstream`)."""
        req, prov = flow.request, state.route.provider
        return LoopJob(
            url=req.url, headers=upstream_headers(req.headers), adapter=adapter,
            provider_type=prov.type, user_id=ident.actor.user_id,
            max_rounds=self.rt.config.mcp.max_rounds, state=state,
            transport=prov.transport, api=state.interception.api, base_path=prov.base_path,
            request_headers=hv, pool=pool, auth_header=PROVIDERS[prov.type].auth_header,
            gate=_tool_decider(state), vet=_injected_vetter(state),
        )

    def _to_relay(self, flow: http.HTTPFlow, state: FlowState, pool) -> None:
        """Send the request through the gateway's own client, which tries the pool's keys in turn."""
        req, prov = flow.request, state.route.provider
        job = RelayJob(
            method=req.method, url=req.url, content=req.raw_content or b"", pool=pool,
            headers=[f for f in req.headers.fields if f[0].lower() not in _RELAY_DROP],
            auth_header=PROVIDERS[prov.type].auth_header, provider_type=prov.type, state=state,
        )
        self._to_loopback(flow, job)

    def _to_loopback(self, flow: http.HTTPFlow, job) -> None:
        """Point the request at the loopback server, where `job` answers it (once)."""
        req, loopback = flow.request, self.rt.loopback
        path = loopback.register(flow.id, job)
        req.scheme, req.host, req.port = "http", "127.0.0.1", loopback.port
        req.host_header = f"127.0.0.1:{loopback.port}"
        req.path = path

    # --- WebSocket (the Responses API's; addons/sockets.py) ------------------------------------------

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        try:
            await self.sockets.message(flow)
        except Exception:  # the message is relayed as it came rather than the socket broken by a hook's failure
            log.exception("aibridge: handling a WebSocket message failed")

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        try:
            await self.sockets.end(flow)
        except Exception:
            log.exception("aibridge: ending a WebSocket failed")

    # --- response ----------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or not state.forwarded_at:
            return
        ic = state.interception
        if ic is None:
            resp = flow.response
            if state.watch is not None and 200 <= resp.status_code < 300 and is_json(resp):
                length = resp.headers.get("content-length", "")
                if length.isdigit() and int(length) <= WATCH_LIMIT:
                    return  # a batch's status: small, read whole in `response`
                if not length:
                    resp.stream = _Held(lambda body: self.objects.watched_body(
                        state.route.provider.name, state.watch, state.client_base, body))
                    return
            resp.stream = True  # passthrough: relayed as it comes
            return
        resp = flow.response
        if getattr(ic.codec, "retrieval", None) == "results" and 200 <= resp.status_code < 300:
            state.tap = ResultsTap(ic.codec)  # JSON Lines, maybe large: read line by line as they pass
            resp.stream = state.tap
            return
        framing = PROVIDERS[state.route.provider.type].stream_framing(ic.api, resp.headers)
        if not (200 <= resp.status_code < 300 and (framing is not None or is_sse(resp))):
            if not ic.codec.model_api and not is_json(resp):
                resp.stream = True  # audio, images as bytes: relayed as they come, nothing to read
            return
        if state.via_loop:
            resp.stream = True  # the loop records every round itself; relay its events as they come
            return
        if framing is not None and framing.converts:  # the client reads server-sent events, not the provider's frames
            resp.headers["content-type"] = framing.content_type
            resp.headers.pop("content-length", None)
        decide = _tool_decider(state)
        state.tap = StreamTap(ic.codec, framing, gate=stream_gate(ic.codec, decide) if decide else None)
        resp.stream = state.tap

    def response(self, flow: http.HTTPFlow):
        self.sockets.upgrade_ended(flow)
        watched = state_of(flow)
        if (watched is not None and watched.watch is not None and watched.interception is None and flow.live
                and flow.response is not None and not flow.response.stream and 200 <= flow.response.status_code < 300):
            try:  # a body in an encoding mitmproxy cannot decode is relayed as it came
                new = self.objects.watched_body(watched.route.provider.name, watched.watch, watched.client_base,
                                                flow.response.content or b"")
            except ValueError:
                new = None
            if new is not None:
                flow.response.content = new
        done = self._finish(flow)
        if inspect.isawaitable(done):  # a retrieval: settled with the store first (mitmproxy awaits it)
            async def settled() -> None:
                self._answered(flow, await done)
            return settled()
        self._answered(flow, done)
        return None

    def _answered(self, flow: http.HTTPFlow, state: FlowState | None) -> None:
        """What the client gets, once the exchange is recorded."""
        if state is None:
            return
        error = state.outcome.error if state.outcome else None
        resp = flow.response
        if (error in (NOT_JSON, NOT_OBJECT) and flow.live and 200 <= resp.status_code < 300
                and state.interception.codec.model_api):
            # An SDK cannot parse this; say what happened in the provider's format (the record keeps the truth).
            flow.response = error_response(state.interception.provider_type, 502,
                                           f"aibridge: the provider's {error}")
        decide = _tool_decider(state)
        if (decide is not None and resp is not None and not resp.stream and not state.via_loop
                and 200 <= resp.status_code < 300 and is_json(resp)):
            # The tool gate on a whole answer: recorded as the provider gave it, relayed with refused calls replaced.
            try:
                gated = gate_body(state.interception.codec, json.loads(resp.content or b""), decide)
            except (ValueError, RecursionError):
                gated = None
            if gated is not None:
                resp.content = json.dumps(gated, ensure_ascii=False).encode()
                _keep_provider_answer(flow, state)
        elif state.tap is not None and state.tap.gate is not None and any(r for _, r in state.tap.gate.decided):
            _keep_provider_answer(flow, state)
        transport = state.route.provider.transport
        if (transport is not None and resp is not None and resp.status_code >= 400 and not state.via_loop
                and "x-aibridge-error" not in resp.headers and not resp.stream):
            # The provider's error in the shape the client's API has (Bedrock's `{"message"}` → Anthropic's).
            shaped = transport.client_error(state.interception.api, resp.status_code,
                                            resp.headers, resp.content or b"")
            if shaped is not None:
                resp.status_code, resp.content = shaped
                resp.headers["content-type"] = "application/json"

    def error(self, flow: http.HTTPFlow):
        if flow.websocket is None:
            self.sockets.upgrade_ended(flow)
        return self._finish(flow)  # an awaitable for a retrieval (mitmproxy awaits it)

    def _finish(self, flow: http.HTTPFlow):
        """Record how the exchange ended; returns the flow's state if it was a recorded interception (a retrieval:
        an awaitable of it, since whose usage it is comes from the store)."""
        rt = self.rt
        if not flow.live:
            if rt.recorder is not None:  # mitmdump -nr <saved flows>: rebuild their audit rows
                rt.recorder.replay(flow)
            return None
        state = state_of(flow)
        if state is not None and rt.loopback is not None:  # a job its flow never came for (it ended first)
            rt.loopback.forget(flow.id)
        if state is None or state not in rt.inflight:
            if state is not None and state.drained is not None:  # ended elsewhere (abandoned): nothing to wait for
                self.draining.discard(state)
                state.drained.set()
            return None
        rt.inflight.discard(state)
        ic = state.interception
        if state.client_gone is not None:  # read on after the client left: the record says so
            ic.client_gone = True
            flow.metadata[META_KEY]["client_gone"] = True
            job = state.loop_job
            if job is not None and state.loop_summary is None:  # the loop was cut before it said: what it had
                state.loop_summary = summary_from_dict(summary_to_dict(job.summary))
                state.loop_rounds = job.rounds
        settling = False
        try:
            summary, status_code, error, ended_at = conclude(ic, flow, state.tap, state.loop_summary)
            if state.key_hint:  # a failover pool: the key that answered, not the one first chosen
                ic.credential_hint = state.key_hint
            _keep_for_replay(flow, state)
            if state.breaker_key is not None and not _client_gone(flow) and state.client_gone is None:
                rt.breakers.record(state.breaker_key, not is_failure(status_code, flow.response is None))
            if getattr(ic.codec, "retrieval", None):
                settling = True  # the awaitable releases a drain itself, once settled
                return self._settle(state, summary, status_code, error, ended_at)
            if state.police is not None and _policed_at_end(state.police):
                settling = True
                return self._police_end(state, summary, status_code, error, ended_at)
            return self._record(state, summary, status_code, error, ended_at)
        finally:
            if not settling:
                self._release(state)

    def _release(self, state: FlowState) -> None:
        """A stream read on after its client left is recorded: its client connection may close."""
        if state.drained is not None:
            self.draining.discard(state)
            state.drained.set()

    async def _settle(self, state: FlowState, summary: ResponseSummary, status_code: int | None, error: str | None,
                      ended_at) -> FlowState:
        """A retrieval: whose usage this is (the object's creator), and whether it was metered before."""
        try:
            return await self._attribute(state, summary, status_code, error, ended_at)
        finally:
            self._release(state)

    async def _police_end(self, state: FlowState, summary: ResponseSummary, status_code: int | None,
                          error: str | None, ended_at) -> FlowState:
        """The response hook (tags, monitored rules, response guardrails) and the masking of what the call stores
        (tool inputs, thoughts), before the record is written."""
        try:
            call = state.police
            verdict = None
            if call.policing.hooks["response"]:
                totals = TokenTotals.of(summary.usages)
                usage = {"input_tokens": totals.input, "output_tokens": totals.output,
                         "cache_read_input_tokens": totals.cache_read, "cache_write_input_tokens": totals.cache_write}
                try:
                    verdict = await call.policing.response(call.facts, usage, summary.model)
                except Exception:  # the call has happened: its record must not be lost to a policy failure
                    log.exception("aibridge: the response policy of %s failed", state.interception.id)
            if verdict is not None and verdict.redact:  # what the call stores is masked: its flow capture too
                call.stored = tuple(dict.fromkeys(call.stored + verdict.redact))
            redactor = call.policing.stored_redactor(call.facts, call.stored)
            if redactor is not None:
                size = sum(len(json_text(c.input)) for c in summary.tool_calls) + sum(
                    len(json_text(t.content)) for t in summary.thoughts)
                if size > OFF_LOOP_TEXT:
                    await asyncio.to_thread(mask_stored, redactor, summary)
                else:
                    mask_stored(redactor, summary)
            if call.facts.tags:
                state.interception.facts["tags"] = dict(call.facts.tags)
            return self._record(state, summary, status_code, error, ended_at)
        finally:
            self._release(state)

    async def _attribute(self, state: FlowState, summary: ResponseSummary, status_code: int | None,
                         error: str | None, ended_at) -> FlowState:
        ic = state.interception
        try:
            keep = await self.objects.settle(ic, summary, status_code, error)
        except Exception:  # recorded as it stands (against the fetching user) rather than lost
            log.exception("aibridge: attributing retrieval %s failed", ic.id)
            keep = True
        if not keep:
            self.rt.recorder.forget(ic)
            state.outcome = Outcome(COMPLETED if not error else "failed", summary, status_code, error, ended_at)
            return state
        ic.info.model = summary.model or ic.info.model
        if state.police is not None and _policed_at_end(state.police):  # masked, tagged, its response rules
            return await self._police_end(state, summary, status_code, error, ended_at)
        return self._record(state, summary, status_code, error, ended_at)

    def _record(self, state: FlowState, summary: ResponseSummary, status_code: int | None, error: str | None,
                ended_at) -> FlowState:
        rt, ic = self.rt, state.interception
        retrieval = getattr(ic.codec, "retrieval", None)
        status = rt.recorder.ended(ic, summary, status_code, error, ended_at)
        state.outcome = Outcome(status, summary, status_code, error, ended_at)
        if status and ic.api in CREATED:
            self.objects.created(ic, summary, status, ended_at, status_code)
        if status and rt.budgets is not None:
            if retrieval == "results":  # summed per model: each priced as its own
                for u in summary.usages:
                    rt.budgets.record(ic.charged[0], ic.started_at, u.metadata.get("model") or summary.model, [u])
            else:
                rt.budgets.record(ic.charged[0], ic.started_at, summary.model or ic.info.model, summary.usages)
            if rt.notices is not None and summary.usages:
                rt.notices.after_charge(rt.budgets, *ic.charged, rt.groups_of(ic.charged[0]))
        return state

    def _client_left(self, flow: http.HTTPFlow, message: str) -> bool:
        """The client went away while a recorded stream was flowing to it: read the provider's answer on (to its
        end, for at most `timeouts.drain_after_disconnect_seconds` and `limits.max_request_body_mb` more bytes), so
        the provider's final usage is recorded and charged. True: keep the stream (patches.install_client_endings).
        """
        state = state_of(flow)
        rt = self.rt
        if (state is None or state not in rt.inflight or state.interception is None or rt.config is None
                or state.abort_reason is not None or state.client_gone is not None):
            return False
        if state.tap is None and not state.via_loop:
            return False
        seconds = rt.config.timeouts.drain_after_disconnect
        if seconds <= 0 or (state.tap is not None and state.tap.closed):
            return False
        state.client_gone = message or "client disconnected"  # a tool loop ends after its round: no new spend
        state.drain_until = time.time() + seconds
        state.drain_bytes = state.tap.bytes_seen if state.tap is not None else 0
        state.drained = asyncio.Event()
        self.draining.add(state)
        log.info("interception %s: the client went away mid-stream; reading the provider's answer to its end "
                 "(at most %g s)", state.interception.id, seconds)
        return True

    async def client_disconnected(self, client) -> None:
        """mitmproxy closes a connection's provider connections once this hook returns: wait (without blocking the
        event loop) for the streams read on after this client left to end and be recorded. The upstream watch
        ends each at its deadline (housekeeping); should it not have, they are ended here."""
        await self.sockets.client_disconnected(client)
        mine = [s for s in self.draining if s.flow.client_conn.id == client.id]
        if not mine:
            return
        waits = lambda: asyncio.gather(*(s.drained.wait() for s in mine))  # noqa: E731
        try:
            await asyncio.wait_for(waits(), max(s.drain_until for s in mine) - time.time() + DRAIN_SETTLE)
            return
        except TimeoutError:
            pass
        for s in mine:
            if not s.drained.is_set() and self.rt.watch is not None:
                self.rt.watch.end_drain(s)
        try:
            await asyncio.wait_for(waits(), DRAIN_SETTLE)
        except TimeoutError:
            log.warning("aibridge: %d stream(s) read on after their client left did not end; closing them",
                        sum(not s.drained.is_set() for s in mine))

    def _client_ending(self, flow: http.HTTPFlow, message: str) -> ClientEnding | None:
        """The provider failed this exchange: what its client should get (None: mitmproxy's default)."""
        state = state_of(flow)
        if state is None or state not in self.rt.inflight:
            return None
        reason = state.abort_reason
        text = reason or f"the provider's connection failed: {message}"
        resp = flow.response
        if resp is not None and resp.stream:  # the client has the headers: end its stream the API's way
            if state.tap is None:
                return None
            return ClientEnding(text, stream_tail=state.tap.upstream_failed(text))
        status = (state.abort_status or 504) if reason else 502
        return ClientEnding(text, response=error_response(state.route.provider.type, status, f"aibridge: {text}"))


def _keep_for_replay(flow: http.HTTPFlow, state: FlowState) -> None:
    """What the gateway's own upstream client learned (the tool loop's summary, a pool's key), as plain values on
    the flow, once, as the exchange is recorded: a saved flow is recorded again from them (`recorder.replay`)."""
    meta = flow.metadata[META_KEY]
    if state.loop_summary is not None:
        meta["loop"] = summary_to_dict(state.loop_summary)
        meta["loop_rounds"] = state.loop_rounds
    if state.key_hint:
        meta["key_hint"] = state.key_hint


def _keep_provider_answer(flow: http.HTTPFlow, state: FlowState) -> None:
    """The client got a gated answer (a refused tool call replaced): a saved flow holds that, so what the provider
    said, as recorded (masked where policies mask), goes with it for `recorder.replay`."""
    if state.outcome is not None and flow.live:
        flow.metadata[META_KEY]["provider_summary"] = summary_to_dict(state.outcome.summary)


_RELAY_DROP = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                         b"proxy-connection", b"te", b"upgrade"))
# Never upstream: the gateway's own headers, and a protocol switch (h2c, …): after a 101, mitmproxy would relay raw
# bytes between client and provider (WebSocket upgrades are refused before this).
_DROP_BYOK = frozenset(h.encode() for h in GATEWAY_TOKEN_HEADERS + ("proxy-authorization", "x-aibridge-on-behalf-of",
                                                                    "upgrade", "http2-settings"))
_DROP_CENTRAL = _DROP_BYOK | frozenset(h.encode() for h in CREDENTIAL_HEADERS)


class _Held:
    """A small passthrough body without a length, held (up to WATCH_LIMIT) so `done` may rewrite it at its end;
    a longer one is relayed as it comes, untouched."""

    __slots__ = ("done", "buf", "passing")

    def __init__(self, done) -> None:
        self.done, self.buf, self.passing = done, bytearray(), False

    def __call__(self, chunk: bytes):
        if self.passing:
            return chunk
        if not chunk:
            body = bytes(self.buf)
            try:
                new = self.done(body)
            except Exception:
                log.exception("aibridge: reading a batch status failed")
                new = None
            return new if new is not None else body
        self.buf += chunk
        if len(self.buf) > WATCH_LIMIT:
            self.passing, out, self.buf = True, bytes(self.buf), bytearray()
            return out
        return []


def _credential_from_query(route: Route, hv: dict[str, str]) -> tuple[Route, bool]:
    """A key sent as a query parameter (Gemini's `?key=`) never goes upstream in the URL: it is taken out of the
    upstream path and read like the provider's key header. Returns the route without it, and whether it moved
    into the header view (the client sent no key header)."""
    name = PROVIDERS[route.provider.type].query_credential
    path, sep, query = route.upstream_path.partition("?")
    if not name or not sep:
        return route, False
    kept, given = [], None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if unquote_plus(key) == name:
            given = unquote_plus(value)
        else:
            kept.append(part)
    if given is None:
        return route, False
    header = PROVIDERS[route.provider.type].credential_headers[0]
    moved = not any(hv.get(h) for h in CREDENTIAL_HEADERS)
    if moved:
        hv[header] = given
    return dataclasses.replace(route, upstream_path=path + ("?" + "&".join(kept) if kept else "")), moved


def _local_answer(local: LocalAnswer) -> http.Response:
    """The gateway's own answer for a client's service endpoint (apis/base.py, LocalAnswer)."""
    headers = {"content-type": "application/json"} if local.body else {}
    return http.Response.make(200, local.body, headers)


def credential_kind(route: Route, ident: Identity) -> str:
    """centralized (the gateway's key), subscription (the user's own login to a paid plan) or byok (their key)."""
    own = ident.byok_credential
    if own is None:
        return "centralized"
    return "subscription" if own.startswith(PROVIDERS[route.provider.type].subscription_prefixes) else "byok"


def header_view(headers: http.Headers) -> dict[str, str]:
    """The request's headers as a plain dict with lower-case names (repeated ones joined, as Headers does), in
    one linear pass (joining as it went was quadratic in a header's repeats)."""
    out: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    for k, v in headers.fields:
        name = k.decode("latin-1").lower()
        value = v.decode("utf-8", "surrogateescape")
        if name in out:
            repeated.setdefault(name, [out[name]]).append(value)
        out[name] = value
    for name, values in repeated.items():
        out[name] = ", ".join(values)
    return out


def _client_gone(flow: http.HTTPFlow) -> bool:
    """A client that hung up says nothing about the provider's health, before the answer (Esc in a coding tool, a
    load generator stopping) or during it; counting it would let any one client open the circuit for everyone."""
    msg = (flow.error.msg if flow.error else "").lower()
    return "client disconnected" in msg or (flow.response is not None and ("client" in msg or "killed" in msg))


def _policed_at_end(call: CallPolicing) -> bool:
    """The call's record waits for the response hook or for masking what it stores (or carries tags)."""
    p = call.policing
    return p.hooks["response"] or p.redact_stored or bool(call.stored) or bool(call.facts.tags)


def _tool_decider(state: FlowState) -> Decide | None:
    """The tool hook for the gate (flow/toolgate.py): each complete tool call the model emits is put to the rules
    before the client sees it; None when no rule looks at tool calls."""
    call = state.police
    if call is None or not call.policing.policy.has_rules("tool"):
        return None

    def decide(c: GateCall) -> Refusal | None:
        denied = call.policing.tool(call.facts, c.name, c.input, c.call_id, injected=False)
        return Refusal(denied.rule, denied.message or "denied") if denied is not None else None

    return decide


def _injected_vetter(state: FlowState):
    """The tool hook for injected MCP calls, which the gateway runs itself: asked before each runs."""
    call = state.police
    if call is None or not call.policing.policy.has_rules("tool"):
        return None

    def vet(name: str, arguments: str, call_id: str | None) -> Refusal | None:
        denied = call.policing.tool(call.facts, name, arguments, call_id, injected=True)
        return Refusal(denied.rule, denied.message or "denied") if denied is not None else None

    return vet
