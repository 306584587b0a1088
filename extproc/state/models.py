"""Learn what each endpoint serves from its `/v1/models`, and whether it answers at all.

A vLLM server lists its base model and every loaded LoRA adapter (with `parent` = the base).
An endpoint whose `/v1/models` fails is marked not ready until it answers again; models declared
in the config are served even before the first answer arrives, but readiness still needs one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from extproc.config import EndpointConfig
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelsReading:
    address: str
    models: frozenset[str]
    problem: str = ""  # empty when the endpoint answered

    @property
    def ok(self) -> bool:
        return not self.problem


async def read_models(
    session: aiohttp.ClientSession, address: str, *, timeout_s: float
) -> ModelsReading:
    url = f"http://{address}/v1/models"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                return ModelsReading(address, frozenset(), f"/v1/models answered {response.status}")
            document = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return ModelsReading(address, frozenset(), f"/v1/models failed: {type(exc).__name__}")
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return ModelsReading(address, frozenset(), "/v1/models has no 'data' list")
    ids = frozenset(
        item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)
    )
    return ModelsReading(address, ids)


def build_snapshot(
    endpoints: Sequence[EndpointConfig],
    readings: Sequence[ModelsReading],
    version: int,
    previous: Snapshot,
) -> Snapshot:
    by_address = {r.address: r for r in readings}
    before = {e.address: e.models for e in previous.endpoints}
    built = []
    for config in endpoints:
        reading = by_address.get(config.address)
        if reading is not None and reading.ok:
            learned = reading.models
        else:
            # A server that stops answering keeps what it served: its model is still known
            # (503, retry later), not unknown (404).
            learned = before.get(config.address, frozenset())
        built.append(
            Endpoint(
                address=config.address,
                models=frozenset(config.models) | learned,
                ready=bool(reading and reading.ok),
                problem=reading.problem if reading else "not read yet",
            )
        )
    return Snapshot.of(built, version)


class ModelDiscovery:
    """Polls every endpoint's /v1/models and publishes a fresh snapshot after each round."""

    def __init__(
        self,
        store: SnapshotStore,
        endpoints: Sequence[EndpointConfig],
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self._store = store
        self._endpoints = tuple(endpoints)
        self._interval = interval
        self._timeout = timeout
        self._version = 0

    async def refresh(self, session: aiohttp.ClientSession) -> Snapshot:
        readings = await asyncio.gather(
            *(read_models(session, e.address, timeout_s=self._timeout) for e in self._endpoints)
        )
        self._version += 1
        current = self._store.current
        previous = {e.address: e for e in current.endpoints}
        snapshot = build_snapshot(self._endpoints, readings, self._version, current)
        for endpoint in snapshot.endpoints:
            before = previous.get(endpoint.address)
            if before is None or before.ready != endpoint.ready:
                log.info(
                    "endpoint %s is %s%s",
                    endpoint.address,
                    "ready" if endpoint.ready else "not ready",
                    f" ({endpoint.problem})" if endpoint.problem else "",
                )
        self._store.replace(snapshot)
        return snapshot
