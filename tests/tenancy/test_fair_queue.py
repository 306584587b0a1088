"""Weighted fair queuing on tokens: who goes next when room frees, and what waits too long."""

from __future__ import annotations

import asyncio

from extproc.tenancy.fair_queue import FairQueue
from extproc.tenancy.policy import Tenant

HEAVY, LIGHT = Tenant("heavy"), Tenant("light")


class Room:
    """Room for `slots` releases; the test frees more by adding slots and poking."""

    def __init__(self) -> None:
        self.slots = 0

    def __call__(self, tenant: Tenant, model: str | None) -> bool:
        if self.slots <= 0:
            return False
        self.slots -= 1
        return True


async def _drain(queue: FairQueue, room: Room, order: list[str], count: int) -> None:
    """Free room for one request at a time, `count` times, each after the last was released."""
    for _ in range(count):
        before = len(order)
        room.slots = 1
        queue.poke()
        for _ in range(1000):
            if len(order) > before:
                break
            await asyncio.sleep(0.001)
        assert len(order) == before + 1


async def _enqueue(
    queue: FairQueue, tenant: Tenant, tokens: int, order: list[str]
) -> asyncio.Task[None]:
    async def one() -> None:
        outcome = await queue.wait(tenant, "m", max_wait=5, max_queued=100)
        assert outcome == "released"
        # As the pipeline does at the pick, before its next await.
        queue.charge(tenant, tokens)
        order.append(tenant.name)

    task = asyncio.create_task(one())
    await asyncio.sleep(0)
    return task


async def test_the_tenant_served_fewer_tokens_goes_first() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    order: list[str] = []
    tasks = [await _enqueue(queue, HEAVY, 1000, order) for _ in range(3)]
    tasks += [await _enqueue(queue, LIGHT, 1000, order) for _ in range(3)]
    queue.charge(HEAVY, 2500)  # heavy was served outside the queue meanwhile
    await _drain(queue, room, order, 6)
    await asyncio.gather(*tasks)
    assert order == ["light", "light", "light", "heavy", "heavy", "heavy"]


async def test_equal_tenants_alternate() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    queue.charge(HEAVY, 10_000)  # heavy had the pool to itself before contention
    order: list[str] = []
    tasks = [await _enqueue(queue, HEAVY, 1000, order) for _ in range(3)]
    # light's counter is lifted to heavy's when it starts waiting: from then on they alternate.
    tasks += [await _enqueue(queue, LIGHT, 1000, order) for _ in range(3)]
    await _drain(queue, room, order, 6)
    await asyncio.gather(*tasks)
    assert order == ["heavy", "light"] * 3


async def test_weights_share_tokens_in_proportion() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    gold, bronze = Tenant("gold", weight=3.0), Tenant("bronze", weight=1.0)
    order: list[str] = []
    tasks = [await _enqueue(queue, bronze, 100, order) for _ in range(8)]
    tasks += [await _enqueue(queue, gold, 100, order) for _ in range(8)]
    await _drain(queue, room, order, 8)
    assert order.count("gold") == 6 and order.count("bronze") == 2
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert queue.waiting() == 0


async def test_priority_goes_before_counters() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    vip = Tenant("vip", priority=5)
    queue.charge(vip, 10**6)
    order: list[str] = []
    tasks = [await _enqueue(queue, LIGHT, 10, order), await _enqueue(queue, vip, 10, order)]
    await _drain(queue, room, order, 2)
    await asyncio.gather(*tasks)
    assert order == ["vip", "light"]


async def test_idle_time_is_not_banked_as_credit() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    queue.charge(HEAVY, 5000)
    order: list[str] = []
    tasks = [await _enqueue(queue, HEAVY, 100, order) for _ in range(2)]
    # A tenant that was idle starts at the lowest waiting counter, not at zero.
    tasks.append(await _enqueue(queue, LIGHT, 100, order))
    assert queue.counter("light") == queue.counter("heavy") == 5000
    await _drain(queue, room, order, 3)
    await asyncio.gather(*tasks)


async def test_a_request_waits_at_most_the_timeout_and_a_full_queue_refuses() -> None:
    queue = FairQueue(has_room=lambda tenant, model: False)
    first = asyncio.create_task(queue.wait(HEAVY, "m", max_wait=0.05, max_queued=1))
    await asyncio.sleep(0)
    assert await queue.wait(HEAVY, "m", max_wait=0.05, max_queued=1) == "full"
    assert await first == "timeout"
    assert queue.waiting() == 0


async def test_only_the_model_with_room_is_released() -> None:
    queue = FairQueue(has_room=lambda tenant, model: model == "free")
    blocked = asyncio.create_task(queue.wait(HEAVY, "full", max_wait=1, max_queued=10))
    await asyncio.sleep(0)
    assert await queue.wait(LIGHT, "free", max_wait=1, max_queued=10) == "released"
    assert queue.waiting("full") == 1
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)
    await queue.aclose()


async def test_one_freed_slot_releases_one_request() -> None:
    """Room is asked again only after the released request counts itself in flight."""
    in_flight = [1]
    peak = [1]
    queue = FairQueue(has_room=lambda tenant, model: in_flight[0] < 1)

    async def request() -> None:
        assert await queue.wait(HEAVY, "m", max_wait=5, max_queued=10) == "released"
        in_flight[0] += 1  # the pick, before any await, as in the pipeline
        peak[0] = max(peak[0], in_flight[0])

    tasks = [asyncio.create_task(request()) for _ in range(5)]
    await asyncio.sleep(0.02)
    for released in range(1, 4):
        in_flight[0] -= 1
        queue.poke()
        await asyncio.sleep(0.05)  # several dispatcher ticks
        assert queue.waiting() == 5 - released
        assert peak[0] == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await queue.aclose()


async def test_a_newcomer_tied_with_a_backlog_goes_first() -> None:
    room = Room()
    queue = FairQueue(has_room=room)
    order: list[str] = []
    tasks = [await _enqueue(queue, HEAVY, 100, order) for _ in range(5)]
    tasks.append(await _enqueue(queue, LIGHT, 100, order))  # lifted to heavy's counter
    await _drain(queue, room, order, 1)
    assert order == ["light"]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_share_is_weighted_among_the_active_tenants() -> None:
    queue = FairQueue(has_room=lambda tenant, model: True)
    heavy, light = Tenant("heavy", weight=3.0), Tenant("light")
    for _ in range(3):
        queue.started(heavy, now=100.0)
    # Alone, heavy's share is the whole pool.
    assert not queue.over_share(heavy, 4, now=100.0)
    queue.started(light, now=100.0)
    queue.finished(light)
    # light, routed 5 s ago, is still active: heavy's share is 3/4 of 4 slots, and it holds 3.
    assert queue.over_share(heavy, 4, now=105.0)
    assert not queue.over_share(light, 4, now=105.0)
    # Quiet for longer than ACTIVE_SECONDS, light no longer counts.
    assert not queue.over_share(heavy, 4, now=111.0)
    queue.finished(heavy)
    assert not queue.over_share(heavy, 4, now=105.0)
