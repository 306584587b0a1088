"""The KVCachePool controller against a Kubernetes API on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controllers.cluster import (
    CONFIG_MAPS,
    KV_CACHE_POOLS,
    NAMESPACE,
    SERVICES,
    STATEFUL_SETS,
    Cluster,
    Controllers,
    running_cluster,
    until,
)

PATH = f"/apis/extproc.io/v1alpha1/namespaces/{NAMESPACE}/kvcachepools"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path) as cluster:
        yield cluster


def _status(cluster: Cluster) -> dict[str, Any]:
    return dict((cluster.get(KV_CACHE_POOLS, "llama-kv") or {}).get("status") or {})


async def test_deploys_reports_ready_puts_back_edits_and_survives_a_restart(
    cluster: Cluster,
) -> None:
    await cluster.create(
        PATH,
        {
            "apiVersion": "extproc.io/v1alpha1",
            "kind": "KVCachePool",
            "metadata": {"name": "llama-kv"},
            "spec": {
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "replicas": 2,
                "cache": {"chunkSize": 256, "localCpuGB": 4},
            },
        },
    )
    controllers = Controllers(cluster, ("kvpool",))
    controllers.start()
    try:
        await until(lambda: _status(cluster).get("phase") == "Pending")
        assert cluster.names(STATEFUL_SETS) == {"llama-kv-cache"}
        assert cluster.names(SERVICES) == {"llama-kv-cache", "llama-kv-cache-headless"}
        assert cluster.names(CONFIG_MAPS) == {"llama-kv-lmcache"}
        uid = cluster.get(KV_CACHE_POOLS, "llama-kv")["metadata"]["uid"]
        stateful_set = cluster.get(STATEFUL_SETS, "llama-kv-cache")
        assert stateful_set["metadata"]["ownerReferences"][0]["uid"] == uid
        assert stateful_set["spec"]["replicas"] == 2
        config = cluster.get(CONFIG_MAPS, "llama-kv-lmcache")["data"]
        lmcache = yaml.safe_load(config["lmcache.yaml"])
        assert lmcache["remote_url"] == f"lm://llama-kv-cache.{NAMESPACE}.svc:65432"
        assert lmcache["chunk_size"] == 256
        status = _status(cluster)
        assert json.loads(status["kvTransferConfig"]) == {
            "kv_connector": "LMCacheConnectorV1",
            "kv_role": "kv_both",
        }
        assert status["vllmArgs"][0] == "--kv-transfer-config"
        assert status["endpoints"] == []

        # The StatefulSet controller reports its pods ready.
        sts_path = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/llama-kv-cache"
        await cluster.patch(sts_path, {"status": {"readyReplicas": 2}})
        await until(lambda: _status(cluster).get("phase") == "Ready")
        assert _status(cluster)["endpoints"] == [
            f"llama-kv-cache-{i}.llama-kv-cache-headless.{NAMESPACE}.svc:65432" for i in (0, 1)
        ]

        # A hand edit of what the pool owns is put back; a restart changes nothing.
        await controllers.restart()
        await cluster.patch(sts_path, {"spec": {"replicas": 5}})
        await until(lambda: cluster.get(STATEFUL_SETS, "llama-kv-cache")["spec"]["replicas"] == 2)
        await until(lambda: bool(cluster.events("Updated")))

        # The pool is scaled through its own spec.
        await cluster.patch(f"{PATH}/llama-kv", {"spec": {"replicas": 3}})
        await until(lambda: cluster.get(STATEFUL_SETS, "llama-kv-cache")["spec"]["replicas"] == 3)
        await until(lambda: _status(cluster).get("phase") == "Degraded")
    finally:
        await controllers.stop()
