"""The same limits as `LocalLimiter`, kept in Redis so every picker replica enforces one limit.

Each decision is one Lua script run atomically by Redis on its own clock (`TIME`), so replicas
with skewed clocks agree and two replicas can never both take the last slot. Per tenant:

    extproc:{tenant}:requests   hash  level, ts     requests-per-minute bucket
    extproc:{tenant}:tokens     hash  level, ts     tokens-per-minute bucket (may be in debt)
    extproc:{tenant}:active     zset  lease -> expiry ms   requests in flight

The `{tenant}` hash tag keeps one tenant's keys in one Redis Cluster slot. A lease expires
`lease_seconds` after its replica last renewed it; each replica renews the leases it holds every
third of that, in one call per tenant, so a request may run for hours while a replica that dies
(SIGKILL, a lost node) frees its slots within `lease_seconds`. A release that cannot reach Redis
is kept and sent again once Redis answers (the slot, no longer renewed, expires meanwhile; the
completion tokens still count). Keys expire once their bucket would be full again, so idle tenants
cost no memory.

When Redis cannot be reached, `failure_mode` decides: `open` answers from this replica's own
`LocalLimiter` (limits per replica, not shared), `closed` refuses. Redis is not tried again for
`retry_seconds`, so an outage costs one timeout, not one per request. Both are visible in
`extproc_limiter_redis_up` and `extproc_limiter_fallbacks_total`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc.metrics import PickerMetrics
from extproc.tenancy.limits import (
    Granted,
    Lease,
    Limited,
    LimitName,
    LocalLimiter,
    Unavailable,
    Verdict,
)
from extproc.tenancy.policy import Tenant

log = logging.getLogger(__name__)

# How long closing waits for each of: the renewal loop to stop, the releases in flight, the
# client's connections. A picker that stops must not hang on Redis (a CI run's test teardown
# once waited its whole 300 s timeout in `aclose`; the part that hung was not found).
_CLOSE_SECONDS = 2.0

# KEYS: requests, tokens, active. ARGV: rpm, tpm, max_concurrency, prompt tokens, lease, lease ms.
# Returns {1} or {0, limit name, retry-after ms}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, lease, lease_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil then return cap end
  return math.min(cap, lvl + math.max(0, now - ts) * cap / 60000)
end
local function store(key, cap, lvl)
  redis.call('HSET', key, 'level', tostring(lvl), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil((cap - lvl) * 60000 / cap) + 1000)
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxc then return {0, 'max_concurrency', 1000} end
end
local r, k = 0, 0
if rpm > 0 then
  r = level(KEYS[1], rpm)
  if r < 1 then return {0, 'requests_per_minute', math.ceil((1 - r) * 60000 / rpm)} end
end
if tpm > 0 then
  k = level(KEYS[2], tpm)
  if k <= 0 then return {0, 'tokens_per_minute', math.ceil((1 - k) * 60000 / tpm)} end
end
if rpm > 0 then store(KEYS[1], rpm, r - 1) end
if tpm > 0 then store(KEYS[2], tpm, k - tokens) end
if maxc > 0 then
  redis.call('ZADD', KEYS[3], now + lease_ms, lease)
  redis.call('PEXPIRE', KEYS[3], lease_ms)
end
return {1}
"""

# KEYS: active. ARGV: lease ms, then the leases to renew (those that expired stay gone).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + lease_ms, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease_ms)
return 1
"""

# KEYS: tokens, active. ARGV: tpm, completion tokens, lease ('' when none was held).
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, tokens, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
if lease ~= '' then redis.call('ZREM', KEYS[2], lease) end
if tpm > 0 and tokens > 0 then
  local v = redis.call('HMGET', KEYS[1], 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil then lvl, ts = tpm, now end
  lvl = math.min(tpm, lvl + math.max(0, now - ts) * tpm / 60000) - tokens
  redis.call('HSET', KEYS[1], 'level', tostring(lvl), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((tpm - lvl) * 60000 / tpm) + 1000)
end
return 1
"""


