"""A profile runs filters, then weighted scorers, then a picker, as the reference picker does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.scheduling.types import Candidate, Filter, Picker, Ranked, SchedulingRequest, Scorer


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float
    # The plugin's instance name from config (two queue scorers may differ in parameters);
    # empty: the scorer's type name.
    label: str = ""

    @property
    def key(self) -> str:
        return self.label or self.scorer.name


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
        addresses = [c.address for c in candidates]
        totals = [0.0] * len(candidates)
        breakdown: dict[str, dict[str, float]] = {}
        for weighted in self.scorers:
            scores = weighted.scorer.score(request, candidates)
            for i, score in enumerate(scores):
                totals[i] += weighted.weight * score
            # Kept for explanations; a dict per scorer costs far less than the scoring itself.
            breakdown[weighted.key] = dict(zip(addresses, scores, strict=True))
        order = tuple(self.picker.rank(candidates, totals))
        return Ranked(order, dict(zip(addresses, totals, strict=True)), breakdown)
