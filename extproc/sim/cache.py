"""The KV block pool: vLLM's `BlockPool` reduced to what routing can observe.

Blocks are reference-counted. A block whose count drops to zero joins the free queue but keeps
its hash, so a later request with the same prefix can still hit it; allocation takes free blocks
from the front and evicts the hash of any block it reuses (LRU among free blocks). Like vLLM,
a finished request frees its blocks tail first, and blocks that never got a hash go to the front
(reused first) while hashed blocks go to the back (kept longest).

Every change a router could learn about is recorded as a `CacheEvent` for the KV-event publisher.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.prefix.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockHash, ...]
    parent: BlockHash | None
    token_ids: tuple[int, ...]
    lora_id: int | None
    lora_name: str | None
    extra_keys: tuple[tuple[str, ...] | None, ...] | None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


CacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class Block:
    """One KV block. Mutable engine-internal state; never crosses a module boundary."""

    __slots__ = ("block_id", "hash", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self._blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the first free block is reused first.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks)
        self._cached: dict[bytes, Block] = {}
        self.events: list[CacheEvent] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: the share of blocks held by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def cached_event_ids(self) -> set[int]:
        """The event ids of every block that would hit now (for tests and handles)."""
        return {block.hash.event_id for block in self._cached.values() if block.hash}

    def longest_prefix(self, hashes: Sequence[BlockHash], max_blocks: int) -> list[Block]:
        """The cached blocks matching the first blocks of `hashes`, stopping at the first miss."""
        hit: list[Block] = []
        cached = self._cached
        for block_hash in hashes[:max_blocks]:
            block = cached.get(block_hash.digest)
            if block is None:
                break
            hit.append(block)
        return hit

    def touch(self, blocks: Sequence[Block]) -> None:
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, count: int) -> list[Block] | None:
        """`count` fresh blocks, evicting cached free blocks in LRU order; None if too few."""
        if count > len(self._free):
            return None
        out: list[Block] = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.hash is not None:
                del self._cached[block.hash.digest]
                self.events.append(BlockRemoved((block.hash,)))
                block.hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def cache_full_blocks(
        self,
        blocks: Sequence[Block],
        hashes: Sequence[BlockHash],
        *,
        start: int,
        token_ids: Sequence[int],
        block_size: int,
        lora_id: int | None,
        lora_name: str | None,
        extra_keys: Sequence[tuple[str, ...] | None] | None,
    ) -> None:
        """Register blocks `start..len(hashes)-1` of a request as cached and record the event.

        A block whose hash another block already holds stays unregistered (vLLM keeps both;
        either way the prefix is cached once from a router's point of view).
        """
        run: list[int] = []
        for i in range(start, len(hashes)):
            block, block_hash = blocks[i], hashes[i]
            if block.hash is not None or block_hash.digest in self._cached:
                # One event per contiguous run keeps each event's parent chain exact.
                self._emit_stored(
                    run,
                    hashes,
                    token_ids,
                    block_size=block_size,
                    lora_id=lora_id,
                    lora_name=lora_name,
                    extra_keys=extra_keys,
                )
                run = []
                continue
            block.hash = block_hash
            self._cached[block_hash.digest] = block
            run.append(i)
        self._emit_stored(
            run,
            hashes,
            token_ids,
            block_size=block_size,
            lora_id=lora_id,
            lora_name=lora_name,
            extra_keys=extra_keys,
        )

    def _emit_stored(
        self,
        run: Sequence[int],
        hashes: Sequence[BlockHash],
        token_ids: Sequence[int],
        *,
        block_size: int,
        lora_id: int | None,
        lora_name: str | None,
        extra_keys: Sequence[tuple[str, ...] | None] | None,
    ) -> None:
        if not run:
            return
        first, last = run[0], run[-1]
        self.events.append(
            BlockStored(
                block_hashes=tuple(hashes[first : last + 1]),
                parent=hashes[first - 1] if first > 0 else None,
                token_ids=tuple(token_ids[first * block_size : (last + 1) * block_size]),
                lora_id=lora_id,
                lora_name=lora_name,
                extra_keys=tuple(extra_keys[first : last + 1]) if extra_keys else None,
            )
        )

    def free(self, blocks: Sequence[Block]) -> None:
        """Release a request's blocks. Tail blocks are freed first so they are evicted first."""
        to_front: list[Block] = []
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.hash is None:
                    to_front.append(block)
                else:
                    self._free[block.block_id] = block
        for block in to_front:
            self._free[block.block_id] = block
            self._free.move_to_end(block.block_id, last=False)

    def clear(self) -> None:
        """Drop every cached hash (a restart or a cache reset); held blocks stay held."""
        for block in self._cached.values():
            block.hash = None
        had = bool(self._cached)
        self._cached.clear()
        if had:
            self.events.append(AllBlocksCleared())

    def take_events(self) -> list[CacheEvent]:
        events, self.events = self.events, []
        return events
