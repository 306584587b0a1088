"""`extproc serve`: the picker's flags, its config checked whole at start, and its life until
SIGTERM (drain, then stop). The picker itself is assembled in `extproc.server.app`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf.internal import api_implementation

from extproc.config import Config, ConfigError
from extproc.scheduling.strategies import known_strategies, validate_strategy_name
from extproc.server.app import PickerServer, strategies_for
from extproc.server.logs import configure_logging
from extproc.server.workers import supervise
from extproc.serving.flags import SERVER_FLAGS, add_pool_arguments, config_from_flags
from extproc.state.discovery import Discovery
from extproc.state.discovery.configured import discovery_for
from extproc.state.load_board import LoadBoard
from extproc.tenancy.reload import load_directory

log = logging.getLogger("extproc")

# The picker's own flags, besides those both servers take (`SERVER_FLAGS`).
_PICKER_FLAGS: tuple[tuple[str, str], ...] = (
    ("grpc_port", "server.grpc_port"),
    ("health_port", "server.health_port"),
    ("workers", "server.workers"),
    ("max_body_bytes", "server.max_body_bytes"),
    ("body_mode", "server.default_body_mode"),
    ("strategy", "routing.strategy"),
    ("fallbacks", "routing.fallbacks"),
    ("destination_endpoint_hint_metadata_namespace", "routing.destination_metadata_namespace"),
    ("destination_endpoint_hint_key", "routing.destination_key"),
    ("emit_endpoint_scores", "routing.emit_endpoint_scores"),
)


async def serve(
    config: Config,
    discovery: Discovery,
    *,
    config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    board: LoadBoard | None = None,
) -> None:
    picker = PickerServer(
        config, discovery=discovery, config_path=config_path, overrides=overrides, board=board
    )
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
    parser.add_argument(
        "--workers", type=int, help="picker processes on the same ports (default 1)"
    )
    # Set by `--workers` on the processes it starts (extproc.server.workers).
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load-board", help=argparse.SUPPRESS)
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


def config_from_args(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """The config the flags and file describe, and the flag overrides (for reloads), with what
    only the picker uses checked too: strategy names, the tenants' keys file."""
    config, overrides = config_from_flags(args, SERVER_FLAGS + _PICKER_FLAGS)
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
    if config.tenancy.enabled:
        load_directory(config.tenancy)  # the keys file must be readable and valid at start-up
    tenancy = config.tenancy
    if config.server.workers > 1 and tenancy.enabled and tenancy.limits_backend != "redis":
        # Each worker would count only the requests the kernel happened to hand it.
        raise ConfigError(
            "server.workers",
            "tenants' limits with several workers need tenancy.limits_backend: redis",
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
    workers = config.server.workers
    board = None
    if workers > 1:
        if args.load_board is None:
            # This process only supervises; sys.argv is the command it was started with.
            server = config.server
            stop_seconds = server.drain_delay_seconds + server.shutdown_grace_seconds + 5
            return supervise(sys.argv[1:], workers, stop_seconds=stop_seconds)
        board = LoadBoard(Path(args.load_board), workers, args.worker_index)
        config = worker_config(config, args.worker_index)
    # --endpoints fixes the set; otherwise the config file's list is followed as it changes.
    path = None if args.endpoints else args.config
    discovery = discovery_for(config, config_path=path, overrides=overrides)
    main = serve(config, discovery, config_path=args.config, overrides=overrides, board=board)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)
    return 0


def worker_config(config: Config, index: int) -> Config:
    """Worker `index`'s config: its own Prometheus port (its counters are its own)."""
    port = config.server.metrics_port
    server = dataclasses.replace(config.server, metrics_port=port + index if port else 0)
    return dataclasses.replace(config, server=server)
