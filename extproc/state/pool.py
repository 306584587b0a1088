"""Join what the state side learns into the one Snapshot that requests read.

Three sources, each replacing its own part whole: the endpoint set (discovery: a static list, the
config file, or InferencePools), what each endpoint serves (`/v1/models` readings), and its live
load (the metrics collector). Every change rebuilds the snapshot and swaps it into the store; the
request path never sees a half-applied update. The KV-cache event index is separate (it changes
far more often than this and is queried per block, not per endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from extproc.config import EndpointConfig
from extproc.state.collector import CollectedState, EndpointReading
from extproc.state.models import ModelsReading
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore


class PoolState:
    def __init__(self, store: SnapshotStore, *, prices: Mapping[str, float] | None = None) -> None:
        self._store = store
        # Accelerator -> cost per hour, for endpoints that do not state their own.
        self._prices = dict(prices or {})
        self._endpoints: tuple[EndpointConfig, ...] = ()
        self._models: dict[str, ModelsReading] = {}
        self._metrics: Mapping[str, EndpointReading] = MappingProxyType({})
        self._version = 0
        self._listeners: list[Callable[[Snapshot], None]] = []

    def on_publish(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every new snapshot (learners that follow the pool)."""
        self._listeners.append(listener)

    @property
    def endpoints(self) -> tuple[EndpointConfig, ...]:
        return self._endpoints

    def set_endpoints(self, endpoints: Iterable[EndpointConfig]) -> None:
        self._endpoints = tuple(endpoints)
        known = {e.address for e in self._endpoints}
        self._models = {a: r for a, r in self._models.items() if a in known}
        self._publish()

    def set_models(self, readings: Iterable[ModelsReading]) -> None:
        for reading in readings:
            previous = self._models.get(reading.address)
            # A server that stops answering keeps what it served: its model is still known
            # (503, retry later), not unknown (404).
            kept = (
                ModelsReading(reading.address, previous.models, reading.problem, previous.adapters)
                if not reading.ok and previous is not None
                else reading
            )
            self._models[reading.address] = kept
        self._publish()

    def set_metrics(self, collected: CollectedState) -> None:
        self._metrics = collected.endpoints
        self._publish()

    def _publish(self) -> None:
        self._version += 1
        built = []
        for config in self._endpoints:
            reading = self._models.get(config.address)
            metrics = self._metrics.get(config.address)
            built.append(
                Endpoint(
                    address=config.address,
                    models=frozenset(config.models) | (reading.models if reading else frozenset()),
                    ready=bool(reading and reading.ok),
                    problem=reading.problem if reading else "not read yet",
                    adapters=reading.adapters if reading else {},
                    stats=metrics.stats if metrics else None,
                    health=metrics.health if metrics else None,
                    role=config.role,
                    accelerator=config.accelerator,
                    cost_per_hour=config.cost_per_hour or self._prices.get(config.accelerator, 0.0),
                )
            )
        snapshot = Snapshot.of(built, self._version)
        self._store.replace(snapshot)
        for listener in self._listeners:
            listener(snapshot)
