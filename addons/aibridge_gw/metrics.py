"""Prometheus metrics with the names and labels of Coder's AI Bridge (prefix configurable, default aibridge_)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, prefix: str = "aibridge_") -> None:
        r = self.registry = CollectorRegistry()
        self._children: dict[tuple, object] = {}
        p = prefix
        self.interceptions = Counter(f"{p}interceptions_total", "Intercepted requests by outcome.",
                                     ["provider", "model", "status", "route", "method", "initiator_id", "client"],
                                     registry=r)
        self.inflight = Gauge(f"{p}interceptions_inflight", "Intercepted requests in progress.",
                              ["provider", "model", "route"], registry=r)
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
                                   ["provider", "endpoint", "model"], registry=r)
        self.breaker_trips = Counter(f"{p}circuit_breaker_trips_total", "Times a circuit breaker opened.",
                                     ["provider", "endpoint", "model"], registry=r)
        self.loop_lag_max = Gauge(f"{p}event_loop_lag_max_seconds", "Longest event-loop stall seen.", registry=r)
        self.client_tools = Counter(f"{p}non_injected_tool_selections_total", "Client-defined tools the model selected.",
                                    ["provider", "model", "name"], registry=r)

    def child(self, metric, *labels):
        """metric.labels(*labels), memoised: labels() validates and locks on every call, and this is per request."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def render(self) -> bytes:
        return generate_latest(self.registry)
