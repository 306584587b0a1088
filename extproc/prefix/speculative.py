"""The precise index, plus what our own routing says will be there before the events do.

vLLM publishes a prompt's `BlockStored` events at the end of the step that computes it (the
scheduler takes them in `update_from_output`), so the precise index learns a prefix only after
the request has waited its turn and run its first chunk. Until then, a second request with the
same prefix sees it nowhere and lands elsewhere, and computes it again. On bursty shared
prompts that is most of them: in the quick h100 shared-prefix cell (seed 1), the picker saw no
prefix at all for its first 28 decisions, where a router that trusts its own picks (sglang's
tree) saw it from the second request on; the default's hit rate was 0.53 against 0.73.

So each pick is recorded here as a *speculative* entry: the endpoint we sent the prompt to will
hold its blocks. A lookup counts, per endpoint, the confirmed run (the events) continued through
its speculative entries. An entry goes when the events confirm it (the confirmed index then answers
for it, evictions included) or when `SPECULATIVE_SECONDS` have passed without them (a request
that never ran, events lost). llm-d's precise scorer does the same ("speculative indexing",
llm-d-router #659), with a TTL.

    index = SpeculativeIndex(precise)        # precise: the KV-event index (`PrefixIndex`)
    index.record("10.0.0.7:8000", hashes)    # after routing there (`Learning.learn`)
    index.lookup(hashes, endpoints)          # confirmed run, continued speculatively
    index.held(endpoints)                    # confirmed, plus our picks not yet confirmed

Like the indexes it joins, it is synchronous and owned by one event loop.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Final

from extproc.prefix.approx_index import DEFAULT_CAPACITY
from extproc.state.prefix_index import PrefixIndex, SlottedIndex

# How long a pick may wait for its events before its entry is dropped. Long enough for a queued
# request on a slow fleet to reach its first step (a few seconds under load on an L4-class GPU);
# an entry the events confirm goes at once, so this bounds only the picks that never ran.
SPECULATIVE_SECONDS: Final = 10.0


class SpeculativeIndex(SlottedIndex[float]):
    """Our recent picks (block hash -> endpoints, each entry stamped with when it was recorded,
    oldest first per endpoint) over the confirmed index. Not thread-safe."""

    __slots__ = ("_clock", "_confirmed", "_ttl")

    def __init__(
        self,
        confirmed: PrefixIndex,
        *,
        ttl_seconds: float = SPECULATIVE_SECONDS,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(default_capacity=capacity)
        self._confirmed = confirmed
        self._ttl = ttl_seconds
        self._clock = clock

    def record(self, endpoint: str, hashes: Iterable[int]) -> None:
        """The picker routed a prompt with these blocks to `endpoint` (stamped now)."""
        slot = self._renew(endpoint, hashes, self._clock())
        over = len(self._held[slot]) - self._capacity[slot]
        if over > 0:
            self._forget_oldest(slot, over)

    def lookup(
        self, hashes: Sequence[int], endpoints: Collection[str] | None = None
    ) -> dict[str, int]:
        """Per endpoint, its confirmed leading run, continued through its speculative entries.
        Entries the confirmed run covers are dropped: from here on the events answer for them.

        The run goes on from where the confirmed one stops, rather than being the longer of
        two runs from the start, because dropping a confirmed block may take the head of other
        entries' chains: the chat template's first block is confirmed everywhere, and once it
        was dropped, another prompt's pick that began with it counted for nothing (measured:
        the quick h100 shared-prefix cell saw no prefix for a third of its groups' second
        requests, docs/prefix.md)."""
        self._expire(self._clock() - self._ttl)
        found = self._confirmed.lookup(hashes, endpoints)
        if not self._owners:
            return found
        count = len(hashes)
        for endpoint, slot in self._slots.items():
            held = self._held[slot]
            if not held or (endpoints is not None and endpoint not in endpoints):
                continue
            confirmed = depth = found.get(endpoint, 0)
            while depth < count and hashes[depth] in held:
                depth += 1
            if depth > confirmed:
                found[endpoint] = depth
            if confirmed:
                self._forget(slot, hashes[:confirmed])
        return found

    def held(self, endpoints: Collection[str]) -> dict[str, int]:
        """How full each cache is: the events' count plus the blocks of our picks they have not
        confirmed yet. The scheduler reads it to put a new prompt where caches are least taken
        (`cost.cache_pressure`); on the events alone, every new group sent within one step of
        each other saw the same counts and went to the same endpoint (measured: three groups of
        about 300 blocks in 120 ms to the one endpoint of four holding least, which they then
        overfilled). An entry the events have confirmed counts twice until a lookup of its
        prompt drops it, or its time runs out: an endpoint given a prompt recently looks fuller
        for up to `SPECULATIVE_SECONDS`, which errs toward spreading new prompts."""
        counts = self._confirmed.held(endpoints)
        slots = self._slots
        for name in endpoints:
            slot = slots.get(name)
            if slot is not None:
                counts[name] = counts.get(name, 0) + len(self._held[slot])
        return counts

    def _forget(self, slot: int, hashes: Sequence[int]) -> None:
        held, bit = self._held[slot], 1 << slot
        for h in hashes:
            if held.pop(h, None) is not None:
                self._unown(h, bit)

    def _expire(self, before: float) -> None:
        """Drop the entries recorded at or before `before` (each endpoint's are oldest first)."""
        for slot, held in enumerate(self._held):
            stale = sum(1 for _ in itertools.takewhile(lambda at: at <= before, held.values()))
            if stale:
                self._forget_oldest(slot, stale)
