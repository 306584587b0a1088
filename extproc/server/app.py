"""`extproc serve`: build the picker once, serve ext_proc, health and metrics, stop on SIGTERM.

Everything the request path uses is constructed here and passed in; nothing is global. The
`PickerServer` class is the same assembly as a library, for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import start_http_server

from extproc.config import Config, ConfigError, EndpointConfig, load_config
from extproc.metrics import PickerMetrics
from extproc.pipeline import Pipeline
from extproc.scheduling.strategies import Strategies, known_strategies, validate_strategy_name
from extproc.server.health import Health
from extproc.server.stream import StreamHandler
from extproc.state.inflight import InFlight
from extproc.state.models import ModelDiscovery
from extproc.state.snapshot import Snapshot, SnapshotStore

log = logging.getLogger("extproc")


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
    """The picker: ext_proc and health gRPC servers, metrics, and the model discovery loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = PickerMetrics()
        self.store = SnapshotStore()
        self.inflight = InFlight()
        self.pipeline = Pipeline(config, self.store, self.inflight, Strategies(), self.metrics)
        self.health = Health()
        self._discovery = ModelDiscovery(
            self.store,
            config.endpoints,
            interval=config.discovery.models_refresh_seconds,
            timeout=config.discovery.request_timeout_seconds,
        )
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
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
        )
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(
            _ExternalProcessor(handler), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port(f"{server.host}:{server.grpc_port}")
        self._health_grpc = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_grpc)
        self.health_port = self._health_grpc.add_insecure_port(
            f"{server.host}:{server.health_port}"
        )
        await self.health.start()
        await self._health_grpc.start()

        # Learn the endpoints before taking traffic, so the first requests are not all 503s.
        self._session = aiohttp.ClientSession()
        snapshot = await self._refresh()
        ready = sum(e.ready for e in snapshot.endpoints)
        self._tasks.append(asyncio.create_task(self._discover()))

        self._metrics_http, _ = start_http_server(
            server.metrics_port, addr=server.host, registry=self.metrics.registry
        )
        self.metrics_port = self._metrics_http.server_port
        await self._grpc.start()
        await self.health.ready()
        log.info(
            "extproc serving ext_proc on :%d, health on :%d, metrics on :%d; strategy %s; "
            "%d/%d endpoints ready",
            self.grpc_port,
            self.health_port,
            self.metrics_port,
            self.config.routing.strategy,
            ready,
            len(snapshot.endpoints),
        )

    async def _refresh(self) -> Snapshot:
        assert self._session is not None
        snapshot = await self._discovery.refresh(self._session)
        ready = sum(e.ready for e in snapshot.endpoints)
        self.metrics.endpoints.labels("ready").set(ready)
        self.metrics.endpoints.labels("not_ready").set(len(snapshot.endpoints) - ready)
        return snapshot

    async def _discover(self) -> None:
        while True:
            await asyncio.sleep(self.config.discovery.models_refresh_seconds)
            try:
                await self._refresh()
            except Exception:  # a bug here must not end discovery for good
                log.exception("model discovery round failed")

    async def stop(self) -> None:
        """Drain: report not ready, let open streams finish within the grace period, close."""
        await self.health.draining()
        if self._grpc is not None:
            await self._grpc.stop(self.config.server.shutdown_grace_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


async def serve(config: Config) -> None:
    picker = PickerServer(config)
    await picker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info(
        "shutting down: draining open streams for up to %.1fs", config.server.shutdown_grace_seconds
    )
    await picker.stop()


def check_protobuf_backend() -> None:
    """The pure-Python protobuf backend is ~10x slower on this path; refuse to run on it."""
    backend = api_implementation.Type()
    if backend != "upb":
        raise RuntimeError(
            f"protobuf is using the '{backend}' backend, not 'upb'; unset "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION and install protobuf >= 4.21"
        )


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
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def config_from_args(args: argparse.Namespace) -> Config:
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
    }
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    config = load_config(args.config, overrides)
    if args.endpoints:
        try:
            endpoints = tuple(
                EndpointConfig(address=a.strip()) for a in args.endpoints.split(",") if a.strip()
            )
        except ConfigError as exc:
            raise ConfigError(f"--endpoints {exc.key}", exc.problem) from exc
        config = Config(config.server, config.routing, config.discovery, endpoints)
    try:
        validate_strategy_name(config.routing.strategy)
    except ValueError as exc:
        raise ConfigError("routing.strategy", str(exc)) from exc
    if config.discovery.kubernetes is not None and config.endpoints:
        raise ConfigError(
            "discovery.kubernetes",
            "endpoints come from InferencePools or from a static list, not both",
        )
    if not config.endpoints and config.discovery.kubernetes is None:
        raise ConfigError(
            "endpoints",
            "no endpoints: give --endpoints, an 'endpoints' list, or discovery.kubernetes",
        )
    return config


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"extproc: config error: {exc}", file=sys.stderr)
        return 2
    check_protobuf_backend()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0
