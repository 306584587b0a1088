"""The block pool: reference counts, LRU eviction of free blocks, and the events it records."""

from __future__ import annotations

from extproc.prefix.hashing import BlockHasher
from extproc.sim.cache import AllBlocksCleared, BlockPool, BlockRemoved, BlockStored

HASHER = BlockHasher()


def _store(pool: BlockPool, tokens: list[int]) -> list[int]:
    hashes = HASHER.hash_blocks(tokens)
    blocks = pool.allocate(len(hashes))
    assert blocks is not None
    pool.cache_full_blocks(
        blocks, hashes, start=0, token_ids=tokens, block_size=16,
        lora_id=None, lora_name=None, extra_keys=None,
    )  # fmt: skip
    pool.free(blocks)
    return [h.event_id for h in hashes]


def test_hit_after_free_and_lru_eviction() -> None:
    pool = BlockPool(4)
    a = _store(pool, list(range(32)))  # 2 blocks, freed but cached
    b = _store(pool, list(range(100, 132)))
    assert pool.cached_event_ids() == {*a, *b}
    hit = pool.longest_prefix(HASHER.hash_blocks(list(range(40))), max_blocks=10)
    assert [blk.hash.event_id for blk in hit if blk.hash] == a
    # Touching a's blocks makes them the most recently used; the next allocation evicts b's
    # tail block first (freed tail first), then b's head.
    pool.touch(hit)
    pool.free(hit)
    pool.take_events()
    assert pool.allocate(2) is not None
    assert pool.cached_event_ids() == set(a)
    removed = [e for e in pool.take_events() if isinstance(e, BlockRemoved)]
    assert [e.block_hashes[0].event_id for e in removed] == [b[1], b[0]]


def test_held_blocks_are_never_evicted() -> None:
    pool = BlockPool(2)
    hashes = HASHER.hash_blocks(list(range(32)))
    blocks = pool.allocate(2)
    assert blocks is not None
    assert pool.allocate(1) is None
    pool.cache_full_blocks(
        blocks, hashes, start=0, token_ids=list(range(32)), block_size=16,
        lora_id=None, lora_name=None, extra_keys=None,
    )  # fmt: skip
    assert pool.usage == 1.0
    (event,) = pool.take_events()
    assert isinstance(event, BlockStored)
    assert event.parent is None
    assert event.token_ids == tuple(range(32))


def test_clear_emits_all_blocks_cleared() -> None:
    pool = BlockPool(4)
    _store(pool, list(range(16)))
    pool.take_events()
    pool.clear()
    assert pool.cached_event_ids() == set()
    assert pool.take_events() == [AllBlocksCleared()]
