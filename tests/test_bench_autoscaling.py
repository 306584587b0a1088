"""The autoscaling benchmark's simulation on a short trace: deterministic, complete, cheap."""

from __future__ import annotations

import math
from pathlib import Path

from extproc.bench import autoscaling as bench
from extproc.controllers.autoscaler.algorithms import Bounds, Decision, Memory, Observation


class _Fixed:
    name = "fixed"

    def decide(self, observation: Observation, memory: Memory, bounds: Bounds) -> Decision:
        return Decision(observation.replicas, "keep", memory)


def test_trace_is_deterministic_and_bursty() -> None:
    config = bench.TraceConfig(hours=0.2, burst_every_seconds=120, seed=3)
    a, b = bench.make_trace(config), bench.make_trace(config)
    assert a == b
    assert a.bursts and len(a.arrivals) == len(a.prompts) == len(a.outputs)
    assert all(x < y for x, y in zip(a.arrivals, a.arrivals[1:], strict=False))


def test_every_request_is_served_and_pods_are_paid_for() -> None:
    trace = bench.make_trace(bench.TraceConfig(hours=0.05, low_rate=2, high_rate=6, seed=2))
    fleet = bench.FleetConfig(initial_pods=2, bounds=Bounds(2, 2))
    result = bench.simulate(trace, bench.Contender("fixed", _Fixed(), 5.0), fleet, slo_seconds=1)
    assert result.requests == len(trace.arrivals)
    assert not math.isnan(result.ttft_p90) and result.ttft_p90 < 1.0  # a light load
    assert result.pod_seconds == 2 * trace.duration  # two pods, warm from t=0, never removed
    assert (result.scale_events, result.oscillations) == (0, 0)


def test_the_three_algorithms_scale_with_a_start_delay(tmp_path: Path) -> None:
    code = bench.main(["--hours", "0.1", "--sweep", "", "--out", str(tmp_path)])
    assert code == 0
    report = (tmp_path / "autoscaling.md").read_text()
    for name in ("hpa", "kpa", "apa"):
        assert f"| {name} |" in report
    assert (tmp_path / "autoscaling.json").exists()
