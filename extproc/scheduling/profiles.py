"""Profiles from YAML, in the shape of the field's `EndpointPickerConfig`, so users carry theirs
over:

    apiVersion: inference.networking.x-k8s.io/v1alpha1   # any version; not checked
    kind: EndpointPickerConfig
    plugins:
    - type: queue-scorer
    - type: prefix-cache-scorer
      name: prefix                # optional; defaults to the type
      parameters: {...}           # optional; checked per type
    - type: max-score-picker
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: queue-scorer
        weight: 2                 # scorers only; default 1
      - pluginRef: prefix
        weight: 3
      - pluginRef: max-score-picker

Each scheduling profile becomes a `Profile`, usable by name as a strategy. Plugin instances are
shared between the profiles that reference them, as in the field. Every error names its key
(`plugins[2].parameters.threshold`) through `ConfigError`.

Plugin type names are the llm-d router's (llm-d/llm-d-router, cmd/epp/runner/runner.go, where
each is registered). A type it has that works the same here is accepted with its parameters; a
type of its that does not is refused by name (`NOT_IMPLEMENTED`), not as an unknown type, so a
carried-over config says what it is missing.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeAlias, cast

from extproc.config import ConfigError
from extproc.scheduling.cost import CostModel, CostParameters, CostScorer
from extproc.scheduling.filters import (
    DecodeFilter,
    LoraAffinityFilter,
    LowKvCacheFilter,
    LowQueueFilter,
    PreferUnsaturated,
    PrefillFilter,
)
from extproc.scheduling.framework import Profile, WeightedScorer
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

KIND = "EndpointPickerConfig"

# `data`: the field's data producers and sources (tokens, prefix matches, in-flight load, scraped
# metrics), which the pipeline runs here whatever the profile (`extproc.pipeline`).
Kind = Literal["filter", "scorer", "picker", "handler", "data"]
Plugin: TypeAlias = Filter | Scorer | Picker | None


@dataclass(frozen=True, slots=True)
class _Context:
    rng: random.Random
    cost_model: Callable[[], CostModel]


class _Params:
    """Reads one plugin's `parameters`, so a wrong key or value names itself."""

    def __init__(self, data: object, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_show(data)}")
        self._data: Mapping[object, object] = data
        self._path = path
        self._known: set[str] = set()

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float = math.inf,
        integer: bool = False,
    ) -> float:
        self._known.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        number = (
            float(value)
            if isinstance(value, int | float) and not isinstance(value, bool)
            else math.nan
        )
        # nan fails every comparison, so a non-number lands here too.
        if not minimum <= number <= maximum or (integer and not number.is_integer()):
            kind = "an integer" if integer else "a number"
            upper = f" and <= {maximum:g}" if maximum < math.inf else ""
            raise ConfigError(
                f"{self._path}.{key}", f"expected {kind} >= {minimum:g}{upper}, got {_show(value)}"
            )
        return number

    def ignored(self, *keys: str) -> None:
        """Keys the field's plugin takes that mean nothing here (documented per type)."""
        self._known.update(keys)

    @property
    def path(self) -> str:
        return self._path

    def raw(self, key: str) -> object:
        """`key`'s value as given (None when absent), for a nested section read by hand."""
        self._known.add(key)
        return self._data.get(key)

    def text(self, key: str, default: str) -> str:
        self._known.add(key)
        value = self._data.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._path}.{key}", f"expected a string, got {_show(value)}")
        return value

    def ignore_all(self) -> None:
        """Every key: a data plugin's parameters configure what our own settings configure."""
        self._known.update(str(k) for k in self._data)

    def unsupported_unless(self, key: str, default: object, plugin: str) -> None:
        """`key` may be given only at its default: other values mean a behaviour not built."""
        self._known.add(key)
        if key in self._data and self._data[key] != default:
            raise ConfigError(
                f"{self._path}.{key}",
                f"{plugin} with {key} other than {default!r} is not implemented here",
            )

    def check(self) -> None:
        unknown = sorted(str(k) for k in self._data if k not in self._known)
        if unknown:
            raise ConfigError(
                f"{self._path}.{unknown[0]}", _unknown_key_problem(unknown[0], self._known)
            )


