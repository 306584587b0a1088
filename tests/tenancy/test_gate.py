"""The tenancy gate holds a request's lease and fair-queue place from its limits to its pick, and
gives both back unless the request is routed: on a refusal, an exception, or a cancellation (the
client hung up) while it waits in the queue. With the in-memory and the Redis limiter alike.

Each case uses a tenant allowed one request at a time: a slot left behind shows as the next
request's refusal. The pool is real: one endpoint in a snapshot, saturated by in-flight counts
(`saturation_requests: 1`), seen by the gate through `PoolRoom` as the picker wires it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from extproc.config import load_config
from extproc.metrics import PickerMetrics
from extproc.scheduling.room import PoolRoom, saturation_thresholds
from extproc.server.app import tenancy_for, tenancy_gate
from extproc.state.inflight import InFlight
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore
from extproc.tenancy.gate import Pass, QueueFull, QueueTimeout, Room, TenancyGate
from extproc.tenancy.limits import Granted, Limited
from extproc.tenancy.policy import Tenant
from extproc.tenancy.tenants import Tenancy
from tests.redis_server import RedisServer

ADDRESS, MODEL = "10.0.0.1:8000", "model-a"


@dataclass
class World:
    gate: TenancyGate
    tenancy: Tenancy
    inflight: InFlight
    metrics: PickerMetrics
    rooms: PoolRoom

    @property
    def solo(self) -> Tenant:
        return self.tenancy.directory.tenants["solo"]

    def room(self) -> Room:
        """The request's own candidates' room, as the pipeline passes it."""
        room = self.rooms(MODEL)
        assert room is not None
        return room

    def settings(self, **changed: Any) -> None:
        """A reload of the tenancy policy."""
        config = dataclasses.replace(self.tenancy.config, **changed)
        self.tenancy.reconfigure(config, self.tenancy.directory)

    def saturate(self) -> None:
        self.inflight.start(ADDRESS, 10)

    def free(self) -> None:
        self.inflight.finish(ADDRESS, 10)
        self.gate.poke()

    async def slot_free(self) -> bool:
        """The tenant's one slot can be taken (a shared limiter releases in the background,
        so it gets a moment); the slot taken to tell is given back."""
        limiter = self.tenancy.limiter
        for _ in range(100):
            verdict = await limiter.acquire(self.solo, 1)
            if isinstance(verdict, Granted):
                limiter.release(verdict.lease, 0)
                await self.released()
                return True
            await asyncio.sleep(0.02)
        return False

    async def released(self) -> None:
        """The shared limiter's background releases have reached Redis."""
        await asyncio.gather(*getattr(self.tenancy.limiter, "_background", ()))

    def queue_depth(self) -> float:
        sample = self.metrics.registry.get_sample_value
        return sample("extproc_tenant_queue_depth", {"tenant": "solo"}) or 0.0


@pytest.fixture(params=["memory", "redis"])
async def world(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[World]:
    tenancy_config: dict[str, Any] = {
        "enabled": True,
        "default_tenant": "solo",
        "tenants": {"solo": {"max_concurrency": 1}},
        "limits_backend": request.param,
        "redis_url": redis_server.url,
        "queue_timeout_seconds": 30,
    }
    config = load_config(
        None,
        {
            "collector": {"enabled": False},
            "scheduling": {"saturation_requests": 1},
            "endpoints": [{"address": ADDRESS}],
            "tenancy": tenancy_config,
        },
    )
    metrics, inflight = PickerMetrics(), InFlight()
    store = SnapshotStore(Snapshot.of([Endpoint(ADDRESS, frozenset({MODEL}), True)]))
    tenancy = tenancy_for(config, metrics)
    assert tenancy is not None
    gate = tenancy_gate(config, tenancy, store, inflight, metrics)
    assert gate is not None
    thresholds = saturation_thresholds(config.scheduling)
    rooms = PoolRoom(store, inflight, thresholds=thresholds, collector=config.collector)
    try:
        yield World(gate, tenancy, inflight, metrics, rooms)
    finally:
        await gate.aclose()
        await tenancy.aclose()


async def _through(world: World, *, entered: asyncio.Event | None = None) -> Pass:
    """One request through the gate, routed (kept)."""
    async with world.gate.enter(world.solo, MODEL, 10, flow="", room=world.room()) as entry:
        assert isinstance(entry, Pass), entry
        if entered is not None:
            entered.set()
        entry.keep()
        return entry


async def test_a_client_that_hangs_up_in_the_queue_leaves_no_lease_and_no_place(
    world: World,
) -> None:
    world.saturate()
    task = asyncio.create_task(_through(world))
    for _ in range(200):
        if world.gate.waiting(MODEL):
            break
        await asyncio.sleep(0.01)
    assert world.gate.waiting(MODEL) == 1 and world.queue_depth() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert world.gate.waiting() == 0 and world.queue_depth() == 0
    assert await world.slot_free()
    # Nor is it counted as started: once room frees, the next request goes at once.
    world.free()
    passed = await asyncio.wait_for(_through(world), 5)
    assert passed.queued is None


@pytest.mark.parametrize("how", ["refused", "raised"])
async def test_a_request_not_routed_inside_the_gate_gives_its_lease_back(
    world: World, how: str
) -> None:
    with pytest.raises(ZeroDivisionError) if how == "raised" else contextlib.nullcontext():
        async with world.gate.enter(world.solo, MODEL, 10, flow="", room=world.room()) as entry:
            assert isinstance(entry, Pass)
            if how == "raised":
                raise ZeroDivisionError("a bug in a plugin")
    assert await world.slot_free()


async def test_a_routed_request_holds_its_slot_until_its_response_ends(world: World) -> None:
    passed = await _through(world)
    async with world.gate.enter(world.solo, MODEL, 10, flow="", room=world.room()) as entry:
        assert isinstance(entry, Limited) and entry.limit == "max_concurrency"
    world.gate.ended(world.solo, passed.lease, 5)
    assert await world.slot_free()


async def test_a_wait_too_long_or_a_full_queue_is_a_refusal_holding_nothing(world: World) -> None:
    world.settings(queue_timeout_seconds=0.05)
    world.saturate()
    async with world.gate.enter(world.solo, MODEL, 10, flow="", room=world.room()) as entry:
        assert isinstance(entry, QueueTimeout)
    assert world.gate.waiting() == 0
    assert await world.slot_free()
    world.settings(max_queued_per_tenant=0)
    async with world.gate.enter(world.solo, MODEL, 10, flow="", room=world.room()) as entry:
        assert isinstance(entry, QueueFull)
    assert await world.slot_free()
