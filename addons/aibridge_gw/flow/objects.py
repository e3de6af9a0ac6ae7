"""Paid work that outlives its call: message batches, Batch API output files, background responses.

The call that creates such an object (`POST …/messages/batches`, `POST /v1/batches`, `POST /v1/responses` with
`background: true`) is recorded as usual; when its response names the object, a row of `aibridge_provider_objects`
remembers who created it. The object's usage arrives later, when it is fetched through the gateway:

- batch results (`GET …/messages/batches/{id}/results`, `GET /v1/files/{id}/content`): one interception per
  retrieval, its usage summed per model, attributed to and charged to the creator — once. The first complete
  retrieval claims the object (`ops.claim_object`, one UPDATE, so two gateways fetching at once cannot both win);
  later ones are recorded without usage, with `already_metered_by` in their metadata. Results of an object the
  gateway did not see created are charged to the fetching user, flagged `creator_unknown`.
- a background response (`GET /v1/responses/{id}`, JSON or SSE): recorded, with its usage, by the first retrieval
  that finds it finished; polls before that, and retrievals after, are not recorded.

OpenAI's output files are learned from the batch as it is polled (`GET /v1/batches/{id}`: `output_file_id`,
`error_file_id`); Anthropic's `results_url` is rewritten to the gateway in base-URL mode, so the SDK fetches results
through it. Every request is still authenticated on its own: the creator matters only for attribution.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections import OrderedDict

from mitmproxy import http

from ..apis.wire.results import object_id
from ..store.rows import PROVIDER_OBJECTS
from .exchange import ResponseSummary
from .recorder import COMPLETED, Interception

log = logging.getLogger(__name__)

CLAIM_WAIT = 5.0  # seconds a finished retrieval may wait for the store to say whether it meters the object
WATCH_LIMIT = 256 * 1024  # a batch status body larger than this is relayed untouched
_NAMESPACE = uuid.UUID("6f1c7a52-3b0e-4f7e-9a57-a1b2c3d4e5f6")
CREATED = {"anthropic.message_batches": "anthropic_batch", "openai.batches": "openai_batch",
           "openai.responses": "openai_response"}
_RESULTS_URL = re.compile(r"/v1/messages/batches/[^/?#]+/results(?:[?#].*)?$")


def object_key(provider_name: str, kind: str, oid: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{provider_name}\x00{kind}\x00{oid}"))


# Passthrough endpoints whose (small JSON) responses the gateway reads: (provider type, endpoint label) -> what for.
WATCHED = {("anthropic", "/v1/messages/batches/{id}"): "results_url",
           ("openai", "/batches/{id}"): "output_files"}


class Objects:
    def __init__(self, runtime) -> None:
        self.rt = runtime
        self._learned: OrderedDict[str, None] = OrderedDict()  # output files already remembered (polls repeat them)

    # --- creation ---------------------------------------------------------------------------------------------

    def created(self, ic: Interception, summary: ResponseSummary, status: str, ended_at,
                status_code: int | None = None) -> None:
        """The creating call ended: remember who created the object its response names."""
        kind = CREATED.get(ic.api)
        oid = summary.response_id
        if kind is None or not isinstance(oid, str) or not oid:
            return
        metered = None
        if kind == "openai_response":
            if not ic.facts.get("background"):
                return
            if status != COMPLETED and not (status_code is not None and 200 <= status_code < 300):
                return
            # A background stream cut before its final event (the client left, the read was cut) is not the
            # response's end: it runs on at the provider, billed, and is metered when retrieved.
            if summary.complete and summary.usages:  # streamed to its end: its usage is recorded with its creation
                metered = ended_at
        elif status != COMPLETED:
            return
        self.rt.store.submit(PROVIDER_OBJECTS.row(
            id=object_key(ic.provider_name, kind, oid[:200]), provider_name=ic.provider_name, kind=kind,
            object_id=oid[:200], user_id=ic.user_id, user_name=ic.user_name, on_behalf_of_id=ic.on_behalf_of_id,
            on_behalf_of_name=ic.on_behalf_of_name, interception_id=ic.id, created_at=ended_at, metered_at=metered,
            metered_by=ic.id if metered else None))

    # --- passthrough responses read on the way -------------------------------------------------------------------

    def watched_body(self, provider_name: str, what: str, client_base: str | None, body: bytes) -> bytes | None:
        """A batch's status as it passes: new bytes for the client (results_url pointed at the gateway), else None."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        if what == "output_files":
            batch = obj.get("id")
            if isinstance(batch, str) and batch:
                for field in ("output_file_id", "error_file_id"):
                    fid = obj.get(field)
                    if isinstance(fid, str) and fid:
                        self._learn(provider_name, batch[:200], fid[:200])
            return None
        url = obj.get("results_url")
        if client_base is None or not isinstance(url, str):
            return None
        m = _RESULTS_URL.search(url)
        if m is None:
            return None
        obj["results_url"] = client_base + m.group(0)
        return json.dumps(obj, ensure_ascii=False).encode()

    def _learn(self, provider_name: str, batch: str, fid: str) -> None:
        key = object_key(provider_name, "openai_file", fid)
        if key in self._learned:
            return
        self._learned[key] = None
        if len(self._learned) > 10_000:
            self._learned.popitem(last=False)
        self.rt.store.submit(PROVIDER_OBJECTS.row(
            id=key, provider_name=provider_name, kind="openai_file", object_id=fid,
            parent_id=object_key(provider_name, "openai_batch", batch), created_at=_now()))

    # --- retrieval ----------------------------------------------------------------------------------------------

    async def settle(self, ic: Interception, summary: ResponseSummary, status_code: int | None,
                     error: str | None) -> bool:
        """A retrieval ended: decide whom it is attributed to and whether it carries usage (changes `ic` and
        `summary`). Returns False when it is not to be recorded at all (a background response not finished yet,
        or not one this gateway saw created)."""
        codec = ic.codec
        ok = status_code is not None and 200 <= status_code < 300 and not error and summary.complete
        if codec.retrieval == "response":
            claim = ok and bool(summary.usages)
            if not claim:
                return False
        else:
            # Every result that passed to the client is metered, even when the download was cut short: hanging up
            # before the last byte must not make results free (a later complete fetch is then not charged again).
            claim = status_code is not None and 200 <= status_code < 300 and bool(summary.usages)
            if isinstance(summary.state, dict):
                ic.facts.update(summary.state)
            if claim and not ok:
                ic.facts["partial_read"] = True
        oid = object_id(ic.upstream_path, codec.kind)
        if not oid:
            summary.usages.clear()
            return codec.retrieval == "results"
        ic.facts["object_id"] = oid[:200]
        adopt = None
        if codec.retrieval == "results":
            adopt = {"provider_name": ic.provider_name, "kind": codec.kind, "object_id": oid[:200],
                     "user_id": ic.user_id, "user_name": ic.user_name, "on_behalf_of_id": ic.on_behalf_of_id,
                     "on_behalf_of_name": ic.on_behalf_of_name}
        try:
            if not self.rt.store.state.get("up", True):
                raise RuntimeError("the audit store is unavailable")
            got = await asyncio.wait_for(asyncio.wrap_future(self.rt.store.run(
                "claim_object", writes=True, id=object_key(ic.provider_name, codec.kind, oid[:200]),
                interception_id=ic.id, at=_now().isoformat(), adopt=adopt, claim=claim)), CLAIM_WAIT)
        except Exception as e:  # never lose usage to a store that is away: charge the fetcher, and say so
            reason = str(e) or type(e).__name__
            log.warning("interception %s: could not tell whether %s %s was metered before (%s); recorded against "
                        "the fetching user", ic.id, codec.kind, oid[:80], reason)
            if codec.retrieval == "response":
                return False
            if claim:
                ic.facts["metering_unconfirmed"] = reason[:200]
            return True
        creator = got.get("creator")
        if codec.retrieval == "response" and (not got.get("known") or not got.get("claimed")):
            return False  # a response not created in the background here, or metered already
        if creator:
            if creator[0] != ic.user_id:
                ic.facts["fetched_by"] = ic.user_name
                ic.facts["fetched_by_id"] = ic.user_id
            ic.user_id, ic.user_name = creator[0], creator[1] or ""
            ic.on_behalf_of_id, ic.on_behalf_of_name = creator[2], creator[3]
        elif claim:
            ic.facts["creator_unknown"] = True
        if claim and not got.get("claimed"):
            ic.facts["already_metered_by"] = got.get("metered_by")
            summary.usages.clear()
        return True


def _now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def client_base(flow: http.HTTPFlow, instance: str) -> str:
    """The gateway's own URL for an instance, as this client reached it (base-URL mode)."""
    req = flow.request
    scheme = "https" if flow.client_conn.tls_established else "http"
    host = req.host_header or f"{req.host}:{req.port}"
    return f"{scheme}://{host}/{instance}"
