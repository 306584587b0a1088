"""Limits shared through a real Redis: two limiters (as two picker replicas) enforce one limit,
and a Redis that dies mid-run leaves each replica with its configured failure mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import pytest

from extproc.metrics import PickerMetrics
from extproc.tenancy.limits import Granted, Limited, Unavailable
from extproc.tenancy.policy import Limits, Tenant
from extproc.tenancy.redis_limits import RedisLimiter
from tests.redis_server import RedisServer

Factory = Callable[..., Awaitable[RedisLimiter]]


@pytest.fixture
async def limiters(redis_server: RedisServer) -> AsyncIterator[Factory]:
    made: list[RedisLimiter] = []

    async def make(
        failure_mode: Literal["open", "closed"] = "open",
        retry_seconds: float = 0.2,
        lease_seconds: float = 60,
    ) -> RedisLimiter:
        limiter = RedisLimiter(
            redis_server.url,
            PickerMetrics(),
            timeout=0.5,
            failure_mode=failure_mode,
            retry_seconds=retry_seconds,
            lease_seconds=lease_seconds,
        )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


def _metric(limiter: RedisLimiter, name: str, labels: dict[str, str] | None = None) -> float:
    value = limiter._metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def test_two_replicas_enforce_one_request_limit(limiters: Factory) -> None:
    one, two = await limiters(), await limiters()
    tenant = Tenant("shared", Limits(requests_per_minute=10))
    verdicts = []
    for i in range(16):  # alternate replicas, as a load balancer would
        verdicts.append(await (one if i % 2 else two).acquire(tenant, 0))
    granted = sum(isinstance(v, Granted) for v in verdicts)
    assert granted == 10
    refused = [v for v in verdicts if isinstance(v, Limited)]
    assert {v.limit for v in refused} == {"requests_per_minute"}
    # One request's worth refills every 6 s: that is what the refusal says.
    assert all(5.0 < v.retry_after <= 6.0 for v in refused)


async def test_concurrent_acquires_never_overshoot(limiters: Factory) -> None:
    replicas = [await limiters() for _ in range(3)]
    tenant = Tenant("burst", Limits(max_concurrency=4))
    verdicts = await asyncio.gather(*(replicas[i % 3].acquire(tenant, 0) for i in range(30)))
    held = [v for v in verdicts if isinstance(v, Granted)]
    assert len(held) == 4
    # Releasing on one replica frees the slot for all.
    replicas[2].release(held[0].lease, 0)
    await asyncio.sleep(0.05)  # the release is sent in the background
    assert isinstance(await replicas[0].acquire(tenant, 0), Granted)


async def test_tokens_are_shared_and_completion_tokens_count(limiters: Factory) -> None:
    one, two = await limiters(), await limiters()
    tenant = Tenant("tokens", Limits(tokens_per_minute=1000))
    first = await one.acquire(tenant, 600)
    assert isinstance(first, Granted)
    one.release(first.lease, 500)  # 1,100 used: in debt
    await asyncio.sleep(0.05)
    over = await two.acquire(tenant, 10)
    assert isinstance(over, Limited) and over.limit == "tokens_per_minute"
    assert over.retry_after > 5  # 100+ tokens at 1000/min


async def test_redis_down_fails_open_to_local_limits_and_comes_back(
    limiters: Factory, redis_server: RedisServer
) -> None:
    limiter = await limiters("open", retry_seconds=0.2)
    tenant = Tenant("t", Limits(requests_per_minute=3))
    assert isinstance(await limiter.acquire(tenant, 0), Granted)
    redis_server.kill()
    # Fail open: this replica's own bucket (full: it never counted locally) answers.
    local = [await limiter.acquire(tenant, 0) for _ in range(4)]
    assert [isinstance(v, Granted) for v in local] == [True, True, True, False]
    assert _metric(limiter, "extproc_limiter_redis_up") == 0
    assert _metric(limiter, "extproc_limiter_fallbacks_total", {"mode": "open"}) == 4
    redis_server.start()  # an empty Redis: the shared count starts again
    await asyncio.sleep(0.25)
    assert isinstance(await limiter.acquire(tenant, 0), Granted)
    assert _metric(limiter, "extproc_limiter_redis_up") == 1


async def test_redis_down_fails_closed_when_configured(
    limiters: Factory, redis_server: RedisServer
) -> None:
    limiter = await limiters("closed", retry_seconds=5)
    tenant = Tenant("t", Limits(requests_per_minute=100))
    assert isinstance(await limiter.acquire(tenant, 0), Granted)
    redis_server.kill()
    assert isinstance(await limiter.acquire(tenant, 0), Unavailable)
    assert isinstance(await limiter.acquire(tenant, 0), Unavailable)
    assert _metric(limiter, "extproc_limiter_fallbacks_total", {"mode": "closed"}) == 2
    # A tenant without limits never needs Redis.
    assert isinstance(await limiter.acquire(Tenant("free"), 0), Granted)


async def test_a_long_request_keeps_its_slot_and_a_dead_replicas_slots_expire(
    limiters: Factory,
) -> None:
    """Leases are short and renewed: a request may outlive `lease_seconds` many times over,
    while a replica that dies (no release, no renewal) frees its slots within that time."""
    alive, dead = await limiters(lease_seconds=1.5), await limiters(lease_seconds=1.5)
    tenant = Tenant("long", Limits(max_concurrency=2))
    assert isinstance(await alive.acquire(tenant, 0), Granted)
    assert isinstance(await dead.acquire(tenant, 0), Granted)
    assert isinstance(await alive.acquire(tenant, 0), Limited)
    await dead.aclose()  # SIGKILL, as far as Redis can tell: its lease is never released
    await asyncio.sleep(2.5)
    assert isinstance(await alive.acquire(tenant, 0), Granted)  # the dead replica's slot
    assert isinstance(await alive.acquire(tenant, 0), Limited)  # the long request's is kept


async def test_a_release_redis_missed_is_sent_again(
    limiters: Factory, redis_server: RedisServer
) -> None:
    limiter = await limiters(lease_seconds=6, retry_seconds=0.1)
    other = await limiters(lease_seconds=6)
    tenant = Tenant("paused", Limits(max_concurrency=1))
    granted = await limiter.acquire(tenant, 0)
    assert isinstance(granted, Granted)
    redis_server.pause()
    try:
        limiter.release(granted.lease, 0)
        await asyncio.sleep(0.8)  # the release times out (0.5 s) while Redis is stopped
    finally:
        redis_server.resume()
    # Sent again at the next renewal (every 2 s), long before the 6 s lease would expire.
    for _ in range(40):
        if isinstance(verdict := await other.acquire(tenant, 0), Granted):
            break
        await asyncio.sleep(0.1)
    assert isinstance(verdict, Granted)


async def test_closing_does_not_wait_forever_for_a_stuck_release(
    limiters: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # A release that never ends (what a CI teardown once waited its 300 s on, cause not found):
    # closing gives up on it after its bound, says so, and still closes the client.
    limiter = await limiters()
    assert isinstance(await limiter.acquire(Tenant("t", Limits(max_concurrency=1)), 0), Granted)
    limiter._in_background(asyncio.Event().wait())
    started = asyncio.get_running_loop().time()
    await limiter.aclose()
    assert asyncio.get_running_loop().time() - started < 10
    assert "the releases in flight did not stop" in caplog.text
