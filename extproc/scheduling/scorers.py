"""Scorers: each turns one signal into a score in [0, 1] per candidate (higher is better)."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.scheduling.types import Candidate, SchedulingRequest


def _spread(values: Sequence[float]) -> list[float]:
    """Lower value -> higher score, scaled so the best gets 1 and the worst 0."""
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    return [(high - v) / (high - low) for v in values]


class LeastRequestScorer:
    """Prefers endpoints with fewer requests in flight from this picker (streams included)."""

    name = "least-request-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        return _spread([c.load.requests for c in candidates])
