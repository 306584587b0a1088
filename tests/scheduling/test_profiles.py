"""EndpointPickerConfig parsing: good configs become profiles, every bad one names its key."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml

from extproc.config import ConfigError
from extproc.scheduling.filters import LowQueueFilter, PreferUnsaturated
from extproc.scheduling.pickers import MaxScorePicker, RoundRobinPicker
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.scheduling.registry import PLUGINS
from extproc.scheduling.scorers import PrefixCacheScorer, QueueScorer
from extproc.scheduling.strategies import Strategies, validate_strategy_name
from extproc.scheduling.types import SchedulingRequest
from tests.scheduling.build import addr, cand

# The field's own sample (GAIE), unchanged.
FIELD_SAMPLE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 64
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 1
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""


def test_field_sample_carries_over() -> None:
    profiles = parse_endpoint_picker_config(yaml.safe_load(FIELD_SAMPLE))
    default = profiles["default"]
    assert [(w.key, w.weight) for w in default.scorers] == [
        ("queue-scorer", 2.0),
        ("kv-cache-utilization-scorer", 2.0),
        ("prefix-cache-scorer", 3.0),
    ]
    assert isinstance(default.filters[0], PreferUnsaturated)
    assert isinstance(default.picker, MaxScorePicker)
    request = SchedulingRequest(model="m", block_hashes=(1, 2, 3, 4))
    ranked = default.schedule(request, [cand(0, waiting=1), cand(1, prefix=4, waiting=1)])
    assert ranked.order[0].address == addr(1)
    assert ranked.breakdown["prefix-cache-scorer"] == {addr(0): 0.0, addr(1): 1.0}


def test_named_instances_several_profiles_and_shared_plugins() -> None:
    config = {
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "low-queue-filter", "name": "short", "parameters": {"threshold": 2}},
            {"type": "queue-scorer", "name": "q"},
            {"type": "cost-scorer", "parameters": {"chunkTokens": 2048, "hotSpotRatio": 2}},
            {"type": "round-robin-picker", "name": "rr"},
        ],
        "schedulingProfiles": [
            {"name": "fast", "plugins": [{"pluginRef": "cost-scorer"}]},
            {
                "name": "rr-short",
                "plugins": [
                    {"pluginRef": "short"},
                    {"pluginRef": "rr"},
                    {"pluginRef": "q", "weight": 0.5},
                ],
            },
        ],
    }
    profiles = parse_endpoint_picker_config(config, rng=random.Random(1))
    assert set(profiles) == {"fast", "rr-short"}
    fast = profiles["fast"]
    assert fast.scorers[0].weight == 1.0 and isinstance(fast.picker, MaxScorePicker)
    rr = profiles["rr-short"]
    assert isinstance(rr.filters[1], LowQueueFilter) and rr.filters[1].threshold == 2
    assert isinstance(rr.picker, RoundRobinPicker)
    assert isinstance(rr.scorers[0].scorer, QueueScorer) and rr.scorers[0].key == "q"

    strategies = Strategies(profiles=profiles)
    assert strategies.get("fast") is fast
    assert "rr-short" in strategies.names()
    validate_strategy_name("rr-short", configured=profiles)
    with pytest.raises(ValueError, match="unknown strategy"):
        validate_strategy_name("rr-short")


def test_configured_names_shadow_built_ins() -> None:
    config = {
        "plugins": [{"type": "prefix-cache-scorer"}],
        "schedulingProfiles": [{"name": "cost", "plugins": [{"pluginRef": "prefix-cache-scorer"}]}],
    }
    profiles = parse_endpoint_picker_config(config)
    profile = Strategies(profiles=profiles).get("cost")
    assert isinstance(profile.scorers[0].scorer, PrefixCacheScorer)


def _base() -> dict[str, Any]:
    return {
        "kind": "EndpointPickerConfig",
        "plugins": [{"type": "queue-scorer"}, {"type": "max-score-picker"}],
        "schedulingProfiles": [
            {"name": "p", "plugins": [{"pluginRef": "queue-scorer", "weight": 2}]}
        ],
    }


def _with(path: str, value: Any) -> dict[str, Any]:
    """The base config with one key replaced (`a.0.b`), or deleted when value is DELETE."""
    data = _base()
    *parents, leaf = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(leaf) if isinstance(node, list) else leaf
    if value is DELETE:
        del node[key]
    elif isinstance(node, list) and key == len(node):
        node.append(value)
    else:
        node[key] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        pytest.param([], "", "expected a mapping", id="not-a-mapping"),
        pytest.param(
            _with("kind", "InferencePool"), "kind", "expected EndpointPickerConfig", id="kind"
        ),
        pytest.param(_with("apiVersion", 3), "apiVersion", "non-empty string", id="api-version"),
        pytest.param(_with("plugin", []), "plugin", "did you mean 'plugins'", id="unknown-top-key"),
        pytest.param(
            _with("plugins", DELETE), "plugins", "required key is missing", id="no-plugins"
        ),
        pytest.param(_with("plugins", []), "plugins", "non-empty list", id="empty-plugins"),
        pytest.param(
            _with("plugins.0", "queue"), "plugins[0]", "expected a mapping", id="plugin-not-mapping"
        ),
        pytest.param(_with("plugins.0.type", DELETE), "plugins[0].type", "required", id="no-type"),
        pytest.param(
            _with("plugins.0.type", 7), "plugins[0].type", "non-empty string", id="type-not-string"
        ),
        pytest.param(
            _with("plugins.0.type", "queue-scorr"),
            "plugins[0].type",
            "unknown plugin type 'queue-scorr' (did you mean 'queue-scorer'?)",
            id="unknown-type",
        ),
        pytest.param(
            _with("plugins.0.nmae", "x"),
            "plugins[0].nmae",
            "did you mean 'name'",
            id="unknown-plugin-key",
        ),
        pytest.param(
            _with("plugins.1", {"type": "queue-scorer"}),
            "plugins[1].name",
            "used twice",
            id="duplicate-plugin-name",
        ),
        pytest.param(
            _with("plugins.0.parameters", [1]),
            "plugins[0].parameters",
            "expected a mapping",
            id="params-not-mapping",
        ),
        pytest.param(
            _with("plugins.0.parameters", {"threshold": 3}),
            "plugins[0].parameters.threshold",
            "unknown key (known: none)",
            id="param-on-parameterless",
        ),
        pytest.param(
            _with("plugins.0", {"type": "low-queue-filter", "parameters": {"threshold": -1}}),
            "plugins[0].parameters.threshold",
            "expected a number >= 0",
            id="param-negative",
        ),
        pytest.param(
            _with("plugins.0", {"type": "low-kv-cache-filter", "parameters": {"threshold": 1.5}}),
            "plugins[0].parameters.threshold",
            "<= 1",
            id="param-over-max",
        ),
        pytest.param(
            _with("plugins.0", {"type": "cost-scorer", "parameters": {"chunkTokens": 1.5}}),
            "plugins[0].parameters.chunkTokens",
            "expected an integer",
            id="param-not-integer",
        ),
        pytest.param(
            _with("plugins.0", {"type": "cost-scorer", "parameters": {"hotSpotRatio": True}}),
            "plugins[0].parameters.hotSpotRatio",
            "expected a number",
            id="param-bool",
        ),
        pytest.param(
            _with("plugins.0", {"type": "cost-scorer", "parameters": {"chunkTokns": 4}}),
            "plugins[0].parameters.chunkTokns",
            "did you mean 'chunkTokens'",
            id="param-typo",
        ),
        pytest.param(
            _with("schedulingProfiles", DELETE), "schedulingProfiles", "required", id="no-profiles"
        ),
        pytest.param(
            _with("schedulingProfiles.0.name", DELETE),
            "schedulingProfiles[0].name",
            "required",
            id="no-profile-name",
        ),
        pytest.param(
            _with(
                "schedulingProfiles.1", {"name": "p", "plugins": [{"pluginRef": "queue-scorer"}]}
            ),
            "schedulingProfiles[1].name",
            "defined twice",
            id="duplicate-profile",
        ),
        pytest.param(
            _with("schedulingProfiles.0.plugins", {}),
            "schedulingProfiles[0].plugins",
            "non-empty list",
            id="profile-plugins-not-list",
        ),
        pytest.param(
            _with("schedulingProfiles.0.extra", 1),
            "schedulingProfiles[0].extra",
            "unknown key",
            id="unknown-profile-key",
        ),
        pytest.param(
            _with("schedulingProfiles.0.plugins.0.pluginRef", "queue"),
            "schedulingProfiles[0].plugins[0].pluginRef",
            "no plugin named 'queue'",
            id="unknown-ref",
        ),
        pytest.param(
            _with("schedulingProfiles.0.plugins.0.weight", 0),
            "schedulingProfiles[0].plugins[0].weight",
            "positive number",
            id="zero-weight",
        ),
        pytest.param(
            _with("schedulingProfiles.0.plugins.0.weight", "2"),
            "schedulingProfiles[0].plugins[0].weight",
            "positive number",
            id="string-weight",
        ),
        pytest.param(
            _with("schedulingProfiles.0.plugins.1", {"pluginRef": "max-score-picker", "weight": 1}),
            "schedulingProfiles[0].plugins[1].weight",
            "only scorers take a weight",
            id="weight-on-picker",
        ),
        pytest.param(
            _with("schedulingProfiles.0.plugins.1", {"pluginRef": "queue-scorer"}),
            "schedulingProfiles[0].plugins[1].pluginRef",
            "referenced twice",
            id="ref-twice",
        ),
        pytest.param(
            _with("schedulingProfiles.0.plugins.0.ref", "x"),
            "schedulingProfiles[0].plugins[0].ref",
            "unknown key",
            id="unknown-ref-key",
        ),
    ],
)
def test_bad_configs_name_the_key(data: object, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_endpoint_picker_config(data)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_two_pickers_in_one_profile() -> None:
    data = _base()
    data["plugins"].append({"type": "random-picker"})
    data["schedulingProfiles"][0]["plugins"] += [
        {"pluginRef": "max-score-picker"},
        {"pluginRef": "random-picker"},
    ]
    with pytest.raises(ConfigError) as caught:
        parse_endpoint_picker_config(data)
    assert caught.value.key == "schedulingProfiles[0].plugins[2].pluginRef"
    assert "one picker" in caught.value.problem


def test_field_keys_outside_profiles_are_accepted() -> None:
    data = _base() | {"featureGates": ["flowControl"], "saturationDetector": {}, "dataLayer": {}}
    assert set(parse_endpoint_picker_config(data)) == {"p"}


@pytest.mark.parametrize("type_name", sorted(PLUGINS.types))
def test_every_plugin_type_builds_without_parameters(type_name: str) -> None:
    data = {
        "plugins": [{"type": type_name}],
        "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": type_name}]}],
    }
    profile = parse_endpoint_picker_config(data)["p"]
    ranked = profile.schedule(SchedulingRequest(model="m"), [cand(0), cand(1)])
    assert len(ranked.order) == 2
