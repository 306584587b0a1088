"""`extproc serve`: build the picker once, serve ext_proc, health and metrics, stop on SIGTERM.

Everything the request path uses is constructed here and passed in; nothing is global. The
`PickerServer` class is the same assembly as a library, for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import start_http_server

from extproc.config import Config, ConfigError, EndpointConfig, ServerConfig, load_config
from extproc.metrics import PickerMetrics, PoolCollector
from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.prefix.mismatch import MismatchDetector, MismatchReporter, MismatchSettings
from extproc.request.objectives import ObjectiveResolver
from extproc.scheduling.cost import CostLearner
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.scheduling.strategies import Strategies, known_strategies, validate_strategy_name
from extproc.server import reply
from extproc.server.access_log import AccessLogReceiver
from extproc.server.field_metrics import MeteredPipeline, pool_reader
from extproc.server.health import PREFIX_HASHING_CONDITION, Health
from extproc.server.logs import configure_logging
from extproc.server.prefill import HttpPrefiller
from extproc.server.stream import StreamHandler
from extproc.server.tls import server_credentials
from extproc.state.discovery import Discovery
from extproc.state.discovery.kubernetes import KubernetesDiscovery
from extproc.state.discovery.objectives import ObjectivesWatch
from extproc.state.discovery.static import FixedDiscovery, StaticDiscovery
from extproc.state.inflight import InFlight
from extproc.state.models import ModelsReading
from extproc.state.objectives import ObjectivesStore
from extproc.state.pool import PoolState
from extproc.state.prefix_index import PrefixIndex
from extproc.state.shared import ChannelTls, SharedStateClient
from extproc.state.side import StateSide
from extproc.state.snapshot import Snapshot, SnapshotStore
from extproc.tenancy.limits import Limiter, LocalLimiter
from extproc.tenancy.redis_limits import RedisLimiter
from extproc.tenancy.reload import TenancyReloader, load_directory
from extproc.tenancy.tenants import Tenancy

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
        async for response in self._handler.process(request_iterator):
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
    ) -> None:
        self.config = config
        self.metrics = PickerMetrics()
        self.store = SnapshotStore()
        self.pool = PoolState(self.store, prices=config.fleet.prices)
        self.inflight = InFlight()
        self.index = (
            PrefixIndex(max_entries=config.kv_events.max_entries)
            if config.kv_events.enabled
            else None
        )
        self.cost = CostLearner(speeds=config.fleet.speeds)
        self.blocks = PromptBlocks(blocks_settings(config))
        precise = self.index is not None and config.prefix.index != "approximate"
        self.learned = None if precise else ApproxPrefixIndex()
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
            ObjectivesWatch(kube, self.objectives) if kube is not None and kube.objectives else None
        )
        self.prefiller = (
            HttpPrefiller(config.disaggregation.prefill_timeout_seconds)
            if config.disaggregation.mode == "centralized"
            else None
        )
        self.pipeline = MeteredPipeline(
            config,
            self.store,
            self.inflight,
            self.strategies,
            self.metrics,
            blocks=self.blocks,
            matcher=self.index if precise else self.learned,
            learned=self.learned,
            cost=self.cost,
            tenancy=self.tenancy,
            prefiller=self.prefiller,
            objectives=ObjectiveResolver(lambda: self.objectives.current, rng=random.Random()),
        )
        self.metrics.registry.register(PoolCollector(pool_reader(config, self.store)))
        self.pool.on_publish(self._on_snapshot)
        self.health = Health()
        discovery = discovery or discovery_for(config)
        if isinstance(discovery, KubernetesDiscovery):
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
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._shared_task: asyncio.Task[None] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._objectives_task: asyncio.Task[None] | None = None
        self._metrics_http: Any = None
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
        )
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
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(
            AccessLogReceiver(handler.logged), self._grpc
        )
        self.grpc_port = add_port(self._grpc, f"{server.host}:{server.grpc_port}", server)
        self._health_grpc = grpc.aio.server()
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

        self._metrics_http, _ = start_http_server(
            server.metrics_port, addr=server.host, registry=self.metrics.registry
        )
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
        if self.learned is not None:
            known = {e.address for e in snapshot.endpoints}
            for endpoint in self.learned.endpoints():
                if endpoint not in known:
                    self.learned.drop_endpoint(endpoint)
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
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


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


def discovery_for(
    config: Config,
    *,
    config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Discovery:
    """Where endpoints come from: InferencePools, the config file at `config_path` (reloaded on
    change, with the same flag overrides), or the fixed list in `config`."""
    if config.discovery.kubernetes is not None:
        return KubernetesDiscovery(config.discovery.kubernetes, fleet=config.fleet)
    if config_path is not None:
        return StaticDiscovery(config_path, overrides=overrides)
    return FixedDiscovery(config.endpoints)


async def serve(
    config: Config,
    discovery: Discovery,
    *,
    config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> None:
    picker = PickerServer(config, discovery=discovery, config_path=config_path, overrides=overrides)
    await picker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    delay = config.server.drain_delay_seconds
    log.info(
        "shutting down: not ready, still taking new streams for %.1fs, then draining open "
        "streams for up to %.1fs",
        delay,
        config.server.shutdown_grace_seconds,
    )
    # A stream that reaches a stopping picker is refused, and its request fails: take new ones
    # until the proxies have seen the not-ready status (Envoy's health check of the ext_proc
    # port, Kubernetes endpoints) and sent their streams to the other replicas.
    await picker.health.draining()
    await asyncio.sleep(delay)
    await picker.stop()


def check_protobuf_backend() -> None:
    """The pure-Python protobuf backend is ~10x slower on this path; refuse to run on it."""
    backend = api_implementation.Type()
    if backend != "upb":
        raise RuntimeError(
            f"protobuf is using the '{backend}' backend, not 'upb'; unset "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION and install protobuf >= 4.21"
        )


def _collector_tls(config: Config) -> ChannelTls | None:
    if not config.collector.source_tls:
        return None
    ca_file = config.collector.source_ca_file
    return ChannelTls(ca=Path(ca_file).read_bytes() if ca_file else None)


def add_port(server: grpc.aio.Server, address: str, config: ServerConfig) -> int:
    """Listen on `address`, over TLS when `config.secure_serving` (docs/deploy.md, "TLS")."""
    if not config.secure_serving:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(config.cert_path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see docs/configuration.md)")
    parser.add_argument("--endpoints", help="comma-separated ip:port list of model servers")
    parser.add_argument(
        "--strategy",
        help=f"routing strategy: {', '.join(known_strategies())}, or a blend like least-request:2",
    )
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--grpc-port", type=int, help="ext_proc port (default 9002)")
    parser.add_argument("--health-port", type=int, help="gRPC health port (default 9003)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 9090)")
    parser.add_argument("--max-body-bytes", type=int, help="refuse larger bodies with 413")
    parser.add_argument("--fallbacks", type=int, help="fallback endpoints after the pick")
    parser.add_argument(
        "--body-mode",
        choices=["streamed", "buffered"],
        help="body mode to assume when Envoy does not announce one",
    )
    parser.add_argument(
        "--secure-serving",
        action="store_true",
        default=None,
        help="serve ext_proc over TLS (self-signed certificate unless --cert-path)",
    )
    parser.add_argument(
        "--cert-path", help="directory with tls.crt and tls.key, read again when they change"
    )
    parser.add_argument(
        "--destination-endpoint-hint-metadata-namespace",
        help="dynamic-metadata namespace of the decision (default envoy.lb)",
    )
    parser.add_argument(
        "--destination-endpoint-hint-key",
        help="header and metadata key of the decision (default x-gateway-destination-endpoint)",
    )
    parser.add_argument(
        "--emit-endpoint-scores",
        action="store_true",
        default=None,
        help="send each scored endpoint's score in the metadata too",
    )
    add_pool_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text for a terminal, json (one object per line, with request ids) for a pipeline",
    )


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The pool flags of the field's picker (`extproc serve` and `extproc collector`): any of
    them turns Kubernetes discovery on (`discovery.kubernetes`)."""
    parser.add_argument(
        "--pool-name", help="the InferencePool to serve (only that pool is watched)"
    )
    parser.add_argument("--pool-namespace", help="its namespace (default: the pod's own namespace)")
    parser.add_argument(
        "--all-pools",
        action="store_true",
        default=None,
        help="serve every InferencePool of the namespace instead of one",
    )


