"""Room in the pool, as the tenancy gate asks about it: is there an endpoint a request could
start on now without queueing behind a saturated one?

The gate (extproc/tenancy/gate.py) sees the pool only through this narrow view, built from the
snapshot and the in-flight counts: it orders the waiting tenants, this says when one may go.
`CandidateRoom` is a request's own candidates (after the subset hint and the roles); `PoolRoom`
looks the model's candidates up afresh each time it is asked, for the fair queue's dispatcher.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.config import CollectorConfig, SchedulingConfig
from extproc.scheduling.admission import SaturationThresholds, pool_saturated
from extproc.scheduling.candidates import NoCandidates, candidates_for
from extproc.scheduling.types import Candidate
from extproc.state.inflight import InFlight
from extproc.state.snapshot import SnapshotStore


def saturation_thresholds(scheduling: SchedulingConfig) -> SaturationThresholds:
    """The pool's saturation thresholds as configured (`scheduling.saturation_*`)."""
    return SaturationThresholds(
        queue=scheduling.saturation_queue,
        kv=scheduling.saturation_kv,
        requests=scheduling.saturation_requests,
    )


@dataclass(frozen=True, slots=True)
class CandidateRoom:
    """Room among `candidates`, by the pool's saturation `thresholds`."""

    candidates: Sequence[Candidate]
    thresholds: SaturationThresholds

    def slots(self) -> float:
        """Requests these endpoints take before they count as saturated (0: no such limit)."""
        return self.thresholds.requests * len(self.candidates)

    def has_room(self, *, headroom: float = 0.0) -> bool:
        """Some candidate is below saturation, each one's request limit lowered by `headroom`
        (never below one request). No candidate at all is not a saturated pool."""
        thresholds = self.thresholds
        if headroom and thresholds.requests:
            lowered = max(1.0, thresholds.requests - headroom)
            thresholds = dataclasses.replace(thresholds, requests=lowered)
        return not pool_saturated(self.candidates, thresholds)


class PoolRoom:
    """The room for a model's requests in the current snapshot, any of its ready endpoints."""

    def __init__(
        self,
        store: SnapshotStore,
        inflight: InFlight,
        *,
        thresholds: SaturationThresholds,
        collector: CollectorConfig,
    ) -> None:
        self._store = store
        self._inflight = inflight
        self._thresholds = thresholds
        self._collector = collector

    def __call__(self, model: str | None) -> CandidateRoom | None:
        """`model`'s room now; None when no endpoint can serve it."""
        candidates = candidates_for(
            self._store.current,
            self._inflight,
            model=model,
            subset=None,
            collector=self._collector,
            now=time.monotonic(),
        )
        if isinstance(candidates, NoCandidates):
            return None
        return CandidateRoom(candidates, self._thresholds)
