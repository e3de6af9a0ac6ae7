"""The `Observation` addon: what operators watch — Prometheus metrics, the one-line interception log and the
optional JSON interception log. It reads what the pipeline decided (`FlowState.outcome`) and never changes a
flow; it runs after the pipeline in the addon chain."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..flow.exchange import TokenTotals
from ..flow.state import FlowState, state_of
from ..interception_log import InterceptionLog
from ..logsafe import printable
from .runtime import Runtime, interception_log

log = logging.getLogger("aibridge")


class Observation:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.json_log: InterceptionLog | None = None
        self._json_log_path: str | None = None
        runtime.on_reload.append(lambda: self.configure(set()))

    def configure(self, updated: set[str]) -> None:
        path = self.rt.config.logging.interceptions_json if self.rt.config else None
        if path == self._json_log_path and (self.json_log is not None) == bool(path):
            return
        if self.json_log is not None:
            self.json_log.close()
        self.json_log = InterceptionLog(path) if path else None
        self._json_log_path = path

    def done(self) -> None:
        if self.json_log is not None:
            self.json_log.close()
            self.json_log = None

    def request(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or not state.forwarded_at:
            return  # not the pipeline's, or refused before it went upstream
        m, ic = self.rt.metrics, state.interception
        if ic is None:
            route = state.route
            m.child(m.passthrough, route.provider.name, route.label, flow.request.method).inc()
        elif not state.inflight and state.outcome is None:
            state.inflight = True
            m.child(m.inflight, ic.provider_name, m.model_label(ic.info.model), ic.route).inc()

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or state.interception is None or state.outcome is None:
            return
        if state.inflight:
            state.inflight = False
            ic = state.interception
            self.rt.metrics.child(self.rt.metrics.inflight, ic.provider_name,
                                  self.rt.metrics.model_label(ic.info.model), ic.route).dec()
            self._report(state)

    def _report(self, state: FlowState) -> None:
        """Metrics and the interception logs for one finished interception."""
        ic, out = state.interception, state.outcome
        summary, m = out.summary, self.rt.metrics
        model = m.model_label(ic.info.model)
        totals = TokenTotals.of(summary.usages)
        m.child(m.interceptions, ic.provider_name, model, out.status, ic.route, "POST", ic.user_id, ic.client).inc()
        duration = (out.ended_at - ic.started_at).total_seconds()
        m.child(m.duration, ic.provider_name, model).observe(max(duration, 0.0))
        if ic.info.prompt and ic.purpose in (None, "chat"):  # a person's turns: the client's own calls are not
            m.child(m.prompts, ic.provider_name, model, ic.user_id, ic.client).inc()
        for kind, n in (("input", totals.input), ("output", totals.output), ("cache_read", totals.cache_read),
                        ("cache_write", totals.cache_write)):
            if n:
                m.child(m.tokens, ic.provider_name, model, kind, ic.user_id, ic.client).inc(n)
        injected = 0
        for t in summary.tool_calls:
            if t.injected:
                injected += 1
                m.child(m.injected_tools, ic.provider_name, model, m.tool_label(t.name),
                        "error" if t.error else "ok").inc()
            else:
                m.child(m.client_tools, ic.provider_name, model, m.tool_label(t.name)).inc()
        error = out.error
        interception_log.info(
            "interception %s user=%s provider=%s api=%s model=%s client=%s status=%s in=%d out=%d tools=%d%s",
            ic.id, printable(ic.user_name), ic.provider_name, ic.api, printable(ic.info.model),
            printable(ic.client), out.status, totals.input, totals.output,
            len(summary.tool_calls), f" error={printable(error, 500)}" if error else "",
        )
        if self.json_log is not None:
            self.json_log.write({
                "msg": "interception log", "interception_id": ic.id, "user": ic.user_name, "user_id": ic.user_id,
                "client": ic.client, "session_id": ic.session_id, "provider": ic.provider_type,
                "provider_name": ic.provider_name, "api": ic.api, "model": ic.info.model,
                "response_model": summary.model,
                "status": out.status, "http_status": out.http_status, "error": error,
                "started_at": ic.started_at.isoformat(), "ended_at": out.ended_at.isoformat(),
                "duration_ms": round(duration * 1000, 1), "credential_kind": ic.credential_kind,
                "input_tokens": totals.input, "output_tokens": totals.output,
                "cache_read_input_tokens": totals.cache_read, "cache_write_input_tokens": totals.cache_write,
                "tool_calls": len(summary.tool_calls) - injected, "injected_tool_calls": injected,
                "thread_parent_id": ic.parent_id, "thread_root_id": ic.root_id, "purpose": ic.purpose,
            })
