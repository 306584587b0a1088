"""Explanations of one decision, and the built-in strategies that produce them."""

from __future__ import annotations

import json
import random

import pytest

from extproc.scheduling.admission import LeastBad, Shed, admit
from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.explain import explain, explain_admission
from extproc.scheduling.strategies import Strategies, known_strategies, parse_blend
from extproc.scheduling.types import SchedulingRequest
from tests.scheduling.build import addr, cand

REQUEST = SchedulingRequest(model="m", prompt_tokens=64, block_hashes=(1, 2, 3, 4))


def test_explain_lists_each_scorer_weight_and_total_in_pick_order() -> None:
    profile = Strategies(random.Random(1)).get("prefix-cache:3,least-kv-cache:2,least-request:2")
    candidates = [cand(0, kv=0.5), cand(1, prefix=4, requests=1), cand(2, saturated=True)]
    ranked = profile.schedule(REQUEST, candidates)
    out = json.loads(explain(profile, candidates, ranked, request=REQUEST, cost_model=CostModel()))
    assert out["pick"] == addr(1)
    assert out["weights"] == {
        "prefix-cache-scorer": 3.0,
        "kv-cache-utilization-scorer": 2.0,
        "least-request-scorer": 2.0,
    }
    first, second = out["endpoints"]
    assert first == {
        "address": addr(1),
        "total": 5.0,
        "scores": {
            "prefix-cache-scorer": 1.0,
            "kv-cache-utilization-scorer": 1.0,
            "least-request-scorer": 0.0,
        },
        "prefix_blocks": 4,
        "ttft_ms": 8.0,
        "wait_ms": 0.0,
        "backlog_ms": 0.0,
        "kv_ms": 0.0,
        "tokens_per_s": 50_000,
        "running": 0.0,
        "waiting": 0.0,
        "kv_usage": 0.0,
    }
    assert second["address"] == addr(0) and second["total"] == 3.0
    assert out["filtered"] == [addr(2)]


def test_explain_caps_endpoints_and_stays_compact() -> None:
    profile = Strategies().get("least-request")
    candidates = [cand(i) for i in range(30)]
    text = explain(profile, candidates, profile.schedule(REQUEST, candidates), max_endpoints=4)
    out = json.loads(text)
    assert len(out["endpoints"]) == 4 and out["more"] == 26
    assert " " not in text and "ttft_ms" not in text


def test_explain_splits_the_wait_into_our_backlog_and_the_kv_blocks() -> None:
    """50 ms of our own prompts ahead (2,500 tokens at 50k tokens/s: 156.25 blocks) and our 4
    new blocks, 150 free: 10.25 short of 850 held, wait that share of a typical decode (256
    steps of 8 ms)."""
    profile = Strategies().get("cost")
    busy = cand(0, backlog=0.05, kv=0.85, gpu_blocks=1000, cached=300)
    ranked = profile.schedule(REQUEST, [busy])
    out = json.loads(explain(profile, [busy], ranked, request=REQUEST, cost_model=CostModel()))
    (entry,) = out["endpoints"]
    kv_ms = round(10.25 / 850 * 256 * 0.008 * 1000, 1)
    assert entry["backlog_ms"] == 50.0
    assert entry["kv_ms"] == kv_ms
    assert entry["wait_ms"] == pytest.approx(50.0 + kv_ms, abs=0.1)
    assert "waiting_ours" not in entry
    # The scrape the KV term read, and the blocks a near tie would be broken by.
    assert entry["kv_usage"] == 0.85
    assert entry["cached_blocks"] == 300


def test_explain_names_the_scraped_waiting_it_took_for_ours() -> None:
    """Two waiting, one of them ours (in the backlog already): the wait is the backlog and one
    typical queued request (1024 tokens at 50k tokens/s, and a step)."""
    profile = Strategies().get("cost")
    busy = cand(0, waiting=2, ours=1, backlog=0.05)
    ranked = profile.schedule(REQUEST, [busy])
    out = json.loads(explain(profile, [busy], ranked, request=REQUEST, cost_model=CostModel()))
    (entry,) = out["endpoints"]
    assert entry["waiting_ours"] == 1
    assert entry["wait_ms"] == pytest.approx(50.0 + (1024 / 50_000 + 0.008) * 1000, abs=0.1)


def test_explain_without_scorers() -> None:
    profile = Strategies().get("round-robin")
    ranked = profile.schedule(REQUEST, [cand(0)])
    out = json.loads(explain(profile, [cand(0)], ranked))
    assert out["weights"] == {} and out["endpoints"][0]["scores"] == {}


def test_explain_admission() -> None:
    full = [cand(0, waiting=7), cand(1, waiting=6)]
    least_bad = admit(REQUEST, full)
    assert isinstance(least_bad, LeastBad)
    out = json.loads(explain_admission(least_bad))
    assert out["admission"] == "least-bad" and out["endpoints"][0]["address"] == addr(1)
    shed = admit(SchedulingRequest(model="m", priority=-2), full)
    assert isinstance(shed, Shed)
    assert json.loads(explain_admission(shed))["admission"] == "shed"
    assert json.loads(explain_admission(admit(REQUEST, [cand(0)]))) == {"admission": "admitted"}


@pytest.mark.parametrize("name", known_strategies())
def test_every_built_in_strategy_schedules(name: str) -> None:
    profile = Strategies(random.Random(2)).get(name)
    candidates = [cand(0, waiting=3, kv=0.7, requests=3), cand(1, prefix=4)]
    ranked = profile.schedule(REQUEST, candidates)
    assert {c.address for c in ranked.order} == {addr(0), addr(1)}
    if name not in ("random", "round-robin", "session-affinity", "lora-affinity"):
        # Every load or cache signal says endpoint 1.
        assert ranked.order[0].address == addr(1)


def test_the_brief_blend_parses() -> None:
    assert parse_blend("prefix-cache:3,least-kv-cache:2,least-request:2") == [
        ("prefix-cache", 3.0),
        ("least-kv-cache", 2.0),
        ("least-request", 2.0),
    ]


@pytest.mark.parametrize(
    ("name", "problem"),
    [("cost:1,cost:2", "listed twice"), ("cost:nan", "must be positive"), ("cost:inf", "positive")],
)
def test_more_bad_blends(name: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_blend(name)
