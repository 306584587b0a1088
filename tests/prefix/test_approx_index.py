"""extproc.prefix.approx_index: the precise index's lookup contract, learned from routing, with
per-endpoint LRU capacity."""

from __future__ import annotations

import random

import pytest

from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.state.prefix_index import PrefixIndex

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def test_lookup_counts_leading_blocks_per_endpoint() -> None:
    index = ApproxPrefixIndex()
    index.record(A, [1, 2, 3, 4])
    index.record(B, [1, 2, 9])
    assert index.lookup([1, 2, 3, 4, 5]) == {A: 4, B: 2}
    assert index.lookup([1, 2, 3], [B, C]) == {B: 2}
    assert index.lookup([2, 3]) == {A: 2, B: 1}  # 2 is in B, 3 is not
    assert index.lookup([7, 1]) == {}  # a miss on the first block: nothing
    assert index.lookup([]) == {}


@pytest.mark.parametrize("seed", range(5))
def test_same_answers_as_the_precise_index(seed: int) -> None:
    rng = random.Random(seed)
    approx, precise = ApproxPrefixIndex(default_capacity=10**6), PrefixIndex()
    endpoints = [f"10.0.0.{i}:8000" for i in range(10)]  # past 8: masks beyond small ints
    for _ in range(200):
        endpoint = rng.choice(endpoints)
        hashes = [rng.randrange(50) for _ in range(rng.randint(0, 8))]
        approx.record(endpoint, hashes)
        precise.store(endpoint, hashes)
    for _ in range(200):
        query = [rng.randrange(50) for _ in range(rng.randint(0, 6))]
        subset = rng.sample(endpoints, rng.randint(1, 10))
        assert approx.lookup(query) == precise.lookup(query)
        assert approx.lookup(query, subset) == precise.lookup(query, subset)
        assert approx.held(subset) == precise.held(subset)


def test_lru_eviction_at_capacity() -> None:
    index = ApproxPrefixIndex(default_capacity=100)
    index.set_capacity(A, 4)
    index.record(A, [1, 2, 3, 4])
    index.record(A, [1])  # 1 is now the most recently used
    index.record(A, [5, 6])  # evicts the two least recently used: 2 and 3
    assert index.blocks_of(A) == (4, 1, 5, 6)
    assert index.lookup([1]) == {A: 1}
    assert index.lookup([2]) == {}
    assert index.evicted == 2
    index.set_capacity(A, 2)  # shrinking evicts now
    assert index.blocks_of(A) == (5, 6)
    index.set_capacity(A, None)  # back to the default
    index.record(A, range(100, 200))
    assert len(index.blocks_of(A)) == 100


def test_large_capacities_evict_in_chunks_but_never_below() -> None:
    index = ApproxPrefixIndex(default_capacity=6400)
    index.record(A, range(6400))
    index.record(A, [99_999])
    held = index.blocks_of(A)
    assert 6400 - 100 <= len(held) <= 6400
    assert held[-1] == 99_999 and 0 not in held


def test_drop_endpoint_forgets_it_and_reuses_the_slot() -> None:
    index = ApproxPrefixIndex()
    index.record(A, [1, 2])
    index.record(B, [1])
    index.drop_endpoint(A)
    index.drop_endpoint("unknown")
    assert index.lookup([1, 2]) == {B: 1}
    assert index.endpoints() == (B,)
    index.record(C, [2])
    assert index.lookup([2]) == {C: 1}
    assert len(index) == 2


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ApproxPrefixIndex(default_capacity=0)
