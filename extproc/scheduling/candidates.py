"""Which endpoints may serve a request: those serving its model, ready, inside the subset hint."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from extproc.scheduling.types import Candidate
from extproc.state.inflight import InFlight
from extproc.state.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class NoCandidates:
    """Why nothing is eligible: the model is unknown (404) or nobody can take it now (503)."""

    unknown_model: bool


def candidates_for(
    snapshot: Snapshot,
    inflight: InFlight,
    *,
    model: str | None,
    subset: Collection[str] | None,
) -> list[Candidate] | NoCandidates:
    pool = snapshot.serving(model) if model is not None else snapshot.endpoints
    if model is not None and not pool:
        return NoCandidates(unknown_model=True)
    eligible = [
        Candidate(e, inflight.load(e.address))
        for e in pool
        if e.ready and (subset is None or e.address in subset)
    ]
    return eligible or NoCandidates(unknown_model=False)
