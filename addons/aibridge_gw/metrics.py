"""Prometheus metrics with the names and labels of Coder's AI Bridge (prefix configurable, default aibridge_).

With `scripts/run --workers N` any worker may answer a scrape, so every worker keeps its values in
prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor) and a scrape adds them
up: counters and histograms summed over every worker that ever ran, gauges over the live ones (in flight: the
sum; states and stalls: the worst)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


MAX_LABELS = 200  # distinct model (and tool) names that get their own series
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,99}$")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, prefix: str = "aibridge_") -> None:
        r = self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        # Gauges read when scraped, by gauge: a reload that sets a key's gauge again replaces its function.
        self._functions: dict[int, tuple[object, Callable[[], float]]] = {}
        self._before_render: list[Callable[[], None]] = []
        self._children: dict[tuple, object] = {}
        self._models: set[str] = set()
        self._tools: set[str] = set()
        self._rules: set[str] = set()
        self._actions: set[str] = set()
        self._mcp_tools: set[str] = set()
        self._mcp_servers: set[str] = set()
        p = prefix
        self.interceptions = Counter(f"{p}interceptions_total", "Intercepted requests by outcome.",
                                     ["provider", "model", "status", "route", "method", "initiator_id", "client"],
                                     registry=r)
        self.inflight = Gauge(f"{p}interceptions_inflight", "Intercepted requests in progress.",
                              ["provider", "model", "route"], registry=r, multiprocess_mode="livesum")
        self.duration = Histogram(f"{p}interceptions_duration_seconds", "Time from request to the end of the response.",
                                  ["provider", "model"], registry=r,
                                  buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600))
        self.passthrough = Counter(f"{p}passthrough_total", "Requests relayed without interception.",
                                   ["provider", "route", "method"], registry=r)
        self.prompts = Counter(f"{p}prompts_total", "User prompts recorded.",
                               ["provider", "model", "initiator_id", "client"], registry=r)
        self.tokens = Counter(f"{p}tokens_total", "Tokens by type.",
                              ["provider", "model", "type", "initiator_id", "client"], registry=r)
        self.injected_tools = Counter(f"{p}injected_tool_invocations_total", "Injected MCP tool calls run by the gateway.",
                                      ["provider", "model", "name", "status"], registry=r)
        self.breaker_state = Gauge(f"{p}circuit_breaker_state",
                                   "Circuit breaker state (0 closed, 1 open, 2 half-open).",
                                   ["provider", "endpoint", "model"], registry=r, multiprocess_mode="livemax")
        self.breaker_trips = Counter(f"{p}circuit_breaker_trips_total", "Times a circuit breaker opened.",
                                     ["provider", "endpoint", "model"], registry=r)
        self.loop_lag_max = Gauge(f"{p}event_loop_lag_max_seconds", "Longest event-loop stall seen.", registry=r,
                                  multiprocess_mode="livemax")
        self.store_up = Gauge(f"{p}store_up", "1 while the audit store takes records, 0 while they are held.",
                              registry=r, multiprocess_mode="livemin")
        self.records_backlog = Gauge(f"{p}records_backlog", "Audit records held while the store cannot take them.",
                                     registry=r, multiprocess_mode="livemax")
        self.dead_lettered_total = Counter(f"{p}records_dead_lettered", "Audit records the store rejected as data, "
                                           "kept in the dead-letter file.", registry=r)
        self.key_state = Gauge(f"{p}upstream_key_state", "Upstream keys of a failover pool (0 ready, 1 cooling "
                               "down after a 429, 2 disabled after a 401/403).", ["provider", "key"], registry=r,
                               multiprocess_mode="livemax")
        self.key_failovers = Counter(f"{p}upstream_key_failovers_total", "Requests sent again with another key of "
                                     "the pool, by why the key was left.", ["provider", "reason"], registry=r)
        self.reloads = Counter(f"{p}config_reloads_total", "Configuration reloads (SIGHUP), applied or refused.",
                               ["result"], registry=r)
        self.client_tools = Counter(f"{p}non_injected_tool_selections_total", "Client-defined tools the model selected.",
                                    ["provider", "model", "name"], registry=r)
        # Enforced and monitored decisions alike (a monitored deny counts as action="deny"): the audit table says
        # which were enforced. Rule names come from the config, so the label set is bounded by it.
        self.policy_decisions = Counter(f"{p}policy_decisions_total", "Policy decisions recorded, by rule and action.",
                                        ["rule", "action"], registry=r)

        # MCP gateway calls (/aibridge/mcp): servers come from the config, tools are the servers' own names (bounded
        # like model names), outcomes a fixed set (see mcp/gateway.OUTCOMES).
        self.mcp_calls = Counter(f"{p}mcp_calls_total", "MCP gateway tool calls, by server, tool and outcome.",
                                 ["server", "tool", "outcome"], registry=r)
        self.mcp_duration = Histogram(f"{p}mcp_call_duration_seconds", "MCP gateway tool calls: time from the "
                                      "call to its answer.", ["server"], registry=r,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.unpriced = Counter(f"{p}unpriced_usage_total", "Usage records of models no price book knows (their "
                                "cost is unknown): set a price with aibridge prices set.", ["model"], registry=r)

    def mcp_call(self, server: str | None, tool: str | None, outcome: str, seconds: float | None) -> None:
        """Count one MCP gateway tool call and its duration (labels bounded: unknown names become `other`)."""
        server_label = self._bounded(self._mcp_servers, server) or "none"
        self.child(self.mcp_calls, server_label, self._bounded(self._mcp_tools, tool) or "none", outcome).inc()
        if seconds is not None:
            self.child(self.mcp_duration, server_label).observe(seconds)

    def unpriced_usage(self, model: str | None) -> None:
        """One usage record whose model has no price (`aibridge_unpriced_usage_total{model}`)."""
        self.child(self.unpriced, self.model_label(model) or "none").inc()

    def model_label(self, model: str | None) -> str:
        """Client-chosen model strings as a bounded label set: the first MAX_LABELS well-formed names, else other."""
        return self._bounded(self._models, model)

    def tool_label(self, name: str | None) -> str:
        return self._bounded(self._tools, name)

    def policy_decision(self, rule: str, action: str, n: int = 1) -> None:
        """Count a policy decision: aibridge_policy_decisions_total{rule, action} (with the configured prefix).
        Called once per decision recorded, enforced or monitored."""
        self.child(self.policy_decisions, self._bounded(self._rules, rule) or "other",
                   self._bounded(self._actions, action) or "other").inc(n)

    @staticmethod
    def _bounded(seen: set[str], value: str | None) -> str:
        if not value:
            return ""
        if value in seen:
            return value
        if len(seen) >= MAX_LABELS or not _LABEL_RE.match(value):
            return "other"
        seen.add(value)
        return value

    def child(self, metric, *labels):
        """metric.labels(*labels), memoised: labels() validates and locks on every call, and this is per request."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def gauge_function(self, gauge, fn: Callable[[], float]) -> None:
        """A gauge whose value is read when scraped (multiprocess files hold only set values: set it then)."""
        if self.multiprocess:
            self._functions[id(gauge)] = (gauge, fn)
        else:
            gauge.set_function(fn)

    def refresh(self) -> None:
        """Multiprocess mode: write the read-when-scraped gauges (each worker, every second, and before a scrape)."""
        for hook in self._before_render:
            hook()
        for gauge, fn in list(self._functions.values()):
            gauge.set(fn())

    def before_render(self, fn: Callable[[], None]) -> None:
        """fn runs before each scrape (counters that follow another process's totals)."""
        self._before_render.append(fn)

    def render(self) -> bytes:
        if not self.multiprocess:
            for hook in self._before_render:
                hook()
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        self.refresh()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
