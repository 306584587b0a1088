"""The llm-d router's current plugin type names in an EndpointPickerConfig: each one is either
accepted (it works the same here) or refused by name as not implemented, never met as an
unknown type; parameters that would change what an accepted one does are refused too."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import ConfigError
from extproc.scheduling.filters import DecodeFilter, PrefillFilter
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.scheduling.refused import NOT_IMPLEMENTED
from extproc.scheduling.registry import PLUGINS
from extproc.scheduling.scorers import PrefixCacheScorer, RunningRequestsScorer


def _words(text: str) -> list[str]:
    return text.split()


# Every type the llm-d router registers (llm-d/llm-d-router cmd/epp/runner/runner.go at
# ebab687927f5331c1b39defcb579a07951bce56c, 2026-08-22), test-only plugins left out.
UPSTREAM_TYPES = _words("""
active-request-scorer agent-identity always-disagg-multimodal-decider always-disagg-pd-decider
anthropic-parser approx-prefix-cache-producer burst-prefix-cache-producer by-label
by-label-selector concurrency-detector context-length-aware core-metrics-extractor
data-parallel-profile-handler dcgm-data-source dcgm-extractor decode-filter
disagg-headers-handler disagg-profile-handler disaggregatedset-rollout-screener
edf-ordering-policy encode-filter endpoint-attribute-filter endpoint-attribute-scorer
endpoint-notification-source fcfs-ordering-policy file-discovery global-strict-fairness-policy
header-label-affinity-scorer header-profile-handler inflight-load-producer
k8s-notification-source kv-cache-utilization-scorer label-selector-filter latency-scorer
latency-slo-admitter load-aware-scorer lora-affinity-scorer max-score-picker metrics-data-source
mm-embeddings-cache-producer mm-embeddings-cache-scorer models-data-extractor models-data-source
multicluster-approx-prefix-cache-producer multicluster-file-discovery
multicluster-kv-cache-utilization-scorer multicluster-metrics-data-source
multicluster-metrics-extractor multicluster-prefix-cache-scorer multicluster-queue-scorer
multicluster-session-affinity-filter no-hit-lru-scorer openai-parser p2p-source-producer
passthrough-parser pd-profile-handler precise-prefix-cache-producer precise-prefix-cache-scorer
predicted-latency-producer prefill-filter prefill-header-handler prefix-based-pd-decider
prefix-cache-affinity-filter prefix-cache-scorer priority-holdback-policy
priority-then-time-eviction-order-policy probabilistic-admitter program-aware-fairness
queue-scorer random-picker request-attribute-reporter round-robin-fairness-policy
running-requests-size-scorer session-affinity-filter session-affinity-scorer session-id-producer
sglanghttp-parser sheddable-eviction-filter single-profile-handler slo-deadline-ordering-policy
slo-headroom-tier-filter soft-reflective-ceiling-policy static-usage-limit-policy
token-load-scorer token-producer tokenizer topology-affinity-filter topology-affinity-scorer
topology-extractor utilization-detector utilization-filter vertexai-parser vllmgrpc-parser
vllmhttp-parser weighted-random-picker
""")


def _config(plugin: dict[str, Any]) -> dict[str, Any]:
    name = plugin.get("name", plugin["type"])
    return {
        "plugins": [plugin],
        "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": name}]}],
    }


def _problem(plugin: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_endpoint_picker_config(_config(plugin))
    return caught.value


@pytest.mark.parametrize("type_name", UPSTREAM_TYPES)
def test_every_upstream_type_is_accepted_or_refused_by_name(type_name: str) -> None:
    if type_name in PLUGINS.types:
        assert "p" in parse_endpoint_picker_config(_config({"type": type_name}))
        return
    error = _problem({"type": type_name})
    assert error.key == "plugins[0].type"
    assert f"plugin type '{type_name}' (llm-d router) is not implemented here" in error.problem


def test_the_not_implemented_list_names_only_upstream_types() -> None:
    assert set(NOT_IMPLEMENTED) <= set(UPSTREAM_TYPES)
    assert not set(NOT_IMPLEMENTED) & set(PLUGINS.types)


def test_a_refusal_says_what_comes_closest() -> None:
    error = _problem({"type": "load-aware-scorer", "parameters": {"threshold": 100}})
    assert error.problem.endswith(
        "closest: queue-scorer scores the waiting queue, scaled across the pool"
    )


def test_an_unknown_type_is_still_unknown() -> None:
    error = _problem({"type": "load-awre-scorer"})
    assert error.problem.startswith("unknown plugin type 'load-awre-scorer'")


@pytest.mark.parametrize(
    ("plugin", "built"),
    [
        ({"type": "running-requests-size-scorer"}, RunningRequestsScorer),
        (
            {
                "type": "precise-prefix-cache-scorer",
                "parameters": {
                    "tokenProcessorConfig": {"blockSize": 64},
                    "indexerConfig": {"kvBlockIndexConfig": {"enableMetrics": True}},
                    "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557"},
                },
            },
            PrefixCacheScorer,
        ),
        (
            {
                "type": "prefix-cache-scorer",
                "parameters": {
                    "prefixMatchInfoProducerName": "precise-prefix-cache-producer",
                    "matchLengthWeight": 0,
                },
            },
            PrefixCacheScorer,
        ),
        ({"type": "decode-filter"}, DecodeFilter),
        ({"type": "prefill-filter"}, PrefillFilter),
    ],
    ids=["running-requests-size", "precise-prefix", "prefix-with-producer", "decode", "prefill"],
)
def test_accepted_types_build_the_same_plugin(plugin: dict[str, Any], built: type) -> None:
    profile = parse_endpoint_picker_config(_config(plugin))["p"]
    plugins = [*profile.filters, *(w.scorer for w in profile.scorers)]
    assert any(isinstance(p, built) for p in plugins)


@pytest.mark.parametrize(
    ("plugin", "key"),
    [
        (
            {"type": "prefix-cache-scorer", "parameters": {"matchLengthWeight": 0.5}},
            "matchLengthWeight",
        ),
        ({"type": "prefix-based-pd-decider", "parameters": {"promptTokens": 512}}, "promptTokens"),
        ({"type": "pd-profile-handler", "parameters": {"primaryPort": 8000}}, "primaryPort"),
    ],
    ids=["match-length", "prompt-tokens", "primary-port"],
)
def test_parameters_that_change_the_behaviour_are_refused(plugin: dict[str, Any], key: str) -> None:
    error = _problem(plugin)
    assert error.key == f"plugins[0].parameters.{key}"
    assert f"{plugin['type']} with {key} other than 0 is not implemented here" == error.problem


def test_p_d_handlers_and_deciders_take_their_parameters() -> None:
    config = {
        "plugins": [
            {"type": "prefill-filter"},
            {"type": "decode-filter"},
            {
                "type": "disagg-profile-handler",
                "parameters": {"deciders": {"prefill": "prefix-based-pd-decider"}},
            },
            {"type": "prefix-based-pd-decider", "parameters": {"nonCachedTokens": 16}},
            {"type": "always-disagg-pd-decider"},
            {"type": "disagg-headers-handler"},
            {"type": "approx-prefix-cache-producer", "parameters": {"lruCapacityPerServer": 31250}},
        ],
        "schedulingProfiles": [
            {"name": "prefill", "plugins": [{"pluginRef": "prefill-filter"}]},
            {"name": "decode", "plugins": [{"pluginRef": "decode-filter"}]},
        ],
    }
    assert set(parse_endpoint_picker_config(config)) == {"prefill", "decode"}


SESSION_ID = {
    "strategy": "session_id",
    "sessionIdConfig": {"sources": [{"header": "x-session-id"}]},
}


@pytest.mark.parametrize(
    ("parameters", "key", "problem"),
    [
        (None, None, None),
        (
            {
                **SESSION_ID,
                "sessionIdConfig": {**SESSION_ID["sessionIdConfig"], "evictionTtlSeconds": 300},
            },
            None,
            None,
        ),
        (
            {"strategy": "encoded_endpoint_header"},
            "strategy",
            "session-affinity-scorer with strategy 'encoded_endpoint_header' is not implemented "
            "here (sessions come from the x-session-id header: strategy session_id)",
        ),
        (
            {"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "x-user"}]}},
            "sessionIdConfig.sources",
            "only the x-session-id header is implemented here, got [{'header': 'x-user'}]",
        ),
    ],
    ids=["default", "session-id", "encoded-endpoint", "other-header"],
)
def test_session_affinity_takes_the_session_id_strategy_on_its_header(
    parameters: dict[str, Any] | None, key: str | None, problem: str | None
) -> None:
    plugin: dict[str, Any] = {"type": "session-affinity-scorer"}
    if parameters is not None:
        plugin["parameters"] = parameters
    if problem is None:
        assert parse_endpoint_picker_config(_config(plugin))["p"].scorers
        return
    error = _problem(plugin)
    assert (error.key, error.problem) == (f"plugins[0].parameters.{key}", problem)