@dataclass(frozen=True, slots=True)
class PluginType:
    kind: Kind
    build: Callable[[_Params, _Context], Plugin]


def _no_params(factory: Callable[[], Plugin]) -> Callable[[_Params, _Context], Plugin]:
    return lambda _params, _ctx: factory()


def _prefix_cache(params: _Params, ctx: _Context) -> Plugin:
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


def _session_affinity(params: _Params, ctx: _Context) -> Plugin:
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
    session = _Params(params.raw("sessionIdConfig"), f"{params.path}.sessionIdConfig")
    session.ignored("evictionTtlSeconds", "evictionSweepSeconds")
    sources = session.raw("sources")
    if sources is not None and sources != [{"header": SESSION_HEADER}]:
        raise ConfigError(
            f"{params.path}.sessionIdConfig.sources",
            f"only the {SESSION_HEADER} header is implemented here, got {_show(sources)}",
        )
    session.check()
    return SessionAffinityScorer()


def _precise_prefix_cache(params: _Params, ctx: _Context) -> Plugin:
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


def _cost(params: _Params, ctx: _Context) -> Plugin:
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
    return CostScorer(ctx.cost_model, parameters if parameters != d else None)


def _price(params: _Params, ctx: _Context) -> Plugin:
    return PriceScorer(ctx.cost_model, params.number("ttftTargetSeconds", 0.5, minimum=0.001))


def _low_queue(params: _Params, ctx: _Context) -> Plugin:
    return LowQueueFilter(params.number("threshold", 5.0))


def _low_kv(params: _Params, ctx: _Context) -> Plugin:
    return LowKvCacheFilter(params.number("threshold", 0.8, maximum=1.0))


def _pd_handler(params: _Params, ctx: _Context) -> Plugin:
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


def _disagg_handler(params: _Params, ctx: _Context) -> Plugin:
    # Its profiles are the disaggregation section's prefill_strategy / decode_strategy, its
    # prefill decider that section's threshold_tokens.
    params.ignored("profiles", "deciders")
    return None


def _prefix_decider(params: _Params, ctx: _Context) -> Plugin:
    # Disaggregate when the prompt's tokens the decode endpoint does not hold reach a threshold:
    # disaggregation.threshold_tokens (nonCachedTokens); a minimum prompt length is not built.
    params.ignored("nonCachedTokens", "prefixMatchInfoProducerName")
    params.unsupported_unless("promptTokens", 0, "prefix-based-pd-decider")
    return None


def _data(params: _Params, ctx: _Context) -> Plugin:
    params.ignore_all()
    return None


def _picker(factory: Callable[[random.Random], Picker]) -> Callable[[_Params, _Context], Plugin]:
    def build(params: _Params, ctx: _Context) -> Plugin:
        # The field's pickers return several endpoints; ours rank all of them and the picker's
        # `routing.fallbacks` says how many Envoy gets.
        params.ignored("maxNumOfEndpoints")
        return factory(ctx.rng)

    return build


