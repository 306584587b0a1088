"""Every scorer, table-driven: given candidates, the exact scores in [0, 1]."""

from __future__ import annotations

import pytest

from extproc.scheduling.scorers import (
    InFlightTokensScorer,
    KvCacheUtilizationScorer,
    LeastRequestScorer,
    LoraAffinityScorer,
    PrefixCacheScorer,
    QueueScorer,
    RunningRequestsScorer,
)
from extproc.scheduling.types import Candidate, SchedulingRequest, Scorer
from extproc.state.stats import LoraState
from tests.scheduling.build import cand

PLAIN = SchedulingRequest(model="m")
FOUR_BLOCKS = SchedulingRequest(model="m", prompt_tokens=64, block_hashes=(1, 2, 3, 4))
ADAPTER = SchedulingRequest(model="sql", lora="sql")


def _lora(
    running: set[str], waiting: frozenset[str] = frozenset(), max_loras: int = 2
) -> LoraState:
    return LoraState(max_loras, frozenset(running), waiting)


CASES = [
    pytest.param(
        QueueScorer(),
        PLAIN,
        [cand(0, waiting=0), cand(1, waiting=5), cand(2, waiting=10)],
        [1.0, 0.5, 0.0],
        id="queue-spread",
    ),
    pytest.param(
        QueueScorer(),
        PLAIN,
        [cand(0, waiting=2), cand(1, waiting=0, picked=2)],
        [1.0, 1.0],
        id="queue-counts-picks-since-scrape",
    ),
    pytest.param(
        QueueScorer(),
        PLAIN,
        [cand(0, waiting=3), cand(1, waiting=3)],
        [1.0, 1.0],
        id="queue-all-equal",
    ),
    pytest.param(
        KvCacheUtilizationScorer(),
        PLAIN,
        [cand(0, kv=0.25), cand(1, kv=1.0), cand(2, stats=False)],
        [0.75, 0.0, 1.0],
        id="kv-one-minus-usage-no-stats-empty",
    ),
    pytest.param(
        KvCacheUtilizationScorer(),
        PLAIN,
        [cand(0, kv=1.7), cand(1, kv=-0.1)],
        [0.0, 1.0],
        id="kv-clamped",
    ),
    pytest.param(
        RunningRequestsScorer(),
        PLAIN,
        [cand(0, running=4), cand(1, running=0), cand(2, stats=False)],
        [0.0, 1.0, 1.0],
        id="running-spread",
    ),
    pytest.param(
        LeastRequestScorer(),
        PLAIN,
        [cand(0, requests=2), cand(1, requests=0)],
        [0.0, 1.0],
        id="least-request",
    ),
    pytest.param(
        InFlightTokensScorer(),
        PLAIN,
        [cand(0, tokens=1000), cand(1, tokens=250), cand(2)],
        [0.0, 0.75, 1.0],
        id="in-flight-tokens",
    ),
    pytest.param(
        PrefixCacheScorer(),
        FOUR_BLOCKS,
        [cand(0, prefix=4), cand(1, prefix=1), cand(2)],
        [1.0, 0.25, 0.0],
        id="prefix-share",
    ),
    pytest.param(
        PrefixCacheScorer(),
        PLAIN,
        [cand(0, prefix=3), cand(1)],
        [0.0, 0.0],
        id="prefix-no-blocks-neutral",
    ),
    pytest.param(
        PrefixCacheScorer(),
        FOUR_BLOCKS,
        [cand(0, prefix=9)],
        [1.0],
        id="prefix-clamped",
    ),
    pytest.param(
        PrefixCacheScorer(),
        # Probed: 4 hashes computed (endpoint 0 holds them all, so it held the first 4), and a
        # token count estimating 16 blocks in all: the share is of the whole prompt.
        SchedulingRequest(model="m", prompt_tokens=16 * 16, block_hashes=(1, 2, 3, 4)),
        [cand(0, prefix=4), cand(1, prefix=1)],
        [0.25, 1 / 16],
        id="prefix-share-of-a-probed-prompt",
    ),
    pytest.param(
        LoraAffinityScorer(),
        ADAPTER,
        [
            cand(0, lora=_lora({"sql"})),
            cand(1, lora=_lora({"chat"})),
            cand(2, lora=_lora({"a", "b"}, frozenset({"sql"}))),
            cand(3, lora=_lora({"a", "b"})),
            cand(4),
        ],
        [1.0, 0.8, 0.6, 0.0, 0.0],
        id="lora-active-free-slot-waiting-none-unknown",
    ),
    pytest.param(
        LoraAffinityScorer(),
        ADAPTER,
        [cand(0, lora=_lora({"x"}, frozenset({"sql"}), max_loras=4))],
        [0.8],
        id="lora-free-slot-beats-waiting",
    ),
    pytest.param(
        LoraAffinityScorer(),
        PLAIN,
        [cand(0, lora=_lora({"sql"})), cand(1)],
        [1.0, 1.0],
        id="lora-base-model-neutral",
    ),
]


@pytest.mark.parametrize(("scorer", "request_", "candidates", "expected"), CASES)
def test_scores(
    scorer: Scorer,
    request_: SchedulingRequest,
    candidates: list[Candidate],
    expected: list[float],
) -> None:
    got = list(scorer.score(request_, candidates))
    assert got == pytest.approx(expected)
    assert all(0.0 <= s <= 1.0 for s in got)


@pytest.mark.parametrize(
    "scorer",
    [
        QueueScorer(),
        KvCacheUtilizationScorer(),
        RunningRequestsScorer(),
        LeastRequestScorer(),
        InFlightTokensScorer(),
        PrefixCacheScorer(),
        LoraAffinityScorer(),
    ],
    ids=lambda s: s.name,
)
def test_type_names_follow_the_field(scorer: Scorer) -> None:
    assert scorer.name.endswith("-scorer")
