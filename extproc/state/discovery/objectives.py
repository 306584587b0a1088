"""Watches the `InferenceObjective`s and `InferenceModelRewrite`s of the picker's namespace.

    store = ObjectivesStore()
    task = asyncio.create_task(ObjectivesWatch(settings, store).run())  # the pool's namespace

Two list-then-watch reflectors (the same machinery as the pool and pod watches in
`kubernetes.py`, one thread each) keep the latest raw objects; after each batch of changes the
event loop derives an `Objectives` view (`extproc.state.objectives.objectives_from`, only the
objects whose `poolRef` names a served pool) and publishes it to the store when it changed.

Which API group: the llm-d router's `llm-d.ai`, else the older
`inference.networking.x-k8s.io` when only that CRD is installed (a 404 on the first), as the
reference picker chooses. Neither installed: the reflector logs and retries with its backoff,
and the store stays empty: every request has priority 0 and no rewrite. The picker's readiness
never waits on these: they refine requests, they do not decide whether there is a pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes.client

from extproc.state.discovery.kubernetes import KubernetesSettings
from extproc.state.discovery.reflector import Reflector, default_namespace, make_api_client
from extproc.state.discovery.watch import Changed, Listed, Update
from extproc.state.objectives import (
    OBJECTIVE_GROUPS,
    OBJECTIVE_PLURAL,
    OBJECTIVE_VERSION,
    REWRITE_PLURAL,
    Objectives,
    ObjectivesStore,
    objectives_from,
)

log = logging.getLogger(__name__)

_NOT_FOUND = 404
_RESOURCES = {"objectives": OBJECTIVE_PLURAL, "rewrites": REWRITE_PLURAL}


class ObjectivesWatch:
    """Keeps `store` at the current objectives and rewrite rules of the served pools."""

    def __init__(
        self,
        settings: KubernetesSettings,
        store: ObjectivesStore,
        *,
        client_configuration: Any | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._namespace = settings.namespace or default_namespace()
        self._client_configuration = client_configuration

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        stop = threading.Event()

        def deliver(update: Update) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, update)  # on a reflector's thread

        reflectors = [
            Reflector(
                resource,
                _lister(self._namespace, plural),
                settings=self._settings,
                make_client=lambda: make_api_client(self._settings, self._client_configuration),
                deliver=deliver,
                stop=stop,
            )
            for resource, plural in _RESOURCES.items()
        ]
        pools = frozenset(self._settings.selected_pools)
        known: dict[str, dict[str, Mapping[str, Any]]] = {name: {} for name in _RESOURCES}
        for reflector in reflectors:
            reflector.start(loop)
        try:
            while True:
                _apply(known, await updates.get())
                while not updates.empty():
                    _apply(known, updates.get_nowait())
                view = objectives_from(
                    known["objectives"].values(), known["rewrites"].values(), pools=pools
                )
                if view != self._store.current:
                    _log_change(view)
                    self._store.set(view)
        finally:
            stop.set()
            for reflector in reflectors:
                reflector.interrupt()
            for reflector in reflectors:
                await reflector.wait()


def _apply(known: dict[str, dict[str, Mapping[str, Any]]], update: Update) -> None:
    objects = known[update.resource]
    if isinstance(update, Listed):
        objects.clear()
        objects.update((_name(o), o) for o in update.objects if _name(o))
    elif isinstance(update, Changed):
        name = _name(update.object)
        if update.kind == "DELETED":
            objects.pop(name, None)
        elif name:
            objects[name] = update.object


def _lister(namespace: str, plural: str) -> Callable[..., Any]:
    """The client call listing (or watching) `plural` in the newest group the API serves. The
    group found is kept for the watches that follow; a 404 later (the CRD removed) looks
    again."""
    found: list[str] = []  # this lister's group, once one answered

    def call(api: Any, **kwargs: Any) -> Any:
        objects = kubernetes.client.CustomObjectsApi(api)
        groups = list(found) or list(OBJECTIVE_GROUPS)
        for i, group in enumerate(groups):
            try:
                response = objects.list_namespaced_custom_object(
                    group, OBJECTIVE_VERSION, namespace, plural, **kwargs
                )
            except kubernetes.client.ApiException as exc:
                if exc.status != _NOT_FOUND:
                    raise
                found.clear()
                if i == len(groups) - 1:
                    raise
                continue
            if not found:
                log.info("watching %s.%s/%s in %s", plural, group, OBJECTIVE_VERSION, namespace)
                found.append(group)
            return response
        raise AssertionError("unreachable: the last group's 404 is raised")

    return call


def _name(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata")
    return str(metadata.get("name") or "") if isinstance(metadata, Mapping) else ""


def _log_change(after: Objectives) -> None:
    """The whole view: it is small, and the operator sees what requests will get."""
    log.info(
        "objectives: %d InferenceObjectives (%s); model rewrites for %s%s",
        len(after.priorities),
        ", ".join(f"{n}={p}" for n, p in sorted(after.priorities.items())) or "none",
        ", ".join(sorted(after.exact)) or "no model by name",
        " and every other model" if after.generic is not None else "",
    )
