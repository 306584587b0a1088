"""Which endpoints may serve a request: those serving its model, ready, inside the subset hint,
with metrics fresh enough to trust (or marked saturated, as the collector config says)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from extproc.config import CollectorConfig
from extproc.scheduling.types import Candidate
from extproc.state.collector import freshness
from extproc.state.inflight import InFlight, Load
from extproc.state.snapshot import Endpoint, Snapshot

# A candidate's counts before `counted` fills them in.
_NOTHING_SENT = Load()


@dataclass(frozen=True, slots=True)
class NoCandidates:
    """Why nothing is eligible: the model is unknown (404) or nobody can take it now (503)."""

    unknown_model: bool


def candidates_for(
    snapshot: Snapshot,
    inflight: InFlight,
    *,
    model: str | None,
    subset: Collection[str] | None,
    collector: CollectorConfig,
    now: float,
) -> list[Candidate] | NoCandidates:
    pool = snapshot.serving(model) if model is not None else snapshot.endpoints
    if model is not None and not pool:
        return NoCandidates(unknown_model=True)
    eligible = []
    for endpoint in pool:
        if not endpoint.ready or (subset is not None and not _inside(endpoint.address, subset)):
            continue
        candidate = _candidate(endpoint, inflight, collector, now)
        if candidate is not None:
            eligible.append(candidate)
    return eligible or NoCandidates(unknown_model=False)


def _inside(address: str, subset: Collection[str]) -> bool:
    """In the proxy's subset hint: named as `ip:port`, or its host named bare (every port of a
    pod; the reference picker matches on the IP alone, which a subset naming one port of a
    pod with several, such as data-parallel ranks, would widen)."""
    return address in subset or address.rpartition(":")[0] in subset


def _candidate(
    endpoint: Endpoint, inflight: InFlight, collector: CollectorConfig, now: float
) -> Candidate | None:
    if not collector.enabled or endpoint.health is None:
        return counted(Candidate(endpoint, _NOTHING_SENT), inflight, now)
    state = freshness(
        endpoint.stats,
        endpoint.health,
        now=now,
        staleness_seconds=collector.staleness_seconds,
        unready_after_failures=collector.unready_after_failures,
    )
    if state == "failing" or (state == "stale" and collector.stale_policy == "drop"):
        return None
    return counted(Candidate(endpoint, _NOTHING_SENT, saturated=state == "stale"), inflight, now)


def counted(candidate: Candidate, inflight: InFlight, now: float) -> Candidate:
    """`candidate` with what this picker (and its sibling workers) sent it, as it stands at
    monotonic time `now`: its requests in flight, its predicted prefill backlog, and, against
    its last scrape (none without metrics), the picks the scrape cannot show yet and those of
    its waiting requests that are ours.

    Taken again just before the pick (`Planner.counted`): a request awaits its tokens between
    finding its candidates and being placed, and a burst's requests all find theirs before
    the first of them is placed, so counts from then miss every pick of the burst but the
    ones before it (measured with a prompt's whole prefix awaited before the decision: five
    branches of an agent fan-out all saw the first one's backlog alone, and were stacked on
    it; docs/benchmarks.md, "Bursts on one prefix")."""
    address = candidate.address
    stats = candidate.stats
    return dataclasses.replace(
        candidate,
        load=inflight.load(address),
        prefill_backlog=inflight.backlog(address, now),
        picked_since_scrape=0 if stats is None else inflight.started_since(address, stats.read_at),
        waiting_ours=0 if stats is None else inflight.waiting_at(address, stats.read_at),
    )


class PrefixLookup(Protocol):
    """The precise index (KV events) or the approximate one (our own routing)."""

    def lookup(
        self, hashes: Sequence[int], endpoints: Collection[str] | None = None
    ) -> dict[str, int]: ...

    def held(self, endpoints: Collection[str]) -> dict[str, int]: ...


def with_prefix_matches(
    candidates: Sequence[Candidate], block_hashes: Sequence[int], index: PrefixLookup
) -> list[Candidate]:
    """Each candidate with the number of the prompt's leading blocks it holds, and the number
    of blocks it holds in all."""
    addresses = [c.address for c in candidates]
    matches = index.lookup(block_hashes, addresses)
    held = index.held(addresses)
    return [
        dataclasses.replace(
            c, prefix_blocks=matches.get(c.address, 0), cached_blocks=held[c.address]
        )
        for c in candidates
    ]


def prefix_holds(
    candidates: Sequence[Candidate], index: PrefixLookup | None
) -> Callable[[Sequence[int]], bool]:
    """Whether some candidate holds every one of a prompt's leading hashes: what a prompt probe
    (`PromptBlocks.probe`) asks before computing more of the prompt. Once no candidate does, no
    match can grow, so `with_prefix_matches` on the hashes so far gives the final counts.
    Without an index nobody holds anything. One per prompt: the probe asks with ever longer
    leading runs of the same prompt's hashes, so only the new ones are looked up."""
    if index is None:
        return lambda hashes: False
    return _PrefixHolds([c.address for c in candidates], index)


class _PrefixHolds:
    __slots__ = ("_alive", "_index", "_seen")

    def __init__(self, addresses: list[str], index: PrefixLookup) -> None:
        self._alive = addresses  # the candidates holding every hash seen so far
        self._index = index
        self._seen = 0

    def __call__(self, hashes: Sequence[int]) -> bool:
        new = hashes[self._seen :]
        if new and self._alive:
            # `lookup` counts each endpoint's leading run of `new`: those holding all of it are
            # still holding the whole prefix.
            found = self._index.lookup(new, self._alive)
            self._alive = [a for a in self._alive if found.get(a) == len(new)]
        self._seen = len(hashes)
        return bool(self._alive)
