"""The cost scorer: rank endpoints by the cost model's predicted time to first token.

Three pieces, kept apart so the request path stays pure:

- `CostLearner` (`extproc.scheduling.cost_learner`, mutable, state side): fed every new
  snapshot, it learns per endpoint how fast the engine computes tokens, how long a step takes
  and how often its prefix cache hits, from the deltas of vLLM's counters between scrapes.
- `CostModel` (`extproc.scheduling.cost_model`, frozen): the learner's current estimates plus
  the fixed parameters. Requests read it through a zero-argument callable (`learner.current`),
  never the learner itself.
- `CostScorer` (here): scores `fastest TTFT / this TTFT`, with a hot-spot guard that falls back
  to load when the pool is badly imbalanced (the model can be wrong; a pile-up must not last).

The equations are in docs/scheduling.md ("The cost model").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from extproc.scheduling.cost_learner import CostLearner
from extproc.scheduling.cost_model import CostModel, CostParameters, Prediction
from extproc.scheduling.scorers import spread
from extproc.scheduling.types import Candidate, SchedulingRequest

# `CostLearner`, `CostModel`, `CostParameters` and `Prediction` are re-exported for the modules
# being rewritten beside this split (issue 21: pipeline.py, strategies.py, profiles.py,
# price.py); new code imports them from cost_learner / cost_model.
__all__ = [
    "CostLearner",
    "CostModel",
    "CostParameters",
    "CostScorer",
    "Prediction",
    "cache_pressure",
    "hot_spot",
    "load_of",
]


def cache_pressure(candidate: Candidate) -> float:
    """How taken an endpoint's KV cache is: the mean of the share its running requests use
    (`kv_usage`) and the share holding any cached blocks at all (the prefix index's count,
    our picks the events have not confirmed yet included). The second says what traffic the
    endpoint already draws, the prefixes its groups will come back for; the first is all there
    is once every cache is full. The second is not capped at the whole cache: our recent picks
    can promise more blocks than it has, and an endpoint promised more is the fuller one
    (capped, every endpoint given a few new prompts in a row looked alike, and the stale
    `kv_usage` sent the next one to the same endpoint again)."""
    stats = candidate.stats
    if stats is None:
        return 0.0
    held = candidate.cached_blocks / stats.num_gpu_blocks if stats.num_gpu_blocks else 0.0
    return (stats.kv_usage + held) / 2


def load_of(candidate: Candidate) -> float:
    """Requests at the endpoint (waiting, sent since the scrape, running); without stats, our
    own in-flight count."""
    stats = candidate.stats
    if stats is None:
        return float(candidate.load.requests)
    return candidate.queue + stats.running


def hot_spot(candidates: Sequence[Candidate], parameters: CostParameters) -> bool:
    """The pool is imbalanced enough that the cost model must not be trusted alone."""
    loads = [load_of(c) for c in candidates]
    low, high = min(loads), max(loads)
    return high - low > parameters.hot_spot_absolute and high > parameters.hot_spot_ratio * low


class CostScorer:
    """Scores `lowest cost / this endpoint's cost` (`CostModel.cost`: predicted TTFT plus the
    weighted prefill work): the cheapest gets 1, one twice as dear 0.5. A ratio, not a spread,
    so 100 ms vs 101 ms stays a near tie in blends. Costs within `tie_tolerance` of the lowest
    are scored again, by free KV cache and cost (`score`), still above every other endpoint."""

    name = "cost-scorer"

    def __init__(
        self,
        model: Callable[[], CostModel] | None = None,
        parameters: CostParameters | None = None,
    ) -> None:
        self._model = model or CostModel
        # Config may set parameters on the scorer; they override the model's.
        self._parameters = parameters

    def current(self) -> CostModel:
        model = self._model()
        if self._parameters is not None and model.parameters != self._parameters:
            model = replace(model, parameters=self._parameters)
        return model

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        model = self.current()
        if hot_spot(candidates, model.parameters):
            return spread([load_of(c) for c in candidates])
        costs = [model.cost(request, c) for c in candidates]
        best = min(costs)
        # Every prediction holds at least one step (> 0); guard anyway against a zero prior.
        scores = [best / t if t > 0 else 1.0 for t in costs]
        tolerance = model.parameters.tie_tolerance
        tied = [t <= best * (1.0 + tolerance) for t in costs]
        if tolerance <= 0 or sum(tied) < 2:
            return scores
        # Near-ties go to the endpoint whose KV cache is least taken (`cache_pressure`). The
        # prompts that land on an endpoint bring their group's later requests with them (that
        # is where the prefix will be), and its cache says how much such traffic it already
        # draws: breaking ties by learned speed, or by a block of chat template every prompt
        # shares, piles every new prefix onto one endpoint, where they evict each other.
        # Pressure counts from the least to the most taken tied endpoint (0 to 1), so the
        # least taken wins the tie however full every cache already is: measured against the
        # most taken alone, caches half full and a little more or less all looked alike, and a
        # cost a percent lower put a fifth group on an endpoint whose groups then outgrew it.
        # Inside the tie, pressure and the cost's own ranking count half each; tied scores stay
        # above every untied one.
        pressures = [
            cache_pressure(c) if tie else 0.0 for c, tie in zip(candidates, tied, strict=True)
        ]
        least = min(p for p, tie in zip(pressures, tied, strict=True) if tie)
        span = max(pressures) - least
        floor = 1.0 / (1.0 + tolerance)
        width = 1.0 - floor
        return [
            1.0 - width * (((p - least) / span if span > 0 else 0.0) + (1.0 - score) / width) / 2
            if tie
            else score
            for p, tie, score in zip(pressures, tied, scores, strict=True)
        ]
