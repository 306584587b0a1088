"""The picker's own Prometheus metrics, in a registry made at start-up (no global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Decisions take tens of microseconds; requests take seconds. Buckets cover both ends.
_PICK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class PickerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "extproc_requests",
            "Requests seen, by strategy and outcome.",
            ["strategy", "outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "extproc_rejections",
            "Requests the picker answered itself, by HTTP status and code.",
            ["status", "code"],
            registry=r,
        )
        self.pick_seconds = Histogram(
            "extproc_pick_duration_seconds",
            "Time from the end of the request body to the routing decision.",
            ["strategy"],
            buckets=_PICK_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "extproc_inflight_requests",
            "Requests picked and not yet finished, per endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.served = Counter(
            "extproc_served_requests",
            "Finished requests per endpoint that served them.",
            ["endpoint"],
            registry=r,
        )
        self.fallback_served = Counter(
            "extproc_fallback_served_requests",
            "Requests served by an endpoint other than the first pick (Envoy retried).",
            registry=r,
        )
        self.tokens = Counter(
            "extproc_usage_tokens",
            "Tokens reported in responses' usage, by kind.",
            ["kind"],
            registry=r,
        )
        self.endpoints = Gauge(
            "extproc_endpoints",
            "Endpoints known to the picker, by readiness.",
            ["state"],
            registry=r,
        )
        self.streams = Gauge(
            "extproc_open_streams",
            "ext_proc streams currently open.",
            registry=r,
        )
        self.stream_errors = Counter(
            "extproc_stream_errors",
            "ext_proc streams that ended with an error.",
            ["reason"],
            registry=r,
        )
