"""Every scheduling plugin, registered once: its `EndpointPickerConfig` type names, how its
parameters are read, the data it needs, and its built-in strategy name if it has one.

Everything else derives from `PLUGINS`: the types a config may name (`profiles.py`), the
strategies a header may name and blend (`strategies.py`), and what the pipeline computes for a
request (`needs`: the prompt's block hashes only for profiles whose plugins read them). A new
scorer is its class plus one `PluginSpec` in `PLUGINS`.

Type names are the llm-d router's (llm-d/llm-d-router, cmd/epp/runner/runner.go, where each is
registered). A type of theirs that works the same here is registered with its parameters, under
their name beside ours; one that does not is refused by name (`refused.py`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeAlias

from extproc.config import ConfigError
from extproc.scheduling.cost import CostScorer
from extproc.scheduling.cost_model import CostModel, CostParameters
from extproc.scheduling.filters import (
    DecodeFilter,
    LoraAffinityFilter,
    LowKvCacheFilter,
    LowQueueFilter,
    PreferUnsaturated,
    PrefillFilter,
)
from extproc.scheduling.framework import Needs, Profile
from extproc.scheduling.params import Params, show
from extproc.scheduling.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from extproc.scheduling.price import PriceScorer
from extproc.scheduling.scorers import (
    SESSION_HEADER,
    InFlightTokensScorer,
    KvCacheUtilizationScorer,
    LeastRequestScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsScorer,
    SessionAffinityScorer,
)
from extproc.scheduling.types import Filter, Picker, Scorer

# `handler`: the field's profile handlers and P/D deciders; `data`: its data producers and
# sources (tokens, prefix matches, in-flight load, scraped metrics). The pipeline and the
# `disaggregation` section do their work here whatever the profile, so both build nothing.
Kind = Literal["filter", "scorer", "picker", "handler", "data"]
Plugin: TypeAlias = Filter | Scorer | Picker | None


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What factories may use besides their parameters."""

    rng: random.Random
    # Where the cost model is read per request (`CostLearner.current`); `CostModel`: the priors.
    cost_model: Callable[[], CostModel] = CostModel
    # `price-scorer`'s default target (`scheduling.ttft_target_seconds` for strategies).
    ttft_target_seconds: float = 0.5


Factory: TypeAlias = Callable[[Params, BuildContext], Plugin]


@dataclass(frozen=True, slots=True)
class PluginSpec:
    kind: Kind
    # Its type names in an EndpointPickerConfig: ours first, then the field's aliases.
    types: tuple[str, ...]
    build: Factory
    needs: Needs = field(default_factory=Needs)
    # Its built-in strategy (`x-routing-strategy`); a scorer's may be blended with weights.
    strategy: str = ""


@dataclass(frozen=True, slots=True)
class Registry:
    """Plugin specs by type name and by strategy name; refuses a name registered twice."""

    specs: tuple[PluginSpec, ...]
    # Derived from `specs`, so left out of equality, hashing and repr.
    types: Mapping[str, PluginSpec] = field(init=False, compare=False, repr=False)
    strategies: Mapping[str, PluginSpec] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        types: dict[str, PluginSpec] = {}
        strategies: dict[str, PluginSpec] = {}
        for spec in self.specs:
            if spec.strategy and spec.kind not in ("scorer", "picker"):
                raise ValueError(f"{spec.types[0]}: only scorers and pickers name a strategy")
            for name in spec.types:
                if name in types:
                    raise ValueError(f"plugin type '{name}' is registered twice")
                types[name] = spec
            if spec.strategy:
                if spec.strategy in strategies:
                    raise ValueError(f"strategy '{spec.strategy}' is registered twice")
                strategies[spec.strategy] = spec
        object.__setattr__(self, "types", MappingProxyType(types))
        object.__setattr__(self, "strategies", MappingProxyType(strategies))

    def plus(self, *specs: PluginSpec) -> Registry:
        """This registry with `specs` added after its own (say, a test's plugin)."""
        return Registry((*self.specs, *specs))


def needs(profile: Profile, registry: Registry | None = None) -> Needs:
    """What `profile`'s plugins need the pipeline to compute for a request.

    Profiles built from the registry carry their needs; a profile built by hand gets those of
    its plugins the registry knows by type name, so it cannot silently go without."""
    known = (registry or PLUGINS).types
    plugins: list[Filter | Scorer | Picker] = [
        *profile.filters,
        *(w.scorer for w in profile.scorers),
        profile.picker,
    ]
    found = profile.needs
    for plugin in plugins:
        spec = known.get(plugin.name)
        if spec is not None:
            found = found | spec.needs
    return found


# --- factories: each reads its plugin's parameters -------------------------------------------


def _plain(factory: Callable[[], Plugin]) -> Factory:
    return lambda _params, _ctx: factory()