class RedisLimiter:
    def __init__(
        self,
        url: str,
        metrics: PickerMetrics,
        *,
        timeout: float,
        failure_mode: Literal["open", "closed"],
        retry_seconds: float,
        lease_seconds: float,
        local: LocalLimiter | None = None,
    ) -> None:
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._acquire = self._client.register_script(_ACQUIRE)
        self._release = self._client.register_script(_RELEASE)
        self._renew = self._client.register_script(_RENEW)
        # Slots this replica holds in Redis, renewed until released; releases Redis missed.
        self._held: dict[str, Lease] = {}
        self._unsent: list[tuple[Lease, int, bool]] = []
        self._renewing: asyncio.Task[None] | None = None
        self._metrics = metrics
        self._failure_mode = failure_mode
        self._retry_seconds = retry_seconds
        self._lease_ms = int(lease_seconds * 1000)
        self._local = local or LocalLimiter()
        self._down_until = 0.0
        # Lease ids are unique across replicas: a random prefix per process, then a counter.
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        self._background: set[asyncio.Task[None]] = set()
        metrics.limiter_redis_up.set(1)

    async def acquire(self, tenant: Tenant, tokens: int) -> Verdict:
        limits = tenant.limits
        lease = Lease(tenant.name, f"{self._prefix}-{next(self._ids)}", "redis", limits)
        if not limits.any:
            return Granted(lease)
        if time.monotonic() < self._down_until:
            return self._fallback(tenant, tokens)
        try:
            answer = await self._acquire(
                keys=_keys(tenant.name),
                args=[
                    limits.requests_per_minute,
                    limits.tokens_per_minute,
                    limits.max_concurrency,
                    tokens,
                    lease.id,
                    self._lease_ms,
                ],
            )
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            return self._fallback(tenant, tokens)
        self._metrics.limiter_redis_up.set(1)
        if int(answer[0]) == 1:
            if limits.max_concurrency:
                self._held[lease.id] = lease
                if self._renewing is None:
                    self._renewing = asyncio.create_task(self._renew_forever())
            return Granted(lease)
        name = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
        limit: LimitName = _limit_name(name)
        return Limited(limit, getattr(limits, limit), int(answer[2]) / 1000)

    def release(self, lease: Lease, completion_tokens: int) -> None:
        if lease.backend == "memory":
            self._local.release(lease, completion_tokens)
            return
        # Freeing a slot twice is harmless (ZREM), so a later release that only counts tokens
        # (usage that came after the response's end) sends the lease again.
        self._held.pop(lease.id, None)
        held = lease.limits.max_concurrency > 0
        if not held and not (lease.limits.tokens_per_minute and completion_tokens):
            return
        self._in_background(self._send_release(lease, completion_tokens, held))

    def charge(self, tenant: Tenant, tokens: int) -> None:
        if not tenant.limits.tokens_per_minute or tokens <= 0:
            return
        # The release script without a lease ('' frees no slot) charges the shared bucket once;
        # a charge Redis missed is kept and sent again, as a release is.
        unheld = Lease(tenant.name, "", "redis", tenant.limits)
        self._in_background(self._send_release(unheld, tokens, False))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_release(self, lease: Lease, completion_tokens: int, held: bool) -> None:
        keys = _keys(lease.tenant)
        try:
            await self._release(
                keys=[keys[1], keys[2]],
                args=[lease.limits.tokens_per_minute, completion_tokens, lease.id if held else ""],
            )
        except (RedisError, OSError) as exc:
            # Sent again once Redis answers; the slot, no longer renewed, expires meanwhile.
            self._went_down(exc)
            self._unsent.append((lease, completion_tokens, held))
            if self._renewing is None:  # a replica holding no slot sends it again all the same
                self._renewing = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Every third of `lease_seconds`: renew the leases held, send the releases missed."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self._renew_held()
            except (RedisError, OSError) as exc:
                self._went_down(exc)
                continue
            unsent, self._unsent = self._unsent, []
            for lease, tokens, held in unsent:
                await self._send_release(lease, tokens, held)

    async def _renew_held(self) -> None:
        by_tenant: dict[str, list[str]] = {}
        for lease in self._held.values():
            by_tenant.setdefault(lease.tenant, []).append(lease.id)
        for tenant, ids in by_tenant.items():
            await self._renew(keys=[_keys(tenant)[2]], args=[self._lease_ms, *ids])

    def _went_down(self, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "redis limiter unreachable (%s); failing %s for %.1fs",
                type(exc).__name__,
                self._failure_mode,
                self._retry_seconds,
            )
        self._down_until = time.monotonic() + self._retry_seconds
        self._metrics.limiter_redis_up.set(0)

    def _fallback(self, tenant: Tenant, tokens: int) -> Verdict:
        self._metrics.limiter_fallbacks.labels(self._failure_mode).inc()
        if self._failure_mode == "closed":
            return Unavailable("the shared rate limiter is unreachable")
        return self._local.acquire_now(tenant, tokens)

    async def aclose(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await _within({self._renewing}, "the lease renewal")
        if self._background:
            await _within(set(self._background), "the releases in flight")
        try:
            await asyncio.wait_for(self._client.aclose(), _CLOSE_SECONDS)
        except TimeoutError:
            log.warning("redis limiter: closing the client took over %gs; left", _CLOSE_SECONDS)


async def _within(tasks: set[asyncio.Task[None]], what: str) -> None:
    """Wait up to `_CLOSE_SECONDS` for `tasks`. Redis's errors were handled where they ran;
    anything else they raised is dropped, as `gather(return_exceptions=True)` did before."""
    done, left = await asyncio.wait(tasks, timeout=_CLOSE_SECONDS)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it at exit
    if left:
        log.warning("redis limiter: %s did not stop within %gs; left", what, _CLOSE_SECONDS)


def _keys(tenant: str) -> list[str]:
    base = f"extproc:{{{tenant}}}"
    return [f"{base}:requests", f"{base}:tokens", f"{base}:active"]


def _limit_name(name: str) -> LimitName:
    if name == "requests_per_minute":
        return "requests_per_minute"
    if name == "tokens_per_minute":
        return "tokens_per_minute"
    return "max_concurrency"
