"""The controllers' one seam to the Kubernetes API: JSON in, JSON out, over the official client.

    api = KubeApi.connect(kubeconfig="", context="")      # in-cluster when neither is given
    deployment = await api.get(DEPLOYMENTS.path("llm", "llama"))
    await api.patch(DEPLOYMENTS.path("llm", "llama", "scale"), {"spec": {"replicas": 3}})

Every call goes through `ApiClient.param_serialize` + `call_api` (auth, TLS, kubeconfig exec
plugins all come from the client) and returns the decoded JSON; objects stay plain mappings that
the controllers parse into their own frozen records at the edge. The client is synchronous
(urllib3), so each call runs on a worker thread; a controller pass makes tens of calls, not
thousands, so a thread per call in flight is cheap and keeps the event loop free for scrapes.

Patches are JSON merge patches (`application/merge-patch+json`): a whole list is replaced, which
is what every list we write (finalizers, status entries) needs. `resourceVersion` in a patch
body makes the API server check it (409 on a stale one), which the Lease election relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import kubernetes.client
import kubernetes.config

_load_kube_config = cast(Callable[..., None], kubernetes.config.load_kube_config)
_load_incluster_config = cast(Callable[..., None], kubernetes.config.load_incluster_config)

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer, with its status and the server's message."""

    def __init__(self, status: int, message: str, *, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


class Conflict(ApiError):
    """409: the object changed since it was read (or already exists on create)."""


@dataclass(frozen=True, slots=True)
class Resource:
    """A namespaced API resource: where its objects live."""

    group: str  # "" for the core group
    version: str
    plural: str

    def path(self, namespace: str, name: str = "", subresource: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


GROUP = "extproc.io"
VERSION = "v1alpha1"
POD_AUTOSCALERS = Resource(GROUP, VERSION, "podautoscalers")
MODEL_ADAPTERS = Resource(GROUP, VERSION, "modeladapters")
KV_CACHE_POOLS = Resource(GROUP, VERSION, "kvcachepools")
PODS = Resource("", "v1", "pods")
EVENTS = Resource("", "v1", "events")
SERVICES = Resource("", "v1", "services")
CONFIG_MAPS = Resource("", "v1", "configmaps")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
STATEFUL_SETS = Resource("apps", "v1", "statefulsets")
LEASES = Resource("coordination.k8s.io", "v1", "leases")


def resource_for(api_version: str, kind: str) -> Resource:
    """The resource of a scale target named by apiVersion and kind (as in scaleTargetRef)."""
    group, _, version = api_version.rpartition("/")
    # Every kind with a scale subresource that Kubernetes ships pluralises with an "s"; custom
    # resources can name their plural in scaleTargetRef.
    return Resource(group, version, kind.lower() + "s")


class KubeApi:
    def __init__(self, client: Any, *, timeout_seconds: float = 10.0) -> None:
        self._client = client  # kubernetes.client.ApiClient
        self._timeout = timeout_seconds

    @classmethod
    def connect(cls, *, kubeconfig: str = "", context: str = "") -> KubeApi:
        """From a kubeconfig file, else the pod's service account, else ~/.kube/config."""
        configuration = kubernetes.client.Configuration()
        if kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            _load_kube_config(
                config_file=kubeconfig or None,
                context=context or None,
                client_configuration=configuration,
            )
        else:
            _load_incluster_config(client_configuration=configuration)
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        self._client.close()

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist (404)."""
        try:
            return await self._json("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str, *, label_selector: str = "") -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else None
        document = await self._json("GET", path, query=query)
        items = document.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._json("POST", path, body=body)

    async def patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._json("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def delete(self, path: str) -> None:
        try:
            await self._json("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def _json(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Sequence[tuple[str, str]] | None = None,
        content_type: str = "",
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, method, path, body, query, content_type)

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        query: Sequence[tuple[str, str]] | None,
        content_type: str,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        request = self._client.param_serialize(
            method,
            path,
            query_params=list(query) if query else None,
            header_params=headers,
            body=dict(body) if body is not None else None,
            auth_settings=["BearerToken"],
        )
        response = self._client.call_api(*request, _request_timeout=(self._timeout,) * 2)
        response.read()
        status = int(response.status)
        text = response.data.decode("utf-8", "replace") if response.data else ""
        if not 200 <= status < 300:
            message = text
            with contextlib.suppress(ValueError, AttributeError):
                message = str(json.loads(text).get("message", text))
            error = Conflict if status == 409 else ApiError
            raise error(status, message[:300], method=method, path=path)
        document = json.loads(text) if text else {}
        return document if isinstance(document, dict) else {}