# Every plugin type a config may name. Immutable: a registry, not state.
PLUGIN_TYPES: Mapping[str, PluginType] = MappingProxyType(
    {
        "prefer-unsaturated-filter": PluginType("filter", _no_params(PreferUnsaturated)),
        "lora-affinity-filter": PluginType("filter", _no_params(LoraAffinityFilter)),
        "low-queue-filter": PluginType("filter", _low_queue),
        "low-kv-cache-filter": PluginType("filter", _low_kv),
        "queue-scorer": PluginType("scorer", _no_params(QueueScorer)),
        "kv-cache-utilization-scorer": PluginType("scorer", _no_params(KvCacheUtilizationScorer)),
        # The older name of the same scorer in the field's configs.
        "kv-cache-scorer": PluginType("scorer", _no_params(KvCacheUtilizationScorer)),
        "prefix-cache-scorer": PluginType("scorer", _prefix_cache),
        "lora-affinity-scorer": PluginType("scorer", _no_params(LoraAffinityScorer)),
        "running-requests-scorer": PluginType("scorer", _no_params(RunningRequestsScorer)),
        # The llm-d router's name of the same scorer: (max - running) / (max - min).
        "running-requests-size-scorer": PluginType("scorer", _no_params(RunningRequestsScorer)),
        "precise-prefix-cache-scorer": PluginType("scorer", _precise_prefix_cache),
        "least-request-scorer": PluginType("scorer", _no_params(LeastRequestScorer)),
        "in-flight-tokens-scorer": PluginType("scorer", _no_params(InFlightTokensScorer)),
        "session-affinity-scorer": PluginType("scorer", _session_affinity),
        "cost-scorer": PluginType("scorer", _cost),
        "price-scorer": PluginType("scorer", _price),
        # llm-d's prefill/decode filters: endpoints by role (`fleet.role_label`).
        "prefill-filter": PluginType("filter", _no_params(PrefillFilter)),
        "decode-filter": PluginType("filter", _no_params(DecodeFilter)),
        "max-score-picker": PluginType("picker", _picker(MaxScorePicker)),
        "random-picker": PluginType("picker", _picker(RandomPicker)),
        "round-robin-picker": PluginType("picker", _picker(lambda _rng: RoundRobinPicker())),
        # One profile per request is all we run; the field's configs list this handler.
        "single-profile-handler": PluginType("handler", _no_params(lambda: None)),
        # llm-d's P/D handlers: here the `disaggregation` section does their work (its
        # threshold, and the prefiller header), naming the two profiles by strategy.
        "pd-profile-handler": PluginType("handler", _pd_handler),
        "prefill-header-handler": PluginType("handler", _no_params(lambda: None)),
        # The llm-d router's current names for the same: the handler, its header handler (an
        # alias it keeps), and the deciders (always: disaggregation.threshold_tokens 0).
        "disagg-profile-handler": PluginType("handler", _disagg_handler),
        "disagg-headers-handler": PluginType("handler", _no_params(lambda: None)),
        "prefix-based-pd-decider": PluginType("handler", _prefix_decider),
        "always-disagg-pd-decider": PluginType("handler", _no_params(lambda: None)),
        # Its data plugins: the pipeline does their work for every request here (tokens from
        # prefix.tokenizers, prefix matches from the index prefix.* / kv_events.* configure,
        # in-flight load, the session header), and the collector scrapes vLLM's metrics. Their
        # parameters configure those, so they are not read.
        **{
            name: PluginType("data", _data)
            for name in (
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
            )
        },
    }
)

