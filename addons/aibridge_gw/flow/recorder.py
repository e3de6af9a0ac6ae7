"""Turns one intercepted exchange into audit rows and hands them to the store's writer queue.

Live traffic and replayed flow files take the same path: the interception's facts travel with the flow
(`flow.metadata["aibridge"]`: written as the request starts, completed as the exchange is recorded with what the
gateway's own upstream client learned — the tool loop's summary, a pool's key), its outcome is derived from the
flow by `conclude`, and every id and timestamp comes from the flow, so replaying a saved flow rebuilds exactly the
rows the live run wrote.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from mitmproxy import http

from ..apis import PROVIDERS, WIRE_APIS
from ..apis.base import WireApi
from ..logsafe import redact
from ..store.rows import (
    INTERCEPTIONS,
    MCP_CALLS,
    MODEL_THOUGHTS,
    POLICY_DECISIONS,
    TOKEN_USAGES,
    TOOL_USAGES,
    USER_PROMPTS,
    USERS,
    interception_end,
)
from ..store.writer import StoreApi
from .exchange import BIGINT_MAX, CLAMPED, RequestInfo, ResponseSummary, summary_from_dict
from .purpose import classify, typed_text
from .tap import StreamTap

log = logging.getLogger(__name__)

COMPLETED, FAILED, IN_PROGRESS = "completed", "failed", "in_progress"
STORE_WAIT = 0.25  # seconds a request may wait on the store (its thread lookup, the fleet's rate counter)
META_KEY = "aibridge"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def at(ts: float | None) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC) if ts else utcnow()


def child_id(parent: str, kind: str, n: int) -> str:
    """Ids derived from the interception id, so replaying a saved flow rewrites the same rows.

    Exactly `uuid.uuid5(UUID(parent), f"{kind}:{n}")`, spelled out because this runs several times per request
    and the UUID objects cost three times the hash.
    """
    h = hashlib.sha1(bytes.fromhex(parent.replace("-", "")) + f"{kind}:{n}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


_VARIANT = "89ab"  # RFC 4122 variant bits over the hash's own two low bits


def decision_id(interception_id: str, rule: str, hook: str, tool_call_id: str | None = None,
                tool: str | None = None, ordinal: int = 0) -> str:
    """A policy decision's id: uuid5 under the interception's id of what makes the decision one (its hook, rule,
    and for a tool call the call's id and tool, or, without an id, its number among the interception's tool calls
    without one), so recording it again (a replayed flow, a retried hook) rewrites the same row."""
    key = json.dumps(["policy", hook, rule, tool_call_id or "", tool or ""] + ([ordinal] if ordinal else []),
                     separators=(",", ":"))
    return str(uuid.uuid5(uuid.UUID(interception_id), key))


DETECTOR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MESSAGE_MAX = 2000
MCP_ARGUMENTS_MAX = 64 * 1024  # a tool call's arguments as stored, at most (JSON text); beyond it, a marker
MCP_NAME_MAX = 512  # server, tool (or resource URI), client, version and session as stored, at most


@dataclass(eq=False)
class Interception:
    """One intercepted provider call, from request to its single end (completed or failed)."""

    id: str
    user_id: str
    user_name: str
    provider_type: str
    provider_name: str
    api: str
    client: str
    user_agent: str | None
    session_id: str | None
    credential_kind: str
    credential_hint: str | None
    upstream_path: str
    started_at: dt.datetime
    route: str = ""  # the endpoint as a bounded label (metrics)
    requested_model: str | None = None  # the client's model when the gateway sent another (Bedrock's mapping)
    client_metadata: dict = field(default_factory=dict)  # what the client says of its context (Coder Agents' ids)
    on_behalf_of_id: str | None = None  # the person a service account made this call for
    on_behalf_of_name: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    purpose: str | None = None  # what the call was for: chat, or one of the client's own calls (flow/purpose.py)
    info: RequestInfo | None = field(default=None, repr=False)
    # Recorded in the interception's metadata: what the request said beyond the columns (a batch's request count,
    # `background`), and how a retrieval was attributed (objects.py).
    facts: dict = field(default_factory=dict)
    # The start row is written with the end: a retrieval's attribution (the object's creator) is known only then.
    deferred: bool = False
    ended: bool = False
    client_gone: bool = False  # the client went away before the end of the stream (the provider's answer was read on)
    # The client's W3C trace context (its span is continued by telemetry.py); live only, never recorded.
    traceparent: str | None = field(default=None, repr=False)
    tracestate: str | None = field(default=None, repr=False)

    @property
    def charged(self) -> tuple[str, str]:
        """(id, name) of whom budgets charge: the person acted for, else the caller."""
        if self.on_behalf_of_id:
            return self.on_behalf_of_id, self.on_behalf_of_name or ""
        return self.user_id, self.user_name

    @property
    def codec(self) -> WireApi:
        return WIRE_APIS[self.api]

    def to_metadata(self) -> dict:
        """The facts a saved flow needs to be recorded again (plain values; JSON- and tnetstring-safe)."""
        d = {k: getattr(self, k) for k in _METADATA_FIELDS}
        d["started_at"] = self.started_at.timestamp()
        if self.info is not None:  # a body the gateway rewrote (Bedrock's) may name neither
            d["model"], d["stream"] = self.info.model, self.info.stream
        return d

    @classmethod
    def from_metadata(cls, d: dict, info: RequestInfo) -> "Interception":
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["started_at"] = at(d["started_at"])
        return cls(**fields, info=info)


_REPLAYED = "replayed"  # Interception.traceparent of a saved flow recorded again
_METADATA_FIELDS = tuple(f for f in Interception.__dataclass_fields__
                        if f not in ("info", "ended", "traceparent", "tracestate"))
NOT_JSON, NOT_OBJECT = "response body is not JSON", "response body is not a JSON object"


def is_sse(resp: http.Response | None) -> bool:
    return resp is not None and "text/event-stream" in resp.headers.get("content-type", "")


def is_json(resp: http.Response | None) -> bool:
    return resp is not None and "json" in resp.headers.get("content-type", "").lower()


def conclude(ic: Interception, flow: http.HTTPFlow, tap: StreamTap | None = None,
             loop: ResponseSummary | None = None) -> tuple[ResponseSummary, int | None, str | None, dt.datetime]:
    """What the provider said and how the exchange ended: (summary, http status, error or None, ended at).
    `tap` is the live stream tap, if one read the response as it passed; `loop` the injected-tool loop's summary
    of every round (`FlowState.loop_summary`), if the loop answered the flow. A saved flow has neither: its loop
    summary comes from the plain-value copy kept in its metadata."""
    resp = flow.response
    if loop is None and not flow.live:  # the loop's rounds, or the provider's answer before the tool gate changed it
        meta = flow.metadata.get(META_KEY) or {}
        saved = meta.get("loop") or meta.get("provider_summary")
        loop = summary_from_dict(saved) if saved is not None else None
    error: str | None = None
    if loop is not None:  # the injected-tool loop recorded every round itself
        summary = loop
        error = summary.error
        tap = None
    elif tap is None and resp is not None and 200 <= resp.status_code < 300 and resp.raw_content:
        framing = PROVIDERS[ic.provider_type].stream_framing(ic.api, resp.headers)
        if framing is not None or is_sse(resp):  # a saved flow: parse the stored stream as the live tap did
            tap = StreamTap(ic.codec, framing)
            tap(resp.content)
            tap(b"")
    if loop is not None:
        pass
    elif tap is not None:
        summary = tap.summary
        ic.codec.finish_stream(summary)
        error = summary.error
        if not error and not summary.complete:
            error = f"stream ended before its final event{f' ({tap.broken})' if tap.broken else ''}"
        if not summary.complete:  # its final usage never came: what the stream gave is the best figure there is
            for u in summary.usages:
                u.estimated = True
    elif resp is not None and resp.raw_content is not None:
        summary, error = _summarize_body(ic, resp)
    else:
        summary = ResponseSummary()
    if flow.error is not None and not (summary.complete and not summary.error and (tap is not None or loop is not None)):
        # The final event reached the client: a client that hangs up right after it (llm, aider), or a
        # provider that drops the connection before the chunk terminator, leaves a complete exchange.
        error = flow.error.msg
    status = resp.status_code if resp is not None else None
    if status is not None and status >= 400:
        error = f"HTTP {status}: {error or 'upstream error'}"
    if resp is not None and resp.timestamp_end:
        ended = at(resp.timestamp_end)
    elif flow.error is not None:
        ended = at(flow.error.timestamp)
    else:
        ended = utcnow()
    return summary, status, error, ended


def _summarize_body(ic: Interception, resp: http.Response) -> tuple[ResponseSummary, str | None]:
    if ic.codec.ends_at_eof and not is_json(resp):
        return ResponseSummary(complete=True), None  # audio, text transcripts, images as bytes: nothing to read
    try:
        body = json.loads(resp.content or b"")
    except (ValueError, RecursionError):
        return ResponseSummary(), (NOT_JSON if resp.status_code < 400 else None)
    if not (isinstance(body, dict) or (isinstance(body, list) and ic.codec.array_responses)):
        return ResponseSummary(), NOT_OBJECT
    summary = ic.codec.summarize(body)
    return summary, summary.error


class Recorder:
    LINEAGE_MEMORY = 100_000

    def __init__(self, store: StoreApi) -> None:
        self.store = store
        # The price book (set by the runtime, replaced on reload): each usage row keeps the cost and the rates it
        # was charged at, so a later price change never rewrites what a call cost.
        self.prices = None
        self.unpriced: Callable[[str | None], None] | None = None  # told of usage no price book knows (metric)
        # provider tool call id -> (interception id, thread root id), newest last
        self._calls: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.telemetry = None  # telemetry.Telemetry: told of every interception's end (not of a replayed flow's)

    async def link_thread(self, ic: Interception) -> None:
        """A request answering a tool call recorded earlier continues that interception's thread (looked up in the
        store for STORE_WAIT at most: a slow or absent store costs the thread link, never the request)."""
        if not ic.info.tool_result_ids:
            return
        call_id = ic.info.tool_result_ids[-1]
        hit = self._calls.get(call_id)
        if hit is None and self.store.state.get("up", True):
            try:
                hit = await asyncio.wait_for(
                    asyncio.wrap_future(self.store.run("tool_call_thread", call_id=call_id)), STORE_WAIT)
            except Exception as e:
                log.debug("thread lookup failed: %s", e)
                hit = None
        if hit:
            ic.parent_id, ic.root_id = hit[0], hit[1]

    def started(self, ic: Interception) -> None:
        """The start record, with the prompt: a call a crash cuts off keeps what was asked (the response id is
        not known yet; the interception's metadata gets it at the end)."""
        if ic.deferred:
            return
        self.store.submit(_interception_row(ic, IN_PROGRESS))
        if ic.info.prompt:
            typed = typed_text(ic.client, ic.info.prompt)  # the person's words; NULL: the prompt is just those
            self.store.submit(USER_PROMPTS.row(id=child_id(ic.id, "prompt", 0), interception_id=ic.id,
                                               provider_response_id=None, prompt=ic.info.prompt,
                                               typed=None if typed == ic.info.prompt else typed,
                                               created_at=ic.started_at))

    def _priced(self, ic: Interception, summary: ResponseSummary, u) -> tuple[float | None, str | None]:
        """The usage's cost at today's price of the model it is billed at, and those rates (JSON); (None, None) when
        no price book knows the model (or the usage is clamped: no figure to charge)."""
        prices = self.prices
        if prices is None or u.clamped:
            return None, None
        model = u.metadata.get("model") or summary.model or ic.info.model
        price = prices.resolve(model, ic.provider_type)
        if price is None:
            if (u.input_tokens or u.output_tokens) and self.unpriced is not None:
                self.unpriced(model)
            return None, None
        cost = price.cost(u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_write_input_tokens)
        return cost, json.dumps({"model": model, **price.rates()}, separators=(",", ":"))

    def ended(
        self, ic: Interception, summary: ResponseSummary, http_status: int | None, error: str | None,
        ended_at: dt.datetime,
    ) -> str:
        """Record the outcome once; later calls are ignored. Returns the final status ('' if already ended)."""
        if ic.ended:
            return ""
        ic.ended = True
        status = FAILED if error else COMPLETED
        rid = summary.response_id
        submit = self.store.submit
        if ic.deferred:
            submit(_interception_row(ic, IN_PROGRESS))
        for n, u in enumerate(summary.usages):
            if u.bound():  # beyond the column type: recorded clamped and flagged, charged to no budget
                log.warning("interception %s: usage beyond %d clamped (%s)", ic.id, BIGINT_MAX,
                            ", ".join(u.metadata[CLAMPED]))
            cost, rates = self._priced(ic, summary, u)
            submit(TOKEN_USAGES.row(
                id=child_id(ic.id, "usage", n), interception_id=ic.id, provider_response_id=u.provider_response_id or rid,
                input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                cache_read_input_tokens=u.cache_read_input_tokens, cache_write_input_tokens=u.cache_write_input_tokens,
                metadata=_usage_metadata(u.metadata), created_at=ended_at, usage_estimated=u.estimated,
                cost_usd=cost, price=rates))
        root = ic.root_id or ic.id
        for n, call in enumerate(summary.tool_calls):
            submit(TOOL_USAGES.row(
                id=child_id(ic.id, "tool", n), interception_id=ic.id, provider_response_id=call.provider_response_id or rid,
                provider_tool_call_id=call.call_id, tool=call.name, server_url=call.server_url, input=call.input,
                injected=call.injected, invocation_error=call.error, created_at=ended_at))
            if call.call_id:
                self._remember(call.call_id, (ic.id, root))
        for n, t in enumerate(summary.thoughts):
            submit(MODEL_THOUGHTS.row(id=child_id(ic.id, "thought", n), interception_id=ic.id, source=t.source,
                                      content=t.content, created_at=ended_at))
        meta = {"upstream_path": ic.upstream_path, "response_id": rid, "response_model": summary.model}
        if ic.requested_model:
            meta["requested_model"] = ic.requested_model
        if ic.client_metadata:
            meta["client"] = ic.client_metadata
        if ic.client_gone:
            meta["client_disconnected"] = True
        if ic.facts:
            meta.update(ic.facts)
        # What the provider or the client said (an upstream error quoting the key it refused, a client's own
        # metadata) is recorded without credentials, as in the logs.
        submit(interception_end(ic.id, status=status, ended_at=ended_at, http_status=http_status,
                                error=redact(error) if error else error, metadata=redact(json.dumps(meta)),
                                credential_hint=ic.credential_hint))
        if self.telemetry is not None and ic.traceparent != _REPLAYED:
            self.telemetry.interception(ic, status=status, summary=summary, http_status=http_status,
                                        error=redact(error) if error else error, ended_at=ended_at)
        return status

    def policy_decision(self, interception_id: str, *, rule: str, policy_version: str, hook: str, action: str,
                        enforced: bool, detectors: list[str], message: str | None, user_id: str | None,
                        tool: str | None = None, tool_call_id: str | None = None, at: dt.datetime | None = None,
                        ordinal: int = 0) -> None:
        """Record what policy `rule` decided for the interception's request (hook `request`/`response`) or one of
        its tool calls (hook `tool`, with the tool's name and call id; `ordinal` numbers the calls without an id):
        queued like every record, never waited on.
        `enforced` is false for a decision only monitored. `detectors` are the detector types that fired
        (["aws-key"]); anything that is not a short type name (text a detector found) is left out. `at` defaults
        to now; pass the flow's own time to have a replay rewrite the same row."""
        kept = list(dict.fromkeys(d for d in detectors or () if isinstance(d, str) and DETECTOR_TYPE.match(d)))
        if len(kept) != len(detectors or ()):
            log.warning("interception %s: policy rule %s: %d detector value(s) that are not detector types were "
                        "not recorded", interception_id, rule, len(detectors or ()) - len(kept))
        if message is not None:
            message = redact(message)[:MESSAGE_MAX]
        self.store.submit(POLICY_DECISIONS.row(
            id=decision_id(interception_id, rule, hook, tool_call_id, tool, ordinal), interception_id=interception_id,
            created_at=at or utcnow(), user_id=user_id, rule=rule, policy_version=policy_version, hook=hook,
            action=action, enforced=bool(enforced), detectors=json.dumps(kept), message=message, tool=tool,
            tool_call_id=tool_call_id))

    def mcp_call(self, id: str, *, created_at: dt.datetime, user_id: str | None, user_name: str | None,
                 method: str, server: str | None, tool: str, arguments, is_error: bool, outcome: str,
                 error: str | None = None, result_bytes: int | None = None, duration_ms: int | None = None,
                 client: str | None = None, client_version: str | None = None, session_id: str | None = None,
                 on_behalf_of_id: str | None = None, on_behalf_of_name: str | None = None) -> None:
        """Record one call an agent made through the MCP gateway (`tools/call`, `resources/read`, `prompts/get`):
        queued like every record, never waited on. `arguments` (a JSON value, already masked when policies mask
        what is stored) are kept without anything shaped like a credential and cut at MCP_ARGUMENTS_MAX; the
        error text likewise."""
        text = None
        if arguments is not None:
            text = redact(json.dumps(arguments, ensure_ascii=False, default=str))
            if len(text) > MCP_ARGUMENTS_MAX:
                text = json.dumps({"aibridge_truncated": True, "bytes": len(text.encode())})

        def cut(v: str | None) -> str | None:
            return v[:MCP_NAME_MAX] if isinstance(v, str) else v

        self.store.submit(MCP_CALLS.row(
            id=id, created_at=created_at, user_id=user_id, user_name=cut(user_name), on_behalf_of_id=on_behalf_of_id,
            on_behalf_of_name=cut(on_behalf_of_name), client=cut(client), client_version=cut(client_version),
            session_id=cut(session_id), method=method, server=cut(server), tool=cut(tool) or "", arguments=text,
            is_error=bool(is_error), outcome=outcome, error=redact(error)[:MESSAGE_MAX] if error else None,
            result_bytes=result_bytes, duration_ms=duration_ms))

    def forget(self, ic: Interception) -> None:
        """A deferred interception that is not to be recorded after all (a poll of a response not finished yet)."""
        ic.ended = True

    def rejected(self, ic: Interception, http_status: int, message: str) -> None:
        """A request refused by the gateway (budget, rate limit): one row, never forwarded."""
        ic.ended = True
        ended_at = utcnow()
        self.store.submit(_interception_row(ic, "rejected", ended_at=ended_at, http_status=http_status,
                                            error=redact(message)))
        if self.telemetry is not None:
            self.telemetry.interception(ic, status="rejected", http_status=http_status, error=redact(message),
                                        ended_at=ended_at)

    def replay(self, flow: http.HTTPFlow) -> Interception | None:
        """Re-run recording for a saved flow; a flow that was not an interception is skipped."""
        meta = flow.metadata.get(META_KEY)
        if not isinstance(meta, dict) or "api" not in meta or flow.request is None:
            return None
        ic_codec = WIRE_APIS.get(meta["api"])
        if ic_codec is None or getattr(ic_codec, "retrieval", None):
            return None  # a retrieval's attribution and metering came from the store when it ran: left as recorded
        try:
            body = json.loads(flow.request.content or b"")
            if isinstance(body, dict) and "model" in meta and "model" not in body:  # sent rewritten (Bedrock)
                body = {**body, "model": meta["model"], "stream": meta.get("stream", False)}
            info = ic_codec.parse_request(body, meta.get("upstream_path") or "")
        except Exception as e:
            log.warning("flow %s: request not replayable: %s", flow.id, e)
            return None
        ic = Interception.from_metadata(meta, info)
        if ic.purpose is None and "purpose" not in meta:  # a flow saved before purposes were recorded
            ic.purpose = classify(ic.client, ic.api, body)
        ic.traceparent = _REPLAYED  # recorded again, not exported again
        if meta.get("key_hint"):  # a failover pool: the key that answered, as the live record has it
            ic.credential_hint = meta["key_hint"]
        self.store.submit(USERS.row(id=ic.user_id, name=ic.user_name, role="member", created_at=ic.started_at))
        self.started(ic)
        self.ended(ic, *conclude(ic, flow))
        return ic

    def _remember(self, call_id: str, value: tuple[str, str]) -> None:
        self._calls[call_id] = value
        self._calls.move_to_end(call_id)
        if len(self._calls) > self.LINEAGE_MEMORY:
            self._calls.popitem(last=False)


def _usage_metadata(meta: dict) -> str | None:
    """A usage's metadata as JSON text; never fails a record (a value JSON cannot hold is written as text)."""
    if not meta:
        return None
    try:
        return json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({k: v if isinstance(v, (str, int, bool, type(None))) else repr(v)[:200]
                           for k, v in meta.items()})


def _interception_row(ic: Interception, status: str, **end):
    """The interception's row, as it starts (in progress) or as the gateway refused it (`end` columns)."""
    return INTERCEPTIONS.row(
        id=ic.id, initiator_id=ic.user_id, provider=ic.provider_type, provider_name=ic.provider_name,
        model=ic.info.model or None, client=ic.client, user_agent=redact(ic.user_agent) if ic.user_agent else None,
        client_session_id=ic.session_id,
        thread_parent_id=ic.parent_id, thread_root_id=ic.root_id, credential_kind=ic.credential_kind,
        credential_hint=ic.credential_hint, status=status, started_at=ic.started_at, api=ic.api,
        stream=ic.info.stream, on_behalf_of_id=ic.on_behalf_of_id, on_behalf_of_name=ic.on_behalf_of_name,
        purpose=ic.purpose, **end)
