"""The simulator's /metrics text: gauges, counters and histograms current on every scrape (each
histogram rendered again only when observed), every duration in the seconds a client sees."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from extproc.sim import SimConfig, SimFleet
from extproc.sim.metrics import (
    ITERATION_TOKENS_BUCKETS,
    REQUEST_NUM_PREEMPTIONS_BUCKETS,
    TTFT_BUCKETS,
    _Histogram,
)
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


def test_every_scrape_shows_every_observation_so_far() -> None:
    stats = [IDLE_STATS]
    metrics = server_metrics(lambda: stats[0], max_lora=None)
    first = metrics.render()
    assert _ttft_count(first) == 0
    assert parse_vllm_metrics(first, read_at=0.0).running == 0

    metrics.on_first_token(0.05)
    stats[0] = dataclasses.replace(IDLE_STATS, running=3, kv_usage=0.5)
    soon = metrics.render()
    assert parse_vllm_metrics(soon, read_at=0.0).running == 3
    assert _ttft_count(soon) == 1
    # A histogram nothing was observed in since is the same text, not rendered again.
    metrics.on_finished(_finished(1))
    later = metrics.render()
    assert _ttft_count(later) == 1
    assert parse_vllm_metrics(later, read_at=0.0).prefill_requests == 1
    assert metrics.render() == later


async def test_first_token_counters_and_histogram_move_together() -> None:
    """vLLM counts a request's prompt tokens and observes its time to first token from the same
    step's stats, so a router that divides one by the other (the cost learner, before any
    request has finished) needs both in the same scrape: every scrape of a server computing
    prompts shows as many first tokens as prompts counted."""
    config = SimConfig(speed=4.0, tokenizer="bytes")
    async with SimFleet(config) as fleet, aiohttp.ClientSession() as http:
        url = fleet.urls[0]
        body = {"model": config.model, "prompt": "x" * 1000, "max_tokens": 1}
        async with http.post(f"{url}/v1/completions", json=body) as response:
            prompt_tokens = (await response.json())["usage"]["prompt_tokens"]
        body["max_tokens"] = 100

        async def send() -> None:
            async with http.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200

        sends = []
        seen = set()
        for i in range(60):
            if i % 10 == 0:
                sends.append(asyncio.create_task(send()))
            async with http.get(f"{url}/metrics") as response:
                stats = parse_vllm_metrics(await response.read(), read_at=0.0)
            assert stats.prompt_tokens == stats.first_tokens * prompt_tokens, i
            seen.add(stats.first_tokens)
            await asyncio.sleep(0.01)
        await asyncio.gather(*sends)
    # The scrapes caught the first tokens one at a time, not only at the end.
    assert len(seen) >= 3, seen


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


@pytest.mark.parametrize(
    "buckets", [TTFT_BUCKETS, ITERATION_TOKENS_BUCKETS, REQUEST_NUM_PREEMPTIONS_BUCKETS]
)
def test_a_histogram_reads_as_prometheus_client_writes_it(buckets: tuple[float, ...]) -> None:
    """The simulator fills in the numbers of a histogram's text itself; prometheus_client, fed
    the same observations, is the referee: every line equal but the creation time's."""
    ours = _Histogram("vllm:h", "A histogram.", buckets, ["m", "0"])
    registry = CollectorRegistry(auto_describe=False)
    theirs = Histogram("vllm:h", "A histogram.", ["model_name", "engine"], buckets=buckets,
                       registry=registry).labels("m", "0")  # fmt: skip
    rng = random.Random(7)
    # On the bounds themselves (le is <=), between them, above the last, and zero.
    values = [*buckets, 0.0, *(rng.uniform(0, 2 * buckets[-1]) for _ in range(300))]
    for i, value in enumerate(values):
        ours.observe(value)
        theirs.observe(value)
        if i % 97 == 0 or i == len(values) - 1:
            assert _without_created(ours.text()) == _without_created(generate_latest(registry))
    assert b"vllm:h_created" in ours.text()


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if not line.startswith("vllm:h_created")]
