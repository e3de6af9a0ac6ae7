"""The gateway's state for one flow, carried in `flow.metadata[STATE_KEY]` from routing to the record.

Audit facts are what gets recorded: the `Interception` (who, which provider, model and client, what the request
said) and what the gateway's own upstream client learned while answering the flow (`key_hint`, `loop_summary`,
`loop_rounds`: the relay and the tool loop write them here, the pipeline reads them here). Their plain-value form
also travels with the flow under `recorder.META_KEY` so a saved flow can be recorded again: the interception's as
the request starts, the rest once, as the exchange is recorded (`Pipeline._finish`). Everything else here is a
live handle (stream tap, loop job, breaker key, timers) and never travels with a copied or saved flow; nor does
this object itself: the live path reads the facts from it, never back from `flow.metadata`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field

from mitmproxy import http

from .exchange import ResponseSummary
from .recorder import Interception
from .routing import Route
from .tap import StreamTap

STATE_KEY = "aibridge.state"
TARGET_KEY = "aibridge.target"
# A flow the gateway answers elsewhere than the pipeline (the MCP gateway's, at the loopback server): set by the
# addon that handed it off, so the pipeline leaves it alone.
HANDED_OFF = "aibridge.handed_off"
SOCKET_KEY = "aibridge.socket"  # a Responses WebSocket's state, on its upgrade flow (addons/sockets.py)
LIVE_KEYS = (STATE_KEY, TARGET_KEY, SOCKET_KEY)  # never saved with a flow (see capture.redacted_copy)


@dataclass(frozen=True, slots=True)
class Target:
    """What a request is, decided once per flow when its head arrives (`ProxyMode.target`) and never again, so
    every addon answers the same way about it, before and after the pipeline rewrites its path for upstream."""

    ours: bool  # addressed to the gateway itself: base-URL mode and /aibridge (never inside a CONNECT tunnel)
    ai_host: str | None  # proxied to this AI endpoint (None: ours, or egress to another host)
    route: Route | None  # the provider endpoint it maps to (None: none, or the path is not canonical)
    bad_path: str | None = None  # why the path could not be made canonical
    provider_type: str | None = None  # whose error format answers it (None: the gateway's own)

    def __deepcopy__(self, memo) -> None:
        return None  # routing handles stay with the live flow, like FlowState


@dataclass(slots=True)
class Outcome:
    """How a recorded exchange ended (what observation reports)."""

    status: str  # completed | failed
    summary: ResponseSummary
    http_status: int | None
    error: str | None
    ended_at: dt.datetime


@dataclass(eq=False, slots=True)
class FlowState:
    flow: http.HTTPFlow
    route: Route
    interception: Interception | None = None  # None: relayed unrecorded (read-only or BYOK passthrough)
    tap: StreamTap | None = None  # parses a relayed stream as it passes
    via_loop: bool = False  # the injected-tool loop runs this exchange and records each round itself
    breaker_key: tuple | None = None  # (provider, route, model) whose circuit breaker this exchange counts for
    forwarded_at: float = 0.0  # when the request went upstream (epoch seconds; upstream timeouts start here)
    abort_reason: str | None = None  # why the gateway aborted the upstream connection (a timeout, shutdown)
    abort_status: int | None = None  # the status a blocking call aborted so is answered (default 504: a timeout)
    inflight: bool = False  # counted in the in-flight gauge
    captured: bool = False  # written to the flow archive
    outcome: Outcome | None = field(default=None)
    # The client went away mid-stream and the provider's answer is read on (see Pipeline._client_left): why it
    # went, until when (epoch seconds) and how many stream bytes had passed then; `drained` is set once recorded.
    client_gone: str | None = None
    drain_until: float = 0.0
    drain_bytes: int = 0
    drained: asyncio.Event | None = None
    loop_job: object | None = None  # the injected-tool loop's job (LoopJob): what it had, if the client goes first
    # Facts from the gateway's own upstream client (loopback.py's jobs): the hint of the pool's key that answered,
    # and the injected-tool loop's summary of every round (None: the loop did not answer, or has not said yet).
    key_hint: str | None = None
    loop_summary: ResponseSummary | None = None
    loop_rounds: int = 0
    watch: str | None = None  # a passthrough response read on the way (objects.WATCHED: a batch's status)
    client_base: str | None = None  # the gateway's URL for this instance as the client reached it (base-URL mode)
    police: object | None = None  # the admin's policies at work on this call (policy.policing.CallPolicing)
    # A turn of a Responses WebSocket (addons/sockets.py): its flow is the gateway's own, carried by the socket's
    # connection; the upstream watch leaves it alone (aborting its connection would end the whole socket).
    on_socket: bool = False

    def __deepcopy__(self, memo) -> None:
        """Live handles stay with the live flow: a copy (capture, `-w`) carries only the recorded facts."""
        return None


def target_of(flow: http.HTTPFlow) -> Target | None:
    return flow.metadata.get(TARGET_KEY)


def state_of(flow: http.HTTPFlow) -> FlowState | None:
    return flow.metadata.get(STATE_KEY)