def config_from_args(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """The config the flags and file describe, and the flag overrides (for reloads)."""
    overrides: dict[str, Any] = {}
    flags = {
        "host": "server.host",
        "grpc_port": "server.grpc_port",
        "health_port": "server.health_port",
        "metrics_port": "server.metrics_port",
        "max_body_bytes": "server.max_body_bytes",
        "body_mode": "server.default_body_mode",
        "strategy": "routing.strategy",
        "fallbacks": "routing.fallbacks",
        "secure_serving": "server.secure_serving",
        "cert_path": "server.cert_path",
        "destination_endpoint_hint_metadata_namespace": "routing.destination_metadata_namespace",
        "destination_endpoint_hint_key": "routing.destination_key",
        "emit_endpoint_scores": "routing.emit_endpoint_scores",
        "pool_name": "discovery.kubernetes.pool_name",
        "pool_namespace": "discovery.kubernetes.namespace",
        "all_pools": "discovery.kubernetes.all_pools",
    }
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        # EXTPROC_ALL_POOLS=false must not create a discovery.kubernetes section by itself.
        if value is not None and not (attr == "all_pools" and value is False):
            overrides[key] = value
    config = load_config(args.config, overrides)
    if args.endpoints:
        try:
            endpoints = tuple(
                EndpointConfig(address=a.strip()) for a in args.endpoints.split(",") if a.strip()
            )
        except ConfigError as exc:
            raise ConfigError(f"--endpoints {exc.key}", exc.problem) from exc
        config = dataclasses.replace(config, endpoints=endpoints)
    configured = strategies_for(config).names()
    for key, name in (
        ("routing.strategy", config.routing.strategy),
        ("disaggregation.prefill_strategy", config.disaggregation.prefill_strategy),
        ("disaggregation.decode_strategy", config.disaggregation.decode_strategy),
    ):
        try:
            validate_strategy_name(name, configured=configured)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from exc
    if config.discovery.kubernetes is not None and config.endpoints:
        raise ConfigError(
            "discovery.kubernetes",
            "endpoints come from InferencePools or from a static list, not both",
        )
    if config.tenancy.enabled:
        load_directory(config.tenancy)  # the keys file must be readable and valid at start-up
    if not config.endpoints and config.discovery.kubernetes is None:
        raise ConfigError(
            "endpoints",
            "no endpoints: give --endpoints, an 'endpoints' list, or discovery.kubernetes",
        )
    return config, overrides


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    try:
        config, overrides = config_from_args(args)
    except ConfigError as exc:
        print(f"extproc: config error: {exc}", file=sys.stderr)
        return 2
    check_protobuf_backend()
    # --endpoints fixes the set; otherwise the config file's list is followed as it changes.
    path = None if args.endpoints else args.config
    discovery = discovery_for(config, config_path=path, overrides=overrides)
    main = serve(config, discovery, config_path=args.config, overrides=overrides)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)
    return 0
