"""A profile runs filters, then weighted scorers, then a picker, as the reference picker does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.scheduling.types import Candidate, Filter, Picker, Ranked, SchedulingRequest, Scorer


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]
    picker: Picker

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Ranked:
        for f in self.filters:
            candidates = f.filter(request, candidates)
            if not candidates:
                return Ranked((), {})
        totals = [0.0] * len(candidates)
        for weighted in self.scorers:
            for i, score in enumerate(weighted.scorer.score(request, candidates)):
                totals[i] += weighted.weight * score
        order = tuple(self.picker.rank(candidates, totals))
        return Ranked(order, {c.address: totals[i] for i, c in enumerate(candidates)})
