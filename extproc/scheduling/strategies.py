"""Strategy names, as users write them in config and in the `x-routing-strategy` header.

A name is a plain strategy (`round-robin`), a weighted blend of scorer-backed ones
(`prefix-cache:3,least-kv-cache:2,least-request:2`), or a profile from the picker's
`EndpointPickerConfig` (`profiles.py`). Each resolves to a `Profile`, built once and reused, so
a strategy that keeps state (round-robin's cursor) keeps it across requests. The built-in names
are the plugins' strategy names in the registry (`registry.py`): a picker's alone, a scorer's
also in blends.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import cast

from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.filters import PreferUnsaturated
from extproc.scheduling.framework import Needs, Profile, WeightedScorer
from extproc.scheduling.params import Params
from extproc.scheduling.pickers import MaxScorePicker
from extproc.scheduling.registry import PLUGINS, BuildContext, Registry
from extproc.scheduling.types import Picker, Scorer

CostModelSource = Callable[[], CostModel]

# Named alone, `prefix-cache` is the field's default profile (the reference picker's weights:
# prefix 3, queue 2, KV cache 2): a prefix scorer alone sends every request that shares even the
# chat template's first block to one pod. Inside a blend the name means the prefix scorer only.
_DEFAULT_BLENDS: Mapping[str, str] = MappingProxyType(
    {"prefix-cache": "prefix-cache:3,least-queue:2,least-kv-cache:2"}
)


# The weight LoRA affinity gets when a strategy does not name it: the reference picker's scale
# (active 1.0, free slot 0.8, waiting 0.6), beside queue and KV cache at 2 and prefix at 3.
_LORA_WEIGHT = 1.0
_LORA_AFFINITY = "lora-affinity"


def _named(kind: str, registry: Registry) -> list[str]:
    return [name for name, spec in registry.strategies.items() if spec.kind == kind]


def known_strategies(registry: Registry = PLUGINS) -> list[str]:
    """The built-in names: a picker's alone, then the scorers' (configured profiles come on
    top, see `Strategies.names`)."""
    return [*_named("picker", registry), *_named("scorer", registry)]


def parse_blend(name: str, registry: Registry = PLUGINS) -> list[tuple[str, float]]:
    """Split `a:3,b:2` into [(a, 3.0), (b, 2.0)]; raise ValueError naming what is wrong."""
    blendable = _named("scorer", registry)
    parts: list[tuple[str, float]] = []
    for item in name.split(","):
        scorer, sep, weight_text = item.strip().partition(":")
        if scorer not in blendable:
            if scorer in registry.strategies:
                raise ValueError(
                    f"'{scorer}' cannot be blended; blend only: {', '.join(blendable)}"
                )
            known = ", ".join(known_strategies(registry))
            raise ValueError(f"unknown strategy '{scorer}'; known: {known}")
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


def validate_strategy_name(
    name: str, *, configured: Collection[str] = (), registry: Registry = PLUGINS
) -> None:
    """Raise ValueError unless `name` is built in, a valid blend, or a configured profile."""
    if name not in _named("picker", registry) and name not in configured:
        parse_blend(name, registry)


# Names arrive in request headers: cap how many distinct blends are kept.
_MAX_CACHED = 256


class Strategies:
    """Builds and caches one Profile per strategy name seen (up to a bound).

    `profiles` are named profiles from the picker's EndpointPickerConfig; a configured name
    shadows a built-in one. `cost_model` is where the `cost` scorer reads the current model
    (`CostLearner.current`); without one it uses the priors. `registry`: the plugins whose
    strategies it knows.
    """

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        profiles: Mapping[str, Profile] | None = None,
        cost_model: CostModelSource | None = None,
        ttft_target_seconds: float = 0.5,
        registry: Registry = PLUGINS,
    ) -> None:
        self._rng = rng or random.Random()
        self._configured = dict(profiles or {})
        self._context = BuildContext(self._rng, cost_model or CostModel, ttft_target_seconds)
        self._registry = registry
        self._profiles: dict[tuple[str, bool], Profile] = {}

    def names(self) -> list[str]:
        builtin = known_strategies(self._registry)
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
        strategies = self._registry.strategies
        spec = strategies.get(name)
        if spec is not None and spec.kind == "picker":
            picker = cast(Picker, spec.build(Params(None, name), self._context))
            return Profile(name, filters, (), picker, spec.needs)
        blend = parse_blend(_DEFAULT_BLENDS.get(name, name), self._registry)
        if adapter and not any(strategies[s].needs.adapter for s, _ in blend):
            # An adapter's request goes where the adapter is in the running batch, else where a
            # slot is free, whatever the strategy: a cold adapter costs a load before any token.
            # (A plugin that needs the adapter, as the cost model, weighs the load itself.)
            blend.append((_LORA_AFFINITY, _LORA_WEIGHT))
        scorers = []
        needs = Needs()
        for strategy, weight in blend:
            spec = strategies[strategy]
            # Every parameter at its default: a strategy name carries none.
            scorer = cast(Scorer, spec.build(Params(None, strategy), self._context))
            scorers.append(WeightedScorer(scorer, weight))
            needs = needs | spec.needs
        return Profile(name, filters, tuple(scorers), MaxScorePicker(self._rng), needs)
