"""Admission: should a request be scheduled at all, given how loaded the pool is?

Pure: from the candidates (after the candidates step) and the request's priority, decide

- `Admit`: the pool has room; schedule with the request's strategy;
- `Shed`: the pool is saturated and the request is sheddable (priority < 0): answer 429;
- `LeastBad`: the pool is saturated and the request is not sheddable: send it where it is
  predicted to wait least (lowest predicted TTFT), bypassing the strategy.

Saturation is the reference picker's rule: an endpoint is saturated when
max(queue / queue_threshold, kv_usage / kv_threshold) >= 1, or when its metrics are stale;
the pool is saturated when every candidate is. Optionally (`scheduling.saturation_requests`)
an endpoint with that many requests on it is saturated too: vLLM's waiting queue stays empty
until the KV cache is full, long after a growing batch has made every request slower. Waiting
queues (hold the request until room frees) belong to tenancy's fair queue, not here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.types import Candidate, SchedulingRequest


@dataclass(frozen=True, slots=True)
class SaturationThresholds:
    """The reference picker's defaults: 5 waiting requests, 80 % KV cache."""

    queue: float = 5.0
    kv: float = 0.8
    requests: float = 0.0  # running + waiting; 0: not a criterion


def saturation(candidate: Candidate, thresholds: SaturationThresholds) -> float:
    """>= 1 means saturated. Stale metrics count as saturated (inf): we cannot tell. An endpoint
    without stats while metrics are not collected is judged by our own in-flight count alone
    (when `requests` is set), else by nothing, so 0."""
    if candidate.saturated:
        return float("inf")
    stats = candidate.stats
    on_it = float(candidate.load.requests)
    if stats is None:
        return on_it / thresholds.requests if thresholds.requests else 0.0
    level = max(candidate.queue / thresholds.queue, stats.kv_usage / thresholds.kv)
    if thresholds.requests:
        # The endpoint's own count (all routers' requests) or ours, whichever is larger: ours is
        # exact between scrapes, the endpoint's includes other replicas' requests.
        on_it = max(on_it, stats.running + candidate.queue)
        level = max(level, on_it / thresholds.requests)
    return level


def pool_saturated(candidates: Sequence[Candidate], thresholds: SaturationThresholds) -> bool:
    return bool(candidates) and all(saturation(c, thresholds) >= 1 for c in candidates)


@dataclass(frozen=True, slots=True)
class Admit:
    outcome: Literal["admitted"] = "admitted"


@dataclass(frozen=True, slots=True)
class Shed:
    """Refuse with 429; `reason` is short and safe for a response header."""

    reason: str
    outcome: Literal["shed"] = "shed"


@dataclass(frozen=True, slots=True)
class LeastBad:
    """Route to `order` (best first, the rest as fallbacks), ignoring the strategy."""

    order: tuple[Candidate, ...]
    # Predicted time to first token per endpoint, seconds (for logs and explanations).
    predicted_seconds: Mapping[str, float] = field(default_factory=dict)
    reason: str = "pool saturated"
    outcome: Literal["least-bad"] = "least-bad"


Admission = Admit | Shed | LeastBad


def admit(
    request: SchedulingRequest,
    candidates: Sequence[Candidate],
    *,
    thresholds: SaturationThresholds | None = None,
    cost_model: CostModel | None = None,
    rng: random.Random | None = None,
) -> Admission:
    """Decide one request's admission. `outcome` on each result names it for metrics."""
    thresholds = thresholds or SaturationThresholds()
    if not pool_saturated(candidates, thresholds):
        return Admit()
    stale = sum(c.saturated for c in candidates)
    reason = f"pool saturated ({len(candidates)} endpoints, {stale} with stale metrics)"
    if request.priority < 0:
        return Shed(reason)
    model = cost_model or CostModel()
    predicted = {c.address: model.predict(request, c).total for c in candidates}
    tie = rng or random.Random()
    # Fresh metrics first: a stale endpoint's prediction rests on numbers we do not trust.
    order = sorted(candidates, key=lambda c: (c.saturated, predicted[c.address], tie.random()))
    return LeastBad(tuple(order), predicted, reason)
