"""Run reconcilers: each makes one pass over all its objects every `interval_seconds`, while this
replica leads.

A pass reads everything it needs from the cluster (and the pods) and converges it; nothing is
carried from one pass to the next except caches a reconciler can lose at any time (the
autoscaler's metric windows), so a restart, or leadership moving to this replica, is a `reset()`
and then the next pass. A failing pass is logged, counted and retried at the next interval; it
never ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from extproc.controllers.leader import LeaderElector
from extproc.controllers.telemetry import ControllerMetrics

log = logging.getLogger(__name__)


class Reconciler(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def interval_seconds(self) -> float: ...

    async def reconcile(self) -> None:
        """One pass over every object this controller owns."""

    def reset(self) -> None:
        """Forget everything held in memory (leadership changed hands)."""


async def run_reconcilers(
    reconcilers: Sequence[Reconciler],
    *,
    metrics: ControllerMetrics,
    elector: LeaderElector | None = None,
) -> None:
    """Until cancelled. Without an elector this replica always leads."""
    tasks = [asyncio.create_task(_loop(r, metrics, elector)) for r in reconcilers]
    if elector is not None:
        tasks.append(asyncio.create_task(elector.run()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _loop(
    reconciler: Reconciler, metrics: ControllerMetrics, elector: LeaderElector | None
) -> None:
    leading = False
    while True:
        if elector is not None and not elector.is_leader:
            if leading:
                log.info("%s: not leading any more; standing by", reconciler.name)
                leading = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(elector.became_leader.wait(), timeout=1.0)
            continue
        if not leading:
            reconciler.reset()
            leading = True
        started = time.monotonic()
        outcome = "ok"
        try:
            await reconciler.reconcile()
        except Exception:
            outcome = "error"
            log.exception("%s: reconcile pass failed; retrying", reconciler.name)
        metrics.reconciles.labels(reconciler.name, outcome).inc()
        metrics.reconcile_seconds.labels(reconciler.name).observe(time.monotonic() - started)
        await asyncio.sleep(reconciler.interval_seconds)
