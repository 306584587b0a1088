"""The precise prefix index: which endpoints hold which KV blocks in GPU memory.

Written by the KV-event subscribers (`extproc.state.kv_events`) from the events each vLLM server
publishes; read by the scheduler through `lookup`, which is pure, synchronous and does no I/O.
Writers and readers share one event loop, so nothing here takes a lock.

    index = PrefixIndex(max_entries=2_000_000)
    index.add_endpoint("10.0.0.7:8000", capacity=29_001)  # num_gpu_blocks, when known
    index.store("10.0.0.7:8000", [h0, h1, h2])           # BlockStored (GPU tier)
    index.remove("10.0.0.7:8000", [h2])                  # BlockRemoved
    index.lookup([h0, h1, h2, h3])                       # {"10.0.0.7:8000": 2}: leading blocks
    index.clear("10.0.0.7:8000")                         # AllBlocksCleared, restart, lost events

Block hashes are vLLM's 64-bit event ints (the low 8 bytes of the digest, big-endian), the same
form `extproc.prefix.hashing.BlockHash.event_id` computes for a prompt.

Representation (chosen by `benchmarks/index_memory.py`, numbers in docs/kv_events.md):
- `_owners: dict[int, int]`: block hash -> bitmask of endpoint slots. Endpoint names are interned
  to small slot numbers, so with up to 8 endpoints every mask is a CPython cached small int and
  costs nothing beyond the dict entry; a dict of sets would cost a set object per block.
- one `dict[int, int]` per endpoint: block hash -> copies held (vLLM can cache one hash in two
  blocks and then sends one BlockRemoved per block). Its insertion order is store order, which
  gives eviction an order, and it makes `clear(endpoint)` cost that endpoint's blocks, not all.

Bounds and what happens at them:
- per endpoint, `capacity` = its `num_gpu_blocks` when known (a server cannot hold more, so going
  past it means removals were missed), else `default_capacity`;
- all endpoints together, `max_entries` (block, endpoint) pairs.
Past a cap, the endpoint's oldest-stored blocks are forgotten (the largest endpoint's, for the
global cap), a chunk of 1/64 of its entries at once so the cost stays amortised O(1). Forgetting
only ever turns a hit into a miss: the index may under-report a prefix, never invent one.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

DEFAULT_MAX_ENTRIES = 2_000_000  # ~220 MB at ~110 B an entry (docs/kv_events.md)
DEFAULT_ENDPOINT_CAPACITY = 500_000  # when num_gpu_blocks is unknown
_EVICT_FRACTION = 64  # at a cap, forget 1/64 of the endpoint's entries in one pass


@dataclass(frozen=True, slots=True)
class IndexSize:
    blocks: int  # distinct block hashes
    entries: int  # (block, endpoint) pairs
    endpoints: int


V = TypeVar("V")


class SlottedIndex(Generic[V]):
    """The core the precise and the learned prefix index share: block hash -> bitmask of endpoint
    slots, one insertion-ordered dict per endpoint (its blocks, oldest first, with a value of
    the subclass's choosing), the prefix lookup over the masks, and eviction in chunks."""

    __slots__ = (
        "_all",
        "_capacity",
        "_default_capacity",
        "_free_slots",
        "_held",
        "_names",
        "_owners",
        "_slots",
        "evicted",
    )

    def __init__(self, *, default_capacity: int) -> None:
        if default_capacity < 1:
            raise ValueError("caps must be positive")
        self._default_capacity = default_capacity
        self._owners: dict[int, int] = {}
        self._slots: dict[str, int] = {}
        self._names: list[str] = []  # slot -> endpoint ("" for a free slot)
        self._held: list[dict[int, V]] = []  # slot -> its blocks, oldest first
        self._capacity: list[int] = []
        self._free_slots: list[int] = []
        self._all = 0  # mask of every registered slot
        self.evicted = 0  # entries forgotten at a cap since start (monotonic, for metrics)

    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def lookup(
        self, hashes: Sequence[int], endpoints: Collection[str] | None = None
    ) -> dict[str, int]:
        """For each endpoint, how many of the leading `hashes` (a prompt's chained block hashes,
        in order) it holds: its longest cached prefix, stopping at its first miss. Endpoints
        holding none are absent from the answer. `endpoints` narrows the search to candidates."""
        if endpoints is None:
            alive = self._all
        else:
            alive = 0
            for name in endpoints:
                slot = self._slots.get(name)
                if slot is not None:
                    alive |= 1 << slot
        found: dict[str, int] = {}
        owners = self._owners
        depth = 0
        for h in hashes:
            if not alive:
                return found
            still = owners.get(h, 0) & alive
            if still != alive and depth:
                self._credit(found, alive & ~still, depth)
            alive = still
            depth += 1
        if alive and depth:
            self._credit(found, alive, depth)
        return found

    def held(self, endpoints: Collection[str]) -> dict[str, int]:
        """How many blocks each endpoint holds, whatever prompt they came from (0 if unknown):
        how full its cache is, which the scheduler reads as the traffic it already draws."""
        slots = self._slots
        return {
            name: len(self._held[slot]) if (slot := slots.get(name)) is not None else 0
            for name in endpoints
        }

    def __len__(self) -> int:
        return len(self._owners)

    def _slot(self, endpoint: str) -> int:
        slot = self._slots.get(endpoint)
        if slot is not None:
            return slot
        if self._free_slots:
            # Reusing the lowest free slot keeps masks small (cached small ints up to 8 slots).
            self._free_slots.sort(reverse=True)
            slot = self._free_slots.pop()
            self._names[slot] = endpoint
            self._capacity[slot] = self._default_capacity
        else:
            slot = len(self._names)
            self._names.append(endpoint)
            self._held.append({})
            self._capacity.append(self._default_capacity)
        self._slots[endpoint] = slot
        self._all |= 1 << slot
        return slot

    def drop_endpoint(self, endpoint: str) -> None:
        """Forget an endpoint and its entries; its slot is reused by the next new endpoint."""
        slot = self._slots.pop(endpoint, None)
        if slot is None:
            return
        self._clear_slot(slot)
        self._free_slot(slot)

    def _renew(self, endpoint: str, hashes: Iterable[int], value: V) -> int:
        """Credit `hashes` to `endpoint` with `value`, each moved to the back (the most recent);
        returns the endpoint's slot. The indexes that learn from our picks record this way."""
        slot = self._slot(endpoint)
        bit = 1 << slot
        held = self._held[slot]
        owners = self._owners
        for h in hashes:
            if h in held:
                del held[h]  # re-inserted below, at the back
            else:
                owners[h] = owners.get(h, 0) | bit
            held[h] = value
        return slot

    def _clear_slot(self, slot: int) -> int:
        """Forget every entry of the slot; returns how many there were."""
        held = self._held[slot]
        bit = 1 << slot
        for h in held:
            self._unown(h, bit)
        count = len(held)
        held.clear()
        return count

    def _free_slot(self, slot: int) -> None:
        """Give back an emptied slot; the next new endpoint reuses it."""
        self._names[slot] = ""
        self._all &= ~(1 << slot)
        self._free_slots.append(slot)

    def _credit(self, found: dict[str, int], mask: int, depth: int) -> None:
        names = self._names
        while mask:
            low = mask & -mask
            found[names[low.bit_length() - 1]] = depth
            mask ^= low

    def _unown(self, h: int, bit: int) -> None:
        rest = self._owners[h] & ~bit
        if rest:
            self._owners[h] = rest
        else:
            del self._owners[h]

    def _forget_oldest(self, slot: int, count: int) -> int:
        """Forget the slot's `count` oldest blocks; returns how many went."""
        held = self._held[slot]
        bit = 1 << slot
        # Taking a chunk in one pass matters: each pass from the front of a dict also walks the
        # holes earlier deletions left, so evicting one entry at a time would be O(n) each.
        victims = list(itertools.islice(held, count))
        for h in victims:
            del held[h]
            self._unown(h, bit)
        self.evicted += len(victims)
        return len(victims)


class PrefixIndex(SlottedIndex[int]):
    """Block hash -> endpoints holding it (GPU tier), bounded. Not thread-safe: one event loop.
    Each endpoint's dict maps a hash to the copies it holds, in store order."""

    __slots__ = ("_entries", "_max_entries")

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        default_capacity: int = DEFAULT_ENDPOINT_CAPACITY,
    ) -> None:
        if max_entries < 1:
            raise ValueError("caps must be positive")
        super().__init__(default_capacity=default_capacity)
        self._max_entries = max_entries
        self._entries = 0

    # -- endpoints -----------------------------------------------------------------------------

    def add_endpoint(self, endpoint: str, *, capacity: int | None = None) -> None:
        """Register an endpoint (idempotent); `capacity` is its num_gpu_blocks when known."""
        slot = self._slot(endpoint)
        self._capacity[slot] = capacity if capacity and capacity > 0 else self._default_capacity
        self._enforce_endpoint_cap(slot)

    # -- writes (from the event subscribers) ---------------------------------------------------

    def store(self, endpoint: str, hashes: Iterable[int]) -> int:
        """Record blocks the endpoint now holds; returns how many entries the caps evicted."""
        slot = self._slot(endpoint)
        bit = 1 << slot
        held = self._held[slot]
        owners = self._owners
        added = 0
        for h in hashes:
            copies = held.get(h)
            if copies is None:
                held[h] = 1
                owners[h] = owners.get(h, 0) | bit
                added += 1
            else:
                held[h] = copies + 1
        self._entries += added
        before = self.evicted
        self._enforce_endpoint_cap(slot)
        self._enforce_global_cap()
        return self.evicted - before

    def remove(self, endpoint: str, hashes: Iterable[int]) -> None:
        """Record blocks the endpoint evicted. Unknown hashes are ignored: after a reset the index
        does not know blocks stored before it, and their removal changes nothing."""
        slot = self._slots.get(endpoint)
        if slot is None:
            return
        held = self._held[slot]
        for h in hashes:
            copies = held.get(h)
            if copies is None:
                continue
            if copies > 1:
                held[h] = copies - 1
                continue
            del held[h]
            self._entries -= 1
            self._unown(h, 1 << slot)

    def clear(self, endpoint: str) -> int:
        """Drop every entry of one endpoint (AllBlocksCleared, a restart, untrusted state)."""
        slot = self._slots.get(endpoint)
        return 0 if slot is None else self._clear_slot(slot)

    # -- reads (tests, metrics; the scheduler calls `lookup`) ------------------------------

    def holds(self, endpoint: str, block_hash: int) -> bool:
        slot = self._slots.get(endpoint)
        return slot is not None and block_hash in self._held[slot]

    def blocks_of(self, endpoint: str) -> frozenset[int]:
        """Every block hash the index credits to an endpoint (tests, debugging; O(blocks))."""
        slot = self._slots.get(endpoint)
        return frozenset() if slot is None else frozenset(self._held[slot])

    def size(self) -> IndexSize:
        return IndexSize(len(self._owners), self._entries, len(self._slots))

    # -- internals -----------------------------------------------------------------------------

    def _clear_slot(self, slot: int) -> int:
        count = super()._clear_slot(slot)
        self._entries -= count
        return count

    def _evict_oldest(self, slot: int, count: int) -> None:
        held = self._held[slot]
        count = min(len(held), max(count, len(held) // _EVICT_FRACTION, 1))
        self._entries -= self._forget_oldest(slot, count)

    def _enforce_endpoint_cap(self, slot: int) -> None:
        over = len(self._held[slot]) - self._capacity[slot]
        if over > 0:
            self._evict_oldest(slot, over)

    def _enforce_global_cap(self) -> None:
        while self._entries > self._max_entries:
            largest = max(self._slots.values(), key=lambda s: len(self._held[s]))
            self._evict_oldest(largest, self._entries - self._max_entries)
