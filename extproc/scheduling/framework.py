"""A profile runs filters, then weighted scorers, then a picker, as the reference picker does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.scheduling.types import Candidate, Filter, Picker, Ranked, SchedulingRequest, Scorer


@dataclass(frozen=True, slots=True)
class Needs:
    """What a plugin reads beyond the endpoints' snapshot, declared where it is registered
    (`registry.py`), so the pipeline computes a request's costly inputs only for profiles whose
    plugins read them."""

    # The prompt tokenized into vLLM's block hashes, and each endpoint's prefix match.
    block_hashes: bool = False
    # The request's LoRA adapter: such a plugin weighs adapter loads itself, so a built-in
    # strategy adds no `lora-affinity` scorer beside it.
    adapter: bool = False
    # The request's session (`x-session-id`).
    session: bool = False
    # The learned cost model (`CostLearner.current`).
    cost_model: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            block_hashes=self.block_hashes or other.block_hashes,
            adapter=self.adapter or other.adapter,
            session=self.session or other.session,
            cost_model=self.cost_model or other.cost_model,
        )


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
    # Its plugins' needs, from their registrations (`registry.needs` reads it); a profile built
    # by hand, outside the registry, may leave it empty.
    needs: Needs = Needs()

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
