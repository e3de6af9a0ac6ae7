"""OpenTelemetry export (`telemetry:`, docs/telemetry.md): one span per interception after the GenAI semantic
conventions, child spans for the tools the gateway runs (the injected-tool loop's and the MCP gateway's calls),
and the `gen_ai.client.*` metrics, sent over OTLP/HTTP by the official SDK.

Off unless `telemetry.otlp_endpoint` is set; the SDK is imported only then. Spans are built when an interception
ends (`Recorder.ended`/`rejected`), with its own start and end times, so nothing is held open across hooks; the
SDK's `BatchSpanProcessor` queues them (bounded: a collector that is down costs dropped spans, never a request)
and exports on its own thread, metrics likewise (`PeriodicExportingMetricReader`). Nothing here raises into the
request path. The SDK's own log lines (export failures) go to the `aibridge.telemetry` logger, each kind at most
once a minute.

A tool call the loop runs happens before its interception's span exists: its times are kept (`tool_call`, bounded)
and it becomes the interception span's child when that span is made.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from .apis import PROVIDERS
from .flow.exchange import ResponseSummary
from .logsafe import redact

log = logging.getLogger("aibridge.telemetry")

TRACES_PATH, METRICS_PATH = "/v1/traces", "/v1/metrics"
MAX_QUEUE = 2048  # spans waiting for export; beyond it new ones are dropped (the SDK counts and says so)
PENDING_MAX = 10_000  # interceptions with tool calls waiting for their span
CONTENT_MAX = 64 * 1024  # one content attribute, at most (characters)
INSTANCE = str(uuid.uuid4())  # service.instance.id: this process (each --workers worker exports its own series)
METRIC_MODELS = 200  # distinct model names as metric attributes; the rest are `_OTHER` (clients choose them)
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
LOG_EVERY = 60.0  # seconds: one SDK log line of a kind per this
# The semantic conventions' advised bucket boundaries.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


def provider_name(provider_type: str) -> str:
    """`gen_ai.provider.name`: as the provider's module declares it (apis/<provider>/)."""
    p = PROVIDERS.get(provider_type)
    return getattr(p, "gen_ai_provider", None) or provider_type


def operation_name(provider_type: str, api: str) -> str:
    """`gen_ai.operation.name` of a wire API at a provider (its module's `gen_ai_operations`; else the API's name)."""
    p = PROVIDERS.get(provider_type)
    return (getattr(p, "gen_ai_operations", None) or {}).get(api) or api


def reasoning_tokens(metadata: Mapping[str, Any]) -> int:
    """Output tokens spent reasoning, where the provider says (OpenAI's details, Gemini's thoughts)."""
    n = 0
    for key in ("completion_tokens_details", "output_tokens_details"):
        d = metadata.get(key)
        if isinstance(d, dict) and isinstance(d.get("reasoning_tokens"), int):
            n += d["reasoning_tokens"]
    if isinstance(metadata.get("thoughtsTokenCount"), int):
        n += metadata["thoughtsTokenCount"]
    return n


def shown_endpoint(url: str) -> str:
    """The collector's URL as logged: without a password it may carry."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _ns(t: dt.datetime | float | None) -> int:
    if t is None:
        return time.time_ns()
    if isinstance(t, dt.datetime):
        return int(t.timestamp() * 1e9)
    return int(t * 1e9)


def _cut(text: str) -> str:
    return text if len(text) <= CONTENT_MAX else text[:CONTENT_MAX] + "…"


@dataclass(slots=True)
class ToolRun:
    """One tool call the gateway ran for an interception (the injected-tool loop), kept until its span is made."""

    name: str
    call_id: str | None
    server: str | None
    started: int  # epoch ns
    ended: int
    error: str | None
    arguments: str | None = None
    result: str | None = None


class _SdkLogs(logging.Handler):
    """The SDK's log lines (an unreachable collector is logged at every export) to aibridge's logger, each kind
    at most once per LOG_EVERY, without tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        key = record.name  # one line per exporter (traces, metrics) and per minute, whatever it says
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -LOG_EVERY) < LOG_EVERY:
                return
            self._last[key] = now
            if len(self._last) > 256:
                self._last.clear()
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            text += f": {type(e).__name__}: {e}"
        log.log(min(record.levelno, logging.WARNING), "aibridge: telemetry export: %s (said at most once a minute)",
                redact(text.splitlines()[0][:240]) if text else record.name)


