"""The picker assembled: build it once, serve ext_proc, health and metrics, stop on SIGTERM.

Everything the request path uses is constructed here and passed in; nothing is global. The
`PickerServer` class is the same assembly as a library, for tests and benchmarks; the
`extproc serve` command around it (flags, config checks, signals) is `extproc.server.cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from grpc_health.v1 import health_pb2_grpc

from extproc.config import Config, ConfigError, KubernetesDiscoveryConfig
from extproc.metrics import PickerMetrics, PoolCollector
from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.prefix.mismatch import MismatchDetector, MismatchReporter, MismatchSettings
from extproc.prefix.speculative import SpeculativeIndex
from extproc.request.objectives import ObjectiveResolver
from extproc.scheduling.cost_learner import CostLearner
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.scheduling.room import PoolRoom, saturation_thresholds
from extproc.scheduling.strategies import Strategies
from extproc.server import reply
from extproc.server.access_log import AccessLogReceiver
from extproc.server.field_metrics import MeteredPipeline, pool_reader
from extproc.server.health import PREFIX_HASHING_CONDITION, Health
from extproc.server.prefill import HttpPrefiller
from extproc.server.stream import RESPONSE_PATH_METADATA, StreamHandler
from extproc.server.workers import LogRelay
from extproc.serving.prometheus import close_metrics, serve_metrics
from extproc.serving.tls import add_port
from extproc.state.discovery import Discovery, ReportsProblems
from extproc.state.discovery.configured import discovery_for
from extproc.state.inflight import InFlight
from extproc.state.load_board import LoadBoard
from extproc.state.models import ModelsReading
from extproc.state.objectives import ObjectivesStore
from extproc.state.pool import PoolState
from extproc.state.prefix_index import PrefixIndex
from extproc.state.shared import ChannelTls, SharedStateClient
from extproc.state.side import StateSide
from extproc.state.snapshot import Snapshot, SnapshotStore
from extproc.tenancy.gate import TenancyGate
from extproc.tenancy.limits import Limiter, LocalLimiter
from extproc.tenancy.redis_limits import RedisLimiter
from extproc.tenancy.reload import TenancyReloader, load_directory
from extproc.tenancy.tenants import Tenancy

if TYPE_CHECKING:
    from extproc.state.discovery.objectives import ObjectivesWatch

log = logging.getLogger("extproc")

_MESSAGE_MARGIN = 1 << 20


class _ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, handler: StreamHandler) -> None:
        self._handler = handler

    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ProcessingResponse]:
        # grpc.aio streams replies only from an async generator function, so delegate by loop.
        ends = (RESPONSE_PATH_METADATA, "ended") in (context.invocation_metadata() or ())
        async for response in self._handler.process(request_iterator, ends_with_response=ends):
            yield response


class PickerServer:
    """The picker: ext_proc and health gRPC servers, metrics, and the state side that feeds the
    snapshot (discovery, /v1/models readings, metrics, KV events) or a shared collector's stream."""

    def __init__(
        self,
        config: Config,
        *,
        discovery: Discovery | None = None,
        config_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        board: LoadBoard | None = None,
    ) -> None:
        self.config = config
        self.metrics = PickerMetrics()
        self.store = SnapshotStore()
        self.pool = PoolState(self.store, prices=config.fleet.prices)
        # With `--workers`, the other processes' in-flight counts come from the board.
        self.inflight = InFlight(board)
        self.index = (
            PrefixIndex(max_entries=config.kv_events.max_entries)
            if config.kv_events.enabled
            else None
        )
        self.cost = CostLearner(speeds=config.fleet.speeds)
        self.blocks = PromptBlocks(blocks_settings(config))
        precise = self.index is not None and config.prefix.index != "approximate"
        self.learned = None if precise else ApproxPrefixIndex()
        # Our picks count until the events that confirm them arrive (extproc.prefix.speculative).
        self.speculative = (
            SpeculativeIndex(self.index) if precise and self.index is not None else None
        )
        # (Explicit `is None` tests: the indexes have a length, so an empty one is falsy.)
        routed: SpeculativeIndex | ApproxPrefixIndex | None = (
            self.speculative if self.speculative is not None else self.learned
        )
        self.strategies = strategies_for(config, self.cost)
        self.tenancy = tenancy_for(config, self.metrics)
        self.reloader = (
            TenancyReloader(
                config.tenancy,
                self.tenancy.reconfigure,
                config_path=config_path,
                overrides=overrides,
            )
            if self.tenancy is not None
            else None
        )
        # The pool's InferenceObjectives and InferenceModelRewrites, when watched.
        self.objectives = ObjectivesStore()
        kube = config.discovery.kubernetes
        self.objectives_watch = (
            _objectives_watch(kube, self.objectives)
            if kube is not None and kube.objectives
            else None
        )
        self.prefiller = (
            HttpPrefiller(config.disaggregation.prefill_timeout_seconds)
            if config.disaggregation.mode == "centralized"
            else None
        )
        # The tenancy gate (limits, fair queue) sees the pool only through the snapshot.
        self.gate = tenancy_gate(config, self.tenancy, self.store, self.inflight, self.metrics)
        self.pipeline = MeteredPipeline(
            config,
            self.store,
            self.inflight,
            self.strategies,
            self.metrics,
            blocks=self.blocks,
            matcher=routed,
            learned=routed,
            cost=self.cost,
            gate=self.gate,
            prefiller=self.prefiller,
            objectives=ObjectiveResolver(lambda: self.objectives.current, rng=random.Random()),
        )
        self.metrics.registry.register(PoolCollector(pool_reader(config, self.store)))
        self.pool.on_publish(self._on_snapshot)
        self.health = Health()
        discovery = discovery or discovery_for(config)
        if isinstance(discovery, ReportsProblems):
            # A missing InferencePool keeps the picker unready, as the field's picker is until
            # its pool has synced.
            discovery.on_problem(self._discovery_problem)
        self._problem_tasks: set[asyncio.Task[None]] = set()  # held until done
        self.state = StateSide(
            config,
            discovery,
            self.metrics.registry,
            on_endpoints=self.pool.set_endpoints,
            on_models=self._on_models,
            on_metrics=self.pool.set_metrics,
            index=self.index,
        )
        # KV events tell whether the picker's block hashes are the servers' (docs/prefix.md).
        self.mismatch = MismatchDetector(
            self.blocks.hasher,
            model_of=self._base_model,
            on_verdict=MismatchReporter(
                _MismatchSink(self.metrics, self.health, self._problem_tasks),
                block_size=config.prefix.block_size,
                tokenizer_of=self.blocks.tokenizer_of,
            ),
            settings=MismatchSettings(window_blocks=config.prefix.mismatch_window_blocks),
        )
        if self.state.subscribers is not None:
            self.blocks.observe(self.mismatch)
            self.state.subscribers.observe(self.mismatch)
        self.shared = (
            SharedStateClient(
                config.collector.source,
                self.index if self.index is not None else PrefixIndex(),
                on_update=self.pool.set_metrics,
                on_connected=lambda up: self.state.set_local(not up),
                name=socket.gethostname(),
                # As old as the collector's figures may get before they count as stale.
                silent_after=config.collector.staleness_seconds,
                tls=_collector_tls(config),
            )
            if config.collector.source
            else None
        )
        self._board = board
        self._relay: LogRelay | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._shared_task: asyncio.Task[None] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._objectives_task: asyncio.Task[None] | None = None
        self._metrics_http: WSGIServer | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        server = self.config.server
        handler = StreamHandler(
            self.pipeline,
            self.metrics,
            default_body_mode=server.default_body_mode,
            awaiting_response_seconds=server.response_observer_timeout_seconds,
            destination=reply.Destination(
                namespace=self.config.routing.destination_metadata_namespace,
                key=self.config.routing.destination_key,
                emit_scores=self.config.routing.emit_endpoint_scores,
            ),
            prefix=self._board.prefix() if self._board is not None else None,
        )
        on_entry = handler.logged
        if self._board is not None:
            # With `--workers`, each entry goes to the worker that routed its request.
            self._relay = LogRelay(self._board, handler.logged)
            self._relay.start()
            on_entry = self._relay.entry
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                # In BUFFERED mode a whole body is one message: gRPC's own 4 MiB default would
                # refuse bodies the picker accepts (Envoy then answers an empty 503). The margin
                # is for the headers and framing that ride with the body.
                ("grpc.max_receive_message_length", server.max_body_bytes + _MESSAGE_MARGIN),
            ]
        )
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(
            _ExternalProcessor(handler), self._grpc
        )
        # Health on the ext_proc port too: Envoy's health check of its picker cluster asks
        # there (over TLS when that is on), so a draining replica is left before it stops.
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._grpc)
        # Envoy's access log, on the same port: the `ended` response path's usage.
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogReceiver(on_entry), self._grpc)
        self.grpc_port = add_port(self._grpc, f"{server.host}:{server.grpc_port}", server)
        # Shared by the workers of `--workers`, as the ext_proc port is.
        self._health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_grpc)
        self.health_port = self._health_grpc.add_insecure_port(
            f"{server.host}:{server.health_port}"
        )
        await self.health.start()
        await self._health_grpc.start()

        # Learn the endpoints before taking traffic, so the first requests are not all 503s.
        await self.state.start()
        if self.shared is not None:
            self._shared_task = asyncio.create_task(self.shared.run())
        if self.reloader is not None:
            self._reload_task = asyncio.create_task(self.reloader.run())
        if self.objectives_watch is not None:
            self._objectives_task = asyncio.create_task(self.objectives_watch.run())

        self._metrics_http = serve_metrics(server.metrics_port, server.host, self.metrics.registry)
        self.metrics_port = self._metrics_http.server_port
        await self._grpc.start()
        await self.health.ready()
        snapshot = self.store.current
        log.info(
            "extproc serving ext_proc on :%d%s, health on :%d, metrics on :%d; strategy %s; "
            "%d/%d endpoints ready",
            self.grpc_port,
            " over TLS" if self.config.server.secure_serving else "",
            self.health_port,
            self.metrics_port,
            self.config.routing.strategy,
            sum(e.ready for e in snapshot.endpoints),
            len(snapshot.endpoints),
        )

    def _discovery_problem(self, problem: str) -> None:
        task = asyncio.create_task(self.health.problem("discovery", problem))
        self._problem_tasks.add(task)
        task.add_done_callback(self._problem_tasks.discard)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        """Every new snapshot: the cost model learns; the learned index follows capacities; the
        fair queue looks for room."""
        self.cost.update(snapshot)
        self.pipeline.poke()
        known = {e.address for e in snapshot.endpoints}
        for index in (self.speculative, self.learned):
            if index is not None:
                for endpoint in set(index.endpoints()) - known:
                    index.drop_endpoint(endpoint)
        if self.learned is not None:
            for e in snapshot.endpoints:
                if e.stats is not None and e.stats.num_gpu_blocks:
                    self.learned.set_capacity(e.address, e.stats.num_gpu_blocks)

    def _base_model(self, address: str) -> str | None:
        """The base model `address` serves (what its KV events are hashed for), if one."""
        for endpoint in self.store.current.endpoints:
            if endpoint.address == address:
                bases = endpoint.models - endpoint.adapters.keys()
                return next(iter(bases)) if len(bases) == 1 else None
        return None

    def _on_models(self, readings: Sequence[ModelsReading]) -> None:
        self.pool.set_models(readings)
        endpoints = self.store.current.endpoints
        ready = sum(e.ready for e in endpoints)
        self.metrics.endpoints.labels("ready").set(ready)
        self.metrics.endpoints.labels("not_ready").set(len(endpoints) - ready)

    async def refresh_models(self) -> None:
        """Read every endpoint's /v1/models now (tests; normally a loop does it)."""
        await self.state.refresh_models()

    async def stop(self) -> None:
        """Drain: report not ready, let open streams finish within the grace period, close."""
        await self.health.draining()
        if self._grpc is not None:
            await self._grpc.stop(self.config.server.shutdown_grace_seconds)
        if self._relay is not None:
            self._relay.close()
        for task in (self._shared_task, self._reload_task, self._objectives_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.pipeline.aclose()
        if self.prefiller is not None:
            await self.prefiller.aclose()
        if self.tenancy is not None:
            await self.tenancy.aclose()
        await self.state.stop()
        await self.blocks.aclose()
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._metrics_http is not None:
            close_metrics(self._metrics_http)


class _MismatchSink:
    """`MismatchReporter`'s verdicts to the metrics and the health condition."""

    def __init__(self, metrics: PickerMetrics, health: Health, tasks: set[asyncio.Task[None]]):
        self._metrics = metrics
        self._health = health
        self._tasks = tasks

    def mismatch(self, model: str, endpoint: str, mismatched: bool) -> None:
        self._metrics.prefix_tokenizer_mismatch.labels(model, endpoint).set(int(mismatched))

    def checked(self, model: str, *, predicted: int, unpredicted: int) -> None:
        self._metrics.prefix_checked_blocks.labels(model, "predicted").inc(predicted)
        self._metrics.prefix_checked_blocks.labels(model, "unpredicted").inc(unpredicted)

    def condition(self, message: str) -> None:
        task = asyncio.create_task(self._health.condition(PREFIX_HASHING_CONDITION, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _objectives_watch(kube: KubernetesDiscoveryConfig, store: ObjectivesStore) -> ObjectivesWatch:
    """The pool's InferenceObjective watch. Imported here, as the Kubernetes discovery is
    (`discovery_for`): a picker with a fixed endpoint list never loads the Kubernetes client."""
    from extproc.state.discovery.objectives import ObjectivesWatch

    return ObjectivesWatch(kube, store)


def blocks_settings(config: Config) -> BlocksSettings:
    prefix = config.prefix
    return BlocksSettings(
        tokenizers=dict(prefix.tokenizers),
        default_tokenizer=prefix.default_tokenizer,
        models_dirs=tuple(prefix.models_dirs),
        hub=prefix.tokenizer_hub,
        block_size=prefix.block_size,
        hash_algo=prefix.hash_algo,
        hash_seed=prefix.hash_seed,
    )


def tenancy_for(config: Config, metrics: PickerMetrics) -> Tenancy | None:
    """Tenancy as configured (None when off): its directory, and a local or Redis limiter."""
    settings = config.tenancy
    if not settings.enabled:
        return None
    local = LocalLimiter()
    limiter: Limiter = local
    if settings.limits_backend == "redis":
        limiter = RedisLimiter(
            settings.redis_url,
            metrics,
            timeout=settings.redis_timeout_seconds,
            failure_mode=settings.redis_failure_mode,
            retry_seconds=settings.redis_retry_seconds,
            lease_seconds=settings.lease_seconds,
            local=local,
        )
    return Tenancy(settings, load_directory(settings), limiter)


def tenancy_gate(
    config: Config,
    tenancy: Tenancy | None,
    store: SnapshotStore,
    inflight: InFlight,
    metrics: PickerMetrics,
) -> TenancyGate | None:
    """The gate for `tenancy` (None when tenancy is off): it sees the pool only through
    `PoolRoom`, the snapshot's candidates and the in-flight counts."""
    if tenancy is None:
        return None
    thresholds = saturation_thresholds(config.scheduling)
    room = PoolRoom(store, inflight, thresholds=thresholds, collector=config.collector)
    return TenancyGate(tenancy, room, metrics)


def strategies_for(config: Config, cost: CostLearner | None = None) -> Strategies:
    """Built-in strategies plus the profiles of the configured EndpointPickerConfig."""
    raw = config.scheduling.endpoint_picker_config
    try:
        profiles = (
            parse_endpoint_picker_config(raw, cost_model=cost.current if cost is not None else None)
            if raw
            else {}
        )
    except ConfigError as exc:
        raise ConfigError(f"scheduling.endpoint_picker_config.{exc.key}", exc.problem) from exc
    return Strategies(
        profiles=profiles,
        cost_model=cost.current if cost is not None else None,
        ttft_target_seconds=config.scheduling.ttft_target_seconds,
    )


def _collector_tls(config: Config) -> ChannelTls | None:
    if not config.collector.source_tls:
        return None
    ca_file = config.collector.source_ca_file
    return ChannelTls(ca=Path(ca_file).read_bytes() if ca_file else None)
