"""The `PodAutoscaler` controller: samples pod metrics, decides, writes the scale and the status.

Each pass (every `interval_seconds`, 1 s by default), for every PodAutoscaler in the namespace:
1. read the target's scale subresource: its replicas and its pod selector;
2. list the pods the selector matches and scrape each Ready pod's vLLM `/metrics`, all at once;
3. add one `Sample` per metric source (the sum over the pods that answered) to that source's
   window; the windows are the only memory, and they are a cache: after a restart they refill;
4. once `syncPeriodSeconds` has passed since its last decision, ask the algorithm
   (`algorithms.py`), write `spec.replicas` through the scale subresource when it changes, record
   an Event, and write the status (replicas, per-pod metric values, the last decisions).

Restart-safe: the current replica count comes from the cluster each pass, the algorithms' memory
starts as "the current size was just recommended", which holds the fleet for a scale-down delay
after a restart instead of shrinking it on a half-filled window, and the decision history
continues from the status.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from extproc.controllers.autoscaler.algorithms import (
    Decision,
    Memory,
    MetricWindow,
    Observation,
    Sample,
)
from extproc.controllers.autoscaler.spec import (
    TOKENS_PER_SECOND,
    Activation,
    AutoscalerSpec,
    SpecError,
    parse_spec,
    per_pod_value,
)
from extproc.controllers.events import EventRecorder
from extproc.controllers.kube import POD_AUTOSCALERS, PODS, KubeApi, Resource, resource_for
from extproc.controllers.pods import Pod, Selector, mapping, scrape, select
from extproc.controllers.telemetry import ControllerMetrics
from extproc.state.stats import EndpointStats

log = logging.getLogger(__name__)

KEEP_DECISIONS = 5  # in status.lastDecisions
WINDOW_SECONDS = 600.0  # samples kept: longer than any window an algorithm reads by default


@dataclass(slots=True)
class _State:
    """What the controller remembers about one PodAutoscaler between passes (a cache)."""

    uid: str
    windows: dict[int, MetricWindow] = field(default_factory=dict)  # by source index
    memory: Memory | None = None
    decided_at: float | None = None
    tokens: dict[str, tuple[float, float]] = field(default_factory=dict)  # pod -> (at, total)
    activation_seen: float | None = None


@dataclass(frozen=True, slots=True)
class Scale:
    replicas: int
    selector: Selector


class AutoscalerController:
    name = "autoscaler"

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        events: EventRecorder,
        metrics: ControllerMetrics,
        session: aiohttp.ClientSession,
        interval_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._events = events
        self._metrics = metrics
        self._session = session
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._states: dict[str, _State] = {}

    def reset(self) -> None:
        self._states.clear()

    async def reconcile(self) -> None:
        objects = await self._api.list(POD_AUTOSCALERS.path(self._namespace))
        names = {str(mapping(o.get("metadata")).get("name")) for o in objects}
        for gone in set(self._states) - names:
            del self._states[gone]
            self._metrics.forget(self._namespace, gone)
        results = await asyncio.gather(
            *(self._reconcile_one(o) for o in objects), return_exceptions=True
        )
        for obj, result in zip(objects, results, strict=True):
            if isinstance(result, Exception):
                log.warning(
                    "PodAutoscaler %s: %s", mapping(obj.get("metadata")).get("name"), result
                )

    async def _reconcile_one(self, obj: Mapping[str, Any]) -> None:
        metadata = mapping(obj.get("metadata"))
        name = str(metadata.get("name"))
        if metadata.get("deletionTimestamp"):
            return
        try:
            spec = parse_spec(mapping(obj.get("spec")))
        except SpecError as exc:
            await self._events.record(obj, "InvalidSpec", str(exc), warning=True)
            await self._write_status(name, {"message": str(exc)})
            return
        state = self._states.get(name)
        uid = str(metadata.get("uid") or "")
        if state is None or state.uid != uid:  # new, or deleted and created again
            state = self._states[name] = _State(uid)
        target = resource_for(spec.target.api_version, spec.target.kind)
        scale = await self._read_scale(target, spec.target.name)
        if scale is None:
            message = f"{spec.target.kind} {spec.target.name} not found"
            await self._events.record(obj, "FailedGetScale", message, warning=True)
            await self._write_status(name, {"message": message})
            return
        pods = select(
            await self._api.list(PODS.path(self._namespace), label_selector=str(scale.selector)),
            scale.selector,
        )
        ready = [p for p in pods if p.ready and p.ip]
        now = self._clock()
        await self._sample(state, spec, ready, now)
        demand = await self._activation(state, spec.activation)
        if state.memory is None:
            # After a (re)start: as if the current size had just been recommended.
            state.memory = Memory(recommendations=((now, scale.replicas),))
        if state.decided_at is not None and now - state.decided_at < spec.sync_seconds:
            return
        state.decided_at = now
        observation = Observation(
            now=now,
            replicas=scale.replicas,
            ready=len(ready),
            metrics=tuple(state.windows[i] for i in sorted(state.windows)),
            activation_demand=demand,
        )
        decision = spec.algorithm.decide(observation, state.memory, spec.bounds)
        state.memory = decision.memory
        await self._apply(
            obj, spec, target=target, scale=scale, decision=decision, ready=len(ready)
        )

    async def _read_scale(self, target: Resource, name: str) -> Scale | None:
        raw = await self._api.get(target.path(self._namespace, name, "scale"))
        if raw is None:
            return None
        spec, status = mapping(raw.get("spec")), mapping(raw.get("status"))
        replicas = spec.get("replicas")
        selector_text = status.get("selector")
        if isinstance(selector_text, str) and selector_text:
            selector = Selector.parse(selector_text)
        else:
            # A Scale always carries status.selector for Deployments and StatefulSets; an
            # emulated API that answers the subresource with the object itself has the
            # object's spec.selector instead.
            selector = Selector.from_labels(
                mapping(mapping(spec.get("selector")).get("matchLabels"))
            )
        return Scale(replicas if isinstance(replicas, int) else 0, selector)

    async def _sample(
        self, state: _State, spec: AutoscalerSpec, ready: Sequence[Pod], now: float
    ) -> None:
        if not ready:
            return  # no reading: a fleet with no ready pod reports nothing, not zero
        # One scrape per (pod, port, path), shared by the sources that read the same page.
        wanted = sorted(
            {
                (pod.name, source.port or pod.port, source.path)
                for source in spec.sources
                for pod in ready
            }
        )
        by_name = {pod.name: pod for pod in ready}
        scraped = await asyncio.gather(
            *(
                scrape(self._session, by_name[n].address(port), path=path)
                for n, port, path in wanted
            )
        )
        pages = dict(zip(wanted, scraped, strict=True))
        for index, source in enumerate(spec.sources):
            total, answered = 0.0, 0
            for pod in ready:
                stats = pages[(pod.name, source.port or pod.port, source.path)]
                if stats is None:
                    continue
                rate = None
                if source.metric == TOKENS_PER_SECOND:
                    rate = _rate(state, pod.name, stats, now)
                value = per_pod_value(source.metric, stats, tokens_rate=rate)
                if value is None:
                    continue
                total += value
                answered += 1
            window = state.windows.get(index) or MetricWindow(source.metric, source.target)
            window = replace(window, target=source.target).trimmed(now, WINDOW_SECONDS)
            if answered:
                window = replace(window, samples=(*window.samples, Sample(now, total, answered)))
            state.windows[index] = window

    async def _activation(self, state: _State, activation: Activation | None) -> float:
        if activation is None:
            return 0.0
        try:
            async with self._session.get(
                activation.url, timeout=aiohttp.ClientTimeout(total=2.0)
            ) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0.0
        value = 0.0
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in (activation.metric, activation.metric + "_total"):
                        value += sample.value
        except ValueError:
            return 0.0
        seen, state.activation_seen = state.activation_seen, value
        return max(0.0, value - seen) if seen is not None else 0.0

    async def _apply(
        self,
        obj: Mapping[str, Any],
        spec: AutoscalerSpec,
        *,
        target: Resource,
        scale: Scale,
        decision: Decision,
        ready: int,
    ) -> None:
        name = str(mapping(obj.get("metadata")).get("name"))
        status = mapping(obj.get("status"))
        now = _timestamp()
        patch: dict[str, Any] = {
            "observedGeneration": mapping(obj.get("metadata")).get("generation"),
            "algorithm": spec.algorithm.name,
            "currentReplicas": scale.replicas,
            "desiredReplicas": decision.desired,
            "readyReplicas": ready,
            "panic": decision.panic,
            "metrics": [
                {"metric": source.metric, "target": source.target, "current": _value(v)}
                for source, (_, v) in zip(spec.sources, decision.values, strict=False)
            ],
            "message": decision.reason,
        }
        if decision.desired != scale.replicas:
            await self._api.patch(
                target.path(self._namespace, spec.target.name, "scale"),
                {"spec": {"replicas": decision.desired}},
            )
            direction = "up" if decision.desired > scale.replicas else "down"
            self._metrics.scalings.labels(self._namespace, name, direction).inc()
            await self._events.record(
                obj,
                "Scaled",
                f"{spec.target.kind} {spec.target.name}: {scale.replicas} -> "
                f"{decision.desired}: {decision.reason}",
            )
            history = [d for d in status.get("lastDecisions") or () if isinstance(d, Mapping)]
            history.append(
                {
                    "time": now,
                    "from": scale.replicas,
                    "to": decision.desired,
                    "reason": decision.reason,
                }
            )
            patch["lastDecisions"] = history[-KEEP_DECISIONS:]
            patch["lastScaleTime"] = now
        self._metrics.desired_replicas.labels(self._namespace, name).set(decision.desired)
        self._metrics.ready_replicas.labels(self._namespace, name).set(ready)
        for metric, value in decision.values:
            self._metrics.metric_value.labels(self._namespace, name, metric).set(value)
        await self._write_status(name, patch)

    async def _write_status(self, name: str, status: Mapping[str, Any]) -> None:
        await self._api.patch(
            POD_AUTOSCALERS.path(self._namespace, name, "status"), {"status": dict(status)}
        )


def _rate(state: _State, pod: str, stats: EndpointStats, now: float) -> float | None:
    total = stats.prompt_tokens + stats.generation_tokens
    previous = state.tokens.get(pod)
    state.tokens[pod] = (now, total)
    if previous is None or now <= previous[0] or total < previous[1]:
        return None  # first reading, or the server restarted (counters went back)
    return (total - previous[1]) / (now - previous[0])


def _value(value: float) -> str:
    # A string: the status shows what kubectl prints, and JSON has no NaN.
    return "unknown" if math.isnan(value) else f"{value:.3g}"


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
