"""The PodAutoscaler controller against a Kubernetes API on loopback and simulated vLLM pods.

The pods' metrics are the simulator's real /metrics; the load is real requests held open on
them. The test plays the Deployment controller (it creates and deletes pods); everything else
goes over HTTP. Assertions poll with a bound; none measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.sim import SimConfig, SimFleet
from tests.controllers.cluster import (
    DEPLOYMENTS,
    NAMESPACE,
    POD_AUTOSCALERS,
    Cluster,
    Controllers,
    running_cluster,
    until,
)

LABELS = {"app": "llama"}
PA_PATH = f"/apis/extproc.io/v1alpha1/namespaces/{NAMESPACE}/podautoscalers"
DEPLOYMENT_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(pods=2, tokenizer="bytes:4")) as fleet:
        yield fleet


class Load:
    """Streamed requests held open on one simulated server (long outputs); cancelling one
    closes its connection, which the server answers by aborting it (as vLLM does)."""

    def __init__(self) -> None:
        self._session = aiohttp.ClientSession()
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, url: str, count: int) -> None:
        for i in range(count):
            self._tasks.append(asyncio.create_task(self._hold(url, i)))

    async def _hold(self, url: str, i: int) -> None:
        body = {"prompt": f"hold {i}", "max_tokens": 20000, "stream": True}
        async with self._session.post(f"{url}/v1/completions", json=body) as response:
            async for _ in response.content:
                pass

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task
        self._tasks.clear()

    async def close(self) -> None:
        await self.stop()
        await self._session.close()


@pytest.fixture
async def load() -> AsyncIterator[Load]:
    load = Load()
    yield load
    await load.close()


async def _deployment(cluster: Cluster, replicas: int = 1) -> None:
    await cluster.create(
        DEPLOYMENT_PATH,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "llama"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": LABELS}},
        },
    )


def _autoscaler(algorithm: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "extproc.io/v1alpha1",
        "kind": "PodAutoscaler",
        "metadata": {"name": "llama", "generation": 1},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llama"},
            "minReplicas": 1,
            "maxReplicas": 3,
            "algorithm": algorithm,
            "syncPeriodSeconds": 0.1,
            "metrics": [{"metric": "concurrency", "target": 2}],
            "kpa": {
                "stableWindowSeconds": 0.5,
                "panicWindowSeconds": 0.2,
                "scaleDownDelaySeconds": 0.5,
            },
            "apa": {"windowSeconds": 0.3, "scaleDownDelaySeconds": 0.5},
            "hpa": {"downscaleStabilizationSeconds": 0.5},
            **spec,
        },
    }


def _replicas(cluster: Cluster) -> int:
    deployment = cluster.get(DEPLOYMENTS, "llama")
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def _status(cluster: Cluster) -> dict[str, Any]:
    obj = cluster.get(POD_AUTOSCALERS, "llama") or {}
    return dict(obj.get("status") or {})


@pytest.mark.parametrize("algorithm", ["kpa", "apa", "hpa"])
async def test_each_algorithm_scales_up_from_live_queue_metrics(
    cluster: Cluster, fleet: SimFleet, load: Load, algorithm: str
) -> None:
    await _deployment(cluster)
    await cluster.add_pod("llama-a", fleet.urls[0], LABELS)
    await cluster.create(PA_PATH, _autoscaler(algorithm))
    controllers = Controllers(cluster, ("autoscaler",))
    controllers.start()
    try:
        await until(lambda: _status(cluster).get("desiredReplicas") == 1)
        load.start(fleet.urls[0], 4)  # 4 requests on one pod, target 2 per pod
        await until(lambda: _replicas(cluster) == 2)
        await until(lambda: bool(_status(cluster).get("lastDecisions")))  # written just after
        status = _status(cluster)
        assert status["algorithm"] == algorithm
        assert status["lastDecisions"][-1]["from"] == 1
        assert status["lastDecisions"][-1]["to"] == 2
        assert cluster.events("Scaled")
    finally:
        await controllers.stop()


async def test_scale_up_restart_scale_down_change_and_delete(
    cluster: Cluster, fleet: SimFleet, load: Load
) -> None:
    await _deployment(cluster)
    await cluster.add_pod("llama-a", fleet.urls[0], LABELS)
    await cluster.add_pod("other", fleet.urls[1], {"app": "other"})  # not selected
    await cluster.create(PA_PATH, _autoscaler("kpa"))
    controllers = Controllers(cluster, ("autoscaler",))
    controllers.start()
    try:
        load.start(fleet.urls[0], 4)
        await until(lambda: _replicas(cluster) == 2)
        # The Deployment's second pod appears; the load stays on the first one.
        await cluster.delete_pod("other")
        await cluster.add_pod("llama-b", fleet.urls[1], LABELS)
        await until(lambda: _status(cluster).get("readyReplicas") == 2)

        # Restarted mid-way: it reads the size from the cluster and keeps it under load.
        await controllers.restart()
        await until(lambda: _status(cluster).get("readyReplicas") == 2)
        for _ in range(20):
            await asyncio.sleep(0.05)
            assert _replicas(cluster) == 2
        decisions = _status(cluster)["lastDecisions"]
        assert [(d["from"], d["to"]) for d in decisions] == [(1, 2)]  # history continued

        # The load ends: back to one pod after the scale-down delay.
        await load.stop()
        await until(lambda: _replicas(cluster) == 1)
        await until(lambda: len(_status(cluster)["lastDecisions"]) == 2)
        await cluster.delete_pod("llama-b")
        assert [(d["from"], d["to"]) for d in _status(cluster)["lastDecisions"]] == [
            (1, 2),
            (2, 1),
        ]

        # Changed: a minimum of 3 (maxReplicas 3) is applied at the next decision.
        await cluster.patch(f"{PA_PATH}/llama", {"spec": {"minReplicas": 3}})
        await until(lambda: _replicas(cluster) == 3)

        # Deleted: the controller lets go; the Deployment keeps what it has.
        await cluster.delete(f"{PA_PATH}/llama")
        await cluster.patch(f"{DEPLOYMENT_PATH}/llama", {"spec": {"replicas": 1}})
        for _ in range(10):
            await asyncio.sleep(0.05)
        assert _replicas(cluster) == 1
    finally:
        await controllers.stop()


async def test_a_missing_target_and_a_bad_spec_are_reported(cluster: Cluster) -> None:
    await cluster.create(PA_PATH, _autoscaler("kpa"))
    bad = _autoscaler("kpa", metrics=[{"metric": "gpu-temperature", "target": 1}])
    bad["metadata"]["name"] = "bad"
    await cluster.create(PA_PATH, bad)
    controllers = Controllers(cluster, ("autoscaler",))
    controllers.start()
    try:
        await until(lambda: bool(cluster.events("FailedGetScale")))
        await until(lambda: bool(cluster.events("InvalidSpec")))

        def message(name: str) -> str:
            obj = cluster.get(POD_AUTOSCALERS, name) or {}
            return str((obj.get("status") or {}).get("message", ""))

        await until(lambda: "gpu-temperature" in message("bad"))
        await until(lambda: "not found" in message("llama"))
    finally:
        await controllers.stop()
