"""The state side, run as one unit: discovery drives the endpoint set, and every source follows
it (the /v1/models readings, the metrics collector, the KV-event subscribers).

A picker runs one (unless a shared collector feeds it, `extproc.state.shared`); the standalone
`extproc collector` runs one and streams what it learns to many pickers. Results go out through
callbacks, so this module decides nothing about snapshots or scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from extproc.config import Config, EndpointConfig
from extproc.state.collector import CollectedState, CollectorMetrics, MetricsCollector
from extproc.state.discovery import Discovery
from extproc.state.kv_events import KVEventMetrics, KVEventSubscribers
from extproc.state.kv_sources import KVEventEndpoint
from extproc.state.models import ModelDiscovery, ModelsReading
from extproc.state.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

# How long start-up waits for discovery's first endpoint set (a Kubernetes list) before serving.
FIRST_ENDPOINTS_SECONDS = 30.0


class StateSide:
    def __init__(
        self,
        config: Config,
        discovery: Discovery,
        registry: CollectorRegistry,
        *,
        on_endpoints: Callable[[tuple[EndpointConfig, ...]], None],
        on_models: Callable[[Sequence[ModelsReading]], None],
        on_metrics: Callable[[CollectedState], None],
        index: PrefixIndex | None = None,
    ) -> None:
        self._config = config
        self._discovery = discovery
        self._on_endpoints = on_endpoints
        self._on_metrics = on_metrics
        # Each endpoint's KV capacity (vllm:cache_config_info) sizes its share of the index.
        self._gpu_blocks: dict[str, int] = {}
        self._models = ModelDiscovery(
            on_models,
            interval=config.discovery.models_refresh_seconds,
            timeout=config.discovery.request_timeout_seconds,
        )
        collector = config.collector
        self.collector = (
            MetricsCollector(
                on_round=self._metrics_round,
                interval=collector.interval_seconds,
                timeout=collector.timeout_seconds,
                staleness_seconds=collector.staleness_seconds,
                unready_after_failures=collector.unready_after_failures,
                metrics=CollectorMetrics(registry),
            )
            if collector.enabled
            else None
        )
        self.index = index
        self.subscribers = (
            KVEventSubscribers(index, metrics=KVEventMetrics(registry))
            if index is not None
            else None
        )
        self._endpoints: tuple[EndpointConfig, ...] = ()
        self._first = asyncio.Event()
        self._local = True  # scrape and subscribe ourselves (no shared collector feeding us)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._collector_task: asyncio.Task[None] | None = None
        self._side: set[asyncio.Task[object]] = set()  # held so they are not collected

    @property
    def endpoints(self) -> tuple[EndpointConfig, ...]:
        return self._endpoints

    @property
    def local(self) -> bool:
        """True while this process scrapes and subscribes itself."""
        return self._local

    async def start(self) -> None:
        # One connection per endpoint for the scrapes (see the collector's notes on pooling).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._tasks.append(asyncio.create_task(self._discovery.run(self._changed)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), FIRST_ENDPOINTS_SECONDS)
        await self._models.refresh(self._session)
        self._tasks.append(asyncio.create_task(self._models.run(self._session)))
        if self.collector is not None and self._local:
            await self.collector.refresh_once(self._session)
            self._collector_task = asyncio.create_task(self.collector.run(self._session))
        await self._follow_kv_events()

    async def refresh_models(self) -> None:
        assert self._session is not None
        await self._models.refresh(self._session)

    def set_local(self, local: bool) -> None:
        """Scrape and subscribe ourselves (True), or let a shared collector feed us (False)."""
        if local == self._local:
            return
        self._local = local
        log.info("state: %s", "scraping locally" if local else "following the shared collector")
        if self._session is None:
            return
        if self.collector is not None:
            if local and self._collector_task is None:
                self._collector_task = asyncio.create_task(self.collector.run(self._session))
            elif not local and self._collector_task is not None:
                self._collector_task.cancel()
                self._collector_task = None
        self._spawn(self._follow_kv_events())

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._side]
        if self._collector_task is not None:
            tasks.append(self._collector_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.subscribers is not None:
            await self.subscribers.close()
        if self._session is not None:
            await self._session.close()

    def _changed(self, endpoints: tuple[EndpointConfig, ...]) -> None:
        """Discovery changed the endpoint set: every source follows it."""
        self._endpoints = endpoints
        addresses = [e.address for e in endpoints]
        log.info("endpoints: %s", ", ".join(addresses) or "none")
        self._on_endpoints(endpoints)
        self._models.set_endpoints(addresses)
        if self.collector is not None:
            self.collector.set_endpoints(addresses)
        if self._first.is_set() and self._session is not None:
            # New endpoints become ready as soon as their models are read, not a round later.
            self._spawn(self._models.refresh(self._session))
            self._spawn(self._follow_kv_events())
        self._first.set()

    async def _follow_kv_events(self) -> None:
        if self.subscribers is None:
            return
        wanted = (
            [
                KVEventEndpoint(
                    e.address,
                    publisher=e.kv_events,
                    num_gpu_blocks=self._gpu_blocks.get(e.address),
                )
                for e in self._endpoints
            ]
            if self._local
            else []
        )
        await self.subscribers.set_endpoints(wanted)

    def _metrics_round(self, collected: CollectedState) -> None:
        self._on_metrics(collected)
        blocks = {
            address: reading.stats.num_gpu_blocks
            for address, reading in collected.endpoints.items()
            if reading.stats is not None and reading.stats.num_gpu_blocks
        }
        if blocks != self._gpu_blocks and self.subscribers is not None:
            self._gpu_blocks = blocks
            self._spawn(self._follow_kv_events())

    def _spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coroutine)
        self._side.add(task)
        task.add_done_callback(self._side.discard)
