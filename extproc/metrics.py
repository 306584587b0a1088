"""The picker's own Prometheus metrics, in a registry made at start-up (no global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Decisions take tens of microseconds; requests take seconds. Buckets cover both ends.
_PICK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# Time in the fair queue: none at all, up to the queue timeout.
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
        # Tenancy. The tenant label takes configured tenant names only ("-" for requests that
        # named none), so its cardinality is the config's.
        self.tenant_requests = Counter(
            "extproc_tenant_requests",
            "Requests per tenant, by outcome (routed, or the refusal's reason).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "extproc_tenant_tokens",
            "Tokens per tenant: prompt (counted at the pick) and completion (from usage).",
            ["tenant", "kind"],
            registry=r,
        )
        self.tenant_rejections = Counter(
            "extproc_tenant_rejections",
            "Requests refused per tenant, by reason.",
            ["tenant", "reason"],
            registry=r,
        )
        self.tenant_queue_seconds = Histogram(
            "extproc_tenant_queue_seconds",
            "Time requests waited in the fair queue, per tenant.",
            ["tenant"],
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.tenant_queue_depth = Gauge(
            "extproc_tenant_queue_depth",
            "Requests waiting in the fair queue, per tenant.",
            ["tenant"],
            registry=r,
        )
        self.limiter_redis_up = Gauge(
            "extproc_limiter_redis_up",
            "1 while the shared (Redis) limiter answers, 0 while its failure mode applies.",
            registry=r,
        )
        self.disaggregation = Counter(
            "extproc_disaggregation_decisions",
            "Requests to a pool with prefill and decode endpoints, by mode and outcome "
            "(disaggregated; local: the decode endpoint prefills, the prompt's uncached part "
            "being under the threshold or no prefill endpoint being better; prefill_failed: "
            "of the disaggregated ones, those whose centralized prefill failed, so that the "
            "decode endpoint computed it all).",
            ["mode", "outcome"],
            registry=r,
        )
        self.limiter_fallbacks = Counter(
            "extproc_limiter_fallbacks",
            "Limit decisions taken without Redis, by failure mode (open: local limits; "
            "closed: refused).",
            ["mode"],
            registry=r,
        )
