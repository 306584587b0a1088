"""Pods as the controllers see them, label selectors, and reading a pod's vLLM over HTTP.

A controller never keeps a pod between passes: each pass lists the pods a selector matches and
parses them into `Pod` records, so a pod that appears, dies or changes address is simply what
the next pass sees (restart-safe by construction).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiohttp

from extproc.config import host_port
from extproc.state.metrics_text import MetricsFormatError, parse_vllm_metrics
from extproc.state.stats import EndpointStats

DEFAULT_PORT = 8000  # vLLM's
HTTP_PORT_NAME = "http"


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    ip: str
    ready: bool  # Ready condition True, not being deleted
    labels: Mapping[str, str]
    port: int  # the container port named "http", else the first declared, else vLLM's 8000
    created: str = ""  # metadata.creationTimestamp, for ordering

    def address(self, port: int | None = None) -> str:
        return host_port(self.ip, port or self.port)


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    metadata = _mapping(obj.get("metadata"))
    status = _mapping(obj.get("status"))
    ready = not metadata.get("deletionTimestamp") and any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    ports: list[tuple[str, int]] = []
    for container in _mapping(obj.get("spec")).get("containers") or ():
        for port in _mapping(container).get("ports") or ():
            number = _mapping(port).get("containerPort")
            if isinstance(number, int):
                ports.append((str(_mapping(port).get("name", "")), number))
    named = [number for name, number in ports if name == HTTP_PORT_NAME]
    port = named[0] if named else ports[0][1] if ports else DEFAULT_PORT
    return Pod(
        name=str(metadata.get("name", "")),
        ip=str(status.get("podIP") or ""),
        ready=bool(ready),
        labels={str(k): str(v) for k, v in _mapping(metadata.get("labels")).items()},
        port=port,
        created=str(metadata.get("creationTimestamp", "")),
    )


@dataclass(frozen=True, slots=True)
class Selector:
    """Equality requirements (matchLabels, or `a=b,c==d` from a Scale's status.selector)."""

    match: tuple[tuple[str, str], ...]

    @classmethod
    def from_labels(cls, labels: Mapping[str, Any]) -> Selector:
        return cls(tuple(sorted((str(k), str(v)) for k, v in labels.items())))

    @classmethod
    def parse(cls, text: str) -> Selector:
        """A label selector string; only equality terms are supported (what a Deployment's or a
        StatefulSet's Scale carries when its selector is matchLabels)."""
        match = []
        for term in filter(None, (t.strip() for t in text.split(","))):
            key, sep, value = term.replace("==", "=").partition("=")
            if not sep or "!" in key or " " in key.strip():
                raise ValueError(f"unsupported selector term {term!r}: only key=value")
            match.append((key.strip(), value.strip()))
        return cls(tuple(sorted(match)))

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.match)

    def matches(self, labels: Mapping[str, str]) -> bool:
        # An empty selector selects nothing here: a controller acting on every pod of a
        # namespace by mistake is worse than one acting on none.
        return bool(self.match) and all(labels.get(k) == v for k, v in self.match)


def select(pods: Iterable[Mapping[str, Any]], selector: Selector) -> list[Pod]:
    """Parsed pods the selector matches, by name. The list is filtered here too, not only by
    the API server's labelSelector, so a server that ignores the parameter cannot widen it."""
    parsed = [parse_pod(p) for p in pods]
    return sorted((p for p in parsed if selector.matches(p.labels)), key=lambda p: p.name)


async def scrape(
    session: aiohttp.ClientSession, address: str, *, path: str = "/metrics", timeout_s: float = 2.0
) -> EndpointStats | None:
    """One vLLM metrics page, parsed; None if the pod does not answer with one."""
    try:
        async with session.get(
            f"http://{address}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    try:
        return parse_vllm_metrics(text, read_at=time.monotonic())
    except MetricsFormatError:
        return None


async def scrape_all(
    session: aiohttp.ClientSession, addresses: Sequence[str], *, path: str = "/metrics"
) -> list[EndpointStats | None]:
    return list(await asyncio.gather(*(scrape(session, a, path=path) for a in addresses)))


def _mapping(value: Any) -> Mapping[str, Any]:
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else {}


mapping = _mapping
