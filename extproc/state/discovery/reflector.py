"""List-then-watch of one namespaced resource on a thread of its own, for the picker's watches
(`extproc.state.discovery.kubernetes` for pools and pods, `.objectives` for objectives).

Why threads: the official client is synchronous (urllib3). Each reflector runs the client's list
and watch calls with `_preload_content=False` and reads the watch stream line by line itself, so
it keeps the resourceVersion of every event and bookmark (the client's `Watch` helper loses it, and
fails on ERROR events, when objects are not deserialized into models; deserializing every pod into
`V1Pod` costs far more than `json.loads`). Updates go to `deliver` on the reflector's thread (the
callers hand them to their loop with `loop.call_soon_threadsafe`). Stopping takes a flag, plus a
shutdown of the socket a watch is blocked on (`interrupt`); a list in flight finishes first
(bounded by `request_timeout_seconds`).

Each reflector lists, then watches from the list's resourceVersion; a watch that ends normally
(the server's `timeoutSeconds`) is resumed from the last resourceVersion seen; `410 Gone` (as an
HTTP status or an ERROR event) means that version is too old, so it lists again, which also
catches deletions the watch never reported. Any other error is logged and retried after an
exponential backoff with full jitter, capped, from the same resourceVersion (`Backoff`: written
here rather than taken from a retry library, docs/dependencies.md says why).
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import kubernetes.config
from kubernetes.watch import watch as _kubernetes_watch

from extproc.config import KubernetesDiscoveryConfig
from extproc.state.discovery.watch import Changed, Listed, Update, as_mapping

log = logging.getLogger(__name__)

# Where a pod's service account namespace is mounted; the default namespace in a cluster.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

_GONE = 410

# The client's functions used below that it leaves untyped, given types here at the edge.
_load_kube_config = cast(Callable[..., None], kubernetes.config.load_kube_config)
_load_incluster_config = cast(Callable[..., None], kubernetes.config.load_incluster_config)
_iter_resp_lines = cast(Callable[[Any], Iterable[str]], _kubernetes_watch.iter_resp_lines)


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


def make_api_client(settings: KubernetesDiscoveryConfig, configuration: Any | None = None) -> Any:
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


class Reflector:
    """List-then-watch one resource on its own thread, handing updates to `deliver`."""

    def __init__(
        self,
        resource: str,
        call: Callable[..., Any],
        *,
        settings: KubernetesDiscoveryConfig,
        make_client: Callable[[], Any],
        deliver: Callable[[Update], None],
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
        self._deliver(Listed(self._resource, tuple(i for i in items if isinstance(i, dict))))
        version = str(as_mapping(document.get("metadata")).get("resourceVersion") or "")
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
                obj = as_mapping(event.get("object"))
                if kind == "ERROR":
                    if obj.get("code") == _GONE:
                        raise _Expired
                    raise _WatchError(
                        f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}"
                    )
                version = str(as_mapping(obj.get("metadata")).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    events += 1
                    self._deliver(Changed(self._resource, kind, obj))
        finally:
            with self._lock:
                self._response = None
            response.close()
            response.release_conn()
        return version, events


def _shutdown(response: Any) -> None:
    """Make a read blocked on `response` (a urllib3 response) return, from another thread."""
    with contextlib.suppress(Exception):  # already closed: nothing is blocked on it
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


def default_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _describe(exc: Exception) -> str:
    if isinstance(exc, kubernetes.client.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
