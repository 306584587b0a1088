"""The plugin registry: a new scorer is one class plus one registration, and what it declares it
needs (the prompt's block hashes here) reaches it through strategies, configured profiles and
the pipeline with no other edit."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence

import pytest

from extproc.config import load_config
from extproc.decision import RequestHead, Routed
from extproc.metrics import PickerMetrics
from extproc.pipeline import Pipeline
from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.scheduling.framework import Needs, Profile, WeightedScorer
from extproc.scheduling.params import Params
from extproc.scheduling.pickers import MaxScorePicker
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.scheduling.registry import PLUGINS, BuildContext, PluginSpec, Registry, needs
from extproc.scheduling.scorers import PrefixCacheScorer, QueueScorer
from extproc.scheduling.strategies import Strategies, known_strategies
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.state.inflight import InFlight
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ADDRESSES = ("10.0.0.1:8000", "10.0.0.2:8000")


class FirstBlockScorer:
    """A new block-hash scorer: prefers the endpoint the prompt's first block hashes to. It
    keeps the hashes it was given, which is what the test checks."""

    name = "first-block-scorer"

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        self.seen.append(request.block_hashes)
        if not request.block_hashes:
            return [0.0] * len(candidates)
        chosen = request.block_hashes[0] % len(candidates)
        return [1.0 if i == chosen else 0.0 for i in range(len(candidates))]


def _registered(scorer: FirstBlockScorer, declared: Needs) -> Registry:
    # The one place the new scorer is registered.
    def build(params: Params, ctx: BuildContext) -> FirstBlockScorer:
        return scorer

    return PLUGINS.plus(
        PluginSpec("scorer", ("first-block-scorer",), build, declared, strategy="first-block")
    )


BLOCKS = Needs(block_hashes=True)


def _configured(registry: Registry) -> Profile:
    config = {
        "plugins": [{"type": "first-block-scorer"}, {"type": "queue-scorer"}],
        "schedulingProfiles": [
            {
                "name": "mine",
                "plugins": [
                    {"pluginRef": "first-block-scorer", "weight": 2},
                    {"pluginRef": "queue-scorer"},
                ],
            }
        ],
    }
    return parse_endpoint_picker_config(config, registry=registry)["mine"]


BUILDS: dict[str, Callable[[Registry], Profile]] = {
    "strategy": lambda r: Strategies(registry=r).get("first-block"),
    "blend": lambda r: Strategies(registry=r).get("first-block:3,least-queue:1"),
    "adapter": lambda r: Strategies(registry=r).get("first-block", adapter=True),
    "config": _configured,
}


@pytest.mark.parametrize("how", list(BUILDS))
def test_a_registered_scorer_declares_its_block_hashes(how: str) -> None:
    build = BUILDS[how]
    assert needs(build(_registered(FirstBlockScorer(), BLOCKS))).block_hashes
    # Declared nothing: nothing else tells the pipeline to tokenize for it.
    assert not needs(build(_registered(FirstBlockScorer(), Needs()))).block_hashes


def test_the_registry_knows_the_new_strategy_and_type() -> None:
    registry = _registered(FirstBlockScorer(), BLOCKS)
    assert known_strategies(registry)[-1] == "first-block"
    assert "first-block" not in known_strategies()
    assert registry.types["first-block-scorer"].needs == BLOCKS
    with pytest.raises(ValueError, match="registered twice"):
        registry.plus(PluginSpec("scorer", ("queue-scorer",), lambda p, c: QueueScorer()))


def test_a_profile_built_by_hand_gets_its_plugins_needs_by_type_name() -> None:
    profile = Profile(
        "by-hand",
        (),
        (WeightedScorer(PrefixCacheScorer(), 1.0), WeightedScorer(QueueScorer(), 1.0)),
        MaxScorePicker(random.Random(0)),
    )
    assert needs(profile) == BLOCKS
    assert needs(Profile("idle", (), (), MaxScorePicker(random.Random(0)))) == Needs()


async def test_the_pipeline_gives_a_registered_scorer_its_block_hashes() -> None:
    scorer = FirstBlockScorer()
    config = load_config(
        None,
        {
            "collector": {"enabled": False},
            "routing": {"fallbacks": 0},
            "endpoints": [{"address": a} for a in ADDRESSES],
        },
    )
    endpoints = [Endpoint(a, frozenset({MODEL}), ready=True) for a in ADDRESSES]
    blocks = PromptBlocks(BlocksSettings())  # cl100k_base: a real vocabulary, no files
    pipeline = Pipeline(
        config,
        SnapshotStore(Snapshot.of(endpoints)),
        InFlight(),
        Strategies(registry=_registered(scorer, BLOCKS)),
        PickerMetrics(),
        blocks=blocks,
    )
    body = {"model": MODEL, "prompt": "The registry hands this prompt's blocks over. " * 40}
    try:
        head = RequestHead("POST", "/v1/completions", {"x-routing-strategy": "first-block"})
        routed = await pipeline.route(head, json.dumps(body).encode())
        assert isinstance(routed, Routed)
        assert len(scorer.seen) == 1
        assert len(scorer.seen[0]) > 4  # ~400 tokens: some 25 blocks of 16
    finally:
        await blocks.aclose()
