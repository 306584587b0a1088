"""Session affinity: rendezvous hashing keeps a session put and moves few when the set changes."""

from __future__ import annotations

from collections import Counter

import pytest

from extproc.scheduling.scorers import SessionAffinityScorer, rendezvous_weight
from extproc.scheduling.strategies import Strategies
from extproc.scheduling.types import Candidate, SchedulingRequest
from tests.scheduling.build import cand

SCORER = SessionAffinityScorer()


def _home(session: str, candidates: list[Candidate]) -> str:
    scores = SCORER.score(SchedulingRequest(model="m", session_id=session), candidates)
    (home,) = [c.address for c, s in zip(candidates, scores, strict=True) if s == 1.0]
    return home


def test_no_session_is_neutral() -> None:
    assert list(SCORER.score(SchedulingRequest(model="m"), [cand(0), cand(1)])) == [1.0, 1.0]


@pytest.mark.parametrize(
    "request_",
    [
        SchedulingRequest(model="m", session_id="s-42"),
        SchedulingRequest(model="m", headers={"x-session-id": "s-42"}),
    ],
    ids=["field", "header"],
)
def test_session_from_field_or_header(request_: SchedulingRequest) -> None:
    candidates = [cand(i) for i in range(5)]
    assert sorted(SCORER.score(request_, candidates)) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert _home("s-42", candidates) == _home("s-42", list(reversed(candidates)))


def test_hash_is_stable_across_processes() -> None:
    # A fixed value: blake2b, not Python's salted hash(), so every replica agrees.
    assert rendezvous_weight("s-1", "10.0.0.1:8000") == 18378707270599536284


def test_sessions_spread_and_move_minimally() -> None:
    sessions = [f"session-{i}" for i in range(2000)]
    pool = [cand(i) for i in range(8)]
    before = {s: _home(s, pool) for s in sessions}
    # Spread: each of 8 endpoints gets roughly 1/8.
    counts = Counter(before.values())
    assert len(counts) == 8 and min(counts.values()) > 150

    # One endpoint leaves: only its sessions move.
    gone = pool[3].address
    smaller = [c for c in pool if c.address != gone]
    after = {s: _home(s, smaller) for s in sessions}
    moved = {s for s in sessions if before[s] != after[s]}
    assert moved == {s for s in sessions if before[s] == gone}

    # One endpoint joins: only sessions that now land on it move (about 1/9 of them).
    bigger = [*pool, cand(8)]
    joined = {s: _home(s, bigger) for s in sessions}
    moved = {s for s in sessions if before[s] != joined[s]}
    assert all(joined[s] == bigger[-1].address for s in moved)
    assert 120 < len(moved) < 330


def test_session_strategy_sticks_across_loads() -> None:
    profile = Strategies().get("session-affinity")
    request = SchedulingRequest(model="m", session_id="abc")
    candidates = [cand(i, requests=i) for i in range(4)]
    firsts = {profile.schedule(request, candidates).order[0].address for _ in range(50)}
    assert firsts == {_home("abc", candidates)}


def test_blend_moves_a_session_only_when_its_home_is_much_worse() -> None:
    profile = Strategies().get("session-affinity:3,least-request:1")
    candidates = [cand(i) for i in range(4)]
    home = _home("abc", candidates)
    loaded = [cand(i, requests=10 if c.address == home else 0) for i, c in enumerate(candidates)]
    request = SchedulingRequest(model="m", session_id="abc")
    assert profile.schedule(request, loaded).order[0].address == home
