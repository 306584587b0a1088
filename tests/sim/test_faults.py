"""Faults for reliability tests: error rate, hang, death and revival, frozen metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from extproc.prefix.tokenizers import Tokenizer
from extproc.sim import SimConfig, SimFleet
from tests.sim.conftest import post, until, words


async def test_error_rate(http: aiohttp.ClientSession, tokenizer: Tokenizer) -> None:
    async with SimFleet(SimConfig(speed=200, seed=3), tokenizer=tokenizer) as fleet:
        url = fleet.urls[0]
        status, _ = await post(http, f"{url}/sim/faults", {"error_rate": 0.5})
        assert status == 200
        statuses = [
            (await post(http, f"{url}/v1/completions", {"prompt": "x", "max_tokens": 1}))[0]
            for _ in range(40)
        ]
        assert set(statuses) == {200, 500}
        await post(http, f"{url}/sim/faults", {"error_rate": 1.0})
        status, body = await post(http, f"{url}/v1/completions", {"prompt": "x"})
        assert status == 500
        assert body["error"]["type"] == "InternalServerError"
        # Probes stay healthy: only inference fails.
        async with http.get(f"{url}/health") as resp:
            assert resp.status == 200
        status, _ = await post(http, f"{url}/sim/faults", {"error_rate": 2})
        assert status == 400


async def test_hung_server_answers_nothing_until_unhung(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    async with SimFleet(SimConfig(speed=200), tokenizer=tokenizer) as fleet:
        server = fleet.servers[0]
        server.set_faults(hang=True)
        health = asyncio.create_task(http.get(f"{server.url}/health"))
        done, _ = await asyncio.wait({health}, timeout=0.2)
        assert not done
        server.set_faults(hang=False)
        resp = await health
        assert resp.status == 200
        resp.release()


async def test_kill_and_revive(http: aiohttp.ClientSession, tokenizer: Tokenizer) -> None:
    config = SimConfig(pods=2, speed=1000, control_port=0)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        victim = fleet.servers[1]
        prompt = words(100)
        await post(http, f"{victim.url}/v1/completions", {"prompt": prompt, "max_tokens": 1})
        assert victim.cached_block_ids()
        # Die through the server's own control endpoint, coming back after 50 simulated seconds.
        status, _ = await post(http, f"{victim.url}/sim/kill", {"down_for": 50})
        assert status == 200
        await until(lambda: not victim.alive)
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, f"{victim.url}/health", {})
        assert victim.stats().prefix_cache_queries == 0  # a restart starts from zero
        await until(lambda: victim.alive, attempts=5000)
        _, body = await post(
            http, f"{victim.url}/v1/completions", {"prompt": prompt, "max_tokens": 1}
        )
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # The fleet control server kills and revives on demand.
        assert fleet.control_url is not None
        status, state = await post(http, f"{fleet.control_url}/servers/0/kill", {})
        assert state == {"index": 0, "alive": False}
        status, state = await post(http, f"{fleet.control_url}/servers/0/revive", {})
        assert state == {"index": 0, "alive": True}
        async with http.get(f"{fleet.urls[0]}/health") as resp:
            assert resp.status == 200


async def test_in_flight_requests_fail_when_the_server_dies(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    async with SimFleet(SimConfig(speed=10), tokenizer=tokenizer) as fleet:
        server = fleet.servers[0]
        pending = asyncio.create_task(
            post(http, f"{server.url}/v1/completions", {"prompt": "x", "max_tokens": 10_000})
        )
        await until(lambda: server.stats().running == 1)
        await server.kill()
        with pytest.raises(aiohttp.ClientError):
            await pending
        assert server.stats().running == 0
        await server.revive()
        assert server.alive


async def test_frozen_metrics(http: aiohttp.ClientSession, tokenizer: Tokenizer) -> None:
    async with SimFleet(SimConfig(speed=200), tokenizer=tokenizer) as fleet:
        server = fleet.servers[0]
        url = server.url
        server.set_faults(freeze_metrics=True)
        async with http.get(f"{url}/metrics") as resp:
            frozen = await resp.text()
        await post(http, f"{url}/v1/completions", {"prompt": "x", "max_tokens": 2})
        async with http.get(f"{url}/metrics") as resp:
            assert await resp.text() == frozen
        server.set_faults(freeze_metrics=False)
        async with http.get(f"{url}/metrics") as resp:
            assert await resp.text() != frozen