_sdk_logs = _SdkLogs()


def _route_sdk_logs() -> None:
    otel = logging.getLogger("opentelemetry")
    if _sdk_logs not in otel.handlers:
        otel.addHandler(_sdk_logs)
        otel.propagate = False


class _Sdk:
    """One configuration's providers and instruments (rebuilt when `telemetry:` changes)."""

    def __init__(self, settings) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _route_sdk_logs()
        base = settings.otlp_endpoint
        headers = dict(settings.headers)
        resource = Resource.create({"service.name": settings.service_name, "service.instance.id": INSTANCE})
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=base + TRACES_PATH, headers=headers, timeout=settings.timeout_seconds),
            max_queue_size=MAX_QUEUE, schedule_delay_millis=int(min(settings.export_interval_seconds, 5.0) * 1000),
            export_timeout_millis=int(settings.timeout_seconds * 1000)))
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=base + METRICS_PATH, headers=headers, timeout=settings.timeout_seconds),
            export_interval_millis=settings.export_interval_seconds * 1000,
            export_timeout_millis=settings.timeout_seconds * 1000)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self.tracer = self.tracer_provider.get_tracer("aibridge")
        meter = self.meter_provider.get_meter("aibridge")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS))
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS))
        self.propagator = TraceContextTextMapPropagator()
        self.content = settings.content
        self.timeout = settings.timeout_seconds

    def shutdown(self) -> None:
        """Flush and stop both providers at once (each gives up after the export timeout), never longer."""
        def close(provider) -> None:
            try:
                provider.shutdown()
            except Exception as e:
                log.warning("aibridge: telemetry shutdown: %s", e)

        threads = [threading.Thread(target=close, args=(p,), name="aibridge-telemetry-flush", daemon=True)
                   for p in (self.tracer_provider, self.meter_provider)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout + 1
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0))