# The llm-d router's plugin types that nothing here does the same way, with what comes closest.
# A config naming one is refused with this, not loaded with a plugin silently missing.
NOT_IMPLEMENTED: Mapping[str, str] = MappingProxyType(
    {
        "load-aware-scorer": "queue-scorer scores the waiting queue, scaled across the pool",
        "active-request-scorer": "least-request-scorer scores requests in flight from this "
        "picker, scaled across the pool",
        "token-load-scorer": "in-flight-tokens-scorer scores prompt tokens in flight",
        "no-hit-lru-scorer": "prefix-cache-scorer with kv_events.enabled",
        "session-affinity-filter": "session-affinity-scorer (x-session-id)",
        "by-label": "prefill-filter and decode-filter (fleet.role_label)",
        "by-label-selector": "prefill-filter and decode-filter (fleet.role_label)",
        "label-selector-filter": "prefill-filter and decode-filter (fleet.role_label)",
        "encode-filter": "",
        "weighted-random-picker": "random-picker or max-score-picker",
        "data-parallel-profile-handler": "one endpoint per data-parallel rank (its own port)",
        "header-profile-handler": "the x-routing-strategy header names a strategy or profile",
        "always-disagg-multimodal-decider": "",
        "context-length-aware": "cost-scorer",
        "endpoint-attribute-filter": "",
        "endpoint-attribute-scorer": "",
        "utilization-filter": "prefer-unsaturated-filter",
        "latency-scorer": "cost-scorer (predicted time to first token)",
        "predicted-latency-producer": "cost-scorer (predicted time to first token)",
        "latency-slo-admitter": "",
        "probabilistic-admitter": "",
        "prefix-cache-affinity-filter": "",
        "slo-headroom-tier-filter": "",
        "mm-embeddings-cache-scorer": "",
        "mm-embeddings-cache-producer": "",
        "header-label-affinity-scorer": "",
        "topology-affinity-filter": "",
        "topology-affinity-scorer": "",
        "burst-prefix-cache-producer": "",
        "p2p-source-producer": "",
        "request-attribute-reporter": "",
        "agent-identity": "tenancy identifies clients by API key",
        "disaggregatedset-rollout-screener": "",
        "concurrency-detector": "scheduling.saturation_requests",
        "global-strict-fairness-policy": "tenancy's fair queue",
        "round-robin-fairness-policy": "tenancy's fair queue",
        "program-aware-fairness": "tenancy's fair queue",
        "fcfs-ordering-policy": "tenancy's fair queue",
        "edf-ordering-policy": "tenancy's fair queue",
        "slo-deadline-ordering-policy": "tenancy's fair queue",
        "static-usage-limit-policy": "tenancy's limits",
        "priority-holdback-policy": "tenancy's headroom_requests",
        "soft-reflective-ceiling-policy": "",
        "sheddable-eviction-filter": "",
        "priority-then-time-eviction-order-policy": "",
        "file-discovery": "a static endpoints list",
        "dcgm-data-source": "",
        "dcgm-extractor": "",
        "topology-extractor": "",
        "anthropic-parser": "",
        "passthrough-parser": "",
        "vllmgrpc-parser": "",
        "vllmhttp-parser": "openai-parser",
        "sglanghttp-parser": "",
        "vertexai-parser": "",
    }
)

# Top-level keys of the field's config that configure things outside scheduling profiles;
# accepted so a config carries over, but not read (their counterparts are our own settings).
_IGNORED_TOP = frozenset(
    {"featureGates", "saturationDetector", "dataLayer", "flowControl", "parser", "requestHandler"}
)
_TOP = frozenset({"apiVersion", "kind", "plugins", "schedulingProfiles"}) | _IGNORED_TOP
# The llm-d router's multi-cluster variants (`multicluster-prefix-cache-scorer`, ...).
_MULTI = "multicluster-"


@dataclass(frozen=True, slots=True)
class _Instance:
    kind: Kind
    plugin: Plugin


def parse_endpoint_picker_config(
    data: object,
    *,
    rng: random.Random | None = None,
    cost_model: Callable[[], CostModel] | None = None,
) -> dict[str, Profile]:
    """Profiles by name from a parsed `EndpointPickerConfig` (YAML already loaded).

    Raises `ConfigError(key, problem)` with the key relative to the config's top. Every profile
    starts with `prefer-unsaturated-filter` (stale endpoints serve only when nothing fresher
    can) unless it lists it itself; without a picker it uses `max-score-picker`.
    """
    ctx = _Context(rng or random.Random(), cost_model or CostModel)
    top = _mapping(data, "")
    _check_keys(top, "", _TOP)
    kind = top.get("kind")
    if kind is not None and kind != KIND:
        raise ConfigError("kind", f"expected {KIND}, got {_show(kind)}")
    if "apiVersion" in top:
        _string(top["apiVersion"], "apiVersion")
    instances = _plugins(top, ctx)

    profiles_data = _list(top, "schedulingProfiles", "")
    profiles: dict[str, Profile] = {}
    for i, item in enumerate(profiles_data):
        path = f"schedulingProfiles[{i}]"
        spec = _mapping(item, path)
        _check_keys(spec, path, {"name", "plugins"})
        name = _string(_required(spec, "name", path), f"{path}.name")
        if name in profiles:
            raise ConfigError(f"{path}.name", f"profile '{name}' is defined twice")
        profiles[name] = _profile(name, spec, path, instances, ctx)
    return profiles


