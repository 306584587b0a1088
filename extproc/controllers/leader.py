"""Leader election on a `coordination.k8s.io/v1` Lease, so two controller replicas can run.

One replica holds the Lease and reconciles; the other renews nothing and waits. The holder renews
every `retry_seconds`; another replica takes the Lease once `renewTime + leaseDurationSeconds` has
passed without a renewal. Writes carry the `resourceVersion` they read, so when two replicas race
for an expired Lease the API server lets one patch through and answers the other 409.

The holder stops acting as leader when it has not renewed for `renew_deadline_seconds` (shorter
than the lease duration), so it has stepped down before anyone else may step up. `may_take` is
the pure rule; `LeaderElector` does the I/O. On shutdown the holder clears the Lease so a standby
takes over at once instead of after a lease duration.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.controllers.kube import LEASES, ApiError, KubeApi

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaseState:
    holder: str
    renewed_at: float | None  # unix seconds
    duration_seconds: float
    transitions: int
    resource_version: str


def may_take(lease: LeaseState | None, me: str, now: float) -> bool:
    """True if `me` may write itself as the holder now."""
    if lease is None or not lease.holder or lease.holder == me:
        return True
    if lease.renewed_at is None:
        return True
    return now > lease.renewed_at + lease.duration_seconds


def parse_lease(obj: Mapping[str, Any]) -> LeaseState:
    spec = obj.get("spec") or {}
    return LeaseState(
        holder=str(spec.get("holderIdentity") or ""),
        renewed_at=_parse_time(spec.get("renewTime")),
        duration_seconds=float(spec.get("leaseDurationSeconds") or 15),
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=str((obj.get("metadata") or {}).get("resourceVersion") or ""),
    )


@dataclass(frozen=True, slots=True)
class ElectionSettings:
    namespace: str
    name: str = "extproc-controllers"
    identity: str = ""
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0


class LeaderElector:
    def __init__(
        self,
        api: KubeApi,
        settings: ElectionSettings,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._api = api
        self._settings = settings
        self._clock = clock
        self._on_change = on_change
        self._leader = False
        self._renewed_at = 0.0
        self.became_leader = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        # Between renewals, leadership also lapses by the clock: a replica cut off from the API
        # stops acting on its own, before its lease can expire for the others.
        deadline = self._renewed_at + self._settings.renew_deadline_seconds
        return self._leader and self._clock() < deadline

    async def run(self) -> None:
        try:
            while True:
                await self.try_once()
                await asyncio.sleep(self._settings.retry_seconds)
        finally:
            await asyncio.shield(self._release())

    async def try_once(self) -> bool:
        """One acquire-or-renew attempt; returns whether this replica leads afterwards."""
        s = self._settings
        now = self._clock()
        path = LEASES.path(s.namespace, s.name)
        try:
            current = await self._api.get(path)
            lease = parse_lease(current) if current is not None else None
            if not may_take(lease, s.identity, now):
                self._set(False)
                return False
            spec = {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": int(s.lease_seconds),
                "renewTime": _format_time(now),
            }
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": s.name, "namespace": s.namespace},
                    "spec": {**spec, "acquireTime": _format_time(now), "leaseTransitions": 0},
                }
                await self._api.create(LEASES.path(s.namespace), body)
            else:
                if lease.holder != s.identity:
                    spec["acquireTime"] = _format_time(now)
                    spec["leaseTransitions"] = lease.transitions + 1
                patch: dict[str, Any] = {"spec": spec}
                if lease.resource_version:
                    patch["metadata"] = {"resourceVersion": lease.resource_version}
                await self._api.patch(path, patch)
        except (ApiError, OSError) as exc:
            # 409: another replica won the race. Anything else: keep leading only until the
            # renew deadline passes (is_leader checks it).
            log.info("lease %s/%s not renewed: %s", s.namespace, s.name, exc)
            if isinstance(exc, ApiError) and exc.status == 409:
                self._set(False)
            return self.is_leader
        self._renewed_at = now
        self._set(True)
        return True

    def _set(self, leader: bool) -> None:
        if leader != self._leader:
            log.info("%s %s leadership", self._settings.identity, "took" if leader else "lost")
            self._leader = leader
            if leader:
                self.became_leader.set()
            else:
                self.became_leader.clear()
            if self._on_change is not None:
                self._on_change(leader)

    async def _release(self) -> None:
        if not self._leader:
            return
        s = self._settings
        self._set(False)
        try:
            await self._api.patch(
                LEASES.path(s.namespace, s.name),
                {"spec": {"holderIdentity": "", "renewTime": None}},
            )
        except Exception as exc:  # the lease then expires by itself
            log.info("lease not released: %s", exc)


def _format_time(now: float) -> str:
    # MicroTime: RFC 3339 with microseconds, as the API server writes it.
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(raw: Any) -> float | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return datetime.datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
