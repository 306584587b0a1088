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

The plugin types, their parameters and what each needs come from the registry (`registry.py`).
Type names are the llm-d router's: a type of its that works the same here is accepted with its
parameters; one that does not is refused by name (`refused.py`), not as an unknown type, so a
carried-over config says what it is missing.
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from extproc.config import ConfigError
from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.filters import PreferUnsaturated
from extproc.scheduling.framework import Needs, Profile, WeightedScorer
from extproc.scheduling.params import Params, show, unknown_key_problem
from extproc.scheduling.pickers import MaxScorePicker
from extproc.scheduling.refused import refusal
from extproc.scheduling.registry import PLUGINS, BuildContext, Kind, Plugin, Registry
from extproc.scheduling.types import Filter, Picker, Scorer

KIND = "EndpointPickerConfig"

# Top-level keys of the field's config that configure things outside scheduling profiles;
# accepted so a config carries over, but not read (their counterparts are our own settings).
_IGNORED_TOP = frozenset(
    {"featureGates", "saturationDetector", "dataLayer", "flowControl", "parser", "requestHandler"}
)
_TOP = frozenset({"apiVersion", "kind", "plugins", "schedulingProfiles"}) | _IGNORED_TOP


@dataclass(frozen=True, slots=True)
class _Instance:
    kind: Kind
    plugin: Plugin
    needs: Needs


def parse_endpoint_picker_config(
    data: object,
    *,
    rng: random.Random | None = None,
    cost_model: Callable[[], CostModel] | None = None,
    registry: Registry = PLUGINS,
) -> dict[str, Profile]:
    """Profiles by name from a parsed `EndpointPickerConfig` (YAML already loaded).

    Raises `ConfigError(key, problem)` with the key relative to the config's top. Every profile
    starts with `prefer-unsaturated-filter` (stale endpoints serve only when nothing fresher
    can) unless it lists it itself; without a picker it uses `max-score-picker`.
    """
    ctx = BuildContext(rng or random.Random(), cost_model or CostModel)
    top = _mapping(data, "")
    _check_keys(top, "", _TOP)
    kind = top.get("kind")
    if kind is not None and kind != KIND:
        raise ConfigError("kind", f"expected {KIND}, got {show(kind)}")
    if "apiVersion" in top:
        _string(top["apiVersion"], "apiVersion")
    instances = _plugins(top, ctx, registry)

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


def _plugins(
    top: Mapping[str, object], ctx: BuildContext, registry: Registry
) -> dict[str, _Instance]:
    instances: dict[str, _Instance] = {}
    for i, item in enumerate(_list(top, "plugins", "")):
        path = f"plugins[{i}]"
        spec_data = _mapping(item, path)
        _check_keys(spec_data, path, {"type", "name", "parameters"})
        type_name = _string(_required(spec_data, "type", path), f"{path}.type")
        spec = registry.types.get(type_name)
        closest = refusal(type_name) if spec is None else None
        if closest is not None:
            raise ConfigError(
                f"{path}.type",
                f"plugin type '{type_name}' (llm-d router) is not implemented here"
                + (f"; closest: {closest}" if closest else ""),
            )
        if spec is None:
            raise ConfigError(
                f"{path}.type",
                f"unknown plugin type '{type_name}'{_did_you_mean(type_name, registry.types)}",
            )
        name = _string(spec_data["name"], f"{path}.name") if "name" in spec_data else type_name
        if name in instances:
            raise ConfigError(f"{path}.name", f"plugin name '{name}' is used twice")
        params = Params(spec_data.get("parameters"), f"{path}.parameters")
        plugin = spec.build(params, ctx)
        params.check()
        instances[name] = _Instance(spec.kind, plugin, spec.needs)
    return instances


def _profile(
    name: str,
    spec: Mapping[str, object],
    path: str,
    instances: Mapping[str, _Instance],
    ctx: BuildContext,
) -> Profile:
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    picker: Picker | None = None
    needs = Needs()
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
        needs = needs | instance.needs
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
    picker = picker or MaxScorePicker(ctx.rng)
    return Profile(name, tuple(filters), tuple(scorers), picker, needs)


# --- small readers, each raising ConfigError with the key ---------------------------------


def _did_you_mean(name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}"


def _mapping(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {show(value)}")
    return value


def _check_keys(data: Mapping[str, object], path: str, known: set[str] | frozenset[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(key, unknown_key_problem(unknown[0], known))


def _required(data: Mapping[str, object], key: str, path: str) -> object:
    if key not in data:
        raise ConfigError(f"{path}.{key}" if path else key, "required key is missing")
    return data[key]


def _list(data: Mapping[str, object], key: str, path: str) -> list[object]:
    full = f"{path}.{key}" if path else key
    value = _required(data, key, path)
    if not isinstance(value, list) or not value:
        raise ConfigError(full, f"expected a non-empty list, got {show(value)}")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string, got {show(value)}")
    return value


def _weight(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(path, f"expected a positive number, got {show(value)}")
    return float(value)
