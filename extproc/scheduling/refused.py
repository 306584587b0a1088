"""The llm-d router's plugin types that nothing here does the same way, by name, with what
comes closest here. A config naming one is refused with that (`profiles.py`), not loaded with a
plugin silently missing and not met as an unknown type. Data only: the types this picker does
implement are registered in `registry.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

NOT_IMPLEMENTED: Mapping[str, str] = MappingProxyType(
    {
        "load-aware-scorer": "queue-scorer scores the waiting queue, scaled across the pool",
        "active-request-scorer": "least-request-scorer scores requests in flight from this "
        "picker, scaled across the pool",
        "token-load-scorer": "in-flight-tokens-scorer scores prompt tokens in flight",
        "no-hit-lru-scorer": "prefix-cache-scorer with kv_events.enabled",
        "session-affinity-filter": "session-affinity-scorer (x-session-id)",
        "by-label": "prefill-filter and decode-filter (fleet.role_label)",
        "by-label-selector": "prefill-filter and decode-filter (fleet.role_label)",
        "label-selector-filter": "prefill-filter and decode-filter (fleet.role_label)",
        "encode-filter": "",
        "weighted-random-picker": "random-picker or max-score-picker",
        "data-parallel-profile-handler": "one endpoint per data-parallel rank (its own port)",
        "header-profile-handler": "the x-routing-strategy header names a strategy or profile",
        "always-disagg-multimodal-decider": "",
        "context-length-aware": "cost-scorer",
        "endpoint-attribute-filter": "",
        "endpoint-attribute-scorer": "",
        "utilization-filter": "prefer-unsaturated-filter",
        "latency-scorer": "cost-scorer (predicted time to first token)",
        "predicted-latency-producer": "cost-scorer (predicted time to first token)",
        "latency-slo-admitter": "",
        "probabilistic-admitter": "",
        "prefix-cache-affinity-filter": "",
        "slo-headroom-tier-filter": "",
        "mm-embeddings-cache-scorer": "",
        "mm-embeddings-cache-producer": "",
        "header-label-affinity-scorer": "",
        "topology-affinity-filter": "",
        "topology-affinity-scorer": "",
        "burst-prefix-cache-producer": "",
        "p2p-source-producer": "",
        "request-attribute-reporter": "",
        "agent-identity": "tenancy identifies clients by API key",
        "disaggregatedset-rollout-screener": "",
        "concurrency-detector": "scheduling.saturation_requests",
        "global-strict-fairness-policy": "tenancy's fair queue",
        "round-robin-fairness-policy": "tenancy's fair queue",
        "program-aware-fairness": "tenancy's fair queue",
        "fcfs-ordering-policy": "tenancy's fair queue",
        "edf-ordering-policy": "tenancy's fair queue",
        "slo-deadline-ordering-policy": "tenancy's fair queue",
        "static-usage-limit-policy": "tenancy's limits",
        "priority-holdback-policy": "tenancy's headroom_requests",
        "soft-reflective-ceiling-policy": "",
        "sheddable-eviction-filter": "",
        "priority-then-time-eviction-order-policy": "",
        "file-discovery": "a static endpoints list",
        "dcgm-data-source": "",
        "dcgm-extractor": "",
        "topology-extractor": "",
        "anthropic-parser": "",
        "passthrough-parser": "",
        "vllmgrpc-parser": "",
        "vllmhttp-parser": "openai-parser",
        "sglanghttp-parser": "",
        "vertexai-parser": "",
    }
)

# The llm-d router's multi-cluster variants (`multicluster-prefix-cache-scorer`, ...).
MULTICLUSTER_PREFIX = "multicluster-"


def refusal(type_name: str) -> str | None:
    """Why `type_name` is refused (what comes closest, possibly empty); None: not an llm-d
    router type this file knows of."""
    if type_name in NOT_IMPLEMENTED:
        return NOT_IMPLEMENTED[type_name]
    if type_name.startswith(MULTICLUSTER_PREFIX):
        return ""
    return None