def _prefix_cache(params: Params, ctx: BuildContext) -> Plugin:
    # The field configures its prefix index on the scorer (older configs) or on a producer the
    # scorer names; ours is configured with the picker (prefix, kv_events settings) and fills
    # `Candidate.prefix_blocks`. The score is the share of the prompt matched, as theirs at
    # matchLengthWeight 0 (their default); blending in the match's length is not built.
    params.ignored(
        "hashBlockSize",
        "maxPrefixBlocksToMatch",
        "lruCapacityPerServer",
        "mode",
        "prefixMatchInfoProducerName",
        "matchLengthScaleTokens",
    )
    params.unsupported_unless("matchLengthWeight", 0, "prefix-cache-scorer")
    return PrefixCacheScorer()


def _precise_prefix_cache(params: Params, ctx: BuildContext) -> Plugin:
    # The same score from the index kept from vLLM's KV events (kv_events.enabled); its
    # tokenizer, indexer and event settings are prefix.* and kv_events.* here.
    params.ignored(
        "tokenProcessorConfig",
        "indexerConfig",
        "kvEventsConfig",
        "speculativeIndexing",
        "speculativeTTL",
    )
    return PrefixCacheScorer()


def _session_affinity(params: Params, ctx: BuildContext) -> Plugin:
    # Ours is the llm-d router's `session_id` strategy on the `x-session-id` header, kept
    # without a table (rendezvous hashing), so its eviction settings mean nothing here. Its
    # default strategy (the picked pod echoed in a response header) is not built.
    params.ignored("profileName", "encodedEndpointHeaderConfig")
    strategy = params.text("strategy", "session_id")
    if strategy != "session_id":
        raise ConfigError(
            f"{params.path}.strategy",
            f"session-affinity-scorer with strategy {strategy!r} is not implemented here "
            f"(sessions come from the {SESSION_HEADER} header: strategy session_id)",
        )
    session = Params(params.raw("sessionIdConfig"), f"{params.path}.sessionIdConfig")
    session.ignored("evictionTtlSeconds", "evictionSweepSeconds")
    sources = session.raw("sources")
    if sources is not None and sources != [{"header": SESSION_HEADER}]:
        raise ConfigError(
            f"{params.path}.sessionIdConfig.sources",
            f"only the {SESSION_HEADER} header is implemented here, got {show(sources)}",
        )
    session.check()
    return SessionAffinityScorer()


def _cost(params: Params, ctx: BuildContext) -> Plugin:
    d = CostParameters()
    parameters = CostParameters(
        chunk_tokens=int(params.number("chunkTokens", d.chunk_tokens, minimum=1, integer=True)),
        mean_prompt_tokens=params.number("meanPromptTokens", d.mean_prompt_tokens, minimum=1),
        mean_output_tokens=params.number("meanOutputTokens", d.mean_output_tokens, minimum=1),
        lora_load_seconds=params.number("loraLoadSeconds", d.lora_load_seconds),
        lora_slot_wait_seconds=params.number("loraSlotWaitSeconds", d.lora_slot_wait_seconds),
        hot_spot_absolute=params.number("hotSpotAbsolute", d.hot_spot_absolute),
        hot_spot_ratio=params.number("hotSpotRatio", d.hot_spot_ratio, minimum=1),
        work_weight=params.number("workWeight", d.work_weight),
        tie_tolerance=params.number("tieTolerance", d.tie_tolerance),
    )
    # No parameters given: the learned model's own, which config may change at run time.
    return CostScorer(ctx.cost_model, parameters if parameters != d else None)


def _price(params: Params, ctx: BuildContext) -> Plugin:
    target = params.number("ttftTargetSeconds", ctx.ttft_target_seconds, minimum=0.001)
    return PriceScorer(ctx.cost_model, target)


def _low_queue(params: Params, ctx: BuildContext) -> Plugin:
    return LowQueueFilter(params.number("threshold", 5.0))


def _low_kv(params: Params, ctx: BuildContext) -> Plugin:
    return LowKvCacheFilter(params.number("threshold", 0.8, maximum=1.0))


def _picker(factory: Callable[[random.Random], Picker]) -> Factory:
    def build(params: Params, ctx: BuildContext) -> Plugin:
        # The field's pickers return several endpoints; ours rank all of them and the picker's
        # `routing.fallbacks` says how many Envoy gets.
        params.ignored("maxNumOfEndpoints")
        return factory(ctx.rng)

    return build


def _pd_handler(params: Params, ctx: BuildContext) -> Plugin:
    params.ignored(
        "threshold",
        "hashBlockSize",
        "prefixPluginName",
        "decodeProfile",
        "prefillProfile",
        "prefixPluginType",
        "prefixMatchInfoProducerName",
    )
    params.unsupported_unless("primaryPort", 0, "pd-profile-handler")
    return None


def _disagg_handler(params: Params, ctx: BuildContext) -> Plugin:
    # Its profiles are the disaggregation section's prefill_strategy / decode_strategy, its
    # prefill decider that section's threshold_tokens.
    params.ignored("profiles", "deciders")
    return None


def _prefix_decider(params: Params, ctx: BuildContext) -> Plugin:
    # Disaggregate when the prompt's tokens the decode endpoint does not hold reach a threshold:
    # disaggregation.threshold_tokens (nonCachedTokens); a minimum prompt length is not built.
    params.ignored("nonCachedTokens", "prefixMatchInfoProducerName")
    params.unsupported_unless("promptTokens", 0, "prefix-based-pd-decider")
    return None


