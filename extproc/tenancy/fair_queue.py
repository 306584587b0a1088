"""Fair sharing of a saturated pool: per-tenant queues served by weighted fair queuing on tokens.

While every endpoint that could serve a request is saturated, the request waits here instead of
piling onto a model server's queue, where it would wait in arrival order behind whoever sends
most. Each tenant has a virtual token counter (the Virtual Token Counter of Sheng et al., "Fairness
in Serving Large Language Models", OSDI '24): every token a tenant is served adds
tokens / weight to its counter, and when room frees the waiting tenant with the lowest counter
goes next. Higher priority goes before lower whatever the counters say (sheddable requests, with
negative priority, are refused before they get here).

Inside one tenant's queue a request's own priority comes first (an objective may lower it below
its tenant's), then its flow (the request's fairness id, `flow`): the tenant's backlogged flows
take turns, each counted by the requests it has had released, a flow that starts waiting lifted
to the fewest among those waiting. A flow never changes the tenant's share, only who inside the
tenant uses it. One flow and one priority: arrival order.

A tenant that starts waiting has its counter lifted to the lowest counter among those already
waiting, so time spent idle is not banked as credit to flood with later. Requests admitted
without waiting are charged too, so a tenant that had the pool to itself is behind the others
when contention starts.

"Room" is the gate's question (`has_room(tenant, model)`, answered from the pool's snapshot):
this module only orders, wakes and keeps the counts that tell whether a tenant holds more than
its weighted share of the pool's slots (`over_share`), which the gate uses to keep headroom for
the others. It looks
again whenever something may have freed room (`poke`: a response ended, new metrics arrived)
and every `tick` seconds while anything waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from extproc.tenancy.policy import Tenant

WaitOutcome = Literal["released", "timeout", "full"]

# A tenant routed this recently still counts as active when shares are worked out.
ACTIVE_SECONDS = 10.0


@dataclass(eq=False, slots=True)
class _Waiter:
    tenant: Tenant
    model: str | None
    future: asyncio.Future[None]
    flow: str = ""
    since: float = field(default_factory=time.monotonic)
    # Set once the waiting request has resumed (released, timed out or cancelled).
    resumed: asyncio.Event = field(default_factory=asyncio.Event)


class FairQueue:
    """One per event loop (per tenancy gate)."""

    def __init__(
        self,
        *,
        has_room: Callable[[Tenant, str | None], bool],
        tick: float = 0.01,
        on_depth: Callable[[str, int], None] | None = None,
    ) -> None:
        self._has_room = has_room
        self._tick = tick
        self._on_depth = on_depth or (lambda tenant, depth: None)
        self._queues: dict[str, deque[_Waiter]] = {}
        self._counters: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        # Each tenant's weight and when it was last routed (bounded by the configured tenants).
        self._seen: dict[str, tuple[float, float]] = {}
        # Per tenant, requests released per flow; only flows with requests waiting are kept.
        self._flows: dict[str, dict[str, int]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def waiting(self, model: str | None = None) -> int:
        """Requests waiting (for `model`, or in all)."""
        return sum(1 for q in self._queues.values() for w in q if model is None or w.model == model)

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """`tenant` was served `tokens` (prompt at the pick, completion at the end)."""
        if tokens > 0:
            self._counters[tenant.name] = self.counter(tenant.name) + tokens / tenant.weight

    def started(self, tenant: Tenant, *, now: float | None = None) -> None:
        """A request of `tenant` was routed (it holds a slot until `finished`)."""
        self._in_flight[tenant.name] = self._in_flight.get(tenant.name, 0) + 1
        self._seen[tenant.name] = (tenant.weight, time.monotonic() if now is None else now)

    def finished(self, tenant: Tenant) -> None:
        left = self._in_flight.get(tenant.name, 0) - 1
        if left > 0:
            self._in_flight[tenant.name] = left
        else:
            self._in_flight.pop(tenant.name, None)

    def over_share(self, tenant: Tenant, slots: float, *, now: float | None = None) -> bool:
        """`tenant` holds at least its weighted share of `slots` among the active tenants: those
        with requests in flight or waiting, or routed within `ACTIVE_SECONDS` (a tenant
        between two requests still counts, or a flood would own the pool in every gap)."""
        now = time.monotonic() if now is None else now
        weights = {
            name: weight
            for name, (weight, at) in self._seen.items()
            if name in self._in_flight or now - at < ACTIVE_SECONDS
        }
        weights.update((name, q[0].tenant.weight) for name, q in self._queues.items() if q)
        weights[tenant.name] = tenant.weight
        share = slots * tenant.weight / sum(weights.values())
        return self._in_flight.get(tenant.name, 0) >= share

    def poke(self) -> None:
        """Room may have freed: look at the queues again now."""
        if self._task is not None:
            self._wake.set()

    async def wait(
        self,
        tenant: Tenant,
        model: str | None,
        *,
        max_wait: float,
        max_queued: int,
        flow: str = "",
    ) -> WaitOutcome:
        """Wait until this request may go: at most `max_wait` seconds, and not at all when the
        tenant already has `max_queued` waiting (both per call: the policy may be reloaded).
        The caller must count it in flight (and `charge` its tokens) before its next await: the
        dispatcher asks about room again only then."""
        queue = self._queues.setdefault(tenant.name, deque())
        if len(queue) >= max_queued:
            return "full"
        if not queue:
            self._lift(tenant.name)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(tenant, model, loop.create_future(), flow)
        flows = self._flows.setdefault(tenant.name, {})
        if flow not in flows:
            flows[flow] = min(flows.values(), default=0)
        queue.append(waiter)
        self._on_depth(tenant.name, len(queue))
        if self._task is None:
            self._task = asyncio.create_task(self._dispatch())
        self._wake.set()
        expiry = loop.call_later(max_wait, _expire, waiter.future)
        try:
            await waiter.future
        except TimeoutError:
            return "timeout"
        finally:
            expiry.cancel()
            waiter.resumed.set()
            # Gone by timeout or by the client hanging up: no longer waiting.
            if waiter in queue:
                queue.remove(waiter)
                self._on_depth(tenant.name, len(queue))
            self._forget_flow(tenant.name, flow, queue)
        return "released"

    def _forget_flow(self, tenant: str, flow: str, queue: deque[_Waiter]) -> None:
        if any(w.flow == flow for w in queue):
            return
        flows = self._flows.get(tenant, {})
        flows.pop(flow, None)
        if not flows:
            self._flows.pop(tenant, None)

    def _lift(self, tenant: str) -> None:
        backlogged = [self.counter(name) for name, q in self._queues.items() if q]
        if backlogged:
            self._counters[tenant] = max(self.counter(tenant), min(backlogged))

    async def _dispatch(self) -> None:
        try:
            while any(self._queues.values()):
                released = self._release_next()
                if released is not None:
                    # Ask about room again only once the released request has made its pick
                    # and counts as in flight, or one freed slot would let two requests go.
                    await released.resumed.wait()
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._tick)
        finally:
            self._task = None

    def _release_next(self) -> _Waiter | None:
        # Priority, then the virtual counter; on a tie (a tenant just lifted to the lowest
        # counter) the shorter queue first, so a newcomer is not put behind a flood's backlog.
        heads = {name: head for name, q in self._queues.items() if (head := self._head(name, q))}
        order = sorted(
            (-head.tenant.priority, self.counter(name), len(self._queues[name]), head.since, name)
            for name, head in heads.items()
        )
        for *_, name in order:
            queue, head = self._queues[name], heads[name]
            if not self._has_room(head.tenant, head.model):
                continue
            queue.remove(head)
            self._on_depth(name, len(queue))
            flows = self._flows.get(name)
            if flows is not None and head.flow in flows:
                flows[head.flow] += 1
            head.future.set_result(None)
            return head
        return None

    def _head(self, name: str, queue: deque[_Waiter]) -> _Waiter | None:
        """The tenant's next request: its highest priority, then the flow with the fewest
        released, then the oldest."""
        while queue and queue[0].future.done():
            queue.popleft()  # timed out or cancelled
        if len(queue) < 2:
            return queue[0] if queue else None
        flows = self._flows.get(name, {})
        return min(
            (w for w in queue if not w.future.done()),
            key=lambda w: (-w.tenant.priority, flows.get(w.flow, 0), w.since),
        )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
