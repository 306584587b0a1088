"""Strategy names, as users write them in config and in the `x-routing-strategy` header.

A name is a plain strategy (`round-robin`), a weighted blend of scorer-backed ones
(`prefix-cache:3,least-kv-cache:2,least-request:2`), or a profile from the picker's
`EndpointPickerConfig` (`profiles.py`). Each resolves to a `Profile`, built once and reused, so
a strategy that keeps state (round-robin's cursor) keeps it across requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from extproc.scheduling.cost import CostModel, CostScorer
from extproc.scheduling.filters import PreferUnsaturated
from extproc.scheduling.framework import Profile, WeightedScorer
from extproc.scheduling.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from extproc.scheduling.price import PriceScorer
from extproc.scheduling.scorers import (
    InFlightTokensScorer,
    KvCacheUtilizationScorer,
    LeastRequestScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsScorer,
    SessionAffinityScorer,
)
from extproc.scheduling.types import Scorer

CostModelSource = Callable[[], CostModel]


@dataclass(frozen=True, slots=True)
class _Inputs:
    """What scorer factories may read: the cost model's source, the `cheapest` target."""

    cost_model: CostModelSource
    ttft_target_seconds: float


# Strategies that are a single scorer, and so can be blended with weights.
_SCORERS: Mapping[str, Callable[[_Inputs], Scorer]] = MappingProxyType(
    {
        "least-request": lambda _: LeastRequestScorer(),
        "least-queue": lambda _: QueueScorer(),
        "least-kv-cache": lambda _: KvCacheUtilizationScorer(),
        "least-running": lambda _: RunningRequestsScorer(),
        "least-tokens": lambda _: InFlightTokensScorer(),
        "prefix-cache": lambda _: PrefixCacheScorer(),
        "lora-affinity": lambda _: LoraAffinityScorer(),
        "session-affinity": lambda _: SessionAffinityScorer(),
        "cost": lambda inputs: CostScorer(inputs.cost_model),
        "cheapest": lambda inputs: PriceScorer(inputs.cost_model, inputs.ttft_target_seconds),
    }
)
_PLAIN = ("random", "round-robin")
# Named alone, `prefix-cache` is the field's default profile (the reference picker's weights:
# prefix 3, queue 2, KV cache 2): a prefix scorer alone sends every request that shares even the
# chat template's first block to one pod. Inside a blend the name means the prefix scorer only.
_DEFAULT_BLENDS: Mapping[str, str] = MappingProxyType(
    {"prefix-cache": "prefix-cache:3,least-queue:2,least-kv-cache:2"}
)


# The weight LoRA affinity gets when a strategy does not name it: the reference picker's scale
# (active 1.0, free slot 0.8, waiting 0.6), beside queue and KV cache at 2 and prefix at 3.
_LORA_WEIGHT = 1.0


def known_strategies() -> list[str]:
    """The built-in names (configured profiles come on top, see `Strategies.names`)."""
    return [*_PLAIN, *_SCORERS]


def parse_blend(name: str) -> list[tuple[str, float]]:
    """Split `a:3,b:2` into [(a, 3.0), (b, 2.0)]; raise ValueError naming what is wrong."""
    parts: list[tuple[str, float]] = []
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
        # `not weight > 0` also refuses nan; inf would swamp every other term.
        if not 0 < weight < float("inf"):
            raise ValueError(f"weight of '{scorer}' must be positive, got {weight_text}")
        if any(scorer == seen for seen, _ in parts):
            raise ValueError(f"'{scorer}' is listed twice")
        parts.append((scorer, weight))
    return parts


def validate_strategy_name(name: str, *, configured: Collection[str] = ()) -> None:
    """Raise ValueError unless `name` is built in, a valid blend, or a configured profile."""
    if name not in _PLAIN and name not in configured:
        parse_blend(name)


# Names arrive in request headers: cap how many distinct blends are kept.
_MAX_CACHED = 256


class Strategies:
    """Builds and caches one Profile per strategy name seen (up to a bound).

    `profiles` are named profiles from the picker's EndpointPickerConfig; a configured name
    shadows a built-in one. `cost_model` is where the `cost` scorer reads the current model
    (`CostLearner.current`); without one it uses the priors.
    """

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        profiles: Mapping[str, Profile] | None = None,
        cost_model: CostModelSource | None = None,
        ttft_target_seconds: float = 0.5,
    ) -> None:
        self._rng = rng or random.Random()
        self._configured = dict(profiles or {})
        self._inputs = _Inputs(cost_model or CostModel, ttft_target_seconds)
        self._profiles: dict[tuple[str, bool], Profile] = {}

    def names(self) -> list[str]:
        builtin = known_strategies()
        return [*builtin, *(n for n in self._configured if n not in builtin)]

    def get(self, name: str, *, adapter: bool = False) -> Profile:
        """The profile for `name`; raises ValueError for an unknown or malformed name.

        With `adapter` (the request names a LoRA adapter), a built-in scorer-backed strategy
        also prefers endpoints where the adapter is active; a configured profile is used as
        written."""
        profile = self._configured.get(name) or self._profiles.get((name, adapter))
        if profile is None:
            profile = self._build(name, adapter)
            if len(self._profiles) < _MAX_CACHED:
                self._profiles[(name, adapter)] = profile
        return profile

    def _build(self, name: str, adapter: bool) -> Profile:
        filters = (PreferUnsaturated(),)
        if name == "random":
            return Profile(name, filters, (), RandomPicker(self._rng))
        if name == "round-robin":
            return Profile(name, filters, (), RoundRobinPicker())
        blend = parse_blend(_DEFAULT_BLENDS.get(name, name))
        if adapter and all(s not in ("lora-affinity", "cost", "cheapest") for s, _ in blend):
            # An adapter's request goes where the adapter is in the running batch, else where a
            # slot is free, whatever the strategy: a cold adapter costs a load before any token.
            # (The cost model prices adapter loads itself.)
            blend.append(("lora-affinity", _LORA_WEIGHT))
        scorers = tuple(WeightedScorer(_SCORERS[s](self._inputs), w) for s, w in blend)
        return Profile(name, filters, scorers, MaxScorePicker(self._rng))
