"""Per-tenant limits in one replica: token buckets on a fake clock, and concurrency slots."""

from __future__ import annotations

import pytest

from extproc.tenancy.limits import Granted, Limited, LocalLimiter, retry_after_header
from extproc.tenancy.policy import Limits, Tenant


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tenant(**limits: int) -> Tenant:
    return Tenant("t", Limits(**limits))


def test_requests_per_minute_refill_continuously() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    tenant = _tenant(requests_per_minute=60)
    assert all(isinstance(limiter.acquire_now(tenant, 0), Granted) for _ in range(60))
    over = limiter.acquire_now(tenant, 0)
    assert isinstance(over, Limited) and over.limit == "requests_per_minute"
    assert over.value == 60 and over.retry_after == pytest.approx(1.0)
    clock.now += 1.0  # one request's worth refilled
    assert isinstance(limiter.acquire_now(tenant, 0), Granted)
    assert isinstance(limiter.acquire_now(tenant, 0), Limited)


def test_tokens_count_prompt_at_the_pick_and_completion_at_the_end() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    tenant = _tenant(tokens_per_minute=600)  # 10 tokens per second
    first = limiter.acquire_now(tenant, 400)
    assert isinstance(first, Granted)
    limiter.release(first.lease, completion_tokens=300)  # 700 used: 100 in debt
    over = limiter.acquire_now(tenant, 1)
    assert isinstance(over, Limited) and over.limit == "tokens_per_minute"
    assert over.retry_after == pytest.approx(10.1)  # back above zero after 101 tokens
    clock.now += 10.2
    assert isinstance(limiter.acquire_now(tenant, 50), Granted)


def test_concurrency_slots_are_held_until_release() -> None:
    limiter = LocalLimiter(clock=Clock())
    tenant = _tenant(max_concurrency=2)
    leases = [limiter.acquire_now(tenant, 0) for _ in range(2)]
    third = limiter.acquire_now(tenant, 0)
    assert isinstance(third, Limited) and third.limit == "max_concurrency"
    first = leases[0]
    assert isinstance(first, Granted)
    limiter.release(first.lease, 0)
    assert isinstance(limiter.acquire_now(tenant, 0), Granted)


def test_a_refused_request_counts_nothing() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    tenant = _tenant(requests_per_minute=5, tokens_per_minute=600, max_concurrency=5)
    assert isinstance(limiter.acquire_now(tenant, 0), Granted)
    assert isinstance(limiter.acquire_now(tenant, 600), Granted)  # tokens now at 0
    for _ in range(3):
        refused = limiter.acquire_now(tenant, 0)
        assert isinstance(refused, Limited) and refused.limit == "tokens_per_minute"
    # The refusals took no request and no concurrency slot: once tokens refill, the three
    # requests left in the bucket and the three slots left are all there.
    clock.now += 60
    assert all(isinstance(limiter.acquire_now(tenant, 0), Granted) for _ in range(3))
    over = limiter.acquire_now(tenant, 0)
    assert isinstance(over, Limited) and over.limit == "max_concurrency"


def test_tenants_are_counted_apart_and_unlimited_ones_not_at_all() -> None:
    limiter = LocalLimiter(clock=Clock())
    a, b = Tenant("a", Limits(requests_per_minute=1)), Tenant("b", Limits(requests_per_minute=1))
    assert isinstance(limiter.acquire_now(a, 0), Granted)
    assert isinstance(limiter.acquire_now(b, 0), Granted)
    assert isinstance(limiter.acquire_now(a, 0), Limited)
    free = Tenant("free")
    assert all(isinstance(limiter.acquire_now(free, 10**6), Granted) for _ in range(100))


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert retry_after_header(0.0) == 1
    assert retry_after_header(1.01) == 2
    assert retry_after_header(3.0) == 3
