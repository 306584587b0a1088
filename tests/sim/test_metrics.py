"""The simulator's /metrics text: gauges fresh on every scrape, histograms at most once a second."""

from __future__ import annotations

import dataclasses

from extproc.sim.engine import FinishedRequest
from extproc.sim.metrics import HISTOGRAM_REFRESH_SECONDS
from extproc.state.metrics_text import parse_vllm_metrics
from tests.sim.conftest import IDLE_STATS, server_metrics


def _finished(i: int) -> FinishedRequest:
    return FinishedRequest(f"r{i}", 100, 10, 0, "stop", 0.0, 0.0, 0.05, 0.5, 0, 10)


def _ttft_count(text: bytes) -> float:
    line = next(
        line
        for line in text.decode().splitlines()
        if line.startswith("vllm:time_to_first_token_seconds_count")
    )
    return float(line.split()[-1])


def test_gauges_are_fresh_and_histograms_refresh_once_a_second() -> None:
    now = [100.0]
    stats = [IDLE_STATS]
    metrics = server_metrics(lambda: stats[0], max_lora=None, clock=lambda: now[0])
    first = metrics.render()
    assert _ttft_count(first) == 0
    assert parse_vllm_metrics(first, read_at=0.0).running == 0

    metrics.on_first_token(0.05)
    metrics.on_finished(_finished(1))
    stats[0] = dataclasses.replace(IDLE_STATS, running=3, kv_usage=0.5)
    now[0] += HISTOGRAM_REFRESH_SECONDS / 2
    soon = metrics.render()
    # The gauges a router reads are current; the histograms are the last rendering's.
    assert parse_vllm_metrics(soon, read_at=0.0).running == 3
    assert _ttft_count(soon) == 0

    now[0] += HISTOGRAM_REFRESH_SECONDS / 2
    assert _ttft_count(metrics.render()) == 1
    # Nothing new observed: the same text however late.
    now[0] += 60
    assert _ttft_count(metrics.render()) == 1
