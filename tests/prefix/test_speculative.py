"""Speculative entries over the precise index: our picks count until their events arrive, then
the events answer for them (evictions included); unconfirmed picks expire."""

from __future__ import annotations

from extproc.prefix.speculative import SpeculativeIndex
from extproc.state.prefix_index import PrefixIndex

A, B = "10.0.0.1:8000", "10.0.0.2:8000"
PROMPT = list(range(100, 120))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _index(ttl: float = 10.0) -> tuple[SpeculativeIndex, PrefixIndex, _Clock]:
    precise, clock = PrefixIndex(), _Clock()
    return SpeculativeIndex(precise, ttl_seconds=ttl, clock=clock), precise, clock


def test_a_pick_counts_before_its_events_arrive() -> None:
    index, precise, _ = _index()
    assert index.lookup(PROMPT, [A, B]) == {}
    index.record(A, PROMPT[:12])
    assert index.lookup(PROMPT, [A, B]) == {A: 12}
    assert precise.lookup(PROMPT, [A, B]) == {}  # the events know nothing yet
    # Narrowed to other candidates, it is not there.
    assert index.lookup(PROMPT, [B]) == {}


def test_the_longer_of_confirmed_and_speculative_wins() -> None:
    index, precise, _ = _index()
    precise.store(B, PROMPT[:8])
    index.record(B, PROMPT[:16])  # the next turn, routed before its new blocks' events
    index.record(A, PROMPT[:4])
    assert index.lookup(PROMPT, [A, B]) == {A: 4, B: 16}


def test_once_the_events_confirm_a_pick_they_alone_answer_for_it() -> None:
    index, precise, _ = _index()
    index.record(A, PROMPT[:10])
    precise.store(A, PROMPT[:10])
    assert index.lookup(PROMPT, [A]) == {A: 10}
    # The server evicts the tail: the speculative entry must not keep it alive.
    precise.remove(A, PROMPT[6:10])
    assert index.lookup(PROMPT, [A]) == {A: 6}


def test_a_confirmed_shared_first_block_does_not_cut_off_other_picks() -> None:
    """Every chat prompt begins with the template's block, which the events confirm on every
    endpoint. Looking up one prompt drops that block from the speculative entries; another
    prompt picked for A a moment earlier must still count past it."""
    index, precise, _ = _index()
    header, document, other = 7, list(range(200, 210)), list(range(300, 310))
    precise.store(A, [header])
    precise.store(B, [header])
    index.record(A, [header, *document])
    assert index.lookup([header, *other], [A, B]) == {A: 1, B: 1}
    assert index.lookup([header, *document, 999], [A, B]) == {A: 11, B: 1}


def test_an_unconfirmed_pick_expires() -> None:
    index, _, clock = _index(ttl=10.0)
    index.record(A, PROMPT[:10])
    clock.now = 9.0
    index.record(B, PROMPT[:5])
    assert index.lookup(PROMPT, [A, B]) == {A: 10, B: 5}
    clock.now = 10.0
    assert index.lookup(PROMPT, [A, B]) == {B: 5}
    # Recording again renews an entry.
    index.record(B, PROMPT[:5])
    clock.now = 19.5
    assert index.lookup(PROMPT, [A, B]) == {B: 5}
    clock.now = 20.0
    assert index.lookup(PROMPT, [A, B]) == {}


def test_held_counts_the_events_and_our_unconfirmed_picks_and_forgets_a_dropped_endpoint() -> None:
    index, precise, _ = _index()
    precise.store(A, PROMPT[:3])
    index.record(A, PROMPT)
    index.record(B, PROMPT)
    # Until a lookup drops A's confirmed entries, they count twice: 3 + 20.
    assert index.held([A, B, "unknown:1"]) == {A: 23, B: 20, "unknown:1": 0}
    index.lookup(PROMPT, [A])
    assert index.held([A, B]) == {A: 20, B: 20}
    index.drop_endpoint(B)
    assert index.held([B]) == {B: 0}
    assert index.lookup(PROMPT, [A, B]) == {A: 20}