def _data(params: Params, ctx: BuildContext) -> Plugin:
    params.ignore_all()
    return None


_NOTHING = _plain(lambda: None)
_BLOCKS = Needs(block_hashes=True)
# The cost model prices the uncached prompt and adapter loads itself.
_COST = Needs(block_hashes=True, adapter=True, cost_model=True)

# Scorers come in the order `known_strategies` lists their strategies.
PLUGINS = Registry(
    (
        PluginSpec("filter", ("prefer-unsaturated-filter",), _plain(PreferUnsaturated)),
        PluginSpec(
            "filter", ("lora-affinity-filter",), _plain(LoraAffinityFilter), Needs(adapter=True)
        ),
        PluginSpec("filter", ("low-queue-filter",), _low_queue),
        PluginSpec("filter", ("low-kv-cache-filter",), _low_kv),
        # llm-d's prefill/decode filters: endpoints by role (`fleet.role_label`).
        PluginSpec("filter", ("prefill-filter",), _plain(PrefillFilter)),
        PluginSpec("filter", ("decode-filter",), _plain(DecodeFilter)),
        PluginSpec(
            "scorer",
            ("least-request-scorer",),
            _plain(LeastRequestScorer),
            strategy="least-request",
        ),
        PluginSpec("scorer", ("queue-scorer",), _plain(QueueScorer), strategy="least-queue"),
        # `kv-cache-scorer`: the older name of the same scorer in the field's configs.
        PluginSpec(
            "scorer",
            ("kv-cache-utilization-scorer", "kv-cache-scorer"),
            _plain(KvCacheUtilizationScorer),
            strategy="least-kv-cache",
        ),
        # `running-requests-size-scorer`: the llm-d router's name, (max - running) / (max - min).
        PluginSpec(
            "scorer",
            ("running-requests-scorer", "running-requests-size-scorer"),
            _plain(RunningRequestsScorer),
            strategy="least-running",
        ),
        PluginSpec(
            "scorer",
            ("in-flight-tokens-scorer",),
            _plain(InFlightTokensScorer),
            strategy="least-tokens",
        ),
        PluginSpec(
            "scorer", ("prefix-cache-scorer",), _prefix_cache, _BLOCKS, strategy="prefix-cache"
        ),
        PluginSpec("scorer", ("precise-prefix-cache-scorer",), _precise_prefix_cache, _BLOCKS),
        PluginSpec(
            "scorer",
            ("lora-affinity-scorer",),
            _plain(LoraAffinityScorer),
            Needs(adapter=True),
            strategy="lora-affinity",
        ),
        PluginSpec(
            "scorer",
            ("session-affinity-scorer",),
            _session_affinity,
            Needs(session=True),
            strategy="session-affinity",
        ),
        PluginSpec("scorer", ("cost-scorer",), _cost, _COST, strategy="cost"),
        PluginSpec("scorer", ("price-scorer",), _price, _COST, strategy="cheapest"),
        PluginSpec("picker", ("max-score-picker",), _picker(MaxScorePicker)),
        PluginSpec("picker", ("random-picker",), _picker(RandomPicker), strategy="random"),
        PluginSpec(
            "picker",
            ("round-robin-picker",),
            _picker(lambda _rng: RoundRobinPicker()),
            strategy="round-robin",
        ),
        # One profile per request is all we run; the field's configs list this handler.
        PluginSpec("handler", ("single-profile-handler",), _NOTHING),
        # llm-d's P/D handlers: here the `disaggregation` section does their work (its
        # threshold, and the prefiller header), naming the two profiles by strategy.
        PluginSpec("handler", ("pd-profile-handler",), _pd_handler),
        PluginSpec("handler", ("prefill-header-handler",), _NOTHING),
        # The llm-d router's current names for the same: the handler, its header handler (an
        # alias it keeps), and the deciders (always: disaggregation.threshold_tokens 0).
        PluginSpec("handler", ("disagg-profile-handler",), _disagg_handler),
        PluginSpec("handler", ("disagg-headers-handler",), _NOTHING),
        PluginSpec("handler", ("prefix-based-pd-decider",), _prefix_decider),
        PluginSpec("handler", ("always-disagg-pd-decider",), _NOTHING),
        # Its data plugins: the pipeline does their work for every request here (tokens from
        # prefix.tokenizers, prefix matches from the index prefix.* / kv_events.* configure,
        # in-flight load, the session header), and the collector scrapes vLLM's metrics. Their
        # parameters configure those, so they are not read.
        PluginSpec(
            "data",
            (
                "token-producer",
                "tokenizer",
                "approx-prefix-cache-producer",
                "precise-prefix-cache-producer",
                "inflight-load-producer",
                "session-id-producer",
                "metrics-data-source",
                "core-metrics-extractor",
                "endpoint-notification-source",
                "k8s-notification-source",
                "models-data-source",
                "models-data-extractor",
                "openai-parser",
                # Saturation: scheduling.saturation_queue / saturation_kv, the same defaults.
                "utilization-detector",
            ),
            _data,
        ),
    )
)
