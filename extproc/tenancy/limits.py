"""Per-tenant limits: requests per minute, tokens per minute, requests in flight.

Rates are token buckets refilled continuously (capacity = the per-minute limit, refilled at
limit/60 per second), which is a sliding window without its bookkeeping: a tenant that was idle
may burst up to one minute's worth, then holds its rate. Tokens are counted twice per request:
the prompt at the pick (known exactly once tokenized) and the completion when the response's
usage arrives, so the token bucket may go below zero; a tenant in debt waits until it refills.

`LocalLimiter` enforces limits for one picker replica; `RedisLimiter` (redis_limits.py) keeps
the same buckets in Redis so N replicas enforce one limit. Both answer the `Limiter` protocol.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from extproc.tenancy.policy import Limits, Tenant

LimitName = Literal["requests_per_minute", "tokens_per_minute", "max_concurrency"]

# A tenant at its concurrency limit cannot be told when a slot frees; this is the hint it gets.
CONCURRENCY_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Lease:
    """What a granted request holds until its response ends."""

    tenant: str
    id: str
    backend: Literal["memory", "redis"]
    limits: Limits


@dataclass(frozen=True, slots=True)
class Granted:
    lease: Lease


@dataclass(frozen=True, slots=True)
class Limited:
    """Over `limit` (whose configured value is `value`); may retry after `retry_after` s."""

    limit: LimitName
    value: int
    retry_after: float


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The shared limiter cannot be reached and the configured failure mode is to refuse."""

    reason: str


Verdict = Granted | Limited | Unavailable


class Limiter(Protocol):
    async def acquire(self, tenant: Tenant, tokens: int) -> Verdict:
        """Count one request of `tenant` with `tokens` prompt tokens, or say which limit holds
        it back (then nothing is counted)."""
        ...

    def release(self, lease: Lease, completion_tokens: int) -> None:
        """The request ended: free its concurrency slot, count its completion tokens. Never
        blocks the caller (a shared limiter finishes this in the background). Called again for
        the same lease it only counts the tokens: usage can arrive after the response's end."""
        ...

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """Count `tokens` completion tokens against `tenant`'s token limit without a lease: a
        request another replica routed, whose access log entry reached this one. Never blocks
        the caller, as `release`."""
        ...

    async def aclose(self) -> None:
        """Finish background work and close connections."""
        ...


@dataclass(slots=True)
class Bucket:
    """A continuously refilled token bucket; `level` may be negative (debt)."""

    level: float
    updated: float

    def refill(self, capacity: float, now: float) -> float:
        rate = capacity / 60.0
        self.level = min(capacity, self.level + max(0.0, now - self.updated) * rate)
        self.updated = now
        return self.level


def seconds_until(level: float, needed: float, capacity: float) -> float:
    """How long a bucket at `level` takes to reach `needed`."""
    return max(0.0, needed - level) / (capacity / 60.0)


@dataclass(slots=True)
class _TenantCounts:
    requests: Bucket
    tokens: Bucket
    active: set[str] = field(default_factory=set)


class LocalLimiter:
    """Limits kept in this process: exact for one replica, per replica for several."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: dict[str, _TenantCounts] = {}
        self._ids = itertools.count()

    async def acquire(self, tenant: Tenant, tokens: int) -> Verdict:
        return self.acquire_now(tenant, tokens)

    def acquire_now(self, tenant: Tenant, tokens: int) -> Granted | Limited:
        limits = tenant.limits
        lease = Lease(tenant.name, f"m{next(self._ids)}", "memory", limits)
        if not limits.any:
            return Granted(lease)
        now = self._clock()
        counts = self._counts_of(tenant.name, limits, now)
        if limits.max_concurrency and len(counts.active) >= limits.max_concurrency:
            return Limited("max_concurrency", limits.max_concurrency, CONCURRENCY_RETRY_SECONDS)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm and (level := counts.requests.refill(rpm, now)) < 1:
            return Limited("requests_per_minute", rpm, seconds_until(level, 1, rpm))
        if tpm and (level := counts.tokens.refill(tpm, now)) <= 0:
            return Limited("tokens_per_minute", tpm, seconds_until(level, 1, tpm))
        counts.requests.level -= 1
        counts.tokens.level -= tokens
        if limits.max_concurrency:
            counts.active.add(lease.id)
        return Granted(lease)

    async def aclose(self) -> None:
        return None

    def release(self, lease: Lease, completion_tokens: int) -> None:
        counts = self._counts.get(lease.tenant)
        if counts is None:
            return
        counts.active.discard(lease.id)
        _spend(counts.tokens, lease.limits.tokens_per_minute, completion_tokens, self._clock())

    def charge(self, tenant: Tenant, tokens: int) -> None:
        limits = tenant.limits
        if not limits.tokens_per_minute or tokens <= 0:
            return
        # A tenant this replica has not served yet gets its (full) buckets now, as `acquire`
        # would have made them: the tokens must not vanish with a bucket that does not exist.
        now = self._clock()
        _spend(
            self._counts_of(tenant.name, limits, now).tokens, limits.tokens_per_minute, tokens, now
        )

    def _counts_of(self, name: str, limits: Limits, now: float) -> _TenantCounts:
        counts = self._counts.get(name)
        if counts is None:
            full = float(limits.requests_per_minute), float(limits.tokens_per_minute)
            counts = _TenantCounts(Bucket(full[0], now), Bucket(full[1], now))
            self._counts[name] = counts
        return counts


def _spend(bucket: Bucket, capacity: int, tokens: int, now: float) -> None:
    """Take `tokens` from a token bucket (into debt if need be; negative gives them back, as
    for a request refused after its count); nothing without a limit."""
    if capacity and tokens:
        bucket.refill(capacity, now)
        bucket.level -= tokens


def retry_after_header(seconds: float) -> int:
    """`Retry-After` is whole seconds; never 0, which would invite an immediate retry storm."""
    return max(1, math.ceil(seconds))
