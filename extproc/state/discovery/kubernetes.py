"""Kubernetes discovery: Ready pods selected by `InferencePool` objects, one endpoint per port.

    settings = KubernetesSettings(namespace="llm", pool_name="llama")
    task = asyncio.create_task(KubernetesDiscovery(settings).run(on_change))

One pool per picker by default, as the field's picker (`--pool-name`, `--pool-namespace`): a
picker given a pool name watches that `InferencePool` alone (a `metadata.name` field selector)
and ignores every other pool of the namespace; `pools` names several, `all_pools` takes every
pool of the namespace. A named pool that does not exist (or selects nothing usable) is a
*problem*: it is logged once, the picker has no endpoints, and `on_problem` listeners (the
picker's readiness) hear of it until the pool appears. Until both lists have arrived once the
discovery reports a problem too, so a picker is not ready before it knows its pool.

Two resources are watched in the namespace, each by a `Reflector` on its own thread
(`extproc.state.discovery.reflector`: list then watch, resume, re-list on 410, backoff):
`inferencepools.inference.networking.k8s.io/v1` (the selected pools) and `pods` (all of them: a
pool's selector can change at any time, and the reference endpoint picker watches the
namespace's pods the same way). The event loop keeps the latest copy of both
(`extproc.state.discovery.inference_pools.PoolsAndPods`, pure, which also reads the pod
annotations) and, after each batch of changes, derives the set: for every selected pool, every
pod whose labels contain the pool's `spec.selector.matchLabels`, that is Ready, not terminating
and has an IP, gives one `EndpointConfig` per `spec.targetPorts[].number`. The set is delivered
only once both resources have been listed, and only when it changes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import kubernetes.client

from extproc.config import EndpointConfig, FleetConfig, KubernetesDiscoveryConfig
from extproc.state.discovery import OnChange
from extproc.state.discovery.inference_pools import WAITING, PoolsAndPods
from extproc.state.discovery.reflector import Reflector, default_namespace, make_api_client
from extproc.state.discovery.watch import Update

log = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"

# How to reach the API and what to watch: the `discovery.kubernetes` config section.
KubernetesSettings = KubernetesDiscoveryConfig


class KubernetesDiscovery:
    """Endpoints of the Ready pods that `InferencePool` objects select, kept live by watches."""

    def __init__(
        self,
        settings: KubernetesSettings,
        *,
        client_configuration: Any | None = None,
        fleet: FleetConfig | None = None,
    ) -> None:
        """`client_configuration` (a `kubernetes.client.Configuration`) skips config loading;
        `fleet` names the pod labels giving an endpoint's role, accelerator and price."""
        self._settings = settings
        self._client_configuration = client_configuration
        self._fleet = fleet or FleetConfig()
        self._problem_listeners: list[Callable[[str], None]] = []

    def on_problem(self, listener: Callable[[str], None]) -> None:
        """Call `listener` on the event loop's thread whenever what keeps the picker from being
        ready changes: a sentence naming the problem, or "" once there is none."""
        self._problem_listeners.append(listener)

    async def run(self, on_change: OnChange) -> None:
        settings = self._settings
        namespace = settings.namespace or default_namespace()
        selected = settings.selected_pools
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        stop = threading.Event()

        def deliver(update: Update) -> None:
            # Called on a reflector's thread.
            loop.call_soon_threadsafe(updates.put_nowait, update)

        reflectors = [
            Reflector(
                "pools",
                _pool_lister(namespace, selected),
                settings=settings,
                make_client=self._make_client,
                deliver=deliver,
                stop=stop,
            ),
            Reflector(
                "pods",
                _pod_lister(namespace),
                settings=settings,
                make_client=self._make_client,
                deliver=deliver,
                stop=stop,
            ),
        ]
        log.info(
            "kubernetes discovery: namespace %s, %s %s",
            namespace,
            "pool" if len(selected) == 1 else "pools",
            ", ".join(selected) or "all",
        )
        state = PoolsAndPods(selected=frozenset(selected), fleet=self._fleet)
        delivered: tuple[EndpointConfig, ...] | None = None
        problem = WAITING
        last_missing: tuple[str, ...] = ()
        self._report(problem)
        for reflector in reflectors:
            reflector.start(loop)
        try:
            while True:
                state.apply(await updates.get())
                # Apply everything already queued before deriving: a re-list of 500 pods arrives
                # as one update, but a burst of watch events should not cause a set per event.
                while not updates.empty():
                    state.apply(updates.get_nowait())
                endpoints = state.endpoints()
                if endpoints is not None and endpoints != delivered:
                    _log_change(delivered or (), endpoints)
                    delivered = endpoints
                    on_change(endpoints)
                if len(selected) > 1 and (missing := state.missing()) != last_missing:
                    if missing:
                        log.warning(
                            "kubernetes discovery: InferencePools %s not found or unusable in "
                            "namespace %s; serving the others",
                            ", ".join(missing),
                            namespace,
                        )
                    last_missing = missing
                now = state.problem(namespace)
                if now != problem:
                    _log_problem(problem, now, namespace)
                    problem = now
                    self._report(problem)
        finally:
            stop.set()
            for reflector in reflectors:
                reflector.interrupt()
            for reflector in reflectors:
                await reflector.wait()

    def _report(self, problem: str) -> None:
        for listener in self._problem_listeners:
            listener(problem)

    def _make_client(self) -> Any:
        return make_api_client(self._settings, self._client_configuration)


def _pool_lister(namespace: str, names: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The client call that lists (or, with watch=True, watches) the namespace's pools: the one
    named, when there is one name (the server sends nothing about the others), else all of
    them (a field selector cannot say "one of these"; `PoolsAndPods` drops the unnamed ones)."""
    selector = {"field_selector": f"metadata.name={names[0]}"} if len(names) == 1 else {}

    def call(api: Any, **kwargs: Any) -> Any:
        return kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object(
            POOL_GROUP, POOL_VERSION, namespace, POOL_PLURAL, **selector, **kwargs
        )

    return call


def _pod_lister(namespace: str) -> Callable[..., Any]:
    def call(api: Any, **kwargs: Any) -> Any:
        return kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, **kwargs)

    return call


def _log_problem(before: str, after: str, namespace: str) -> None:
    if after and after != WAITING:
        log.warning(
            "kubernetes discovery: %s; no endpoints from it, and the picker is not ready until "
            "it exists in namespace %s (check --pool-name / --pool-namespace, and that the "
            "picker's Role may list inferencepools there)",
            after,
            namespace,
        )
    elif before and before != WAITING:
        log.info("kubernetes discovery: the pool is back (%s no longer holds)", before)


def _log_change(before: tuple[EndpointConfig, ...], after: tuple[EndpointConfig, ...]) -> None:
    old = {e.address for e in before}
    new = {e.address for e in after}
    log.info(
        "kubernetes discovery: %d endpoints (added %s; removed %s)",
        len(after),
        ", ".join(sorted(new - old)) or "none",
        ", ".join(sorted(old - new)) or "none",
    )
