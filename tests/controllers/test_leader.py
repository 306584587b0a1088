"""Lease-based leader election: two electors against a Kubernetes API on loopback, with a
clock the test moves (the Lease's times are wall-clock times; nothing here waits for them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extproc.controllers.kube import KubeApi
from extproc.controllers.leader import (
    ElectionSettings,
    LeaderElector,
    LeaseState,
    may_take,
    parse_lease,
)
from tests.controllers.cluster import LEASES, NAMESPACE, Cluster, running_cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path) as cluster:
        yield cluster


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_one_leads_the_other_takes_over_when_renewals_stop(cluster: Cluster) -> None:
    clock = Clock()
    api = KubeApi.connect(kubeconfig=str(cluster.kubeconfig))
    try:
        a = LeaderElector(api, ElectionSettings(NAMESPACE, identity="a"), clock=clock)
        b = LeaderElector(api, ElectionSettings(NAMESPACE, identity="b"), clock=clock)
        assert await a.try_once()
        assert not await b.try_once()
        clock.now += 5
        assert await a.try_once()  # renewed
        assert not await b.try_once()
        lease = parse_lease(cluster.get(LEASES, "extproc-controllers") or {})
        assert lease.holder == "a"

        # a stops renewing (cut off): it steps down by its own clock before b may step up.
        clock.now += 11
        assert not a.is_leader
        assert not await b.try_once()  # 11 s < the 15 s lease
        clock.now += 5
        assert await b.try_once()
        lease = parse_lease(cluster.get(LEASES, "extproc-controllers") or {})
        assert (lease.holder, lease.transitions) == ("b", 1)
        assert not await a.try_once()
    finally:
        api.close()


@pytest.mark.parametrize(
    ("lease", "expected"),
    [
        (None, True),
        (LeaseState("", None, 15, 0, "1"), True),
        (LeaseState("me", 990.0, 15, 0, "1"), True),
        (LeaseState("other", 990.0, 15, 0, "1"), False),
        (LeaseState("other", 980.0, 15, 0, "1"), True),
    ],
    ids=["absent", "released", "mine", "held", "expired"],
)
def test_may_take(lease: LeaseState | None, expected: bool) -> None:
    assert may_take(lease, "me", 1000.0) is expected
