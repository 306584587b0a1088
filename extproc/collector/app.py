"""`extproc collector`: one state side for many picker replicas.

It discovers the endpoints, scrapes their metrics and follows their KV-cache events exactly as a
picker would, and streams the result on `StateService.Watch` (extproc.state.shared). Pickers
started with `collector.source: host:port` follow it and scrape by themselves only while its
stream is down. Each picker still reads `/v1/models` itself: it changes rarely and decides
readiness, which a picker should not lose with the collector.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Gauge

from extproc._generated import state_pb2_grpc as pb_grpc
from extproc.config import Config, ConfigError
from extproc.serving.flags import SERVER_FLAGS, add_pool_arguments, config_from_flags
from extproc.serving.prometheus import close_metrics, serve_metrics
from extproc.serving.tls import add_port
from extproc.state.discovery import Discovery
from extproc.state.discovery.configured import discovery_for
from extproc.state.shared import KEEPALIVE, RecordingIndex, StateService
from extproc.state.side import StateSide

log = logging.getLogger("extproc.collector")


class CollectorServer:
    def __init__(self, config: Config, discovery: Discovery, *, port: int, metrics_port: int):
        self.config = config
        self.registry = CollectorRegistry()
        self.index = RecordingIndex(max_entries=config.kv_events.max_entries)
        self.service = StateService(self.index)
        self.state = StateSide(
            config,
            discovery,
            self.registry,
            on_endpoints=lambda endpoints: None,
            on_models=lambda readings: None,
            on_metrics=self.service.publish,
            index=self.index if config.kv_events.enabled else None,
        )
        watchers = Gauge(
            "extproc_collector_watchers",
            "Pickers following this collector.",
            registry=self.registry,
        )
        watchers.set_function(lambda: self.service.watchers)
        self._port = port
        self._metrics_port = metrics_port
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: WSGIServer | None = None
        self.port = 0

    async def start(self) -> None:
        host = self.config.server.host
        self._grpc = grpc.aio.server(options=KEEPALIVE)
        pb_grpc.add_StateServiceServicer_to_server(self.service, self._grpc)  # type: ignore[no-untyped-call]
        self.port = add_port(self._grpc, f"{host}:{self._port}", self.config.server)
        await self.state.start()
        await self._grpc.start()
        self._metrics_http = serve_metrics(self._metrics_port, host, self.registry)
        log.info("extproc collector streaming state on :%d", self.port)

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(1.0)
        await self.state.stop()
        if self._metrics_http is not None:
            close_metrics(self._metrics_http)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the pickers' YAML config (endpoints, discovery, ...)")
    parser.add_argument("--endpoints", help="comma-separated ip:port list of model servers")
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9004, help="StateService port (default 9004)")
    parser.add_argument("--metrics-port", type=int, default=9091, help="Prometheus port")
    parser.add_argument(
        "--secure-serving",
        action="store_true",
        default=None,
        help="serve the stream over TLS (self-signed certificate unless --cert-path)",
    )
    parser.add_argument(
        "--cert-path", help="directory with tls.crt and tls.key, read again when they change"
    )
    add_pool_arguments(parser)  # the pickers' pool, which the collector follows for them
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """The pickers' config as the collector reads it: the file, `--endpoints` and the flags
    both servers take (`extproc.serving.flags`). Routing and tenancy keys are the pickers' to
    check; the collector uses neither."""
    return config_from_flags(args, SERVER_FLAGS)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config, overrides = config_from_args(args)
    except ConfigError as exc:
        print(f"extproc collector: config error: {exc}", file=sys.stderr)
        return 2
    discovery = discovery_for(
        config, config_path=None if args.endpoints else args.config, overrides=overrides
    )
    asyncio.run(_serve(config, discovery, args.port, args.metrics_port))
    return 0


async def _serve(config: Config, discovery: Discovery, port: int, metrics_port: int) -> None:
    server = CollectorServer(config, discovery, port=port, metrics_port=metrics_port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop()
