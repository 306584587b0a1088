"""The immutable view of the pool that every scheduling decision reads.

The state side (discovery, later the metrics collector and KV events) builds a new `Snapshot` and
swaps it into the `SnapshotStore` whole; the request path only ever reads `store.current`, so a
decision never sees half an update and never waits for one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from extproc.state.stats import EndpointStats, ScrapeHealth


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model server as the picker sees it."""

    address: str  # "ip:port", exactly what Envoy receives
    models: frozenset[str] = frozenset()  # base model and adapters it serves
    ready: bool = False
    # Why it is not ready, for logs and the debug view.
    problem: str = ""
    # LoRA adapters it serves: name -> (base model, adapter path).
    adapters: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # Live load from the metrics collector: the last good scrape, and how scrapes have gone.
    stats: EndpointStats | None = None
    health: ScrapeHealth | None = None
    # What it is, from config or pod labels: its prefill/decode role, GPU type and price.
    role: str = "both"  # "prefill" | "decode" | "both"
    accelerator: str = ""
    cost_per_hour: float = 0.0

    @property
    def prefills(self) -> bool:
        """It may be given a disaggregated request's prefill."""
        return self.role != "decode"

    @property
    def decodes(self) -> bool:
        """It may generate (a disaggregated request's decode, or a whole request)."""
        return self.role != "prefill"


@dataclass(frozen=True, slots=True)
class Snapshot:
    endpoints: tuple[Endpoint, ...] = ()
    version: int = 0
    _by_model: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict, repr=False)
    _adapters: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint], version: int = 0) -> Snapshot:
        endpoints = tuple(sorted(endpoints, key=lambda e: e.address))
        by_model: dict[str, list[Endpoint]] = {}
        for endpoint in endpoints:
            for model in endpoint.models:
                by_model.setdefault(model, []).append(endpoint)
        adapters = {name: spec for e in endpoints for name, spec in e.adapters.items()}
        return cls(endpoints, version, {m: tuple(eps) for m, eps in by_model.items()}, adapters)

    def serving(self, model: str) -> tuple[Endpoint, ...]:
        """Endpoints that serve `model`, ready or not."""
        return self._by_model.get(model, ())

    def adapter(self, model: str) -> tuple[str, str] | None:
        """(base model, adapter path) when `model` names a LoRA adapter some endpoint serves."""
        return self._adapters.get(model)

    def models(self) -> list[str]:
        return sorted(self._by_model)


class SnapshotStore:
    """Holds the current snapshot; replaced whole by the state side, read by requests."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._current = snapshot or Snapshot()

    @property
    def current(self) -> Snapshot:
        return self._current

    def replace(self, snapshot: Snapshot) -> None:
        self._current = snapshot
