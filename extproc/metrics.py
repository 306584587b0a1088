"""The picker's own Prometheus metrics, in a registry made at start-up (no global registry),
and the field's endpoint-picker names beside them (`FieldMetrics`, `PoolCollector`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
        # extproc.prefix.mismatch: the picker's block hashes against the servers' KV events.
        self.prefix_tokenizer_mismatch = Gauge(
            "extproc_prefix_tokenizer_mismatch",
            "1 while an endpoint's KV events show its block hashes are not the picker's for a "
            "model (tokenizer, chat template, hash algorithm, seed or block size differ).",
            ["model", "endpoint"],
            registry=r,
        )
        self.prefix_checked_blocks = Counter(
            "extproc_prefix_checked_blocks",
            "Blocks in servers' KV events checked against the picker's hashes, by model and "
            "outcome (predicted: the picker had computed that hash for the model's prompts).",
            ["model", "outcome"],
            registry=r,
        )


# --- The field's names --------------------------------------------------------------------------
# The llm-d router's endpoint picker (formerly the Gateway API Inference Extension's) exports
# `inference_objective_*` per request and `inference_pool_*` per pool, and its dashboards and
# alerts read them. Same names, types, labels and buckets here (llm-d/llm-d-router,
# pkg/epp/metrics/metrics.go); docs/observability.md lists which are exported and why not others.

# From 5 ms to an hour: whole requests, streams included.
_FIELD_LATENCY_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20,
    30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
_FIELD_REQUEST_SIZE_BUCKETS = (
    64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288,
    1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456,
    536870912, 1073741824,
)  # fmt: skip
_FIELD_INPUT_TOKEN_BUCKETS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144,
    524288, 1048576,
)  # fmt: skip
_FIELD_OUTPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_FIELD_NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_MODEL_LABELS = ["model_name", "target_model_name"]
# Model names come from request bodies; past this many distinct ones a name is counted as
# `other`, as the field's picker does, so a client cannot grow the series without bound.
MAX_MODEL_LABELS = 1000
OVERFLOW_LABEL = "other"


class FieldMetrics:
    """The field's per-request series (`inference_objective_*`), in the picker's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self._models: set[str] = set()
        self.requests = Counter(
            "inference_objective_request",
            "Counter of inference objective requests broken out for each model and target model.",
            [*_MODEL_LABELS, "priority"],
            registry=r,
        )
        self.errors = Counter(
            "inference_objective_request_error",
            "Counter of inference objective requests errors broken out for each model and target "
            "model.",
            [*_MODEL_LABELS, "error_code"],
            registry=r,
        )
        self.duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds for each model and "
            "target model.",
            _MODEL_LABELS,
            buckets=_FIELD_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_sizes = Histogram(
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes for each model and target "
            "model.",
            _MODEL_LABELS,
            buckets=_FIELD_REQUEST_SIZE_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model.",
            _MODEL_LABELS,
            buckets=_FIELD_INPUT_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model.",
            _MODEL_LABELS,
            buckets=_FIELD_OUTPUT_TOKEN_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model.",
            ["model_name"],
            registry=r,
        )
        self.ntpot = Histogram(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by number of output tokens in seconds for each "
            "model and target model.",
            _MODEL_LABELS,
            buckets=_FIELD_NTPOT_BUCKETS,
            registry=r,
        )

    def model_label(self, model: str) -> str:
        """`model` as a label value: itself while fewer than MAX_MODEL_LABELS names have been
        seen (and always once seen, so a gauge's inc and dec stay paired), else `other`."""
        if not model or model in self._models:
            return model
        if len(self._models) >= MAX_MODEL_LABELS:
            return OVERFLOW_LABEL
        self._models.add(model)
        return model


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """One pool's ready endpoints with fresh metrics, as the field's picker averages them."""

    name: str
    kv_usage: tuple[float, ...] = ()  # 0..1 each
    waiting: tuple[float, ...] = ()
    running: tuple[float, ...] = ()


class PoolCollector(Collector):
    """`inference_pool_*` gauges read from the pool at scrape time, so they are never older than
    the picker's own view. `read` returns None when the picker serves no single named pool."""

    _READY = "inference_pool_ready_pods"
    _KV = "inference_pool_average_kv_cache_utilization"
    _QUEUE = "inference_pool_average_queue_size"
    _RUNNING = "inference_pool_average_running_requests"

    def __init__(self, read: Callable[[], PoolLoad | None]) -> None:
        self._read = read

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self._read()
        if load is None:
            return
        ready, kv, queue, running = self._families()
        ready.add_metric([load.name], len(load.kv_usage))
        yield ready
        if not load.kv_usage:
            return  # no endpoint to average: no value rather than a made-up zero
        for family, values in ((kv, load.kv_usage), (queue, load.waiting), (running, load.running)):
            family.add_metric([load.name], sum(values) / len(values))
            yield family

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        labels = ["name"]
        return (
            GaugeMetricFamily(
                self._READY, "The number of ready pods in the inference server pool.", labels=labels
            ),
            GaugeMetricFamily(
                self._KV,
                "The average kv cache utilization for an inference server pool.",
                labels=labels,
            ),
            GaugeMetricFamily(
                self._QUEUE,
                "The average number of requests pending in the model server queue.",
                labels=labels,
            ),
            GaugeMetricFamily(
                self._RUNNING,
                "The average number of running requests across model servers in the pool.",
                labels=labels,
            ),
        )
