"""A Kubernetes API on loopback for discovery tests: kmock's emulator plus a few helpers.

kmock's `KubernetesEmulator` stores objects written over HTTP and serves list, watch and get for
them. It does not keep resourceVersions (a list answers "..."; objects keep whatever version they
were written with), ignores `resourceVersion`, `timeoutSeconds` and `labelSelector` on a watch,
and never ends a watch by itself. So `Cluster` stamps every write with the next resourceVersion,
and the tests script the rest with kmock reactions on the first watch or list: a watch that ends,
an ERROR 410 event, a 500. Nothing here patches the client: it talks HTTP to this server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import yaml

from extproc.config import EndpointConfig

NAMESPACE = "llm"
PODS = kmock.resource("v1/pods")
POOLS = kmock.resource("inference.networking.k8s.io/v1/inferencepools")


class Cluster:
    """Pods and InferencePools in one namespace, written through the API like a controller."""

    def __init__(self, api: kmock.KubernetesEmulator, kubeconfig: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        self._versions = itertools.count(100)

    def next_version(self) -> str:
        return str(next(self._versions))

    async def add_pool(self, name: str, labels: dict[str, str], ports: list[int]) -> None:
        await self._write("post", f"/apis/{_pools_path()}", _pool(name, labels, ports))

    async def change_pool(self, name: str, labels: dict[str, str], ports: list[int]) -> None:
        body = _pool(name, labels, ports)
        await self._write("patch", f"/apis/{_pools_path()}/{name}", body)

    async def delete_pool(self, name: str) -> None:
        await self._request("delete", f"/apis/{_pools_path()}/{name}")

    async def add_pod(
        self,
        name: str,
        ip: str,
        *,
        labels: dict[str, str],
        ready: bool = True,
        annotations: dict[str, str] | None = None,
    ) -> None:
        await self._write("post", _pods_path(), pod(name, ip, labels, ready, annotations))

    async def set_ready(self, name: str, ready: bool) -> None:
        await self._write("patch", f"{_pods_path()}/{name}", {"status": _status(ready)})

    async def delete_pod(self, name: str) -> None:
        await self._request("delete", f"{_pods_path()}/{name}")

    async def _write(self, method: str, path: str, body: dict[str, Any]) -> None:
        body.setdefault("metadata", {})["resourceVersion"] = self.next_version()
        await self._request(method, path, json=body)

    async def _request(self, method: str, path: str, **kwargs: Any) -> None:
        async with self.api.request(method.upper(), path, **kwargs) as response:
            assert response.status == 200, await response.text()


def pod(
    name: str,
    ip: str,
    labels: dict[str, str],
    ready: bool = True,
    annotations: dict[str, str] | None = None,
    version: str = "1",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": labels,
            "annotations": annotations or {},
            "resourceVersion": version,
        },
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {"podIP": ip, **_status(ready)},
    }


def _status(ready: bool) -> dict[str, Any]:
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }


def _pool(name: str, labels: dict[str, str], ports: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": labels},
            "targetPorts": [{"number": port} for port in ports],
            "endpointPickerRef": {"name": "extproc-picker", "port": {"number": 9002}},
        },
    }


def _pods_path() -> str:
    return f"/api/v1/namespaces/{NAMESPACE}/pods"


def _pools_path() -> str:
    return f"inference.networking.k8s.io/v1/namespaces/{NAMESPACE}/inferencepools"


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig pointing at `server` over plain HTTP, no credentials."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {}}],
        "contexts": [
            {
                "name": "loopback",
                "context": {"cluster": "loopback", "user": "tester", "namespace": NAMESPACE},
            }
        ],
        "current-context": "loopback",
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def running_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """The body of the `cluster` fixture: an emulator on a free loopback port."""
    async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
        # Declared, so an empty namespace lists as empty instead of 404.
        api.resources[PODS] = kmock.ResourceInfo()
        api.resources[POOLS] = kmock.ResourceInfo()
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"))
        yield Cluster(api, kubeconfig)


async def eventually(check: Callable[[], bool], *, within: float = 10.0) -> None:
    """Poll `check` until it holds; fail after about `within` seconds (a bound, never asserted)."""
    for _ in range(int(within / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


class Sets:
    """Records every endpoint set a discovery delivers, and every problem it reports."""

    def __init__(self) -> None:
        self.seen: list[tuple[EndpointConfig, ...]] = []
        self.problems: list[str] = []  # what the discovery reported to `on_problem`, in order

    def __call__(self, endpoints: tuple[EndpointConfig, ...]) -> None:
        self.seen.append(endpoints)

    @property
    def addresses(self) -> set[str] | None:
        return {e.address for e in self.seen[-1]} if self.seen else None

    async def until(self, addresses: set[str]) -> None:
        """Wait until the last delivered set has exactly these addresses."""
        try:
            await eventually(lambda: self.addresses == addresses)
        except AssertionError:
            raise AssertionError(f"expected {sorted(addresses)}, last {self.addresses}") from None


async def gate_then(
    gate: asyncio.Event, *events: dict[str, Any]
) -> AsyncIterator[bytes | dict[str, Any]]:
    """A watch response body: headers at once, then `events` (JSON lines) once `gate` is set."""
    yield b""
    await gate.wait()
    for event in events:
        yield event