class Telemetry:
    """Owned by the runtime: `configure` at start and on every reload (rebuilt only when `telemetry:` changed),
    `shutdown` at the gateway's end. Every entry point is a no-op while export is off, and never raises."""

    def __init__(self) -> None:
        self.settings = None
        self._sdk: _Sdk | None = None
        self._pending: OrderedDict[str, list[ToolRun]] = OrderedDict()
        self.hosts: dict[str, str] = {}  # provider instance name -> its upstream host (server.address)
        self._models: set[str] = set()  # model names the metrics carry (bounded: METRIC_MODELS)

    @property
    def enabled(self) -> bool:
        return self._sdk is not None

    def configure(self, settings, providers: Iterable = ()) -> None:
        self.hosts = {p.name: p.host for p in providers}
        if settings == self.settings:
            return
        old, self._sdk = self._sdk, None
        self.settings = settings
        ResponseSummary.keep_text = False
        if settings is not None and settings.otlp_endpoint:
            try:
                self._sdk = _Sdk(settings)
                ResponseSummary.keep_text = settings.content  # the codecs gather the model's text for spans
                log.info("aibridge: telemetry: exporting spans and metrics over OTLP/HTTP to %s%s",
                         shown_endpoint(settings.otlp_endpoint),
                         " (with prompts and outputs)" if settings.content else "")
            except Exception as e:  # an SDK that cannot start must not stop the gateway
                log.error("aibridge: telemetry could not start: %s", e)
        if old is not None:  # a reload: what the old one holds is flushed off the event loop
            threading.Thread(target=old.shutdown, name="aibridge-telemetry-shutdown", daemon=True).start()

    @staticmethod
    def prepare(settings) -> None:
        """Import the SDK ahead of `configure` (a reload calls this on a worker thread, so the event loop does not
        wait for the first import)."""
        if settings is not None and settings.otlp_endpoint:
            try:
                import opentelemetry.exporter.otlp.proto.http.metric_exporter  # noqa: F401
                import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
                import opentelemetry.sdk.metrics  # noqa: F401
                import opentelemetry.sdk.trace  # noqa: F401
            except Exception:
                pass  # said by configure

    def shutdown(self) -> None:
        sdk, self._sdk, self.settings = self._sdk, None, None
        ResponseSummary.keep_text = False
        self._pending.clear()
        if sdk is not None:
            sdk.shutdown()

    # --- what is recorded ----------------------------------------------------------------------------

    def tool_call(self, interception_id: str, run: ToolRun) -> None:
        """A tool the injected-tool loop ran: a child of the interception's span, made with it."""
        if self._sdk is None:
            return
        if not self._sdk.content:  # what the tool was given and said are kept only for content
            run.arguments = run.result = None
        runs = self._pending.get(interception_id)
        if runs is None:
            runs = self._pending[interception_id] = []
            if len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)
        runs.append(run)

    def interception(self, ic, *, status: str, summary=None, http_status: int | None = None,
                     error: str | None = None, ended_at: dt.datetime | None = None) -> None:
        """The span (and metrics) of one interception that ended: completed, failed or rejected."""
        sdk = self._sdk
        if sdk is None:
            return
        runs = self._pending.pop(ic.id, None)
        try:
            self._interception(sdk, ic, status, summary, http_status, error, ended_at, runs or ())
        except Exception:
            log.debug("telemetry: the span of %s was not made", ic.id, exc_info=True)

    def _interception(self, sdk: _Sdk, ic, status, summary, http_status, error, ended_at, runs) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        info = ic.info
        op = operation_name(ic.provider_type, ic.api)
        model = (info.model if info is not None else None) or ""
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": op,
            "gen_ai.provider.name": provider_name(ic.provider_type),
            "aibridge.interception.id": ic.id,
            "aibridge.user.name": ic.user_name,
            "aibridge.provider": ic.provider_name,
            "aibridge.api": ic.api,
            "aibridge.status": status,
        }
        if model:
            attrs["gen_ai.request.model"] = model
        if ic.requested_model:
            attrs["aibridge.client_model"] = ic.requested_model
        if ic.client:
            attrs["aibridge.client"] = ic.client
        if ic.on_behalf_of_name:
            attrs["aibridge.on_behalf_of"] = ic.on_behalf_of_name
        if ic.session_id:
            attrs["gen_ai.conversation.id"] = ic.session_id
        host = self.hosts.get(ic.provider_name)
        if host:
            attrs["server.address"] = host
        if info is not None:
            attrs["aibridge.stream"] = bool(info.stream)
        if http_status is not None:
            attrs["http.response.status_code"] = http_status
        totals = None
        if summary is not None:
            if summary.model:
                attrs["gen_ai.response.model"] = summary.model
            if summary.response_id:
                attrs["gen_ai.response.id"] = summary.response_id
            reasons = [r for r in getattr(summary, "finish_reasons", None) or () if isinstance(r, str)]
            if reasons:
                attrs["gen_ai.response.finish_reasons"] = reasons
            if summary.usages:
                i = o = r = w = reasoning = 0
                for u in summary.usages:
                    i += u.input_tokens
                    o += u.output_tokens
                    r += u.cache_read_input_tokens
                    w += u.cache_write_input_tokens
                    reasoning += reasoning_tokens(u.metadata)
                totals = (i + r + w, o)  # input: every input token, cached ones included (the conventions')
                attrs["gen_ai.usage.input_tokens"] = i + r + w
                attrs["gen_ai.usage.output_tokens"] = o
                attrs["gen_ai.usage.cache_read.input_tokens"] = r
                attrs["gen_ai.usage.cache_creation.input_tokens"] = w
                if reasoning:
                    attrs["gen_ai.usage.reasoning.output_tokens"] = reasoning
                if any(u.estimated for u in summary.usages):
                    attrs["aibridge.usage.estimated"] = True
        error_type = None
        if status not in ("completed",):
            error_type = (str(http_status) if http_status else None) or ("rejected" if status == "rejected"
                                                                          else "_OTHER")
            attrs["error.type"] = error_type
        if sdk.content:
            self._content(attrs, info, summary)
        parent = None
        if ic.traceparent:
            carrier = {"traceparent": ic.traceparent}
            if ic.tracestate:
                carrier["tracestate"] = ic.tracestate
            parent = sdk.propagator.extract(carrier)
        start, end = _ns(ic.started_at), _ns(ended_at)
        end = max(end, start)
        span = sdk.tracer.start_span(f"{op} {model}".strip(), context=parent, kind=SpanKind.CLIENT,
                                     attributes=attrs, start_time=start)
        if error_type is not None:
            span.set_status(Status(StatusCode.ERROR, (error or "")[:500] or None))
        inside = trace.set_span_in_context(span)
        for run in runs:
            self._tool_span(sdk, run, inside, provider=attrs["gen_ai.provider.name"])
        span.end(end_time=end)
        metric_attrs = {k: attrs[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name", "server.address")
                        if k in attrs}
        for k in ("gen_ai.request.model", "gen_ai.response.model"):
            if k in attrs:
                metric_attrs[k] = self._model_attribute(attrs[k])
        if error_type is not None:
            sdk.duration.record((end - start) / 1e9, {**metric_attrs, "error.type": error_type})
        else:
            sdk.duration.record((end - start) / 1e9, metric_attrs)
        if totals is not None:
            sdk.token_usage.record(totals[0], {**metric_attrs, "gen_ai.token.type": "input"})
            sdk.token_usage.record(totals[1], {**metric_attrs, "gen_ai.token.type": "output"})

    def _model_attribute(self, model: str) -> str:
        """A model name as a metric attribute: the first METRIC_MODELS well-formed names, else `_OTHER`, so a client
        that makes up model names cannot make up metric series."""
        if model in self._models:
            return model
        if len(self._models) >= METRIC_MODELS or not _MODEL_RE.match(model):
            return "_OTHER"
        self._models.add(model)
        return model

    @staticmethod
    def _content(attrs: dict, info, summary) -> None:
        """`telemetry.content: true`: what was asked (the prompt as recorded: masked where policies mask it) and
        what the model produced, as the conventions' message JSON."""
        if info is not None and info.prompt:
            attrs["gen_ai.input.messages"] = _cut(json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": info.prompt}]}], ensure_ascii=False))
        if summary is None:
            return
        parts: list[dict] = []
        for t in summary.thoughts:
            parts.append({"type": "reasoning", "content": t.content})
        text = "".join(getattr(summary, "output_text", None) or ())
        if text:
            parts.append({"type": "text", "content": text})
        for c in summary.tool_calls:
            parts.append({"type": "tool_call", "id": c.call_id, "name": c.name, "arguments": c.input})
        if parts:
            message = {"role": "assistant", "parts": parts}
            reasons = getattr(summary, "finish_reasons", None)
            if reasons:
                message["finish_reason"] = reasons[-1]
            attrs["gen_ai.output.messages"] = _cut(json.dumps([message], ensure_ascii=False))

    def _tool_span(self, sdk: _Sdk, run: ToolRun, context, provider: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        attrs: dict[str, Any] = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": run.name,
                                 "gen_ai.tool.type": "extension"}
        if provider:
            attrs["gen_ai.provider.name"] = provider
        if run.call_id:
            attrs["gen_ai.tool.call.id"] = run.call_id
        if run.server:
            attrs["aibridge.mcp.server"] = run.server
        if extra:
            attrs.update(extra)
        if run.error:
            attrs["error.type"] = "tool_error"
        if sdk.content:
            if run.arguments is not None:
                attrs["gen_ai.tool.call.arguments"] = _cut(run.arguments)
            if run.result is not None:
                attrs["gen_ai.tool.call.result"] = _cut(run.result)
        span = sdk.tracer.start_span(f"execute_tool {run.name}", context=context, kind=SpanKind.INTERNAL,
                                     attributes=attrs, start_time=run.started)
        if run.error:
            # A tool's error text is what the tool said (file contents, rows, secrets): content, sent only with
            # telemetry.content, and then masked like any logged text.
            span.set_status(Status(StatusCode.ERROR, redact(run.error)[:500] if sdk.content else "tool_error"))
        span.end(end_time=max(run.ended, run.started))

    def mcp_call(self, run: ToolRun, *, headers: Mapping[str, str] | None, method: str, outcome: str,
                 user_name: str | None, client: str | None, session: str | None, call_id: str) -> None:
        """One call an agent made through the MCP gateway: a span of its own, continuing the trace of the MCP
        request's `traceparent` when its client sent one."""
        sdk = self._sdk
        if sdk is None:
            return
        try:
            parent = None
            if headers and headers.get("traceparent"):
                carrier = {"traceparent": headers["traceparent"]}
                if headers.get("tracestate"):
                    carrier["tracestate"] = headers["tracestate"]
                parent = sdk.propagator.extract(carrier)
            extra = {"aibridge.mcp.method": method, "aibridge.mcp.outcome": outcome, "aibridge.mcp.call.id": call_id}
            if user_name:
                extra["aibridge.user.name"] = user_name
            if client:
                extra["aibridge.client"] = client
            if session:
                extra["gen_ai.conversation.id"] = session
            self._tool_span(sdk, run, parent, extra=extra)
        except Exception:
            log.debug("telemetry: the span of MCP call %s was not made", call_id, exc_info=True)
