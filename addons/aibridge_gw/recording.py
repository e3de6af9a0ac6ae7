"""Turns one intercepted exchange into audit rows and hands them to the store's writer queue."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from types import ModuleType

from .auth import Actor
from .codecs import StreamTap
from .config import ProviderInstance
from .records import RequestInfo, ResponseSummary
from .store.writer import EndInterception, Insert, Store

log = logging.getLogger(__name__)

COMPLETED, FAILED, IN_PROGRESS = "completed", "failed", "in_progress"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def child_id(parent: str, kind: str, n: int) -> str:
    """Ids derived from the interception id, so replaying a saved flow rewrites the same rows."""
    return str(uuid.uuid5(uuid.UUID(parent), f"{kind}:{n}"))


@dataclass(eq=False)
class Interception:
    """One intercepted provider call, from request to its single end (completed or failed)."""

    id: str
    actor: Actor
    provider: ProviderInstance
    api: str
    codec: ModuleType
    info: RequestInfo
    client: str
    user_agent: str | None
    session_id: str | None
    credential_kind: str
    credential_hint: str | None
    upstream_path: str
    started_at: dt.datetime = field(default_factory=utcnow)
    parent_id: str | None = None
    root_id: str | None = None
    tap: StreamTap | None = None
    ended: bool = False


class Recorder:
    LINEAGE_MEMORY = 100_000

    def __init__(self, store: Store) -> None:
        self.store = store
        # provider tool call id -> (interception id, thread root id), newest last
        self._calls: OrderedDict[str, tuple[str, str]] = OrderedDict()

    async def link_thread(self, ic: Interception) -> None:
        """A request answering a tool call recorded earlier continues that interception's thread."""
        if not ic.info.tool_result_ids:
            return
        call_id = ic.info.tool_result_ids[-1]
        hit = self._calls.get(call_id)
        if hit is None:
            try:
                hit = await asyncio.wrap_future(self.store.read(lambda cur: _lookup_call(cur, call_id)))
            except Exception as e:
                log.warning("thread lookup failed: %s", e)
                hit = None
        if hit:
            ic.parent_id, ic.root_id = hit

    def started(self, ic: Interception) -> None:
        self.store.submit(
            Insert(
                "aibridge_interceptions",
                (
                    ic.id, ic.actor.user_id, ic.provider.type, ic.provider.name, ic.info.model, ic.client,
                    ic.user_agent, ic.session_id, ic.parent_id, ic.root_id, ic.credential_kind,
                    ic.credential_hint, IN_PROGRESS, ic.started_at, None, None, ic.api, ic.info.stream,
                    None, None,
                ),
            )
        )

    def ended(
        self, ic: Interception, summary: ResponseSummary, http_status: int | None, error: str | None
    ) -> str:
        """Record the outcome once; later calls are ignored. Returns the final status."""
        if ic.ended:
            return ""
        ic.ended = True
        now = utcnow()
        status = FAILED if error else COMPLETED
        rid = summary.response_id
        if ic.info.prompt:
            self.store.submit(
                Insert("aibridge_user_prompts", (child_id(ic.id, "prompt", 0), ic.id, rid, ic.info.prompt, now))
            )
        for n, u in enumerate(summary.usages):
            self.store.submit(
                Insert(
                    "aibridge_token_usages",
                    (
                        child_id(ic.id, "usage", n), ic.id, u.provider_response_id or rid, u.input_tokens,
                        u.output_tokens, u.cache_read_input_tokens, u.cache_write_input_tokens,
                        json.dumps(u.metadata) if u.metadata else None, now,
                    ),
                )
            )
        root = ic.root_id or ic.id
        for n, call in enumerate(summary.tool_calls):
            self.store.submit(
                Insert(
                    "aibridge_tool_usages",
                    (
                        child_id(ic.id, "tool", n), ic.id, call.provider_response_id or rid, call.call_id,
                        call.name, None, call.input, False, None, now,
                    ),
                )
            )
            if call.call_id:
                self._remember(call.call_id, (ic.id, root))
        for n, t in enumerate(summary.thoughts):
            self.store.submit(
                Insert("aibridge_model_thoughts", (child_id(ic.id, "thought", n), ic.id, t.source, t.content, now))
            )
        meta = {"upstream_path": ic.upstream_path, "response_id": rid, "response_model": summary.model}
        self.store.submit(
            EndInterception(ic.id, (status, now, http_status, error, json.dumps(meta)))
        )
        return status

    def _remember(self, call_id: str, value: tuple[str, str]) -> None:
        self._calls[call_id] = value
        self._calls.move_to_end(call_id)
        if len(self._calls) > self.LINEAGE_MEMORY:
            self._calls.popitem(last=False)


def _lookup_call(cur, call_id: str) -> tuple[str, str] | None:
    row = cur.execute(
        "SELECT i.id, coalesce(i.thread_root_id, i.id) FROM aibridge_tool_usages t "
        "JOIN aibridge_interceptions i ON i.id = t.interception_id "
        "WHERE t.provider_tool_call_id = ? ORDER BY t.created_at DESC LIMIT 1",
        [call_id],
    ).fetchone()
    return (str(row[0]), str(row[1])) if row else None
