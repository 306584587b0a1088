"""The tenancy gate: a request passes it holding its tenant's limit lease and, while the pool is
saturated, after its turn in the fair queue; whatever happens before the pick is counted, it
leaves nothing held.

    async with gate.enter(tenant, model, prompt_tokens, flow=..., room=...) as entry:
        if not isinstance(entry, Pass):
            ...  # a refusal: over a limit, the limiter unreachable, the queue full or too long
        ...      # admission, the schedule, the in-flight count
        entry.keep()  # routed: the lease is the response's now, given back when it ends

On a refusal inside the block, an exception or a cancellation (a client that hangs up while it
waits in the queue, or while anything else is awaited) the lease goes back with its prompt
tokens and the queue place is given up. A kept lease is given back by `ended`.

The gate owns the fair queue; it sees the pool only through a `Room` (extproc/scheduling/room.py
builds them from the snapshot and the in-flight counts), never through the pipeline. A tenant
already holding its weighted share of the pool's request slots finds the pool saturated
`headroom_requests` per endpoint early, so the last slots stay free for tenants under their
share. Refusals are values: the pipeline turns them into OpenAI errors.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from extproc.metrics import PickerMetrics
from extproc.tenancy.fair_queue import FairQueue
from extproc.tenancy.identity import Unidentified
from extproc.tenancy.limits import Granted, Lease, Limited, Unavailable
from extproc.tenancy.policy import Tenant
from extproc.tenancy.tenants import Tenancy


class Room(Protocol):
    """Load on the endpoints a request could start on, as the gate needs it."""

    def slots(self) -> float:
        """Requests these endpoints take before they count as saturated (0: no such limit)."""
        ...

    def has_room(self, *, headroom: float = 0.0) -> bool:
        """Some endpoint is below saturation, each one's request limit lowered by `headroom`."""
        ...


# A model's room now, None when no endpoint can serve it: what the queue's dispatcher asks.
Rooms = Callable[[str | None], Room | None]


@dataclass(frozen=True, slots=True)
class QueueFull:
    """The tenant already has `max_queued` requests waiting."""

    max_queued: int


@dataclass(frozen=True, slots=True)
class QueueTimeout:
    """Waited `waited` seconds in the fair queue without room freeing."""

    waited: float


Refusal = Limited | Unavailable | QueueFull | QueueTimeout


@dataclass(eq=False, slots=True)
class Pass:
    """Through the gate. `queued`: seconds waited in the fair queue, None when it did not wait
    (then the candidates the request was checked against are still current)."""

    tenant: Tenant
    lease: Lease
    queued: float | None = None
    _kept: bool = field(default=False, repr=False)

    def keep(self) -> None:
        """The request is routed: its lease lives until its response ends (`TenancyGate.ended`)."""
        self._kept = True

    @property
    def kept(self) -> bool:
        return self._kept


class TenancyGate:
    """One per event loop (per pipeline), with its fair queue."""

    def __init__(self, tenancy: Tenancy, rooms: Rooms, metrics: PickerMetrics) -> None:
        self._tenancy = tenancy
        self._rooms = rooms
        self._metrics = metrics
        self._fair = FairQueue(
            has_room=self._pool_has_room,
            on_depth=lambda tenant, depth: metrics.tenant_queue_depth.labels(tenant).set(depth),
        )

    def identify(self, headers: Mapping[str, str]) -> Tenant | Unidentified:
        return self._tenancy.identify(headers)

    def cache_salt(self, tenant: Tenant, client_salt: str | None) -> str | None:
        return self._tenancy.cache_salt(tenant, client_salt)

    def waiting(self, model: str | None = None) -> int:
        """Requests waiting in the fair queue (for `model`, or in all)."""
        return self._fair.waiting(model)

    @asynccontextmanager
    async def enter(
        self, tenant: Tenant, model: str | None, prompt_tokens: int, *, flow: str, room: Room
    ) -> AsyncIterator[Pass | Refusal]:
        """Count the request against its tenant's limits, then wait for its turn when `room`
        (its own candidates) is saturated or others already wait for `model`. Yields the pass,
        or the refusal (then nothing is held)."""
        verdict = await self._tenancy.limiter.acquire(tenant, prompt_tokens)
        if not isinstance(verdict, Granted):
            yield verdict
            return
        entry = Pass(tenant, verdict.lease)
        try:
            queued = await self._wait_turn(tenant, model, flow, room)
            if isinstance(queued, QueueFull | QueueTimeout):
                yield queued
                return
            entry.queued = queued
            yield entry
        finally:
            if not entry.kept:
                # Refused, raised or cancelled before its pick: the slot and the prompt tokens
                # return (the request stays counted: a refused request was still a request).
                self._tenancy.limiter.release(entry.lease, -prompt_tokens)
        # Kept: counted before the caller's next await, as the queue's dispatcher requires.
        self._fair.charge(tenant, prompt_tokens)
        self._fair.started(tenant)

    def ended(self, tenant: Tenant, lease: Lease | None, completion_tokens: int) -> None:
        """A kept request's response ended: its fair-share place and concurrency slot free."""
        self._fair.finished(tenant)
        if lease is not None:
            self._tenancy.limiter.release(lease, completion_tokens)

    def settled(
        self, tenant: Tenant, lease: Lease | None, completion_tokens: int, *, limiter_charged: bool
    ) -> None:
        """Its usage arrived: the completion counts against its fair share and token limit
        (`limiter_charged`: `ended` already gave the limiter those tokens)."""
        self._fair.charge(tenant, completion_tokens)
        if lease is not None and not limiter_charged:
            self._tenancy.limiter.release(lease, completion_tokens)

    def charge_foreign(self, name: str, completion_tokens: int) -> Tenant | None:
        """Another replica's request, named in an access log entry: its tenant's token limit
        is charged here. None when no such tenant is configured (then nothing is)."""
        known = self._tenancy.directory.tenants.get(name)
        if known is not None:
            self._tenancy.limiter.charge(known, completion_tokens)
        return known

    def poke(self) -> None:
        """Room may have freed (a response ended, new metrics): the fair queue looks again."""
        self._fair.poke()

    async def aclose(self) -> None:
        await self._fair.aclose()

    async def _wait_turn(
        self, tenant: Tenant, model: str | None, flow: str, room: Room
    ) -> float | QueueFull | QueueTimeout | None:
        settings = self._tenancy.config  # the current policy, reloads included
        if not settings.fair_sharing or tenant.sheddable:
            return None  # admission sheds a sheddable request: it never queues
        if not self._fair.waiting(model) and self._has_room(tenant, room):
            return None
        began = time.monotonic()
        outcome = await self._fair.wait(
            tenant,
            model,
            max_wait=settings.queue_timeout_seconds,
            max_queued=settings.max_queued_per_tenant,
            flow=flow,
        )
        waited = time.monotonic() - began
        self._metrics.tenant_queue_seconds.labels(tenant.name).observe(waited)
        if outcome == "full":
            return QueueFull(settings.max_queued_per_tenant)
        if outcome == "timeout":
            return QueueTimeout(waited)
        return waited

    def _pool_has_room(self, tenant: Tenant, model: str | None) -> bool:
        room = self._rooms(model)
        return room is not None and self._has_room(tenant, room)

    def _has_room(self, tenant: Tenant, room: Room) -> bool:
        headroom = self._tenancy.config.headroom_requests
        if headroom and self._fair.over_share(tenant, room.slots()):
            return room.has_room(headroom=headroom)
        return room.has_room()
