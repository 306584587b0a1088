"""Flows (the request's fairness id) inside one tenant's queue, and a request's own priority."""

from __future__ import annotations

import asyncio
import dataclasses

from extproc.tenancy.fair_queue import FairQueue
from extproc.tenancy.policy import Tenant
from tests.tenancy.test_fair_queue import Room, _drain

ACME, OTHER = Tenant("acme"), Tenant("other")


async def _enqueue(
    queue: FairQueue, tenant: Tenant, flow: str, order: list[str], *, tokens: int = 100
) -> asyncio.Task[None]:
    async def one() -> None:
        outcome = await queue.wait(tenant, "m", max_wait=5, max_queued=100, flow=flow)
        assert outcome == "released"
        queue.charge(tenant, tokens)
        order.append(f"{tenant.name}/{flow}" if flow else f"{tenant.name}:{tenant.priority}")

    task = asyncio.create_task(one())
    await asyncio.sleep(0)
    return task


async def test_a_tenants_flows_take_turns() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    order: list[str] = []
    tasks = [await _enqueue(queue, ACME, "bulk", order) for _ in range(4)]
    tasks += [await _enqueue(queue, ACME, "chat", order) for _ in range(2)]
    await _drain(queue, room, order, 6)
    await asyncio.gather(*tasks)
    # Without flows this is arrival order: four bulk, then chat.
    assert order == ["acme/bulk", "acme/chat", "acme/bulk", "acme/chat", "acme/bulk", "acme/bulk"]


async def test_flows_never_add_to_a_tenants_share() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    order: list[str] = []
    # acme opens a flow per request; other sends one flow. Equal tenants still alternate.
    tasks = [await _enqueue(queue, ACME, f"f{i}", order) for i in range(3)]
    tasks += [await _enqueue(queue, OTHER, "one", order) for _ in range(3)]
    await _drain(queue, room, order, 6)
    await asyncio.gather(*tasks)
    assert [o.split("/")[0] for o in order] == ["acme", "other"] * 3


async def test_a_requests_own_priority_goes_first_inside_its_tenant() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    order: list[str] = []
    low = dataclasses.replace(ACME, priority=-1)  # as an objective lowered it
    tasks = [await _enqueue(queue, low, "", order) for _ in range(2)]
    tasks.append(await _enqueue(queue, ACME, "", order))
    await _drain(queue, room, order, 3)
    await asyncio.gather(*tasks)
    assert order == ["acme:0", "acme:-1", "acme:-1"]
