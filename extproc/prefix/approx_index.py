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

from collections.abc import Iterable
from typing import Final

from extproc.state.prefix_index import SlottedIndex

DEFAULT_CAPACITY: Final = 29_001  # an 8B model on one 80 GB GPU, vLLM's defaults (the simulator's)
_EVICT_FRACTION: Final = 64


class ApproxPrefixIndex(SlottedIndex[None]):
    """Block hash -> endpoints we routed it to, LRU-bounded per endpoint. Not thread-safe.
    Each endpoint's dict holds its hashes least recently used first."""

    __slots__ = ()

    def __init__(self, *, default_capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(default_capacity=default_capacity)

    def set_capacity(self, endpoint: str, blocks: int | None) -> None:
        """The endpoint's num_gpu_blocks (None or <= 0: the default). Shrinking evicts now."""
        slot = self._slot(endpoint)
        self._capacity[slot] = blocks if blocks and blocks > 0 else self._default_capacity
        self._enforce(slot)

    def record(self, endpoint: str, hashes: Iterable[int]) -> None:
        """The picker routed a request with these prompt blocks to `endpoint`: now its most
        recently used."""
        self._enforce(self._renew(endpoint, hashes, None))

    def blocks_of(self, endpoint: str) -> tuple[int, ...]:
        """The endpoint's hashes, least recently used first (tests, debugging)."""
        slot = self._slots.get(endpoint)
        return () if slot is None else tuple(self._held[slot])

    def _enforce(self, slot: int) -> None:
        over = len(self._held[slot]) - self._capacity[slot]
        if over > 0:
            # The overflow, or 1/64 of the capacity when that is more: one pass per many records.
            count = min(len(self._held[slot]), max(over, self._capacity[slot] // _EVICT_FRACTION))
            self._forget_oldest(slot, count)
