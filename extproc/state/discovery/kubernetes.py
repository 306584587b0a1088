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

Two resources are watched in the namespace, each by a `_Reflector` on its own thread:
`inferencepools.inference.networking.k8s.io/v1` (the selected pools) and `pods` (all of them: a
pool's selector can change at any time, and the reference endpoint picker watches the
namespace's pods the same way). The event loop keeps the
latest copy of both and, after each batch of changes, derives the set: for every selected pool,
every pod whose labels contain the pool's `spec.selector.matchLabels`, that is Ready, not
terminating and has an IP, gives one `EndpointConfig` per `spec.targetPorts[].number`. The set is
delivered only once both resources have been listed, and only when it changes.

Pod annotations (documented in `docs/discovery.md`):
- `extproc.io/models`: comma-separated model names the pod serves (also learned from
  `/v1/models`); an annotation and not a label because model names contain `/`.
- `extproc.io/kv-events`: the vLLM KV event publisher, `tcp://host:port`, or just a port, which
  means `tcp://<pod IP>:<port>` (a pod template cannot know its pod's IP).

Why threads: the official client is synchronous (urllib3). Each reflector runs the client's list
and watch calls with `_preload_content=False` and reads the watch stream line by line itself, so
it keeps the resourceVersion of every event and bookmark (the client's `Watch` helper loses it, and
fails on ERROR events, when objects are not deserialized into models; deserializing every pod into
`V1Pod` costs far more than `json.loads`). Updates reach the loop through
`loop.call_soon_threadsafe`. Cancelling `run` stops both threads: a flag, plus a shutdown of the
socket a watch is blocked on; a list in flight finishes first (bounded by
`request_timeout_seconds`).

Each reflector lists, then watches from the list's resourceVersion; a watch that ends normally
(the server's `timeoutSeconds`) is resumed from the last resourceVersion seen; `410 Gone` (as an
HTTP status or an ERROR event) means that version is too old, so it lists again, which also
catches deletions the watch never reported. Any other error is logged and retried after an
exponential backoff with full jitter, capped, from the same resourceVersion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import kubernetes.config
from kubernetes.watch import watch as _kubernetes_watch

from extproc.config import (
    ConfigError,
    EndpointConfig,
    EndpointRole,
    FleetConfig,
    KubernetesDiscoveryConfig,
)
from extproc.state.discovery import OnChange, ordered

log = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
MODELS_ANNOTATION = "extproc.io/models"
KV_EVENTS_ANNOTATION = "extproc.io/kv-events"
# Where a pod's service account namespace is mounted; the default namespace in a cluster.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

_GONE = 410
# The problem reported until both resources have been listed once.
_WAITING = "waiting for the first list of InferencePools and pods from the Kubernetes API"

# The client's functions used below that it leaves untyped, given types here at the edge.
_load_kube_config = cast(Callable[..., None], kubernetes.config.load_kube_config)
_load_incluster_config = cast(Callable[..., None], kubernetes.config.load_incluster_config)
_iter_resp_lines = cast(Callable[[Any], Iterable[str]], _kubernetes_watch.iter_resp_lines)


# How to reach the API and what to watch: the `discovery.kubernetes` config section.
KubernetesSettings = KubernetesDiscoveryConfig


# The records the event loop keeps; raw API objects stay inside this module.


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


@dataclass(frozen=True, slots=True)
class _Listed:
    """A complete list of one resource: it replaces everything known about that resource."""

    resource: str
    objects: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class _Changed:
    resource: str
    kind: str  # ADDED, MODIFIED, DELETED
    object: Mapping[str, Any]


_Update = _Listed | _Changed


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class _WatchError(Exception):
    """An ERROR event other than 410 in a watch stream."""


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: a uniform delay in [0, min(cap, initial * 2**n)]."""

    initial: float
    cap: float
    _attempt: int = 0
    _random: random.Random = field(default_factory=random.Random)

    def delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._random.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0


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
        namespace = settings.namespace or _default_namespace()
        selected = settings.selected_pools
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[_Update] = asyncio.Queue()
        stop = threading.Event()

        def deliver(update: _Update) -> None:
            # Called on a reflector's thread.
            loop.call_soon_threadsafe(updates.put_nowait, update)

        reflectors = [
            _Reflector(
                "pools",
                _pool_lister(namespace, selected),
                settings=settings,
                make_client=self._make_client,
                deliver=deliver,
                stop=stop,
            ),
            _Reflector(
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
        state = _State(selected=frozenset(selected), fleet=self._fleet)
        delivered: tuple[EndpointConfig, ...] | None = None
        problem = _WAITING
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


def make_api_client(settings: KubernetesSettings, configuration: Any | None = None) -> Any:
    """An ApiClient from `configuration`, else from the kubeconfig or the pod's service account;
    runs on a reflector's thread (kubeconfig exec plugins can be slow)."""
    if configuration is None:
        configuration = kubernetes.client.Configuration()
        if settings.kubeconfig or not _in_cluster():
            _load_kube_config(
                config_file=settings.kubeconfig or None,
                context=settings.context or None,
                client_configuration=configuration,
            )
        else:
            _load_incluster_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


class _State:
    """The latest pools and pods, owned by the event loop; derives the endpoint set."""

    def __init__(self, *, selected: frozenset[str], fleet: FleetConfig) -> None:
        self._selected = selected  # empty: all pools
        self._fleet = fleet
        self._pools: dict[str, PoolSpec] = {}
        self._unusable: set[str] = set()  # selected pools that exist but select nothing
        self._pods: dict[str, PodState] = {}
        self._listed: set[str] = set()

    def apply(self, update: _Update) -> None:
        if isinstance(update, _Listed):
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
            return _WAITING
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
            host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip  # IPv6 as Envoy expects it
            kv_events = pod.kv_events
            if kv_events.isdigit():
                kv_events = f"tcp://{host}:{kv_events}"
            role, accelerator, cost = _described(pod, fleet)
            for port in pool.ports:
                try:
                    found.append(
                        EndpointConfig(
                            address=f"{host}:{port}",
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
    spec = _mapping(obj.get("spec"))
    match_labels = _mapping(_mapping(spec.get("selector")).get("matchLabels"))
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
    metadata = _mapping(obj.get("metadata"))
    status = _mapping(obj.get("status"))
    annotations = _mapping(metadata.get("annotations"))
    ready = not metadata.get("deletionTimestamp") and any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    models = str(annotations.get(MODELS_ANNOTATION, ""))
    return PodState(
        name=str(metadata.get("name", "")),
        labels={str(k): str(v) for k, v in _mapping(metadata.get("labels")).items()},
        ip=str(status.get("podIP") or ""),
        ready=ready,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        kv_events=str(annotations.get(KV_EVENTS_ANNOTATION, "")).strip(),
    )


class _Reflector:
    """List-then-watch one resource on its own thread, handing updates to `deliver`."""

    def __init__(
        self,
        resource: str,
        call: Callable[..., Any],
        *,
        settings: KubernetesSettings,
        make_client: Callable[[], Any],
        deliver: Callable[[_Update], None],
        stop: threading.Event,
    ) -> None:
        self._resource = resource
        self._call = call  # (api_client, **list_kwargs) -> urllib3 response
        self._settings = settings
        self._make_client = make_client
        self._deliver = deliver
        self._stop = stop
        self._thread: threading.Thread | None = None
        self._ended: asyncio.Future[None] | None = None
        self._lock = threading.Lock()  # guards _response between this thread and interrupt()
        self._response: Any = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        ended: asyncio.Future[None] = loop.create_future()
        self._ended = ended

        def finished() -> None:
            if not ended.done():
                ended.set_result(None)

        def run() -> None:
            try:
                self._run()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(finished)

        self._thread = threading.Thread(target=run, name=f"k8s-watch-{self._resource}", daemon=True)
        self._thread.start()

    def interrupt(self) -> None:
        """Unblock a watch read from another thread (the stop flag must be set first)."""
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown(response)

    async def wait(self) -> None:
        """Wait, without blocking the loop, until the thread has ended (after `stop` is set)."""
        if self._thread is None or self._ended is None:
            return
        try:
            await asyncio.shield(self._ended)
        except asyncio.CancelledError:
            # Cancelled again while stopping: still leave no thread behind.
            self._thread.join()
            raise
        self._thread.join()  # it has signalled its end: this returns at once

    def _run(self) -> None:
        settings = self._settings
        backoff = Backoff(settings.backoff_initial_seconds, settings.backoff_max_seconds)
        api: Any = None
        version = ""  # empty: list first
        try:
            while not self._stop.is_set():
                try:
                    if api is None:
                        api = self._make_client()
                    if not version:
                        version = self._list(api)
                        backoff.reset()
                    started = time.monotonic()
                    version, events = self._watch(api, version)
                    if events:
                        backoff.reset()
                    elif time.monotonic() - started < 1.0 and not self._stop.is_set():
                        # A server that ends every watch at once must not be hammered.
                        self._stop.wait(backoff.delay())
                except _Expired:
                    if self._stop.is_set():
                        break
                    log.info(
                        "%s watch expired at resourceVersion %s; listing again",
                        self._resource,
                        version,
                    )
                    version = ""
                except Exception as exc:  # any failure is logged and retried, never fatal
                    if self._stop.is_set():
                        break
                    delay = backoff.delay()
                    log.warning(
                        "%s %s failed: %s; retrying in %.1fs",
                        self._resource,
                        "list" if not version else "watch",
                        _describe(exc),
                        delay,
                    )
                    self._stop.wait(delay)
        finally:
            if api is not None:
                api.close()

    def _list(self, api: Any) -> str:
        response = self._call(
            api,
            _preload_content=False,
            _request_timeout=(self._settings.request_timeout_seconds,) * 2,
        )
        try:
            document = json.loads(response.data)
        finally:
            response.release_conn()
        items = document.get("items") or []
        self._deliver(_Listed(self._resource, tuple(i for i in items if isinstance(i, dict))))
        version = str(_mapping(document.get("metadata")).get("resourceVersion") or "")
        # Without a version (not a real API server) the watch starts from "now"; a version is
        # never empty afterwards, so the loop does not list again on its own.
        return version or "0"

    def _watch(self, api: Any, version: str) -> tuple[str, int]:
        """One watch request from `version`; returns the last version seen and the event count."""
        settings = self._settings
        try:
            response = self._call(
                api,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=settings.watch_timeout_seconds,
                _preload_content=False,
                _request_timeout=(
                    settings.request_timeout_seconds,
                    settings.watch_timeout_seconds + settings.request_timeout_seconds,
                ),
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == _GONE:
                raise _Expired from exc
            raise
        with self._lock:
            self._response = response
        events = 0
        try:
            if self._stop.is_set():  # stopped while connecting: interrupt() saw no response
                return version, events
            for line in _iter_resp_lines(response):
                if not line:
                    continue
                event = json.loads(line)
                kind = event.get("type")
                obj = _mapping(event.get("object"))
                if kind == "ERROR":
                    if obj.get("code") == _GONE:
                        raise _Expired
                    raise _WatchError(
                        f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}"
                    )
                version = str(_mapping(obj.get("metadata")).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    events += 1
                    self._deliver(_Changed(self._resource, kind, obj))
        finally:
            with self._lock:
                self._response = None
            response.close()
            response.release_conn()
        return version, events


def _pool_lister(namespace: str, names: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The client call that lists (or, with watch=True, watches) the namespace's pools: the one
    named, when there is one name (the server sends nothing about the others), else all of
    them (a field selector cannot say "one of these"; `_State` drops the unnamed ones)."""
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


def _shutdown(response: Any) -> None:
    """Make a read blocked on `response` (a urllib3 response) return, from another thread."""
    with contextlib.suppress(Exception):  # already closed: nothing is blocked on it
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


def _default_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _name(obj: Mapping[str, Any]) -> str:
    return str(_mapping(obj.get("metadata")).get("name") or "")


def _mapping(value: Any) -> Mapping[str, Any]:
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else {}


def _describe(exc: Exception) -> str:
    if isinstance(exc, kubernetes.client.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _log_problem(before: str, after: str, namespace: str) -> None:
    if after and after != _WAITING:
        log.warning(
            "kubernetes discovery: %s; no endpoints from it, and the picker is not ready until "
            "it exists in namespace %s (check --pool-name / --pool-namespace, and that the "
            "picker's Role may list inferencepools there)",
            after,
            namespace,
        )
    elif before and before != _WAITING:
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


# The list-then-watch machinery, for the other watches of the picker's namespace
# (`extproc.state.discovery.objectives`).
Reflector = _Reflector
Listed = _Listed
Changed = _Changed
Update = _Update
default_namespace = _default_namespace
