"""The approximate prefix index: which blocks each endpoint probably holds, learned from our own
routing decisions, for fleets that publish no KV events.

When the picker sends a request to an endpoint, that endpoint will compute (and cache) the
request's prompt blocks, so `record(endpoint, block_hashes)` credits them to it. vLLM evicts
cached blocks least-recently-used first once its `num_gpu_blocks` are taken, so each endpoint's
share here is an LRU bounded by the same number (`set_capacity`, from `vllm:cache_config_info`),
or `default_capacity` until it is known. It is approximate in both directions: requests other
routers sent, preemptions and restarts are invisible, and a request still queued is credited
before it runs. The precise index (`extproc.state.prefix_index`) replaces it when events flow.

    index = ApproxPrefixIndex(default_capacity=29_001)
    index.set_capacity("10.0.0.7:8000", 29_001)
    index.record("10.0.0.7:8000", tokens.block_hashes)   # after routing there
    index.lookup(tokens.block_hashes, ["10.0.0.7:8000", "10.0.0.8:8000"])  # {"10.0.0.7:8000": n}
    index.drop_endpoint("10.0.0.7:8000")

`lookup` has exactly the contract of `PrefixIndex.lookup`: for each endpoint, how many leading
hashes it holds, stopping at its first miss; endpoints holding none are absent. Everything is
synchronous, pure over the index's own state and O(len(hashes)); one event loop owns it.

Representation, as in the precise index: `_owners` maps a hash to a bitmask of endpoint slots
(small ints for up to 8 endpoints), and each endpoint has a dict in recency order. `record`
moves a known hash to the back (most recent); past capacity the front goes, in chunks of 1/64 of
the endpoint's entries so that evicting stays amortised O(1) (deleting from a dict's front one
at a time would rescan the holes each time).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from typing import Final

DEFAULT_CAPACITY: Final = 29_001  # an 8B model on one 80 GB GPU, vLLM's defaults (the simulator's)
_EVICT_FRACTION: Final = 64


class ApproxPrefixIndex:
    """Block hash -> endpoints we routed it to, LRU-bounded per endpoint. Not thread-safe."""

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

    def __init__(self, *, default_capacity: int = DEFAULT_CAPACITY) -> None:
        if default_capacity < 1:
            raise ValueError("default_capacity must be positive")
        self._default_capacity = default_capacity
        self._owners: dict[int, int] = {}
        self._slots: dict[str, int] = {}
        self._names: list[str] = []
        self._held: list[dict[int, None]] = []  # per slot, least recently used first
        self._capacity: list[int] = []
        self._free_slots: list[int] = []
        self._all = 0
        self.evicted = 0  # entries forgotten at capacity since start (monotonic, for metrics)

    def set_capacity(self, endpoint: str, blocks: int | None) -> None:
        """The endpoint's num_gpu_blocks (None or <= 0: the default). Shrinking evicts now."""
        slot = self._slot(endpoint)
        self._capacity[slot] = blocks if blocks and blocks > 0 else self._default_capacity
        self._enforce(slot)

    def record(self, endpoint: str, hashes: Iterable[int]) -> None:
        """The picker routed a request with these prompt blocks to `endpoint`."""
        slot = self._slot(endpoint)
        bit = 1 << slot
        held = self._held[slot]
        owners = self._owners
        for h in hashes:
            if h in held:
                del held[h]  # re-inserted below: now the most recently used
            else:
                owners[h] = owners.get(h, 0) | bit
            held[h] = None
        self._enforce(slot)

    def drop_endpoint(self, endpoint: str) -> None:
        slot = self._slots.pop(endpoint, None)
        if slot is None:
            return
        bit = 1 << slot
        for h in self._held[slot]:
            self._unown(h, bit)
        self._held[slot].clear()
        self._names[slot] = ""
        self._all &= ~bit
        self._free_slots.append(slot)

    def lookup(
        self, hashes: Sequence[int], endpoints: Collection[str] | None = None
    ) -> dict[str, int]:
        """For each endpoint, how many of the leading `hashes` it holds (see the module doc)."""
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

    def blocks_of(self, endpoint: str) -> tuple[int, ...]:
        """The endpoint's hashes, least recently used first (tests, debugging)."""
        slot = self._slots.get(endpoint)
        return () if slot is None else tuple(self._held[slot])

    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def __len__(self) -> int:
        return len(self._owners)

    # -- internals -----------------------------------------------------------------------------

    def _slot(self, endpoint: str) -> int:
        slot = self._slots.get(endpoint)
        if slot is not None:
            return slot
        if self._free_slots:
            # The lowest free slot keeps masks small (cached small ints up to 8 endpoints).
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

    def _enforce(self, slot: int) -> None:
        held = self._held[slot]
        over = len(held) - self._capacity[slot]
        if over <= 0:
            return
        # The overflow, or 1/64 of the capacity when that is more: one pass per many records.
        count = min(len(held), max(over, self._capacity[slot] // _EVICT_FRACTION))
        bit = 1 << slot
        victims = list(itertools.islice(held, count))
        for h in victims:
            del held[h]
            self._unown(h, bit)
        self.evicted += len(victims)
