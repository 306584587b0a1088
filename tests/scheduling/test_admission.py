"""Admission under saturation, table-driven."""

from __future__ import annotations

import random

import pytest

from extproc.scheduling.admission import (
    Admit,
    LeastBad,
    SaturationThresholds,
    Shed,
    admit,
    saturation,
)
from extproc.scheduling.types import Candidate, SchedulingRequest
from tests.scheduling.build import addr, cand

CRITICAL = SchedulingRequest(model="m", prompt_tokens=100)
SHEDDABLE = SchedulingRequest(model="m", prompt_tokens=100, priority=-1)


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        pytest.param(cand(0), 0.0, id="idle"),
        pytest.param(cand(0, waiting=5), 1.0, id="queue-at-threshold"),
        pytest.param(cand(0, waiting=2, picked=3), 1.0, id="queue-counts-picks"),
        pytest.param(cand(0, kv=0.4), 0.5, id="kv-half"),
        pytest.param(cand(0, waiting=1, kv=0.96), 1.2, id="kv-dominates"),
        pytest.param(cand(0, saturated=True), float("inf"), id="stale"),
        pytest.param(cand(0, stats=False), 0.0, id="no-collector"),
    ],
)
def test_saturation(candidate: Candidate, expected: float) -> None:
    assert saturation(candidate, SaturationThresholds()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("request_", "candidates", "outcome", "first"),
    [
        pytest.param(CRITICAL, [cand(0, waiting=9), cand(1)], "admitted", None, id="one-has-room"),
        pytest.param(
            SHEDDABLE, [cand(0, waiting=9), cand(1)], "admitted", None, id="shed-only-when-full"
        ),
        pytest.param(
            SHEDDABLE, [cand(0, waiting=9), cand(1, kv=0.9)], "shed", None, id="sheddable-shed"
        ),
        pytest.param(
            SHEDDABLE,
            [cand(0, saturated=True), cand(1, saturated=True)],
            "shed",
            None,
            id="all-stale-counts-as-saturated",
        ),
        pytest.param(
            CRITICAL,
            [cand(0, waiting=9), cand(1, waiting=6), cand(2, waiting=20)],
            "least-bad",
            1,
            id="critical-least-bad-by-ttft",
        ),
        pytest.param(
            SchedulingRequest(model="m", priority=0),
            [cand(0, saturated=True), cand(1, waiting=30)],
            "least-bad",
            1,
            id="fresh-before-stale",
        ),
        pytest.param(CRITICAL, [], "admitted", None, id="no-candidates-not-judged"),
        pytest.param(
            CRITICAL, [cand(0, stats=False)], "admitted", None, id="no-metrics-no-saturation"
        ),
    ],
)
def test_admit(
    request_: SchedulingRequest, candidates: list[Candidate], outcome: str, first: int | None
) -> None:
    result = admit(request_, candidates, rng=random.Random(1))
    assert result.outcome == outcome
    if isinstance(result, LeastBad):
        assert first is not None and result.order[0].address == addr(first)
        assert len(result.order) == len(candidates)
        assert set(result.predicted_seconds) == {c.address for c in candidates}
    if isinstance(result, Shed):
        assert "saturated" in result.reason


def test_thresholds_are_configurable() -> None:
    loose = SaturationThresholds(queue=50, kv=0.99)
    assert isinstance(admit(SHEDDABLE, [cand(0, waiting=9, kv=0.9)], thresholds=loose), Admit)
