"""A Kubernetes API on loopback for controller tests (kmock's emulator, as in tests/state).

kmock stores what is written over HTTP and serves it back; its quirks that matter here (see
tests/state/kubeapi.py for the rest): a list ignores `labelSelector` (the controllers filter
again themselves), patches are plain dictionary merges (a list is replaced, as in a JSON merge
patch), a subresource path (`/scale`, `/status`) reads and writes the object itself, and there
is no garbage collector and no Deployment controller: the tests create and delete the pods a
Deployment would have. The controllers run in-process with a kubeconfig pointing at it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kmock

from extproc.controllers import cli
from extproc.controllers.telemetry import ControllerMetrics
from tests.state.kubeapi import NAMESPACE, eventually, write_kubeconfig

PODS = kmock.resource("v1/pods")
EVENTS = kmock.resource("v1/events")
SERVICES = kmock.resource("v1/services")
CONFIG_MAPS = kmock.resource("v1/configmaps")
DEPLOYMENTS = kmock.resource("apps/v1/deployments")
STATEFUL_SETS = kmock.resource("apps/v1/statefulsets")
LEASES = kmock.resource("coordination.k8s.io/v1/leases")
POD_AUTOSCALERS = kmock.resource("extproc.io/v1alpha1/podautoscalers")
MODEL_ADAPTERS = kmock.resource("extproc.io/v1alpha1/modeladapters")
KV_CACHE_POOLS = kmock.resource("extproc.io/v1alpha1/kvcachepools")
ALL = (
    PODS, EVENTS, SERVICES, CONFIG_MAPS, DEPLOYMENTS, STATEFUL_SETS, LEASES,
    POD_AUTOSCALERS, MODEL_ADAPTERS, KV_CACHE_POOLS,
)  # fmt: skip

__all__ = ["NAMESPACE", "Cluster", "eventually", "running_cluster"]


class Cluster:
    def __init__(self, api: kmock.KubernetesEmulator, kubeconfig: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        self._uids = iter(range(1000, 10**6))

    def get(self, resource: kmock.resource, name: str) -> dict[str, Any] | None:
        key = (resource, NAMESPACE, name)
        if key not in self.api.objects or self.api.objects[key].deleted:
            return None
        return dict(self.api.objects[key].raw)

    def names(self, resource: kmock.resource) -> set[str]:
        return {
            name
            for (res, _, name), obj in self.api.objects.items()
            if res == resource and not obj.deleted
        }

    def events(self, reason: str = "") -> list[dict[str, Any]]:
        found = [
            dict(obj.raw)
            for (res, _, _), obj in self.api.objects.items()
            if res == EVENTS and not obj.deleted
        ]
        return [e for e in found if not reason or e.get("reason") == reason]

    async def create(self, plural_path: str, body: dict[str, Any]) -> None:
        body.setdefault("metadata", {}).setdefault("uid", f"uid-{next(self._uids)}")
        body["metadata"].setdefault("namespace", NAMESPACE)
        await self._request("POST", plural_path, json=body)

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        await self._request("PATCH", path, json=body)

    async def delete(self, path: str) -> None:
        await self._request("DELETE", path)

    async def add_pod(self, name: str, url: str, labels: dict[str, str]) -> None:
        """A Ready pod whose vLLM is the simulated server at `url` (its port is the pod's
        containerPort named http, as a real pod template would declare)."""
        parts = urlsplit(url)
        await self.create(
            f"/api/v1/namespaces/{NAMESPACE}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm/vllm-openai",
                            "ports": [{"name": "http", "containerPort": parts.port}],
                        }
                    ]
                },
                "status": {
                    "podIP": parts.hostname,
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            },
        )

    async def delete_pod(self, name: str) -> None:
        await self.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")

    async def _request(self, method: str, path: str, **kwargs: Any) -> None:
        async with self.api.request(method, path, **kwargs) as response:
            assert response.status == 200, await response.text()


@contextlib.asynccontextmanager
async def running_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
        for resource in ALL:
            api.resources[resource] = kmock.ResourceInfo()
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"))
        yield Cluster(api, kubeconfig)


class Controllers:
    """`extproc controller ...` in-process: started, stopped (a restart) and started again."""

    def __init__(self, cluster: Cluster, which: tuple[str, ...], **settings: Any) -> None:
        self._settings = cli.Settings(
            controllers=which,
            namespace=NAMESPACE,
            kubeconfig=str(cluster.kubeconfig),
            metrics_port=None,
            leader_elect=settings.pop("leader_elect", False),
            interval_seconds=settings.pop("interval_seconds", 0.05),
            **settings,
        )
        self.metrics = ControllerMetrics()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(cli.serve(self._settings, metrics=self.metrics))

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task

    async def restart(self) -> None:
        await self.stop()
        self.start()


async def until(check: Callable[[], bool], *, within: float = 20.0) -> None:
    await eventually(check, within=within)
