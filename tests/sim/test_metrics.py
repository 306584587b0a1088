"""The simulator's /metrics text: gauges fresh on every scrape, histograms at most once a second."""

from __future__ import annotations

import dataclasses

from extproc.sim.engine import EngineStats, FinishedRequest
from extproc.sim.metrics import HISTOGRAM_REFRESH_SECONDS, ServerMetrics
from extproc.state.metrics_text import parse_vllm_metrics

IDLE = EngineStats(
    running=0,
    waiting=0,
    waiting_deferred=0,
    kv_usage=0.0,
    num_gpu_blocks=100,
    prefix_cache_queries=0,
    prefix_cache_hits=0,
    preemptions=0,
    prompt_tokens=0,
    prompt_tokens_cached=0,
    generation_tokens=0,
    finished_by_reason={"stop": 0},
    steps=0,
    running_loras=(),
    waiting_loras=(),
)


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
    stats = [IDLE]
    metrics = ServerMetrics(
        model_name="m",
        stats=lambda: stats[0],
        cache_info={"block_size": "16", "num_gpu_blocks": "100"},
        max_model_len=4096,
        max_lora=None,
        clock=lambda: now[0],
    )
    first = metrics.render()
    assert _ttft_count(first) == 0
    assert parse_vllm_metrics(first, read_at=0.0).running == 0

    metrics.on_first_token(0.05)
    metrics.on_finished(_finished(1))
    stats[0] = dataclasses.replace(IDLE, running=3, kv_usage=0.5)
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
