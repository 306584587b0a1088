"""Strategy names, as users write them in config and in the `x-routing-strategy` header.

A name is either a plain strategy (`round-robin`) or a weighted blend of scorer-backed ones
(`least-request:2,prefix-cache:3`). Each resolves to a `Profile`, built once and reused, so a
strategy that keeps state (round-robin's cursor) keeps it across requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from extproc.scheduling.filters import PreferUnsaturated
from extproc.scheduling.framework import Profile, WeightedScorer
from extproc.scheduling.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from extproc.scheduling.scorers import LeastRequestScorer
from extproc.scheduling.types import Scorer

# Strategies that are a single scorer, and so can be blended with weights.
_SCORERS: dict[str, Callable[[], Scorer]] = {
    "least-request": LeastRequestScorer,
}
_PLAIN = ("random", "round-robin")


def known_strategies() -> list[str]:
    return [*_PLAIN, *_SCORERS]


def parse_blend(name: str) -> list[tuple[str, float]]:
    """Split `a:3,b:2` into [(a, 3.0), (b, 2.0)]; raise ValueError naming what is wrong."""
    parts = []
    for item in name.split(","):
        scorer, sep, weight_text = item.strip().partition(":")
        if scorer not in _SCORERS:
            blendable = ", ".join(_SCORERS)
            if scorer in _PLAIN:
                raise ValueError(f"'{scorer}' cannot be blended; blend only: {blendable}")
            raise ValueError(f"unknown strategy '{scorer}'; known: {', '.join(known_strategies())}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(
                f"weight of '{scorer}' must be a number, got '{weight_text}'"
            ) from None
        if weight <= 0:
            raise ValueError(f"weight of '{scorer}' must be positive, got {weight_text}")
        parts.append((scorer, weight))
    return parts


def validate_strategy_name(name: str) -> None:
    if name not in _PLAIN:
        parse_blend(name)


# Names arrive in request headers: cap how many distinct blends are kept.
_MAX_CACHED = 256


class Strategies:
    """Builds and caches one Profile per strategy name seen (up to a bound)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._profiles: dict[str, Profile] = {}

    def get(self, name: str) -> Profile:
        """The profile for `name`; raises ValueError for an unknown or malformed name."""
        profile = self._profiles.get(name)
        if profile is None:
            profile = self._build(name)
            if len(self._profiles) < _MAX_CACHED:
                self._profiles[name] = profile
        return profile

    def _build(self, name: str) -> Profile:
        filters = (PreferUnsaturated(),)
        if name == "random":
            return Profile(name, filters, (), RandomPicker(self._rng))
        if name == "round-robin":
            return Profile(name, filters, (), RoundRobinPicker())
        scorers = tuple(WeightedScorer(_SCORERS[s](), w) for s, w in parse_blend(name))
        return Profile(name, filters, scorers, MaxScorePicker(self._rng))
