"""Strategies as profiles of filters, scorers and pickers, table-driven."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from extproc.scheduling.strategies import Strategies, parse_blend, validate_strategy_name
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.state.inflight import InFlight, Load
from extproc.state.snapshot import Endpoint

REQUEST = SchedulingRequest(model="m")


def _candidates(loads: list[int]) -> list[Candidate]:
    return [
        Candidate(Endpoint(f"10.0.0.{i}:8000", frozenset({"m"}), True), Load(n))
        for i, n in enumerate(loads)
    ]


@pytest.mark.parametrize(
    ("loads", "expected_first"),
    [([3, 0, 5], "10.0.0.1:8000"), ([1, 1, 0], "10.0.0.2:8000"), ([0], "10.0.0.0:8000")],
    ids=["middle-idle", "last-idle", "single"],
)
def test_least_request_picks_the_least_loaded_and_orders_fallbacks(
    loads: list[int], expected_first: str
) -> None:
    ranked = Strategies(random.Random(1)).get("least-request").schedule(REQUEST, _candidates(loads))
    assert ranked.order[0].address == expected_first
    got = [c.load.requests for c in ranked.order]
    assert got == sorted(got)


def test_least_request_breaks_ties_at_random() -> None:
    profile = Strategies(random.Random(7)).get("least-request")
    firsts = Counter(
        profile.schedule(REQUEST, _candidates([2, 2, 2])).order[0].address for _ in range(300)
    )
    assert len(firsts) == 3 and min(firsts.values()) > 50


def test_round_robin_cycles_and_random_covers_everyone() -> None:
    strategies = Strategies(random.Random(3))
    candidates = _candidates([0, 0, 0, 0])
    rr = [
        strategies.get("round-robin").schedule(REQUEST, candidates).order[0].address
        for _ in range(8)
    ]
    assert rr[:4] == rr[4:] and len(set(rr)) == 4
    picks = Counter(
        strategies.get("random").schedule(REQUEST, candidates).order[0].address for _ in range(400)
    )
    assert len(picks) == 4 and min(picks.values()) > 60


def test_profiles_are_cached_so_round_robin_keeps_its_cursor() -> None:
    strategies = Strategies()
    assert strategies.get("round-robin") is strategies.get("round-robin")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("fastest", "unknown strategy 'fastest'"),
        ("round-robin:2", "'round-robin' cannot be blended"),
        ("least-request:x", "must be a number"),
        ("least-request:0", "must be positive"),
        ("least-request:-1", "must be positive"),
        ("", "unknown strategy ''"),
    ],
)
def test_bad_strategy_names_say_why(name: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        validate_strategy_name(name)


def test_blend_weights() -> None:
    assert parse_blend("least-request:2.5") == [("least-request", 2.5)]
    assert parse_blend("least-request") == [("least-request", 1.0)]


def test_inflight_counts_requests_and_tokens() -> None:
    inflight = InFlight()
    inflight.start("a", 10)
    inflight.start("a", 5)
    assert inflight.load("a") == Load(2, 15)
    inflight.finish("a", 10)
    assert inflight.load("a") == Load(1, 5)
    inflight.finish("a", 5)
    inflight.finish("a", 5)  # an extra finish never goes negative
    assert inflight.load("a") == Load(0, 0) and inflight.total() == 0


def test_inflight_prefill_backlog_queues_and_drains() -> None:
    inflight = InFlight()
    inflight.start("a", 100, prefill_seconds=0.2, now=10.0)
    inflight.start("a", 100, prefill_seconds=0.1, now=10.1)  # behind the first: done at 10.3
    assert inflight.backlog("a", 10.1) == pytest.approx(0.2)
    assert inflight.backlog("a", 10.25) == pytest.approx(0.05)
    assert inflight.backlog("a", 10.3) == 0.0 and inflight.backlog("b", 10.0) == 0.0
    inflight.start("a", 100, prefill_seconds=0.1, now=11.0)  # an idle engine starts at once
    assert inflight.backlog("a", 11.0) == pytest.approx(0.1)
    inflight.finish("a", 100)  # a response's end does not change the prediction
    assert inflight.backlog("a", 11.05) == pytest.approx(0.05)


def test_inflight_knows_which_picks_a_scrape_saw_waiting() -> None:
    inflight = InFlight()
    inflight.start("a", 100, waits_seconds=0.0, now=10.0)  # admitted at once
    inflight.start("a", 100, waits_seconds=0.5, now=10.1)  # waits until 10.6
    inflight.start("a", 100, waits_seconds=0.6, now=10.2)  # waits until 10.8
    assert inflight.waiting_at("a", 9.9) == 0  # nothing picked yet
    assert inflight.waiting_at("a", 10.15) == 1  # the third not picked yet
    assert inflight.waiting_at("a", 10.3) == 2
    assert inflight.waiting_at("a", 10.7) == 1
    assert inflight.waiting_at("a", 10.8) == 0 and inflight.waiting_at("b", 10.3) == 0
    # A pick still waiting outlives the 5 s memory of picks; an admitted one does not.
    inflight.start("a", 100, waits_seconds=20.0, now=11.0)
    inflight.start("a", 100, waits_seconds=15.0, now=17.0)
    assert inflight.waiting_at("a", 17.0) == 2
    assert inflight.started_since("a", 0.0) == 2


def test_an_adapters_request_prefers_where_the_adapter_is_active_under_any_strategy() -> None:
    """Same load everywhere; only pod 1 has `sql` in its running batch (pod 2 has no free slot
    for it). A built-in blend adds LoRA affinity for adapter requests, and only for them."""
    from extproc.scheduling.types import SchedulingRequest
    from extproc.state.stats import LoraState
    from tests.scheduling.build import addr, cand

    pods = [
        cand(0, lora=LoraState(2, frozenset({"chat", "summarise"}))),
        cand(1, lora=LoraState(2, frozenset({"sql"}))),
        cand(2, lora=LoraState(1, frozenset({"chat"}))),
    ]
    strategies = Strategies()
    adapter = SchedulingRequest(model="sql", lora="sql")
    for name in ("least-request", "prefix-cache", "least-queue:1,least-kv-cache:1"):
        ranked = strategies.get(name, adapter=True).schedule(adapter, pods)
        assert ranked.order[0].address == addr(1), name
        base = strategies.get(name)
        assert all(w.scorer.name != "lora-affinity-scorer" for w in base.scorers)
