"""The picker's view of a simulated fleet: live stats, servers that die and return, and stale
metrics handled as configured. Real simulator, real HTTP scrapes, real gRPC to the picker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from extproc.config import (
    CollectorConfig,
    Config,
    DiscoveryConfig,
    EndpointConfig,
    ServerConfig,
    StalePolicy,
)
from extproc.server.app import PickerServer
from extproc.sim import SimConfig, SimFleet
from tests import extproc_client as ep

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
COMPLETION = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4}


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(pods=2, speed=20)) as fleet:
        yield fleet


async def _picker(fleet: SimFleet, **collector: Any) -> PickerServer:
    config = Config(
        server=ServerConfig(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0),
        # Readiness from /v1/models stays put during a test; the collector decides.
        discovery=DiscoveryConfig(models_refresh_seconds=300),
        collector=CollectorConfig(interval_seconds=0.05, timeout_seconds=0.04, **collector),
        endpoints=tuple(EndpointConfig(url.removeprefix("http://")) for url in fleet.urls),
    )
    picker = PickerServer(config)
    await picker.start()
    return picker


@pytest.fixture
async def picker_of() -> AsyncIterator[Callable[..., Any]]:
    started: list[PickerServer] = []

    async def start(fleet: SimFleet, **collector: Any) -> PickerServer:
        picker = await _picker(fleet, **collector)
        started.append(picker)
        return picker

    yield start
    for picker in started:
        await picker.stop()


async def _picks(picker: PickerServer, count: int = 6) -> set[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as channel:
        chosen = set()
        for _ in range(count):
            stream = ep.Stream(channel)
            await stream.send(
                ep.request_headers("/v1/completions", headers={"x-routing-strategy": "round-robin"})
            )
            await stream.send(ep.request_body(ep.json_body(COMPLETION), end_of_stream=True))
            chosen.add(ep.destination(await stream.receive()).split(",")[0])
            await stream.close()
        return chosen


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_stats_follow_the_simulator(fleet: SimFleet, picker_of: Any) -> None:
    picker = await picker_of(fleet)
    address = fleet.urls[0].removeprefix("http://")
    # Keep requests running on server 0: long generations at a slowed-down clock.
    import aiohttp

    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "x " * 50, "max_tokens": 2000}
        tasks = [
            asyncio.create_task(http.post(f"{fleet.urls[0]}/v1/completions", json=body))
            for _ in range(3)
        ]

        def running() -> float:
            stats = _stats(picker, address)
            return float(stats.running) if stats is not None else -1.0

        await _until(lambda: running() == fleet.servers[0].stats().running == 3, "3 running")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_killed_server_drops_out_and_returns(fleet: SimFleet, picker_of: Any) -> None:
    picker = await picker_of(fleet, unready_after_failures=2)
    addresses = {url.removeprefix("http://") for url in fleet.urls}
    assert await _picks(picker) == addresses
    dead = fleet.urls[1].removeprefix("http://")
    await fleet.servers[1].kill()
    await _until(lambda: _failures(picker, dead) >= 2, "scrapes of the dead server failing")
    assert await _picks(picker) == addresses - {dead}
    await fleet.servers[1].revive()
    await _until(lambda: _failures(picker, dead) == 0, "the server scraped again")
    assert await _picks(picker) == addresses


@pytest.mark.parametrize("policy", ["saturated", "drop"])
async def test_stale_metrics_follow_the_policy(
    fleet: SimFleet, picker_of: Any, policy: StalePolicy
) -> None:
    # Scrapes of a hung server time out; with a high failure bound it stays ready but stale.
    picker = await picker_of(
        fleet, staleness_seconds=0.3, unready_after_failures=10_000, stale_policy=policy
    )
    hung = fleet.urls[1].removeprefix("http://")
    fleet.servers[1].set_faults(hang=True)
    try:
        stats = _stats(picker, hung)
        assert stats is not None
        await _until(lambda: time.monotonic() - stats.read_at > 0.5, "metrics stale")
        assert _stats(picker, hung).read_at == stats.read_at  # no scrape got through
        # Saturated or dropped, the fresh server takes every request while it can.
        assert await _picks(picker) == {fleet.urls[0].removeprefix("http://")}
        if policy == "saturated":
            # With only the stale server left (subset hint), it is still used: least-bad wins.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as channel:
                stream = ep.Stream(channel)
                await stream.send(ep.request_headers("/v1/completions", subset=[hung]))
                await stream.send(ep.request_body(ep.json_body(COMPLETION), end_of_stream=True))
                assert ep.destination(await stream.receive()).split(",")[0] == hung
                await stream.close()
        else:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as channel:
                stream = ep.Stream(channel)
                await stream.send(ep.request_headers("/v1/completions", subset=[hung]))
                await stream.send(ep.request_body(ep.json_body(COMPLETION), end_of_stream=True))
                status, _, _ = ep.immediate(await stream.receive())
                assert status == 503
                await stream.close()
    finally:
        fleet.servers[1].set_faults(hang=False)


def _failures(picker: PickerServer, address: str) -> int:
    (endpoint,) = [e for e in picker.store.current.endpoints if e.address == address]
    return endpoint.health.consecutive_failures if endpoint.health is not None else 0


def _stats(picker: PickerServer, address: str) -> Any:
    (endpoint,) = [e for e in picker.store.current.endpoints if e.address == address]
    return endpoint.stats
