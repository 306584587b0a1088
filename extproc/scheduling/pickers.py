"""Pickers: order the scored candidates; the first is the pick, the rest are Envoy's fallbacks."""

from __future__ import annotations

import random
from collections.abc import Sequence

from extproc.scheduling.types import Candidate


class MaxScorePicker:
    """Highest total score first; ties broken at random so equal endpoints share the load."""

    name = "max-score-picker"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def rank(self, candidates: Sequence[Candidate], scores: Sequence[float]) -> Sequence[Candidate]:
        keyed = [(-score, self._rng.random(), i) for i, score in enumerate(scores)]
        keyed.sort()
        return [candidates[i] for _, _, i in keyed]


class RandomPicker:
    name = "random-picker"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def rank(self, candidates: Sequence[Candidate], scores: Sequence[float]) -> Sequence[Candidate]:
        return self._rng.sample(list(candidates), len(candidates))


class RoundRobinPicker:
    """Takes candidates in turn. The one stateful picker: its cursor is the strategy itself."""

    name = "round-robin-picker"

    def __init__(self) -> None:
        self._cursor = 0

    def rank(self, candidates: Sequence[Candidate], scores: Sequence[float]) -> Sequence[Candidate]:
        start = self._cursor % len(candidates)
        self._cursor += 1
        return [*candidates[start:], *candidates[:start]]
