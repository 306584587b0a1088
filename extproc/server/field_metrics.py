"""The field's endpoint-picker metrics, filled from this picker's requests and pool.

The llm-d router's dashboards read `inference_objective_*` (per request, by model) and
`inference_pool_*` (per pool). `MeteredPipeline` is the pipeline with those per-request series
recorded at its lifecycle calls, the ones `StreamHandler` already makes: `route` (a decision or
a refusal), `ended` (the response is over: duration, running requests) and `settle` (its usage:
tokens, time per output token). `pool_reader` gives `PoolCollector` the pool's ready endpoints
with fresh metrics at scrape time. docs/observability.md says which of the field's series are
exported and why the others are not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.config import Config
from extproc.decision import LocalAnswer, RequestHead, Routed
from extproc.metrics import FieldMetrics, PoolLoad
from extproc.pipeline import Pipeline
from extproc.request.errors import OpenAIError
from extproc.request.usage import Usage
from extproc.state.collector import freshness
from extproc.state.snapshot import SnapshotStore
from extproc.state.stats import ScrapeHealth

# The field's error codes by HTTP status (llm-d-router pkg/common/error: BuildErrResponse maps
# them the other way); a status without one is `Unknown`, as their CanonicalCode says.
_ERROR_CODES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    412: "PreconditionFailed",
    413: "BadRequest",
    429: "ResourceExhausted",
    500: "Internal",
    503: "ServiceUnavailable",
}
_NO_HEALTH = ScrapeHealth()


def error_code(status: int) -> str:
    return _ERROR_CODES.get(status, "Unknown")


@dataclass(frozen=True, slots=True)
class _Started:
    """A routed request's labels and times, from its decision to its usage."""

    model: str
    target: str
    received: float
    ended: float | None = None


class MeteredPipeline(Pipeline):
    """`Pipeline`, with the field's per-request series recorded around its lifecycle calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._field = FieldMetrics(self._metrics.registry)
        # Keyed by the decision's identity: `Routed` holds a mapping, so it has no hash. An
        # entry lives from the decision to its settling, which every decision reaches
        # (`StreamHandler` settles the ones whose response or usage never shows up).
        self._started: dict[int, _Started] = {}

    async def route(
        self, head: RequestHead, body: bytes | None
    ) -> Routed | LocalAnswer | OpenAIError:
        received = time.monotonic()
        try:
            outcome = await super().route(head, body)
        except Exception:
            self._count_error(body, "Internal")  # the stream answers 500
            raise
        if isinstance(outcome, OpenAIError):
            self._count_error(body, error_code(outcome.status))
        elif isinstance(outcome, Routed) and outcome.request.model is not None:
            field = self._field
            model = field.model_label(outcome.request.model)
            # The model the endpoint is asked for: the body's, as the picker sends it on.
            target = model
            priority = str(outcome.tenant.priority) if outcome.tenant is not None else "0"
            field.requests.labels(model, target, priority).inc()
            field.request_sizes.labels(model, target).observe(len(body or b""))
            field.running.labels(model).inc()
            self._started[id(outcome)] = _Started(model, target, received)
        return outcome

    def ended(self, routed: Routed, *, completion_tokens: int = 0) -> None:
        super().ended(routed, completion_tokens=completion_tokens)
        started = self._started.get(id(routed))
        if started is None or started.ended is not None:
            return
        now = time.monotonic()
        self._started[id(routed)] = _Started(started.model, started.target, started.received, now)
        self._field.running.labels(started.model).dec()
        self._field.duration.labels(started.model, started.target).observe(now - started.received)

    def settle(self, routed: Routed, usage: Usage | None, *, limiter_charged: bool = False) -> None:
        super().settle(routed, usage, limiter_charged=limiter_charged)
        started = self._started.pop(id(routed), None)
        if started is None or usage is None:
            return
        field, labels = self._field, (started.model, started.target)
        # As the field's picker: counts of zero are not observed (nothing was reported).
        if usage.prompt_tokens > 0:
            field.input_tokens.labels(*labels).observe(usage.prompt_tokens)
        if usage.completion_tokens > 0:
            field.output_tokens.labels(*labels).observe(usage.completion_tokens)
            if started.ended is not None and started.ended > started.received:
                seconds = (started.ended - started.received) / usage.completion_tokens
                field.ntpot.labels(*labels).observe(seconds)

    def _count_error(self, body: bytes | None, code: str) -> None:
        model = self._field.model_label(_model_in(body))
        self._field.errors.labels(model, model, code).inc()


def _model_in(body: bytes | None) -> str:
    """The body's `model`, for a refused request's labels ("" when there is none): refusals
    are rare, so reading the body again here costs the routed requests nothing."""
    if not body:
        return ""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return ""
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else ""


def pool_name(config: Config) -> str | None:
    """The one InferencePool the picker serves, by name; None for a static list of endpoints
    or several pools, whose endpoints carry no pool name to average by."""
    kubernetes = config.discovery.kubernetes
    if kubernetes is None:
        return None
    if kubernetes.pool_name:
        return kubernetes.pool_name
    return kubernetes.pools[0] if len(kubernetes.pools) == 1 else None


def pool_reader(config: Config, store: SnapshotStore) -> Callable[[], PoolLoad | None]:
    """What `PoolCollector` reads: the pool's ready endpoints whose metrics are fresh, as the
    field's picker counts and averages them."""
    name = pool_name(config)
    collector = config.collector

    def read() -> PoolLoad | None:
        if name is None:
            return None
        now = time.monotonic()
        fresh = [
            e.stats
            for e in store.current.endpoints
            if e.ready
            and e.stats is not None
            and freshness(
                e.stats,
                e.health or _NO_HEALTH,
                now=now,
                staleness_seconds=collector.staleness_seconds,
                unready_after_failures=collector.unready_after_failures,
            )
            == "fresh"
        ]
        return PoolLoad(
            name,
            kv_usage=tuple(s.kv_usage for s in fresh),
            waiting=tuple(s.waiting for s in fresh),
            running=tuple(s.running for s in fresh),
        )

    return read
