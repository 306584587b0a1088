"""The simulator's /metrics text: gauges fresh on every scrape, histograms at most once a second,
every duration in the seconds a client sees."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import pytest

from extproc.sim import SimConfig, SimFleet
from extproc.sim.metrics import HISTOGRAM_REFRESH_SECONDS
from extproc.sim.request import FinishedRequest
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


@pytest.mark.parametrize("speed", [0.5, 4.0])
async def test_durations_are_in_the_clients_seconds_at_any_speed(speed: float) -> None:
    """A router reading the histograms must see the seconds its clients see, whatever the
    simulator's speed: the time to first token the client timed on a streamed request, and
    the whole request, match the histograms' sums."""
    config = SimConfig(speed=speed, tokenizer="bytes")
    async with SimFleet(config) as fleet, aiohttp.ClientSession() as http:
        url = fleet.urls[0]
        body = {"model": config.model, "prompt": "x" * 3000, "max_tokens": 8, "stream": True}
        started = time.monotonic()
        first = None
        async with http.post(f"{url}/v1/completions", json=body) as response:
            async for line in response.content:
                if first is None and line.startswith(b"data: {"):
                    first = time.monotonic() - started
        whole = time.monotonic() - started
        await asyncio.sleep(1.05)  # histograms refresh at most once a second
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
    assert first is not None

    def value(name: str) -> float:
        (line,) = [x for x in text.splitlines() if x.startswith(name + "{")]
        return float(line.rsplit(" ", 1)[1])

    ttft = value("vllm:time_to_first_token_seconds_sum")
    e2e = value("vllm:e2e_request_latency_seconds_sum")
    # The client's times include HTTP and the event loop's wake-ups: a little above the
    # engine's, never the factor `speed` (or 1 / speed) that simulated seconds would show.
    assert ttft <= first <= ttft * 1.25 + 0.01, (ttft, first)
    assert e2e <= whole <= e2e * 1.25 + 0.01, (e2e, whole)
    # Token counts are not durations: not scaled (the bytes tokenizer packs 4 bytes a token).
    assert value("vllm:request_prefill_kv_computed_tokens_sum") == 750
