"""A `KVCachePool` rendered into the objects that run it, and the vLLM flags that use it (pure).

    pool = parse_spec("llama-kv", spec)
    objects = render(pool, namespace="llm", owner=owner_reference)
    objects.kv_transfer_config   # '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'

The shared tier is LMCache's cache server: a StatefulSet (stable names, one per replica) behind
a headless Service (per-replica DNS) plus a ClusterIP Service that model pods connect to, and a
ConfigMap holding the LMCache configuration the model pods mount (`LMCACHE_CONFIG_FILE`):
chunk size, the local CPU tier and `remote_url: lm://<service>:<port>`. vLLM joins it with
`--kv-transfer-config` naming LMCache's V1 connector in the `kv_both` role (each pod both stores
and loads). Every object carries an ownerReference to the pool, so deleting the pool lets the
API server's garbage collector delete them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

DEFAULT_IMAGE = "lmcache/vllm-openai:latest"
DEFAULT_PORT = 65432
# LMCache's standalone cache server: `<entry point> <host> <port>`. The entry point's name has
# changed across LMCache releases; spec.server.command overrides it.
DEFAULT_COMMAND = ("lmcache_server",)
CONNECTOR = "LMCacheConnectorV1"
CONFIG_FILE = "lmcache.yaml"
MOUNT_PATH = "/etc/lmcache"
MANAGED_BY = "extproc-controller"


class SpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    model: str
    replicas: int = 1
    image: str = DEFAULT_IMAGE
    port: int = DEFAULT_PORT
    command: tuple[str, ...] = DEFAULT_COMMAND
    chunk_size: int = 256
    local_cpu_gb: float = 5.0  # each model pod's own CPU tier in front of the shared one
    serde: str = "naive"
    resources: Mapping[str, Any] = field(default_factory=dict)


def parse_spec(name: str, spec: Mapping[str, Any]) -> PoolSpec:
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        raise SpecError("spec.model must be a non-empty string")
    replicas = spec.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise SpecError("spec.replicas must be an integer >= 0")
    server = spec.get("server") or {}
    if not isinstance(server, Mapping):
        raise SpecError("spec.server must be an object")
    port = server.get("port", DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SpecError("spec.server.port must be a port number")
    command = server.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise SpecError("spec.server.command must be a list of strings")
    cache = spec.get("cache") or {}
    if not isinstance(cache, Mapping):
        raise SpecError("spec.cache must be an object")
    chunk = cache.get("chunkSize", 256)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise SpecError("spec.cache.chunkSize must be a positive integer")
    local = cache.get("localCpuGB", 5.0)
    if isinstance(local, bool) or not isinstance(local, int | float) or local < 0:
        raise SpecError("spec.cache.localCpuGB must be a number >= 0")
    serde = cache.get("serde", "naive")
    if serde not in ("naive", "cachegen"):
        raise SpecError("spec.cache.serde must be naive or cachegen")
    resources = server.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise SpecError("spec.server.resources must be an object")
    return PoolSpec(
        name=name,
        model=model,
        replicas=replicas,
        image=str(server.get("image") or DEFAULT_IMAGE),
        port=port,
        command=tuple(command),
        chunk_size=chunk,
        local_cpu_gb=float(local),
        serde=str(serde),
        resources=dict(resources),
    )


@dataclass(frozen=True, slots=True)
class Rendered:
    config_map: dict[str, Any]
    service: dict[str, Any]  # ClusterIP: what model pods connect to
    headless: dict[str, Any]  # per-replica DNS names for the StatefulSet
    stateful_set: dict[str, Any]
    remote_url: str
    kv_transfer_config: str
    endpoints: tuple[str, ...]  # one per replica
    vllm_env: tuple[dict[str, str], ...]

    @property
    def objects(self) -> Sequence[dict[str, Any]]:
        return (self.config_map, self.service, self.headless, self.stateful_set)


def names(pool: str) -> dict[str, str]:
    return {
        "server": f"{pool}-cache",
        "headless": f"{pool}-cache-headless",
        "config": f"{pool}-lmcache",
    }


def kv_transfer_config() -> str:
    return json.dumps({"kv_connector": CONNECTOR, "kv_role": "kv_both"}, separators=(",", ":"))


def render(pool: PoolSpec, *, namespace: str, owner: Mapping[str, Any]) -> Rendered:
    n = names(pool.name)
    labels = {
        "app.kubernetes.io/name": "lmcache-server",
        "app.kubernetes.io/instance": pool.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }

    def metadata(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels),
            "ownerReferences": [dict(owner)],
        }

    remote_url = f"lm://{n['server']}.{namespace}.svc:{pool.port}"
    config = {
        "chunk_size": pool.chunk_size,
        "local_cpu": pool.local_cpu_gb > 0,
        "max_local_cpu_size": pool.local_cpu_gb,
        "remote_url": remote_url,
        "remote_serde": pool.serde,
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(n["config"]),
        "data": {
            CONFIG_FILE: yaml.safe_dump(config, sort_keys=True),
            "kv-transfer-config": kv_transfer_config(),
            "model": pool.model,
        },
    }
    port = {"name": "lmcache", "port": pool.port, "targetPort": "lmcache", "protocol": "TCP"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(n["server"]),
        "spec": {"selector": dict(labels), "ports": [port], "type": "ClusterIP"},
    }
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(n["headless"]),
        "spec": {
            "selector": dict(labels),
            "ports": [port],
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
        },
    }
    container: dict[str, Any] = {
        "name": "lmcache-server",
        "image": pool.image,
        "command": [*pool.command, "0.0.0.0", str(pool.port)],
        "ports": [{"name": "lmcache", "containerPort": pool.port, "protocol": "TCP"}],
        # The server speaks its own TCP protocol: a TCP probe is what can be checked.
        "readinessProbe": {"tcpSocket": {"port": "lmcache"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "lmcache"}, "periodSeconds": 15},
    }
    if pool.resources:
        container["resources"] = dict(pool.resources)
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(n["server"]),
        "spec": {
            "replicas": pool.replicas,
            "serviceName": n["headless"],
            "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [container]}},
        },
    }
    endpoints = tuple(
        f"{n['server']}-{i}.{n['headless']}.{namespace}.svc:{pool.port}"
        for i in range(pool.replicas)
    )
    env = (
        {"name": "LMCACHE_CONFIG_FILE", "value": f"{MOUNT_PATH}/{CONFIG_FILE}"},
        {"name": "LMCACHE_USE_EXPERIMENTAL", "value": "True"},
    )
    return Rendered(
        config_map=config_map,
        service=service,
        headless=headless,
        stateful_set=stateful_set,
        remote_url=remote_url,
        kv_transfer_config=kv_transfer_config(),
        endpoints=endpoints,
        vllm_env=env,
    )


def owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata") or {}
    return {
        "apiVersion": obj.get("apiVersion", ""),
        "kind": obj.get("kind", ""),
        "name": metadata.get("name", ""),
        "uid": metadata.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def differs(wanted: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """True if a field we set has another value in `current` (fields the server adds, such
    as defaults and status, are not ours and do not count)."""
    for key, value in wanted.items():
        if isinstance(value, Mapping):
            have = current.get(key)
            if not isinstance(have, Mapping) or differs(value, have):
                return True
        elif current.get(key) != value:
            return True
    return False
