"""HPA, KPA and APA decisions as pure functions, table-driven."""

from __future__ import annotations

import pytest

from extproc.controllers.autoscaler.algorithms import (
    Apa,
    ApaParams,
    Bounds,
    Hpa,
    HpaParams,
    Kpa,
    KpaParams,
    Memory,
    MetricWindow,
    Observation,
    Sample,
)

BOUNDS = Bounds(1, 10)


def _window(totals: list[float], pods: int, *, target: float = 10.0) -> MetricWindow:
    """One sample a second ending at t=100."""
    start = 100 - len(totals) + 1
    samples = tuple(Sample(start + i, total, pods) for i, total in enumerate(totals))
    return MetricWindow("concurrency", target, samples)


def _obs(totals: list[float], *, replicas: int, ready: int | None = None) -> Observation:
    ready = replicas if ready is None else ready
    return Observation(100.0, replicas, ready, (_window(totals, max(ready, 1)),))


@pytest.mark.parametrize(
    ("totals", "replicas", "ready", "expected"),
    [
        ([20] * 15, 2, 2, 2),  # on target
        ([21] * 15, 2, 2, 2),  # within the 10% tolerance
        ([40] * 15, 2, 2, 4),  # double: ceil(2 * 2)
        ([200] * 15, 2, 2, 6),  # capped by max(4 pods, 100%) per sync
        ([40] * 15, 4, 2, 4),  # 2 starting pods count as idle: 40 / (4 * 10) = 1, keep
    ],
    ids=["on-target", "tolerance", "double", "rate-limit", "unready-idle"],
)
def test_hpa(totals: list[float], replicas: int, ready: int, expected: int) -> None:
    decision = Hpa().decide(_obs(totals, replicas=replicas, ready=ready), Memory(), BOUNDS)
    assert decision.desired == expected


def test_hpa_scales_down_only_to_the_highest_recommendation_of_its_window() -> None:
    hpa = Hpa(HpaParams(downscale_stabilization_seconds=300))
    memory = Memory(recommendations=((50.0, 4),))
    assert hpa.decide(_obs([10] * 15, replicas=4), memory, BOUNDS).desired == 4
    old = Memory(recommendations=((-500.0, 4),))
    assert hpa.decide(_obs([10] * 15, replicas=4), old, BOUNDS).desired == 1


@pytest.mark.parametrize(
    ("totals", "replicas", "expected", "panic"),
    [
        ([30] * 60, 3, 3, False),  # stable: ceil(30 / 10)
        ([50] * 60, 3, 5, False),  # ceil(50 / 10)
        ([10] * 54 + [70] * 6, 3, 6, True),  # panic window asks 7 >= 2 * 3: up, capped 2x
        ([100] * 60, 2, 4, True),  # capped by max_scale_up_rate 2
    ],
    ids=["stable", "scale-up", "panic", "rate-limit"],
)
def test_kpa(totals: list[float], replicas: int, expected: int, panic: bool) -> None:
    kpa = Kpa(KpaParams(scale_down_delay_seconds=0))
    decision = kpa.decide(_obs(totals, replicas=replicas), Memory(), BOUNDS)
    assert (decision.desired, decision.panic) == (expected, panic)


def test_kpa_never_scales_down_in_panic_and_delays_after_it() -> None:
    kpa = Kpa(KpaParams(scale_down_delay_seconds=30))
    low = MetricWindow("c", 10, tuple(Sample(150 - i, 10, 6) for i in range(60)))  # wants 1
    memory = Memory(panic_since=90.0, panic_peak=6)
    decision = kpa.decide(Observation(149.0, 6, 6, (low,)), memory, BOUNDS)
    assert decision.panic and decision.desired == 6
    # The panic ends a stable window (60 s) after the last overload; the delay then holds.
    decision = kpa.decide(Observation(151.0, 6, 6, (low,)), decision.memory, BOUNDS)
    assert not decision.panic and decision.desired == 6
    later = MetricWindow("c", 10, tuple(Sample(182 - i, 10, 6) for i in range(60)))
    decision = kpa.decide(Observation(182.0, 6, 6, (later,)), decision.memory, BOUNDS)
    assert decision.desired == 3  # floor(6 / 2): the scale-down rate


def test_kpa_scales_to_zero_after_grace_and_activates_on_demand() -> None:
    kpa = Kpa(KpaParams(scale_to_zero=True, scale_to_zero_grace_seconds=30,
                        scale_down_delay_seconds=0))  # fmt: skip
    bounds = Bounds(0, 10)
    idle = _obs([0] * 60, replicas=1)
    assert kpa.decide(idle, Memory(busy_at=90.0), bounds).desired == 1  # within the grace
    assert kpa.decide(idle, Memory(busy_at=50.0), bounds).desired == 0
    asleep = Observation(100.0, 0, 0, (_window([], 0),))
    assert kpa.decide(asleep, Memory(), bounds).desired == 0
    woken = Observation(100.0, 0, 0, (_window([], 0),), activation_demand=25)
    assert kpa.decide(woken, Memory(), bounds).desired == 3  # ceil(25 / 10)


@pytest.mark.parametrize(
    ("totals", "replicas", "expected"),
    [
        ([30] * 30, 3, 3),  # on target
        ([32] * 30, 3, 3),  # +6.7%: inside the up tolerance (10%)
        ([25] * 30, 3, 3),  # -17%: inside the down tolerance (20%)
        ([40] * 30, 3, 4),  # +33%: ceil(3 * 1.33)
        ([12] * 30, 3, 2),  # -60%: ceil(3 * 0.4)
    ],
    ids=["on-target", "up-band", "down-band", "up", "down"],
)
def test_apa(totals: list[float], replicas: int, expected: int) -> None:
    apa = Apa(ApaParams(scale_down_delay_seconds=0))
    assert apa.decide(_obs(totals, replicas=replicas), Memory(), BOUNDS).desired == expected


@pytest.mark.parametrize("algorithm", [Hpa(), Kpa(), Apa()], ids=["hpa", "kpa", "apa"])
def test_no_samples_keeps_and_bounds_clamp(algorithm: Hpa | Kpa | Apa) -> None:
    empty = Observation(100.0, 3, 3, (MetricWindow("c", 10.0),))
    assert algorithm.decide(empty, Memory(), BOUNDS).desired == 3
    assert algorithm.decide(_obs([1000] * 60, replicas=3), Memory(), Bounds(1, 4)).desired <= 4


def test_several_sources_the_largest_wins() -> None:
    queue = _window([10] * 60, 2)  # wants 1
    kv = MetricWindow("kv", 0.5, tuple(Sample(41 + i, 1.6, 2) for i in range(60)))  # wants 4
    observation = Observation(100.0, 2, 2, (queue, kv))
    assert (
        Kpa(KpaParams(scale_down_delay_seconds=0)).decide(observation, Memory(), BOUNDS).desired
        == 4
    )
