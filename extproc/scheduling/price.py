"""The `cheapest` strategy: the cheapest endpoint that still meets a latency target.

On a fleet of mixed GPUs the fastest endpoint is rarely the cheapest per token. This scorer
prices a request at each endpoint as what it adds to that GPU's bill, billed by busy time (what
an autoscaled or shared fleet pays: an idle GPU is scaled away or lent out):

    price = cost per second x (our prefill there + our output tokens x step / (batch + 1))

The prefill (uncached tokens at the endpoint's learned speed, `CostModel.work`) is ours alone;
each decode step is shared by the running batch, so joining a busy endpoint costs a share of
its steps, and an idle one costs every step. Endpoints whose predicted time to first token
(`CostModel.predict`) is within `ttft_target_seconds` qualify, and the cheapest of them wins;
when none qualifies (the pool is loaded), the fastest wins: work spills over to faster GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from extproc.scheduling.cost import CostModel, Prediction
from extproc.scheduling.types import Candidate, SchedulingRequest

# Score bands: qualifying endpoints score in (QUALIFIES, 1], ranked mostly by price and, among
# equal prices (none set), by speed; the rest score below QUALIFIES by speed alone.
QUALIFIES = 0.5
_PRICE_SHARE = 0.8


def request_price(
    model: CostModel,
    request: SchedulingRequest,
    candidate: Candidate,
    prediction: Prediction | None = None,
) -> float:
    """What the request adds to the endpoint's bill (its cost per hour's unit). `prediction`:
    the model's for this candidate, when the caller has it already."""
    per_second = candidate.endpoint.cost_per_hour / 3600.0
    if per_second <= 0:
        return 0.0
    prediction = prediction or model.predict(request, candidate)
    prefill = prediction.prefill_seconds + prediction.interference_seconds  # CostModel.work
    stats = candidate.stats
    batch = (stats.running if stats is not None else candidate.load.requests) + candidate.queue
    decode = model.output_tokens(request) * model.estimate(candidate.address).step_seconds
    return per_second * (prefill + decode / (batch + 1.0))


class PriceScorer:
    """Cheapest within the TTFT target, else fastest (see the module's docstring)."""

    name = "price-scorer"

    def __init__(self, model: Callable[[], CostModel], ttft_target_seconds: float) -> None:
        self._model = model
        self._target = ttft_target_seconds

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        model = self._model()
        predictions = [model.predict(request, c) for c in candidates]
        ttfts = [p.total for p in predictions]
        fastest = min(ttfts)
        speed = [fastest / t if t > 0 else 1.0 for t in ttfts]
        qualifying = [t <= self._target for t in ttfts]
        if not any(qualifying):
            return [QUALIFIES * s for s in speed]
        prices = [
            request_price(model, request, c, p)
            for c, p in zip(candidates, predictions, strict=True)
        ]
        cheapest = min(p for p, ok in zip(prices, qualifying, strict=True) if ok)
        width = 1.0 - QUALIFIES
        return [
            QUALIFIES
            + width * (_PRICE_SHARE * (cheapest / p if p > 0 else 1.0) + (1 - _PRICE_SHARE) * s)
            if ok
            else QUALIFIES * s
            for p, s, ok in zip(prices, speed, qualifying, strict=True)
        ]
