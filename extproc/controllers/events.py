"""Kubernetes Events about the controllers' objects (`kubectl describe` shows them).

An event is recorded when something happens (a scale, a load, a failure), not on every pass: the
recorder remembers the last message per object and reason and skips an identical repeat, so a
retrying placement does not write an event every second. Recording never fails a reconcile.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from extproc.controllers.kube import EVENTS, KubeApi

log = logging.getLogger(__name__)

COMPONENT = "extproc-controller"


class EventRecorder:
    def __init__(self, api: KubeApi, *, component: str = COMPONENT) -> None:
        self._api = api
        self._component = component
        self._last: dict[tuple[str, str, str, str], str] = {}  # (kind, ns, name, reason) -> msg

    async def record(
        self,
        obj: Mapping[str, Any],
        reason: str,
        message: str,
        *,
        warning: bool = False,
    ) -> None:
        metadata = obj.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        name = str(metadata.get("name") or "")
        kind = str(obj.get("kind") or "")
        key = (kind, namespace, name, reason)
        if self._last.get(key) == message:
            return
        self._last[key] = message
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", ""),
                "kind": kind,
                "name": name,
                "namespace": namespace,
                "uid": metadata.get("uid", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": self._component},
            "reportingComponent": self._component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        log.info("%s %s/%s: %s: %s", kind, namespace, name, reason, message)
        try:
            await self._api.create(EVENTS.path(namespace), event)
        except Exception as exc:  # an event is best effort: the reconcile goes on
            log.warning("event for %s/%s not recorded: %s", namespace, name, exc)
