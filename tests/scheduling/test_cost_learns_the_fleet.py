"""The cost model learns a fleet's prefill speed from the simulator's own metrics, light load
only (nothing ever queues), from a prior ten times wrong either way (issue 18).

The fleet runs `speed` times faster than its profile, so the speed the router should learn is the
profile's lone-prompt speed times `speed`: every duration the simulator reports is in wall
seconds, the clock the router reads (and the client sees)."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from extproc.bench.workloads import WORDS
from extproc.scheduling.cost_learner import CostLearner
from extproc.sim.fleet import DEFAULT_MODEL, SimConfig, SimFleet
from extproc.sim.profiles import get_profile
from extproc.state.metrics_text import parse_vllm_metrics
from extproc.state.snapshot import Endpoint, Snapshot

GPU = "gpu"
# 30 simulated seconds of traffic, run `SPEED` times faster than the profile: 15 s of the
# learner's (wall) clock, half what the target allows.
SIMULATED_SECONDS = 30.0
SPEED = 2.0


async def _traffic(
    http: aiohttp.ClientSession, url: str, *, rate: float, seconds: float, rng: random.Random
) -> list[int]:
    """Poisson arrivals of distinct ~1.5k-token prompts (nothing cached); their prompt sizes."""
    sizes: list[int] = []

    async def one() -> None:
        prompt = " ".join(rng.choice(WORDS) for _ in range(1500))
        body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 24}
        async with http.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            sizes.append((await resp.json())["usage"]["prompt_tokens"])

    tasks = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return sizes


async def _scrape(
    http: aiohttp.ClientSession, url: str, learners: list[CostLearner], stop: asyncio.Event
) -> None:
    address = url.removeprefix("http://")
    while not stop.is_set():
        async with http.get(f"{url}/metrics") as resp:
            stats = parse_vllm_metrics(await resp.read(), read_at=time.monotonic())
        endpoint = Endpoint(address, frozenset({DEFAULT_MODEL}), True, stats=stats, accelerator=GPU)
        for learner in learners:
            learner.update(Snapshot.of([endpoint]))
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["h100-8b", "l4-8b"])
async def test_prefill_speed_within_20_percent_after_30_seconds(profile: str) -> None:
    rng = random.Random(7)
    async with (
        SimFleet(SimConfig(profile=profile, speed=SPEED, seed=3)) as fleet,
        aiohttp.ClientSession() as http,
    ):
        url = fleet.urls[0]
        # The learned speed is what a router can use: the profile's lone-prompt speed (at the
        # prompts' size) in wall seconds. Priors ten times too fast and ten times too slow.
        guess = get_profile(profile).prefill_tokens_per_second(1500) * SPEED
        fast = CostLearner(speeds={GPU: guess * 10})
        slow = CostLearner(speeds={GPU: guess / 10})
        stop = asyncio.Event()
        scraper = asyncio.create_task(_scrape(http, url, [fast, slow], stop))
        # One request per simulated second: far below what even the L4 computes.
        sizes = await _traffic(http, url, rate=SPEED, seconds=SIMULATED_SECONDS / SPEED, rng=rng)
        stop.set()
        await scraper
    truth = get_profile(profile).prefill_tokens_per_second(round(sum(sizes) / len(sizes))) * SPEED
    address = url.removeprefix("http://")
    for learner in (fast, slow):
        learned = learner.current().estimate(address).tokens_per_second
        assert learned == pytest.approx(truth, rel=0.2), (profile, learned, truth)
