"""The `cheapest` strategy (PriceScorer) and the cost model's per-GPU-type speeds."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.scheduling.cost_learner import CostLearner
from extproc.scheduling.cost_model import CostModel, EndpointCost
from extproc.scheduling.price import QUALIFIES, PriceScorer, request_price
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.state.snapshot import Endpoint, Snapshot
from extproc.state.stats import EndpointStats
from tests.scheduling.build import addr, cand

FAST = EndpointCost(tokens_per_second=50_000, step_seconds=0.006, samples=3)
SLOW = EndpointCost(tokens_per_second=15_000, step_seconds=0.011, samples=3)


def priced(c: Candidate, per_hour: float, accelerator: str = "") -> Candidate:
    endpoint = dataclasses.replace(c.endpoint, cost_per_hour=per_hour, accelerator=accelerator)
    return dataclasses.replace(c, endpoint=endpoint)


def model(**estimates: EndpointCost) -> CostModel:
    return CostModel(estimates={addr(int(k[1:])): v for k, v in estimates.items()})


REQUEST = SchedulingRequest("m", prompt_tokens=2000, max_tokens=200)


def scores(m: CostModel, target: float, candidates: list[Candidate]) -> list[float]:
    return list(PriceScorer(lambda: m, target).score(REQUEST, candidates))


def test_the_cheapest_endpoint_within_the_target_wins() -> None:
    # A slow cheap GPU and a fast dear one, both idle: both meet a loose target.
    m = model(e1=SLOW, e2=FAST)
    cheap, dear = priced(cand(1), 1.0), priced(cand(2), 4.0)
    s = scores(m, 1.0, [cheap, dear])
    assert s[0] > s[1] > QUALIFIES


def test_under_load_work_spills_over_to_the_faster_endpoint() -> None:
    # The cheap GPU's queue puts its predicted TTFT past the target: the dear one qualifies.
    m = model(e1=SLOW, e2=FAST)
    cheap, dear = priced(cand(1, backlog=2.0), 1.0), priced(cand(2), 4.0)
    s = scores(m, 0.5, [cheap, dear])
    assert s[1] > QUALIFIES > s[0]


def test_with_none_in_target_the_fastest_wins() -> None:
    m = model(e1=SLOW, e2=FAST)
    cheap, dear = priced(cand(1, backlog=3.0), 1.0), priced(cand(2, backlog=2.0), 4.0)
    s = scores(m, 0.1, [cheap, dear])
    assert QUALIFIES >= s[1] > s[0]


def test_joining_a_running_batch_costs_a_share_of_its_steps() -> None:
    m = model(e1=FAST, e2=FAST)
    idle, busy = priced(cand(1), 2.0), priced(cand(2, running=9), 2.0)
    assert request_price(m, REQUEST, busy) < request_price(m, REQUEST, idle)
    s = scores(m, 10.0, [idle, busy])
    assert s[1] > s[0]


def test_an_endpoint_without_a_price_costs_nothing_and_ties_go_to_speed() -> None:
    m = model(e1=SLOW, e2=FAST)
    a, b = cand(1), cand(2)
    assert request_price(m, REQUEST, a) == 0.0
    s = scores(m, 10.0, [a, b])
    assert s[1] > s[0] > QUALIFIES


def _stats(read_at: float, prompt: float, waiting: float) -> EndpointStats:
    return EndpointStats(
        read_at=read_at, waiting=waiting, running=4, kv_usage=0.1, prompt_tokens=prompt
    )


@pytest.mark.parametrize(("kind", "expected"), [("a100", 15_000.0), ("h100", 50_000.0)])
def test_an_unlearned_endpoint_takes_its_gpu_types_learned_speed(
    kind: str, expected: float
) -> None:
    learner = CostLearner()
    rates = {"10.0.0.1:8000": ("a100", 15_000.0), "10.0.0.2:8000": ("h100", 50_000.0)}
    unlearned = {"10.0.0.3:8000": "a100", "10.0.0.4:8000": "h100"}

    def snapshot(t: float) -> Snapshot:
        eps = [
            Endpoint(a, frozenset({"m"}), True, stats=_stats(t, rate * t, 3), accelerator=k)
            for a, (k, rate) in rates.items()
        ]
        eps += [Endpoint(a, frozenset({"m"}), True, accelerator=k) for a, k in unlearned.items()]
        return Snapshot.of(eps)

    for step in range(300):  # queued at every scrape: throughput is the engine's speed
        learner.update(snapshot(step * 0.1))
    current = learner.current()
    address = next(a for a, k in unlearned.items() if k == kind)
    assert current.estimate(address).tokens_per_second == pytest.approx(expected, rel=0.2)
    # Without a type, the fleet's mean.
    assert current.estimate("10.0.0.9:8000").tokens_per_second == pytest.approx(32_500, rel=0.2)


def test_a_configured_gpu_speed_is_the_prior_of_its_type() -> None:
    learner = CostLearner(speeds={"a100": 14_400.0})
    eps = [
        Endpoint("10.0.0.1:8000", frozenset({"m"}), True, accelerator="a100"),
        Endpoint("10.0.0.2:8000", frozenset({"m"}), True, accelerator="h100"),
    ]
    learner.update(Snapshot.of(eps))
    current = learner.current()
    assert current.estimate("10.0.0.1:8000").tokens_per_second == 14_400.0
    assert current.estimate("10.0.0.2:8000") == EndpointCost()  # no speed given: the default
