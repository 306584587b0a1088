"""InferencePools and pods as the picker reads them, and the endpoint set they give: pure.

The watch loop (`extproc.state.discovery.kubernetes`) hands every list and change of the two
resources to `PoolsAndPods`, which keeps the latest copy and derives the set: for every selected
pool, every pod whose labels contain the pool's `spec.selector.matchLabels`, that is Ready, not
terminating and has an IP, gives one `EndpointConfig` per `spec.targetPorts[].number`
(`derive_endpoints`). Raw API objects go no further than this module.

Pod annotations (documented in `docs/discovery.md`):
- `extproc.io/models`: comma-separated model names the pod serves (also learned from
  `/v1/models`); an annotation and not a label because model names contain `/`.
- `extproc.io/kv-events`: the vLLM KV event publisher, `tcp://host:port`, or just a port, which
  means `tcp://<pod IP>:<port>` (a pod template cannot know its pod's IP).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.config import ConfigError, EndpointConfig, EndpointRole, FleetConfig, host_port
from extproc.state.discovery import ordered
from extproc.state.discovery.watch import Listed, Update, as_mapping

log = logging.getLogger(__name__)

MODELS_ANNOTATION = "extproc.io/models"
KV_EVENTS_ANNOTATION = "extproc.io/kv-events"
# The problem reported until both resources have been listed once.
WAITING = "waiting for the first list of InferencePools and pods from the Kubernetes API"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    match_labels: tuple[tuple[str, str], ...]
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PodState:
    name: str
    labels: Mapping[str, str]
    ip: str
    ready: bool  # the Ready condition is True and the pod is not being deleted
    models: tuple[str, ...] = ()
    kv_events: str = ""  # as annotated: a URL or a bare port


class PoolsAndPods:
    """The latest pools and pods, owned by the event loop; derives the endpoint set."""

    def __init__(self, *, selected: frozenset[str], fleet: FleetConfig) -> None:
        self._selected = selected  # empty: all pools
        self._fleet = fleet
        self._pools: dict[str, PoolSpec] = {}
        self._unusable: set[str] = set()  # selected pools that exist but select nothing
        self._pods: dict[str, PodState] = {}
        self._listed: set[str] = set()

    def apply(self, update: Update) -> None:
        if isinstance(update, Listed):
            self._listed.add(update.resource)
            if update.resource == "pools":
                self._pools = {}
                self._unusable = set()
            else:
                self._pods = {}
            for obj in update.objects:
                self._put(update.resource, obj)
        elif update.kind == "DELETED":
            name = _name(update.object)
            (self._pools if update.resource == "pools" else self._pods).pop(name, None)
            if update.resource == "pools":
                self._unusable.discard(name)
        else:
            self._put(update.resource, update.object)

    def _put(self, resource: str, obj: Mapping[str, Any]) -> None:
        name = _name(obj)
        if not name:
            return
        if resource == "pools":
            if self._selected and name not in self._selected:
                return
            pool = parse_pool(obj)
            if pool is None:
                self._pools.pop(name, None)
                self._unusable.add(name)
            else:
                self._pools[name] = pool
                self._unusable.discard(name)
        else:
            self._pods[name] = parse_pod(obj)

    def endpoints(self) -> tuple[EndpointConfig, ...] | None:
        """The set, or None until both resources have been listed once."""
        if self._listed != {"pools", "pods"}:
            return None
        return derive_endpoints(self._pools.values(), self._pods.values(), self._fleet)

    def problem(self, namespace: str) -> str:
        """What keeps the picker unready: "" when its pools are known. A picker serving named
        pools is unready only when none of them is usable; with some missing it serves the
        others (each missing one is still logged)."""
        if self._listed != {"pools", "pods"}:
            return WAITING
        if not self._selected or any(name in self._pools for name in self._selected):
            return ""
        return "; ".join(
            f"InferencePool {namespace}/{name} "
            + ("selects nothing usable" if name in self._unusable else "not found")
            for name in sorted(self._selected)
        )

    def missing(self) -> tuple[str, ...]:
        """Selected pools that are not (or no longer) usable, once the pools are listed."""
        if "pools" not in self._listed:
            return ()
        return tuple(sorted(self._selected - set(self._pools)))


def derive_endpoints(
    pools: Iterable[PoolSpec], pods: Iterable[PodState], fleet: FleetConfig | None = None
) -> tuple[EndpointConfig, ...]:
    """One endpoint per (Ready pod with an IP that a pool selects) x (that pool's target port),
    with the role, accelerator and price its labels give (`fleet` names the labels)."""
    fleet = fleet or FleetConfig()
    pods = [pod for pod in pods if pod.ready and pod.ip]
    found: list[EndpointConfig] = []
    for pool in sorted(pools, key=lambda p: p.name):
        for pod in pods:
            if not all(pod.labels.get(key) == value for key, value in pool.match_labels):
                continue
            kv_events = pod.kv_events
            if kv_events.isdigit():
                kv_events = f"tcp://{host_port(pod.ip, kv_events)}"
            role, accelerator, cost = _described(pod, fleet)
            for port in pool.ports:
                try:
                    found.append(
                        EndpointConfig(
                            address=host_port(pod.ip, port),
                            models=pod.models,
                            kv_events=kv_events,
                            role=role,
                            accelerator=accelerator,
                            cost_per_hour=cost,
                        )
                    )
                except ConfigError as exc:
                    log.warning("pod %s: %s: %s", pod.name, exc.key, exc.problem)
    # A pod selected by two pools with the same port is one endpoint.
    return ordered(found)


def _described(pod: PodState, fleet: FleetConfig) -> tuple[EndpointRole, str, float]:
    """A pod's role, accelerator and cost per hour, from its labels (a bad price is logged and
    left to `fleet.prices`)."""
    # llm-d's values; its `prefill-decode` (or no label, or anything else) serves whole requests.
    label = pod.labels.get(fleet.role_label)
    role: EndpointRole = (
        "prefill" if label == "prefill" else "decode" if label == "decode" else "both"
    )
    cost = 0.0
    if (text := pod.labels.get(fleet.cost_label)) is not None:
        try:
            cost = float(text)
        except ValueError:
            cost = -1.0
        if not 0 <= cost < float("inf"):
            log.warning("pod %s: label %s=%r is not a price", pod.name, fleet.cost_label, text)
            cost = 0.0
    return role, pod.labels.get(fleet.accelerator_label, ""), cost


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec | None:
    """The parts of an InferencePool the picker uses, or None (logged) if they are unusable."""
    name = _name(obj)
    spec = as_mapping(obj.get("spec"))
    match_labels = as_mapping(as_mapping(spec.get("selector")).get("matchLabels"))
    ports = tuple(
        port["number"]
        for port in spec.get("targetPorts") or ()
        if isinstance(port, Mapping) and isinstance(port.get("number"), int)
    )
    # An empty selector would select every pod in the namespace; the CRD requires one, so an
    # object without it is broken rather than a request for everything.
    if not match_labels or not ports:
        log.warning(
            "InferencePool %s has no %s; it selects no endpoints",
            name,
            "spec.selector.matchLabels" if not match_labels else "spec.targetPorts",
        )
        return None
    return PoolSpec(
        name=name,
        match_labels=tuple(sorted((str(k), str(v)) for k, v in match_labels.items())),
        ports=tuple(sorted(set(ports))),
    )


def parse_pod(obj: Mapping[str, Any]) -> PodState:
    metadata = as_mapping(obj.get("metadata"))
    status = as_mapping(obj.get("status"))
    annotations = as_mapping(metadata.get("annotations"))
    ready = not metadata.get("deletionTimestamp") and any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    models = str(annotations.get(MODELS_ANNOTATION, ""))
    return PodState(
        name=str(metadata.get("name", "")),
        labels={str(k): str(v) for k, v in as_mapping(metadata.get("labels")).items()},
        ip=str(status.get("podIP") or ""),
        ready=ready,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        kv_events=str(annotations.get(KV_EVENTS_ANNOTATION, "")).strip(),
    )


def _name(obj: Mapping[str, Any]) -> str:
    return str(as_mapping(obj.get("metadata")).get("name") or "")