def _plugins(top: Mapping[str, object], ctx: _Context) -> dict[str, _Instance]:
    instances: dict[str, _Instance] = {}
    for i, item in enumerate(_list(top, "plugins", "")):
        path = f"plugins[{i}]"
        spec = _mapping(item, path)
        _check_keys(spec, path, {"type", "name", "parameters"})
        type_name = _string(_required(spec, "type", path), f"{path}.type")
        plugin_type = PLUGIN_TYPES.get(type_name)
        if plugin_type is None and (type_name in NOT_IMPLEMENTED or type_name.startswith(_MULTI)):
            closest = NOT_IMPLEMENTED.get(type_name, "")
            raise ConfigError(
                f"{path}.type",
                f"plugin type '{type_name}' (llm-d router) is not implemented here"
                + (f"; closest: {closest}" if closest else ""),
            )
        if plugin_type is None:
            raise ConfigError(
                f"{path}.type",
                f"unknown plugin type '{type_name}'{_did_you_mean(type_name, PLUGIN_TYPES)}",
            )
        name = _string(spec["name"], f"{path}.name") if "name" in spec else type_name
        if name in instances:
            raise ConfigError(f"{path}.name", f"plugin name '{name}' is used twice")
        params = _Params(spec.get("parameters"), f"{path}.parameters")
        plugin = plugin_type.build(params, ctx)
        params.check()
        instances[name] = _Instance(plugin_type.kind, plugin)
    return instances


def _profile(
    name: str,
    spec: Mapping[str, object],
    path: str,
    instances: Mapping[str, _Instance],
    ctx: _Context,
) -> Profile:
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    picker: Picker | None = None
    seen: set[str] = set()
    for j, item in enumerate(_list(spec, "plugins", path)):
        ref_path = f"{path}.plugins[{j}]"
        ref = _mapping(item, ref_path)
        _check_keys(ref, ref_path, {"pluginRef", "weight"})
        plugin_name = _string(_required(ref, "pluginRef", ref_path), f"{ref_path}.pluginRef")
        instance = instances.get(plugin_name)
        if instance is None:
            raise ConfigError(
                f"{ref_path}.pluginRef",
                f"no plugin named '{plugin_name}' in plugins"
                + _did_you_mean(plugin_name, instances),
            )
        if plugin_name in seen:
            raise ConfigError(f"{ref_path}.pluginRef", f"'{plugin_name}' is referenced twice")
        seen.add(plugin_name)
        if "weight" in ref and instance.kind != "scorer":
            raise ConfigError(
                f"{ref_path}.weight",
                f"only scorers take a weight; '{plugin_name}' is a {instance.kind}",
            )
        if instance.kind == "scorer":
            weight = _weight(ref.get("weight", 1), f"{ref_path}.weight")
            # The kind tag says which Protocol the plugin was built as.
            scorers.append(WeightedScorer(cast(Scorer, instance.plugin), weight, plugin_name))
        elif instance.kind == "filter":
            filters.append(cast(Filter, instance.plugin))
        elif instance.kind == "picker":
            if picker is not None:
                raise ConfigError(f"{ref_path}.pluginRef", "a profile takes one picker")
            picker = cast(Picker, instance.plugin)
    if not any(isinstance(f, PreferUnsaturated) for f in filters):
        filters.insert(0, PreferUnsaturated())
    return Profile(name, tuple(filters), tuple(scorers), picker or MaxScorePicker(ctx.rng))


# --- small readers, each raising ConfigError with the key ---------------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}"


def _unknown_key_problem(key: str, known: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (known: {', '.join(sorted(known)) or 'none'})"


def _mapping(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {_show(value)}")
    return value


def _check_keys(data: Mapping[str, object], path: str, known: set[str] | frozenset[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(key, _unknown_key_problem(unknown[0], known))


def _required(data: Mapping[str, object], key: str, path: str) -> object:
    if key not in data:
        raise ConfigError(f"{path}.{key}" if path else key, "required key is missing")
    return data[key]


def _list(data: Mapping[str, object], key: str, path: str) -> list[object]:
    full = f"{path}.{key}" if path else key
    value = _required(data, key, path)
    if not isinstance(value, list) or not value:
        raise ConfigError(full, f"expected a non-empty list, got {_show(value)}")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string, got {_show(value)}")
    return value


def _weight(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(path, f"expected a positive number, got {_show(value)}")
    return float(value)
