"""The `KVCachePool` controller: keeps a pool's ConfigMap, Services and StatefulSet as rendered,
and reports the ready replicas, the endpoints and the vLLM flags in the status.

Each pass renders every pool (`render.py`) and, per object: creates it when missing, patches it
when a field we set differs (a hand edit is put back), leaves it alone otherwise. Nothing is
remembered between passes. Deleting a pool is left to the API server's garbage collector through
the ownerReferences every object carries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from extproc.controllers.events import EventRecorder
from extproc.controllers.kube import (
    CONFIG_MAPS,
    KV_CACHE_POOLS,
    SERVICES,
    STATEFUL_SETS,
    KubeApi,
    Resource,
)
from extproc.controllers.kvpool.render import (
    SpecError,
    differs,
    owner_reference,
    parse_spec,
    render,
)
from extproc.controllers.pods import mapping
from extproc.controllers.telemetry import ControllerMetrics

log = logging.getLogger(__name__)

_RESOURCES: dict[str, Resource] = {
    "ConfigMap": CONFIG_MAPS,
    "Service": SERVICES,
    "StatefulSet": STATEFUL_SETS,
}


class KVCachePoolController:
    name = "kvpool"

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        events: EventRecorder,
        metrics: ControllerMetrics,
        interval_seconds: float = 1.0,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._events = events
        self._metrics = metrics
        self.interval_seconds = interval_seconds

    def reset(self) -> None:
        return None  # nothing is held between passes

    async def reconcile(self) -> None:
        pools = await self._api.list(KV_CACHE_POOLS.path(self._namespace))
        results = await asyncio.gather(
            *(self._reconcile_one(p) for p in pools), return_exceptions=True
        )
        for pool, result in zip(pools, results, strict=True):
            if isinstance(result, Exception):
                log.warning("KVCachePool %s: %s", mapping(pool.get("metadata")).get("name"), result)

    async def _reconcile_one(self, obj: Mapping[str, Any]) -> None:
        metadata = mapping(obj.get("metadata"))
        if metadata.get("deletionTimestamp"):
            return
        name = str(metadata.get("name"))
        try:
            pool = parse_spec(name, mapping(obj.get("spec")))
        except SpecError as exc:
            await self._events.record(obj, "InvalidSpec", str(exc), warning=True)
            await self._write_status(name, {"phase": "Invalid", "message": str(exc)})
            return
        rendered = render(pool, namespace=self._namespace, owner=owner_reference(obj))
        stateful_set: Mapping[str, Any] = {}
        for wanted in rendered.objects:
            current = await self._ensure(obj, wanted)
            if wanted["kind"] == "StatefulSet":
                stateful_set = current
        ready = mapping(stateful_set.get("status")).get("readyReplicas") or 0
        ready = ready if isinstance(ready, int) else 0
        phase = "Ready" if ready >= pool.replicas else "Pending" if ready == 0 else "Degraded"
        self._metrics.kvpool_ready.labels(self._namespace, name).set(ready)
        status = {
            "phase": phase,
            "replicas": pool.replicas,
            "readyReplicas": ready,
            "endpoints": list(rendered.endpoints[:ready]) if ready else [],
            "service": f"{rendered.service['metadata']['name']}.{self._namespace}.svc",
            "remoteUrl": rendered.remote_url,
            "kvTransferConfig": rendered.kv_transfer_config,
            "configMap": rendered.config_map["metadata"]["name"],
            "vllmArgs": ["--kv-transfer-config", rendered.kv_transfer_config],
            "vllmEnv": [dict(e) for e in rendered.vllm_env],
            "message": f"{ready}/{pool.replicas} cache servers ready",
        }
        previous = mapping(obj.get("status"))
        if any(previous.get(k) != v for k, v in status.items()):
            if previous.get("phase") != phase:
                await self._events.record(obj, phase, str(status["message"]))
            await self._write_status(name, status)

    async def _ensure(self, owner: Mapping[str, Any], wanted: dict[str, Any]) -> Mapping[str, Any]:
        """Create or correct one child object; returns it as the server has it."""
        resource = _RESOURCES[wanted["kind"]]
        name = wanted["metadata"]["name"]
        current = await self._api.get(resource.path(self._namespace, name))
        if current is None:
            created = await self._api.create(resource.path(self._namespace), wanted)
            await self._events.record(owner, "Created", f"{wanted['kind']} {name}")
            return created
        ours = {k: v for k, v in wanted.items() if k in ("metadata", "spec", "data")}
        if differs(ours, current):
            patched = await self._api.patch(resource.path(self._namespace, name), ours)
            await self._events.record(owner, "Updated", f"{wanted['kind']} {name} put back")
            return patched
        return current

    async def _write_status(self, name: str, status: Mapping[str, Any]) -> None:
        await self._api.patch(
            KV_CACHE_POOLS.path(self._namespace, name, "status"), {"status": dict(status)}
        )
