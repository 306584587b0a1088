"""The `ModelAdapter` controller: keeps a LoRA adapter loaded on `replicas` of the selected pods.

Each pass, for every ModelAdapter in the namespace:
1. list the pods `spec.podSelector` matches; read each Ready pod's `/v1/models` (the picker's
   own reader, `extproc.state.models`): which serve `spec.baseModel`, which adapters each holds;
2. plan with the placement policy (`placement.py`) and carry it out through vLLM's runtime API
   (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`), concurrently; a failed load puts
   that pod on an exponential backoff (in memory) and the next pass picks another pod;
3. write the status: the pods holding it, per pod; Events for loads, unloads and failures.

What a pod holds is read from the pod every pass, never remembered, so a pod that restarts
(losing its adapters), a new pod, or a deleted one is simply converged on the next pass. A
finalizer (`extproc.io/lora-unload`) lets a deleted ModelAdapter be unloaded from every pod
before the object goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from extproc.controllers.events import EventRecorder
from extproc.controllers.kube import MODEL_ADAPTERS, PODS, KubeApi
from extproc.controllers.lora.placement import POLICIES, PodView, place
from extproc.controllers.pods import Pod, Selector, mapping, scrape, select
from extproc.controllers.telemetry import ControllerMetrics
from extproc.state.models import read_models

log = logging.getLogger(__name__)

FINALIZER = "extproc.io/lora-unload"
BACKOFF_INITIAL_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 120.0


class SpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    adapter: str  # the name requests use as "model"
    base_model: str
    source: str  # vLLM's lora_path: a path or repository the server can read
    replicas: int
    selector: Selector
    policy: str
    port: int | None


def parse_spec(name: str, spec: Mapping[str, Any]) -> AdapterSpec:
    base = spec.get("baseModel")
    source = spec.get("source")
    if not isinstance(base, str) or not base:
        raise SpecError("spec.baseModel must be a non-empty string")
    if not isinstance(source, str) or not source:
        raise SpecError("spec.source must be a non-empty string")
    replicas = spec.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise SpecError("spec.replicas must be an integer >= 0")
    labels = mapping(mapping(spec.get("podSelector")).get("matchLabels"))
    if not labels:
        raise SpecError("spec.podSelector.matchLabels must name at least one label")
    policy = str(spec.get("placement") or "least-adapters")
    if policy not in POLICIES:
        raise SpecError(f"spec.placement must be one of {', '.join(POLICIES)}")
    port = spec.get("port")
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        raise SpecError("spec.port must be a port number")
    adapter = spec.get("adapterName") or name
    if adapter == base:
        raise SpecError("the adapter's name must differ from the base model's")
    return AdapterSpec(
        str(adapter), base, source, replicas, Selector.from_labels(labels), policy, port
    )


@dataclass(frozen=True, slots=True)
class _Outcome:
    pod: str
    ok: bool
    message: str


class ModelAdapterController:
    name = "lora"

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        events: EventRecorder,
        metrics: ControllerMetrics,
        session: aiohttp.ClientSession,
        interval_seconds: float = 1.0,
        request_timeout_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._events = events
        self._metrics = metrics
        self._session = session
        self.interval_seconds = interval_seconds
        self._timeout = request_timeout_seconds
        self._clock = clock
        # (adapter object, pod) -> (failures in a row, not before): pods that failed a load.
        self._backoff: dict[tuple[str, str], tuple[int, float]] = {}

    def reset(self) -> None:
        self._backoff.clear()

    async def reconcile(self) -> None:
        objects = await self._api.list(MODEL_ADAPTERS.path(self._namespace))
        results = await asyncio.gather(
            *(self._reconcile_one(o) for o in objects), return_exceptions=True
        )
        for obj, result in zip(objects, results, strict=True):
            if isinstance(result, Exception):
                name = mapping(obj.get("metadata")).get("name")
                log.warning("ModelAdapter %s: %s", name, result)

    async def _reconcile_one(self, obj: Mapping[str, Any]) -> None:
        metadata = mapping(obj.get("metadata"))
        name = str(metadata.get("name"))
        finalizers = [str(f) for f in metadata.get("finalizers") or ()]
        deleting = bool(metadata.get("deletionTimestamp"))
        try:
            spec = parse_spec(name, mapping(obj.get("spec")))
        except SpecError as exc:
            if deleting:
                await self._drop_finalizer(name, finalizers)
                return
            await self._events.record(obj, "InvalidSpec", str(exc), warning=True)
            await self._write_status(name, {"phase": "Invalid", "message": str(exc)})
            return
        if not deleting and FINALIZER not in finalizers:
            await self._api.patch(
                MODEL_ADAPTERS.path(self._namespace, name),
                {"metadata": {"finalizers": [*finalizers, FINALIZER]}},
            )
        pods = await self._serving_pods(spec)
        if deleting:
            holders = [p for p, view in pods if spec.adapter in view.adapters]
            outcomes = await asyncio.gather(*(self._unload(obj, spec, p) for p in holders))
            if all(o.ok for o in outcomes):
                await self._drop_finalizer(name, finalizers)
                self._metrics.forget(self._namespace, name)
            return

        now = self._clock()
        excluded = frozenset(
            pod for (obj_name, pod), (_, until) in self._backoff.items()
            if obj_name == name and until > now
        )  # fmt: skip
        views = [view for _, view in pods]
        if spec.policy == "least-load":
            views = await self._with_load(spec, pods)
        plan = place(
            spec.adapter,
            replicas=spec.replicas,
            pods=views,
            policy=POLICIES[spec.policy],
            excluded=excluded,
        )
        by_name = {p.name: p for p, _ in pods}
        loads = await asyncio.gather(*(self._load(obj, spec, by_name[n]) for n in plan.load))
        unloads = await asyncio.gather(*(self._unload(obj, spec, by_name[n]) for n in plan.unload))
        failed: dict[str, str] = {}
        for outcome in loads:
            key = (name, outcome.pod)
            if outcome.ok:
                self._backoff.pop(key, None)
                continue
            failed[outcome.pod] = outcome.message
            failures = self._backoff.get(key, (0, 0.0))[0] + 1
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** (failures - 1))
            self._backoff[key] = (failures, now + delay)
        holding = {p.name for p, view in pods if spec.adapter in view.adapters}
        holding |= {o.pod for o in loads if o.ok}
        holding -= {o.pod for o in unloads if o.ok}
        await self._report(obj, spec, pods=[p for p, _ in pods], holding=holding, failed=failed)

    async def _serving_pods(self, spec: AdapterSpec) -> list[tuple[Pod, PodView]]:
        """Ready selected pods that answer /v1/models and serve the base model."""
        listed = await self._api.list(PODS.path(self._namespace), label_selector=str(spec.selector))
        pods = [p for p in select(listed, spec.selector) if p.ready and p.ip]
        readings = await asyncio.gather(
            *(read_models(self._session, p.address(spec.port), timeout_s=5.0) for p in pods)
        )
        serving = []
        for pod, reading in zip(pods, readings, strict=True):
            if not reading.ok or spec.base_model not in reading.models:
                continue
            adapters = frozenset(reading.adapters)
            serving.append((pod, PodView(pod.name, pod.address(spec.port), adapters)))
        return serving

    async def _with_load(
        self, spec: AdapterSpec, pods: Sequence[tuple[Pod, PodView]]
    ) -> list[PodView]:
        stats = await asyncio.gather(
            *(scrape(self._session, p.address(spec.port)) for p, _ in pods)
        )
        views = []
        for (_, view), s in zip(pods, stats, strict=True):
            load = s.running + s.waiting if s is not None else float("inf")
            views.append(PodView(view.name, view.address, view.adapters, load))
        return views

    async def _load(self, obj: Mapping[str, Any], spec: AdapterSpec, pod: Pod) -> _Outcome:
        status, text = await self._post(
            pod.address(spec.port),
            "/v1/load_lora_adapter",
            {"lora_name": spec.adapter, "lora_path": spec.source},
        )
        # 400 "already loaded": someone (a previous pass, a restart of this controller) did it.
        ok = status == 200 or (status == 400 and "already been loaded" in text)
        self._metrics.adapter_operations.labels("load", "ok" if ok else "error").inc()
        if ok:
            await self._events.record(obj, "Loaded", f"{spec.adapter} loaded on {pod.name}")
        else:
            message = f"{spec.adapter} on {pod.name}: HTTP {status}: {text[:200]}"
            await self._events.record(obj, "LoadFailed", message, warning=True)
        return _Outcome(pod.name, ok, "" if ok else f"HTTP {status}: {text[:200]}")

    async def _unload(self, obj: Mapping[str, Any], spec: AdapterSpec, pod: Pod) -> _Outcome:
        status, text = await self._post(
            pod.address(spec.port), "/v1/unload_lora_adapter", {"lora_name": spec.adapter}
        )
        ok = status in (200, 404)  # 404: not loaded, which is what was wanted
        self._metrics.adapter_operations.labels("unload", "ok" if ok else "error").inc()
        if ok:
            await self._events.record(obj, "Unloaded", f"{spec.adapter} unloaded from {pod.name}")
        else:
            message = f"unload {spec.adapter} from {pod.name}: HTTP {status}: {text[:200]}"
            await self._events.record(obj, "UnloadFailed", message, warning=True)
        return _Outcome(pod.name, ok, text[:200])

    async def _post(self, address: str, path: str, body: Mapping[str, Any]) -> tuple[int, str]:
        try:
            async with self._session.post(
                f"http://{address}{path}",
                json=body,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    async def _report(
        self,
        obj: Mapping[str, Any],
        spec: AdapterSpec,
        *,
        pods: Sequence[Pod],
        holding: set[str],
        failed: Mapping[str, str],
    ) -> None:
        name = str(mapping(obj.get("metadata")).get("name"))
        entries = []
        for pod in pods:
            if pod.name in holding:
                entries.append(
                    {"name": pod.name, "address": pod.address(spec.port), "state": "Loaded"}
                )
            elif pod.name in failed:
                entries.append(
                    {
                        "name": pod.name,
                        "address": pod.address(spec.port),
                        "state": "Failed",
                        "message": failed[pod.name],
                    }
                )
        ready = len(holding)
        phase = "Ready" if ready >= spec.replicas else "Pending" if ready == 0 else "Partial"
        status = mapping(obj.get("status"))
        patch = {
            "phase": phase,
            "adapter": spec.adapter,
            "desiredReplicas": spec.replicas,
            "readyReplicas": ready,
            "pods": entries,
            "message": (
                f"{ready}/{spec.replicas} pods hold {spec.adapter}"
                + (f"; {len(failed)} failed to load" if failed else "")
            ),
        }
        self._metrics.adapter_replicas.labels(self._namespace, name).set(ready)
        if any(status.get(k) != v for k, v in patch.items()):
            await self._write_status(name, patch)

    async def _drop_finalizer(self, name: str, finalizers: list[str]) -> None:
        if FINALIZER in finalizers:
            await self._api.patch(
                MODEL_ADAPTERS.path(self._namespace, name),
                {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER]}},
            )

    async def _write_status(self, name: str, status: Mapping[str, Any]) -> None:
        await self._api.patch(
            MODEL_ADAPTERS.path(self._namespace, name, "status"), {"status": dict(status)}
        )
