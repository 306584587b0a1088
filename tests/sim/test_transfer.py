"""The engine's side of disaggregation on its own: held blocks expire in order and go back to the
pool, and pulls share one FIFO link (a pull starts when the one before it has crossed)."""

from __future__ import annotations

import asyncio

import pytest

from extproc.sim.cache import BlockPool
from extproc.sim.request import TRANSFERRING, EngineRequest
from extproc.sim.transfer import HeldBlocks, KVLink


def _request(request_id: str, prompt_len: int, blocks: int, pool: BlockPool) -> EngineRequest:
    # Its `done` future is made on the running loop: the test runs in one.
    req = EngineRequest(
        request_id,
        list(range(prompt_len)),
        max_tokens=1,
        lora=None,
        cache_salt=None,
        stream=False,
        arrival=0.0,
        loop=asyncio.get_running_loop(),
    )
    got = pool.allocate(blocks)
    assert got is not None
    req.blocks = got
    return req


def test_held_blocks_expire_oldest_first_and_return_to_the_pool() -> None:
    pool = BlockPool(10)
    freed: list[int] = []
    held = HeldBlocks(pool, timeout=5.0, on_free=lambda: freed.append(pool.num_free))
    first, second = pool.allocate(3), pool.allocate(2)
    assert first is not None and second is not None
    assert held.hold("a", first, now=0.0) == tuple(b.block_id for b in first)
    held.hold("b", second, now=1.0)
    assert (held.blocks, pool.num_free, held.next_expiry()) == (5, 5, 5.0)

    held.expire(now=5.5)  # a's time is up, b's is not
    assert (held.ids("a"), held.blocks, pool.num_free, freed) == (None, 2, 8, [8])
    assert held.find(None, [b.block_id for b in second]) == "b"
    assert held.release("b") and not held.release("b")
    assert (held.blocks, pool.num_free, held.next_expiry()) == (0, 10, None)


async def test_pulls_queue_on_one_link() -> None:
    pool = BlockPool(20)
    link = KVLink(bandwidth=1000.0, latency=0.5, block_size=4, kv_bytes_per_token=10)
    # 3 blocks of 4 tokens at 10 bytes per token, one block cached here: 80 bytes cross.
    first = _request("a", 12, 3, pool)
    second = _request("b", 8, 2, pool)
    link.start(first, hit_blocks=1, now=1.0)
    link.start(second, hit_blocks=0, now=1.0)
    # The second waits for the first's 0.08 s on the wire, then sends its own 0.08 s.
    assert first.kv_ready_at == pytest.approx(1.0 + 0.08 + 0.5)
    assert second.kv_ready_at == pytest.approx(1.0 + 0.16 + 0.5)
    assert (first.transferred_blocks, first.transferred_tokens, first.state) == (2, 8, TRANSFERRING)
    assert link.next_ready() == first.kv_ready_at
    assert link.landed(now=1.6) == [first]
    assert link.landed(now=1.7) == [second]
    assert link.next_ready() is None
