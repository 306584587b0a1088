"""Filters and pickers, table-driven."""

from __future__ import annotations

import random

import pytest

from extproc.scheduling.candidates import with_prefix_matches
from extproc.scheduling.filters import (
    LoraAffinityFilter,
    LowKvCacheFilter,
    LowQueueFilter,
    PreferUnsaturated,
)
from extproc.scheduling.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from extproc.scheduling.types import Candidate, Filter, SchedulingRequest
from extproc.state.prefix_index import PrefixIndex
from extproc.state.stats import LoraState
from tests.scheduling.build import addr, cand

PLAIN = SchedulingRequest(model="m")
ADAPTER = SchedulingRequest(model="sql", lora="sql")
ACTIVE = LoraState(2, frozenset({"sql"}))
FREE = LoraState(2, frozenset({"chat"}))
FULL = LoraState(1, frozenset({"chat"}))


@pytest.mark.parametrize(
    ("filter_", "request_", "candidates", "kept"),
    [
        pytest.param(
            PreferUnsaturated(), PLAIN, [cand(0, saturated=True), cand(1)], [1], id="drop-stale"
        ),
        pytest.param(
            PreferUnsaturated(),
            PLAIN,
            [cand(0, saturated=True), cand(1, saturated=True)],
            [0, 1],
            id="all-stale-keeps-all",
        ),
        pytest.param(
            LoraAffinityFilter(),
            ADAPTER,
            [cand(0, lora=FREE), cand(1, lora=ACTIVE), cand(2, lora=FULL)],
            [1],
            id="lora-active-first",
        ),
        pytest.param(
            LoraAffinityFilter(),
            ADAPTER,
            [cand(0, lora=FREE), cand(1, lora=FULL), cand(2)],
            [0],
            id="lora-then-free-slot",
        ),
        pytest.param(
            LoraAffinityFilter(),
            ADAPTER,
            [cand(0, lora=FULL), cand(1)],
            [0, 1],
            id="lora-none-keeps-all",
        ),
        pytest.param(
            LoraAffinityFilter(), PLAIN, [cand(0, lora=FULL), cand(1)], [0, 1], id="lora-base-model"
        ),
        pytest.param(
            LowQueueFilter(3),
            PLAIN,
            [cand(0, waiting=4), cand(1, waiting=1, picked=2), cand(2, waiting=0, picked=4)],
            [1],
            id="low-queue",
        ),
        pytest.param(
            LowQueueFilter(0),
            PLAIN,
            [cand(0, waiting=4), cand(1, waiting=1)],
            [0, 1],
            id="low-queue-none-keeps-all",
        ),
        pytest.param(
            LowKvCacheFilter(0.5),
            PLAIN,
            [cand(0, kv=0.9), cand(1, kv=0.5), cand(2, stats=False)],
            [1, 2],
            id="low-kv",
        ),
        pytest.param(
            LowKvCacheFilter(0.1), PLAIN, [cand(0, kv=0.9)], [0], id="low-kv-none-keeps-all"
        ),
    ],
)
def test_filters(
    filter_: Filter, request_: SchedulingRequest, candidates: list[Candidate], kept: list[int]
) -> None:
    got = [c.address for c in filter_.filter(request_, candidates)]
    assert got == [addr(i) for i in kept]


def test_max_score_picker_orders_by_score_and_ties_at_random() -> None:
    picker = MaxScorePicker(random.Random(5))
    candidates = [cand(i) for i in range(3)]
    assert [c.address for c in picker.rank(candidates, [0.1, 0.9, 0.5])] == [
        addr(1),
        addr(2),
        addr(0),
    ]
    firsts = {picker.rank(candidates, [1.0, 1.0, 0.0])[0].address for _ in range(100)}
    assert firsts == {addr(0), addr(1)}


def test_random_and_round_robin_pickers_return_everyone() -> None:
    candidates = [cand(i) for i in range(4)]
    assert sorted(
        c.address for c in RandomPicker(random.Random(1)).rank(candidates, [0.0] * 4)
    ) == [addr(i) for i in range(4)]
    rr = RoundRobinPicker()
    assert [rr.rank(candidates, [0.0] * 4)[0].address for _ in range(5)] == [
        addr(0),
        addr(1),
        addr(2),
        addr(3),
        addr(0),
    ]


def test_prefix_matches_and_cache_fill_come_from_the_index() -> None:
    index = PrefixIndex()
    index.store(addr(0), [1, 2, 3, 40, 41])
    index.store(addr(1), [1, 9])
    matched = with_prefix_matches([cand(0), cand(1), cand(2)], [1, 2, 3, 4], index)
    assert [(c.prefix_blocks, c.cached_blocks) for c in matched] == [(3, 5), (1, 2), (0, 0)]
