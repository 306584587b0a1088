"""Filters: narrow the candidates before scoring. Each keeps the request servable if it can."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.scheduling.types import Candidate, SchedulingRequest


class PreferUnsaturated:
    """Drops saturated endpoints (stale metrics) while any other can serve; if all are
    saturated, keeps them all: the least-bad endpoint beats refusing the request."""

    name = "prefer-unsaturated-filter"

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        fresh = [c for c in candidates if not c.saturated]
        return fresh or candidates
