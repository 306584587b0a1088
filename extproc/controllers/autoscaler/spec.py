"""A `PodAutoscaler`'s spec as frozen records, and the per-pod value of each metric source.

The CRD's OpenAPI schema (manifests/crds/podautoscalers.yaml) rejects malformed objects at the
API server; `parse_spec` checks again (a cluster without the CRD's validation, or an older CRD,
must not crash the controller) and raises `SpecError` with the field at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from extproc.controllers.autoscaler.algorithms import (
    Algorithm,
    Apa,
    ApaParams,
    Bounds,
    Hpa,
    HpaParams,
    Kpa,
    KpaParams,
)
from extproc.state.stats import EndpointStats

# Metric sources: what is read from each pod's vLLM /metrics.
QUEUE: Final = "queue"  # vllm:num_requests_waiting
RUNNING: Final = "running"  # vllm:num_requests_running
CONCURRENCY: Final = "concurrency"  # running + waiting
KV_USAGE: Final = "kv-usage"  # vllm:kv_cache_usage_perc, 0..1
TOKENS_PER_SECOND: Final = "tokens-per-second"  # rate of prompt + generation token counters
METRICS: Final = (QUEUE, RUNNING, CONCURRENCY, KV_USAGE, TOKENS_PER_SECOND)

# How often each algorithm decides unless the spec says: the HPA's controller sync period, and
# Knative's 2 s tick for the other two.
DEFAULT_SYNC_SECONDS: Final = {"hpa": 15.0, "kpa": 2.0, "apa": 2.0}


class SpecError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"spec.{field}: {problem}")
        self.field = field


@dataclass(frozen=True, slots=True)
class TargetRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class MetricSource:
    metric: str
    target: float  # per pod
    port: int | None = None  # None: the pod's own HTTP port
    path: str = "/metrics"


@dataclass(frozen=True, slots=True)
class Activation:
    """A Prometheus counter whose increase means demand with no pod to serve it (for example
    the picker's 503s for the model); it wakes a target scaled to zero."""

    url: str
    metric: str


@dataclass(frozen=True, slots=True)
class AutoscalerSpec:
    target: TargetRef
    bounds: Bounds
    algorithm: Algorithm
    sources: tuple[MetricSource, ...]
    sync_seconds: float
    activation: Activation | None = None


def parse_spec(spec: Mapping[str, Any]) -> AutoscalerSpec:
    ref = _mapping(spec.get("scaleTargetRef"), "scaleTargetRef")
    target = TargetRef(
        api_version=_string(ref, "apiVersion", "scaleTargetRef", default="apps/v1"),
        kind=_string(ref, "kind", "scaleTargetRef", default="Deployment"),
        name=_string(ref, "name", "scaleTargetRef"),
    )
    low = _int(spec, "minReplicas", default=1, minimum=0)
    high = _int(spec, "maxReplicas", default=max(low, 1), minimum=1)
    if high < low:
        raise SpecError("maxReplicas", f"{high} is below minReplicas {low}")
    name = str(spec.get("algorithm") or "kpa").lower()
    algorithm = _algorithm(name, spec)
    if low == 0 and not (isinstance(algorithm, Kpa) and algorithm.params.scale_to_zero):
        raise SpecError("minReplicas", "0 needs algorithm kpa with kpa.scaleToZero: true")
    raw_sources = spec.get("metrics")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise SpecError("metrics", "at least one metric source is required")
    sources = []
    for i, raw in enumerate(raw_sources):
        where = f"metrics[{i}]"
        item = _mapping(raw, where)
        metric = _string(item, "metric", where)
        if metric not in METRICS:
            raise SpecError(f"{where}.metric", f"{metric!r} is not one of {', '.join(METRICS)}")
        target_value = _number(item, "target", where)
        if target_value <= 0:
            raise SpecError(f"{where}.target", "must be positive")
        port = item.get("port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise SpecError(f"{where}.port", "must be a port number")
        sources.append(
            MetricSource(metric, target_value, port, _string(item, "path", where, "/metrics"))
        )
    activation = None
    if spec.get("activation") is not None:
        raw_activation = _mapping(spec.get("activation"), "activation")
        activation = Activation(
            url=_string(raw_activation, "url", "activation"),
            metric=_string(raw_activation, "metric", "activation"),
        )
    sync = spec.get("syncPeriodSeconds", DEFAULT_SYNC_SECONDS[name])
    if not isinstance(sync, int | float) or sync <= 0:
        raise SpecError("syncPeriodSeconds", "must be a positive number")
    return AutoscalerSpec(
        target, Bounds(low, high), algorithm, tuple(sources), float(sync), activation
    )


def _algorithm(name: str, spec: Mapping[str, Any]) -> Algorithm:
    if name == "hpa":
        raw = _mapping(spec.get("hpa") or {}, "hpa")
        h = HpaParams()
        return Hpa(
            HpaParams(
                tolerance=_number(raw, "tolerance", "hpa", h.tolerance),
                downscale_stabilization_seconds=_number(
                    raw, "downscaleStabilizationSeconds", "hpa", h.downscale_stabilization_seconds
                ),
            )
        )
    if name == "kpa":
        raw = _mapping(spec.get("kpa") or {}, "kpa")
        k = KpaParams()
        return Kpa(
            KpaParams(
                stable_window_seconds=_number(
                    raw, "stableWindowSeconds", "kpa", k.stable_window_seconds
                ),
                panic_window_seconds=_number(
                    raw, "panicWindowSeconds", "kpa", k.panic_window_seconds
                ),
                panic_threshold=_number(raw, "panicThreshold", "kpa", k.panic_threshold),
                max_scale_up_rate=_number(raw, "maxScaleUpRate", "kpa", k.max_scale_up_rate),
                max_scale_down_rate=_number(raw, "maxScaleDownRate", "kpa", k.max_scale_down_rate),
                scale_down_delay_seconds=_number(
                    raw, "scaleDownDelaySeconds", "kpa", k.scale_down_delay_seconds
                ),
                scale_to_zero=bool(raw.get("scaleToZero", k.scale_to_zero)),
                scale_to_zero_grace_seconds=_number(
                    raw, "scaleToZeroGraceSeconds", "kpa", k.scale_to_zero_grace_seconds
                ),
            )
        )
    if name == "apa":
        raw = _mapping(spec.get("apa") or {}, "apa")
        a = ApaParams()
        return Apa(
            ApaParams(
                window_seconds=_number(raw, "windowSeconds", "apa", a.window_seconds),
                up_tolerance=_number(raw, "upTolerance", "apa", a.up_tolerance),
                down_tolerance=_number(raw, "downTolerance", "apa", a.down_tolerance),
                max_scale_up_rate=_number(raw, "maxScaleUpRate", "apa", a.max_scale_up_rate),
                max_scale_down_rate=_number(raw, "maxScaleDownRate", "apa", a.max_scale_down_rate),
                scale_down_delay_seconds=_number(
                    raw, "scaleDownDelaySeconds", "apa", a.scale_down_delay_seconds
                ),
            )
        )
    raise SpecError("algorithm", f"{name!r} is not one of hpa, kpa, apa")


def per_pod_value(
    metric: str, stats: EndpointStats, *, tokens_rate: float | None = None
) -> float | None:
    """One pod's value of `metric`; tokens-per-second needs the rate between two scrapes."""
    if metric == QUEUE:
        return stats.waiting
    if metric == RUNNING:
        return stats.running
    if metric == CONCURRENCY:
        return stats.running + stats.waiting
    if metric == KV_USAGE:
        return stats.kv_usage
    return tokens_rate


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(field, "must be an object")
    return value


def _string(raw: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}.{key}", "must be a non-empty string")
    return value


def _number(raw: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{where}.{key}", "must be a number")
    if value < 0:
        raise SpecError(f"{where}.{key}", "must not be negative")
    return float(value)


def _int(raw: Mapping[str, Any], key: str, *, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(key, f"must be an integer >= {minimum}")
    return value
