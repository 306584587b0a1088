"""ModelAdapter placement end to end: a Kubernetes API on loopback, simulated vLLM pods with
runtime LoRA loading, and the controller in-process. What each pod holds is read back from the
simulator itself; nothing is patched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.sim import SimConfig, SimFleet
from extproc.sim.fleet import DEFAULT_MODEL
from tests.controllers.cluster import (
    MODEL_ADAPTERS,
    NAMESPACE,
    Cluster,
    Controllers,
    running_cluster,
    until,
)

LABELS = {"app": "llama"}
PATH = f"/apis/extproc.io/v1alpha1/namespaces/{NAMESPACE}/modeladapters"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path) as cluster:
        yield cluster


def _adapter(name: str, replicas: int, placement: str = "least-adapters") -> dict[str, Any]:
    return {
        "apiVersion": "extproc.io/v1alpha1",
        "kind": "ModelAdapter",
        "metadata": {"name": name},
        "spec": {
            "baseModel": DEFAULT_MODEL,
            "source": f"/models/{name}",
            "replicas": replicas,
            "placement": placement,
            "podSelector": {"matchLabels": LABELS},
        },
    }


def _holders(fleet: SimFleet, adapter: str) -> set[int]:
    return {s.index for s in fleet.servers if adapter in s.adapters}


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict((cluster.get(MODEL_ADAPTERS, name) or {}).get("status") or {})


async def test_placed_served_moved_on_pod_loss_scaled_and_unloaded_on_delete(
    cluster: Cluster,
) -> None:
    config = SimConfig(pods=3, tokenizer="bytes:4", enable_lora=True, max_loras=2,
                       lora_load_seconds=0.01)  # fmt: skip
    async with SimFleet(config) as fleet, aiohttp.ClientSession() as http:
        for i, url in enumerate(fleet.urls):
            await cluster.add_pod(f"llama-{i}", url, LABELS)
        await cluster.create(PATH, _adapter("sql-lora", 2))
        controllers = Controllers(cluster, ("lora",))
        controllers.start()
        try:
            await until(lambda: len(_holders(fleet, "sql-lora")) == 2)
            await until(lambda: _status(cluster, "sql-lora").get("readyReplicas") == 2)
            status = _status(cluster, "sql-lora")
            assert status["phase"] == "Ready"
            assert sorted(p["state"] for p in status["pods"]) == ["Loaded", "Loaded"]
            assert cluster.events("Loaded")
            finalizers = cluster.get(MODEL_ADAPTERS, "sql-lora")["metadata"]["finalizers"]
            assert finalizers == ["extproc.io/lora-unload"]

            # Requests naming the adapter are served by a pod that holds it.
            holder = min(_holders(fleet, "sql-lora"))
            body = {"model": "sql-lora", "prompt": "SELECT", "max_tokens": 2}
            async with http.post(f"{fleet.urls[holder]}/v1/completions", json=body) as r:
                assert r.status == 200

            # A holder's pod goes away: the adapter is placed on the remaining pod.
            (spare,) = {0, 1, 2} - _holders(fleet, "sql-lora")
            await cluster.delete_pod(f"llama-{holder}")
            await until(lambda: spare in _holders(fleet, "sql-lora"))
            await until(
                lambda: (
                    {p["name"] for p in _status(cluster, "sql-lora")["pods"]}
                    == {f"llama-{i}" for i in {0, 1, 2} - {holder}}
                )
            )

            # Restarted mid-way, then asked for one replica: one of the two is unloaded.
            await controllers.restart()
            await cluster.patch(f"{PATH}/sql-lora", {"spec": {"replicas": 1}})
            selected = {0, 1, 2} - {holder}
            await until(lambda: len(_holders(fleet, "sql-lora") & selected) == 1)
            await until(lambda: _status(cluster, "sql-lora").get("readyReplicas") == 1)

            # Deleted: unloaded from every selected pod, then the finalizer lets it go.
            await cluster.delete(f"{PATH}/sql-lora")
            await until(lambda: not _holders(fleet, "sql-lora") & selected)
            await until(lambda: "sql-lora" not in cluster.names(MODEL_ADAPTERS))
        finally:
            await controllers.stop()


async def test_a_full_pod_fails_the_load_and_the_adapter_lands_when_room_frees(
    cluster: Cluster,
) -> None:
    # One adapter slot per server: with sql-lora on both, chat-lora fits nowhere.
    config = SimConfig(pods=2, tokenizer="bytes:4", enable_lora=True, max_loras=1,
                       max_cpu_loras=1, lora_load_seconds=0.01)  # fmt: skip
    async with SimFleet(config) as fleet:
        for i, url in enumerate(fleet.urls):
            await cluster.add_pod(f"llama-{i}", url, LABELS)
        await cluster.create(PATH, _adapter("sql-lora", 2))
        controllers = Controllers(cluster, ("lora",))
        controllers.start()
        try:
            await until(lambda: len(_holders(fleet, "sql-lora")) == 2)
            await cluster.create(PATH, _adapter("chat-lora", 1, placement="bin-pack"))
            await until(lambda: bool(cluster.events("LoadFailed")))
            await until(
                lambda: any(
                    p["state"] == "Failed" for p in _status(cluster, "chat-lora").get("pods", [])
                )
            )
            assert _status(cluster, "chat-lora")["phase"] == "Pending"
            # Room frees on one pod; after that pod's backoff the adapter lands there.
            await cluster.patch(f"{PATH}/sql-lora", {"spec": {"replicas": 1}})
            await until(lambda: len(_holders(fleet, "chat-lora")) == 1, within=30)
            await until(lambda: _status(cluster, "chat-lora").get("phase") == "Ready")
            assert not _holders(fleet, "chat-lora") & _holders(fleet, "sql-lora")
        finally:
            await controllers.stop()
