"""`Limiter.charge`: completion tokens of a request another replica routed (its access log entry
came here, issue 19) count against the tenant's token limit without a lease: in this replica's
buckets (LocalLimiter), or once in the shared one (RedisLimiter, on a real redis-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from extproc.metrics import PickerMetrics
from extproc.tenancy.limits import Granted, Limited, LocalLimiter
from extproc.tenancy.policy import Limits, Tenant
from extproc.tenancy.redis_limits import RedisLimiter
from tests.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_local_charge_puts_a_tenant_never_served_here_in_debt() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    tenant = Tenant("t", Limits(tokens_per_minute=600))  # 10 tokens per second
    limiter.charge(tenant, 700)  # 100 in debt
    over = limiter.acquire_now(tenant, 0)
    assert isinstance(over, Limited) and over.limit == "tokens_per_minute"
    assert over.retry_after == pytest.approx(10.1)
    clock.now += 10.2
    assert isinstance(limiter.acquire_now(tenant, 0), Granted)


def test_a_local_charge_adds_to_what_the_tenant_used_and_holds_no_slot() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    tenant = Tenant("t", Limits(tokens_per_minute=600, max_concurrency=1))
    first = limiter.acquire_now(tenant, 500)
    assert isinstance(first, Granted)
    limiter.release(first.lease, 0)
    limiter.charge(tenant, 50)
    second = limiter.acquire_now(tenant, 0)
    assert isinstance(second, Granted)  # 50 left, and the slot is free: charge held none
    limiter.release(second.lease, 0)
    limiter.charge(tenant, 60)
    over = limiter.acquire_now(tenant, 0)
    assert isinstance(over, Limited) and over.limit == "tokens_per_minute"


def test_a_local_charge_without_a_token_limit_or_tokens_is_nothing() -> None:
    limiter = LocalLimiter(clock=Clock())
    limiter.charge(Tenant("free", Limits(requests_per_minute=5)), 10_000)
    limiter.charge(Tenant("t", Limits(tokens_per_minute=600)), 0)
    limiter.charge(Tenant("t", Limits(tokens_per_minute=600)), -5)
    assert isinstance(
        limiter.acquire_now(Tenant("free", Limits(requests_per_minute=5)), 0), Granted
    )
    assert isinstance(limiter.acquire_now(Tenant("t", Limits(tokens_per_minute=600)), 600), Granted)


# --- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def redis_pair(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLimiter, ...]]:
    made = [
        RedisLimiter(
            redis_server.url,
            PickerMetrics(),
            timeout=0.5,
            failure_mode="open",
            retry_seconds=0.1,
            lease_seconds=3,
        )
        for _ in range(2)
    ]
    yield tuple(made)
    for limiter in made:
        await limiter.aclose()


async def _level(redis_server: RedisServer, tenant: str) -> float | None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        raw = await client.hget(f"extproc:{{{tenant}}}:tokens", "level")
    finally:
        await client.aclose()
    return None if raw is None else float(raw)


async def _until_level(redis_server: RedisServer, tenant: str, within: float) -> float:
    for _ in range(int(within / 0.05)):
        if (level := await _level(redis_server, tenant)) is not None:
            return level
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tenant}'s token bucket never written")


async def test_a_redis_charge_counts_once_in_the_shared_bucket(
    redis_pair: tuple[RedisLimiter, ...], redis_server: RedisServer
) -> None:
    one, two = redis_pair
    tenant = Tenant("foreign", Limits(tokens_per_minute=600))  # 10 tokens per second
    one.charge(tenant, 700)
    level = await _until_level(redis_server, "foreign", within=5)
    # 100 in debt (plus what refilled since, well under 10 tokens); charged twice it is -800.
    assert -100 <= level < -90
    over = await two.acquire(tenant, 0)  # the other replica sees it
    assert isinstance(over, Limited) and over.limit == "tokens_per_minute"
    two.charge(Tenant("free", Limits(requests_per_minute=5)), 10_000)  # no token limit: no key
    await asyncio.sleep(0.1)
    assert await _level(redis_server, "free") is None


async def test_a_redis_charge_redis_missed_is_sent_again(
    redis_pair: tuple[RedisLimiter, ...], redis_server: RedisServer
) -> None:
    """A replica that holds no slot (no renewal loop yet) still sends a missed charge again."""
    one, _ = redis_pair
    tenant = Tenant("paused", Limits(tokens_per_minute=600))
    redis_server.pause()
    try:
        one.charge(tenant, 700)
        await asyncio.sleep(0.8)  # the charge times out (0.5 s) while Redis is stopped
    finally:
        redis_server.resume()
    # Sent again at the next pass of the loop (every lease_seconds / 3 = 1 s).
    assert -100 <= await _until_level(redis_server, "paused", within=5) < -80
