"""The precise prefix index: lookups, copies, resets, slots and the memory caps."""

from __future__ import annotations

import pytest

from extproc.state.prefix_index import IndexSize, PrefixIndex

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def _index() -> PrefixIndex:
    index = PrefixIndex()
    index.store(A, [1, 2, 3, 4])
    index.store(B, [1, 2, 9])
    index.store(C, [7, 8])
    return index


@pytest.mark.parametrize(
    ("hashes", "endpoints", "expected"),
    [
        ([1, 2, 3, 4, 5], None, {A: 4, B: 2}),
        ([1, 2, 9], None, {A: 2, B: 3}),
        ([2, 3], None, {A: 2, B: 1}),  # B holds 2 but lookups are positional prefixes
        ([5, 1, 2], None, {}),  # a first-block miss is a miss everywhere
        ([7, 8, 1], None, {C: 2}),
        ([], None, {}),
        ([1, 2, 3], [B, C], {B: 2}),
        ([1, 2, 3], ["unknown:1"], {}),
    ],
    ids=[
        "longest-prefix",
        "branch",
        "mid-chain",
        "first-miss",
        "other-endpoint",
        "empty",
        "candidates-only",
        "unknown-candidate",
    ],
)
def test_lookup_counts_leading_blocks(
    hashes: list[int], endpoints: list[str] | None, expected: dict[str, int]
) -> None:
    assert _index().lookup(hashes, endpoints) == expected


def test_a_gap_stops_an_endpoint_even_if_later_blocks_match() -> None:
    index = PrefixIndex()
    index.store(A, [1, 3])
    assert index.lookup([1, 2, 3]) == {A: 1}


def test_remove_and_copies() -> None:
    index = _index()
    index.store(A, [2])  # a second block under the same hash
    index.remove(A, [2])
    assert index.lookup([1, 2, 3]) == {A: 3, B: 2}
    index.remove(A, [2, 42])  # 42: unknown (stored before a reset), ignored
    assert index.lookup([1, 2, 3]) == {A: 1, B: 2}
    index.remove("never-seen:1", [1])
    assert index.size() == IndexSize(blocks=7, entries=8, endpoints=3)


def test_held_counts_each_endpoints_distinct_blocks() -> None:
    index = _index()
    index.store(A, [2])  # a second copy is still one block hash
    assert index.held([A, B, C, "unknown:1"]) == {A: 4, B: 3, C: 2, "unknown:1": 0}
    index.remove(B, [9])
    index.clear(C)
    assert index.held([B, C]) == {B: 2, C: 0}


def test_clear_drops_one_endpoint_only() -> None:
    index = _index()
    assert index.clear(A) == 4
    assert index.blocks_of(A) == frozenset()
    assert index.lookup([1, 2, 9]) == {B: 3}
    assert index.size() == IndexSize(blocks=5, entries=5, endpoints=3)
    assert index.clear("never-seen:1") == 0


def test_drop_endpoint_frees_its_slot_for_the_next() -> None:
    index = _index()
    index.drop_endpoint(B)
    assert index.endpoints() == (A, C)
    assert index.lookup([1, 2, 9]) == {A: 2}
    index.store("10.0.0.4:8000", [1])
    assert index.lookup([1]) == {A: 1, "10.0.0.4:8000": 1}
    assert not index.holds(B, 1)
    index.drop_endpoint(B)  # idempotent


def test_endpoint_cap_forgets_oldest_stored_first() -> None:
    index = PrefixIndex()
    index.add_endpoint(A, capacity=128)
    evicted = index.store(A, range(128))
    assert evicted == 0
    evicted = index.store(A, [1000])
    # One chunk of 1/64 of the entries: the two oldest.
    assert evicted == 2
    assert index.blocks_of(A) == frozenset([*range(2, 128), 1000])
    assert index.evicted == 2
    # Shrinking the cap (num_gpu_blocks learned later) applies at once.
    index.add_endpoint(A, capacity=10)
    assert len(index.blocks_of(A)) <= 10
    assert 1000 in index.blocks_of(A)


def test_global_cap_takes_from_the_largest_endpoint() -> None:
    index = PrefixIndex(max_entries=100)
    index.store(A, range(70))
    index.store(B, range(1000, 1030))
    assert index.size().entries == 100
    index.store(B, [5000])
    size = index.size()
    assert size.entries <= 100
    assert len(index.blocks_of(B)) == 31  # B stored last but A was larger
    assert 0 not in index.blocks_of(A)
    assert 69 in index.blocks_of(A)


def test_many_endpoints_use_wide_masks() -> None:
    index = PrefixIndex()
    names = [f"10.0.1.{i}:8000" for i in range(70)]
    for depth, name in enumerate(names):
        index.store(name, range(depth % 5 + 1))
    found = index.lookup(range(10))
    assert found == {name: depth % 5 + 1 for depth, name in enumerate(names)}


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        PrefixIndex(max_entries=0)
