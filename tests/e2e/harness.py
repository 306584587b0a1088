"""End-to-end harness: fake vLLM backends, the real picker, the real Envoy, all on 127.0.0.1.

- Backends are small aiohttp servers (OpenAI-style: /v1/models, /v1/completions,
  /v1/chat/completions with SSE, /v1/embeddings, /health) running on one event loop in a
  background thread, so they outlive each test's own loop and can be shared by a whole module.
  Each records what it received and answers with `x-backend: <port>`.
- The picker is `extproc serve` as a subprocess; Envoy is started with `extproc.bench.envoy`.
  Both are stopped by PID at teardown (terminate, wait, kill). Their logs go to files under the
  session's temp dir; `Stack.logs()` returns their tails for assertion messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.bench import envoy, envoy_config
from extproc.bench.processes import free_port_range
from extproc.config import BodyMode, FailureMode
from tests.fakes import vllm_metrics

EXTPROC = Path(sys.executable).with_name("extproc")
MODEL_A = "model-a"
MODEL_B = "model-b"
MODEL_F = "model-f"


def free_port() -> int:
    """A port nothing listens on right now (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- fake vLLM backends -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Backend:
    """One fake model server. `received` is appended to from the backends' thread."""

    model: str
    port: int = 0
    received: list[Received] = field(default_factory=list)
    streams_finished: int = 0
    runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def via_envoy(self, path: str | None = None) -> list[Received]:
        """Requests that came through Envoy (it adds x-envoy-attempt-count): not the picker's."""
        return [
            r
            for r in list(self.received)
            if "x-envoy-attempt-count" in r.headers and (path is None or r.path == path)
        ]


class Fleet:
    """Backends on an event loop in a background thread, plus a gate that holds SSE streams."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.backends: list[Backend] = []
        self._gate: asyncio.Event | None = None

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self, model: str) -> Backend:
        backend = Backend(model)
        self._call(self._start(backend))
        self.backends.append(backend)
        return backend

    def stop(self, backend: Backend) -> None:
        if backend.runner is not None:
            self._call(self._stop(backend.runner))
            backend.runner = None

    @staticmethod
    async def _stop(runner: web.AppRunner) -> None:
        server = runner.server
        await runner.cleanup()
        # aiohttp closes the connections it knows of, but one accepted just before the listener
        # closed registers a loop turn or two later (the picker polls these backends every
        # 0.2 s) and would stay open until garbage collection, whose ResourceWarning then fails
        # whichever test is running. A CI run failed on such a warning (a backend's socket, in
        # the test after one that stops a backend mid-test); this is the one way we found for
        # it to happen, so the latecomers are closed here.
        await asyncio.sleep(0.05)
        for handler in server.connections if server is not None else []:
            handler.force_close()
        await asyncio.sleep(0)  # the socket itself is closed on the loop's next turn

    def hold_streams(self) -> None:
        """From now on, an SSE stream stops after its first chunk until `release_streams()`."""

        async def arm() -> None:
            self._gate = asyncio.Event()

        self._call(arm())

    def release_streams(self) -> None:
        gate = self._gate
        if gate is not None:
            self.loop.call_soon_threadsafe(gate.set)

    def close(self) -> None:
        for backend in self.backends:
            self.stop(backend)
        self.release_streams()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    async def _start(self, backend: Backend) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handler(backend))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        backend.runner = runner
        backend.port = runner.addresses[0][1]

    def _handler(self, backend: Backend) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path == "/metrics":  # the picker's collector, not a request to record
                return web.Response(text=vllm_metrics(backend.model), content_type="text/plain")
            body = await request.read()
            backend.received.append(
                Received(request.method, request.path, dict(request.headers), body)
            )
            headers = {"x-backend": str(backend.port)}
            if request.path == "/health":
                return web.Response(text="ok", headers=headers)
            if request.path == "/v1/models":
                data = [{"id": backend.model, "object": "model", "owned_by": "vllm"}]
                return web.json_response({"object": "list", "data": data}, headers=headers)
            if request.method != "POST":
                return web.json_response({"error": "not found"}, status=404, headers=headers)
            try:
                payload = json.loads(body)
            except ValueError:
                return web.json_response({"error": "bad json"}, status=400, headers=headers)
            if request.path == "/v1/embeddings":
                return web.json_response(_embedding(backend.model), headers=headers)
            chat = request.path == "/v1/chat/completions"
            if payload.get("stream"):
                return await self._stream(request, backend, payload, chat=chat, headers=headers)
            return web.json_response(_completion(backend.model, chat=chat), headers=headers)

        return handle

    async def _stream(
        self,
        request: web.Request,
        backend: Backend,
        payload: dict[str, Any],
        *,
        chat: bool,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await response.prepare(request)
        words = ["Hello", " from", " the", " fleet"]
        for i, word in enumerate(words):
            await response.write(_sse(_chunk(backend.model, word, chat=chat)))
            if i == 0 and self._gate is not None:
                await self._gate.wait()
        if (payload.get("stream_options") or {}).get("include_usage"):
            await response.write(_sse(_usage_chunk(backend.model, len(words), chat=chat)))
        await response.write(b"data: [DONE]\n\n")
        # Counted before the end is sent: the client sees the end only after it, whereas a count
        # after `write_eof()` could come after the client (same event loop) had read everything.
        backend.streams_finished += 1
        await response.write_eof()
        return response


_USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


def _completion(model: str, *, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": "Hello from the fleet"}
    else:
        choice["text"] = "Hello from the fleet"
    obj = "chat.completion" if chat else "text_completion"
    return {"id": "cmpl-1", "object": obj, "model": model, "choices": [choice], "usage": _USAGE}


def _chunk(model: str, text: str, *, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": None}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": "cmpl-1", "object": obj, "model": model, "choices": [choice]}


def _usage_chunk(model: str, completion_tokens: int, *, chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": 7, "completion_tokens": completion_tokens}
    usage["total_tokens"] = 7 + completion_tokens
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": "cmpl-1", "object": obj, "model": model, "choices": [], "usage": usage}


def _embedding(model: str) -> dict[str, Any]:
    data = [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}]
    usage = {"prompt_tokens": 3, "total_tokens": 3}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# --- processes --------------------------------------------------------------------------------


def _stop(popen: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Picker:
    popen: subprocess.Popen[bytes]
    grpc_port: int
    health_port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def health(self, service: str) -> int | None:
        """The gRPC health status of `service`, or None while the port does not answer."""
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            except grpc.RpcError:
                return None
            status: int = reply.status
            return status

    def wait_port(self, port: int, within: float = 30.0) -> None:
        """Until something accepts connections on `port` (a worker's metrics)."""
        deadline = time.monotonic() + within
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.popen.poll() is not None:
                raise RuntimeError(f"picker exited ({self.popen.returncode}):\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing serves port {port}:\n{_tail(self.log)}")
            time.sleep(0.1)

    def wait(self, service: str, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while self.health(service) != health_pb2.HealthCheckResponse.SERVING:
            if self.popen.poll() is not None:
                raise RuntimeError(f"picker exited ({self.popen.returncode}):\n{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"picker {service} not SERVING:\n{_tail(self.log)}")
            time.sleep(0.1)


@contextlib.contextmanager
def run_picker(
    logs: Path,
    endpoints: list[str],
    *,
    strategy: str = "round-robin",
    extra: list[str] | None = None,
    config: dict[str, Any] | None = None,
    ready: bool = True,
    workers: int = 1,
) -> Iterator[Picker]:
    """`extproc serve` on free ports; waits for liveness (and readiness when `ready`).

    `endpoints` become `--endpoints` (if any); `config` is written to a file for `--config`.
    `workers` > 1 runs `--workers`, worker i serving metrics on `metrics_port + i`, and waits
    until every worker serves them: the shared health port answers as soon as one worker is
    up, and a test that reads another's metrics before it has started fails (seen in CI: the
    second worker came up 350 ms after the first).
    """
    grpc_port, health_port = free_port(), free_port()
    metrics_port = free_port_range(workers, avoid=(grpc_port, health_port))
    log = logs / f"picker-{grpc_port}.log"
    argv = [
        str(EXTPROC), "serve",
        "--strategy", strategy,
        "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port),
        "--health-port", str(health_port),
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    if endpoints:
        argv += ["--endpoints", ",".join(endpoints)]
    # A loaded test machine must not turn slow scrapes of the small test backends (they run in
    # a thread of the test process) into failing or stale endpoints: these tests are about the
    # request path, not the collector.
    collector = {"timeout_seconds": 2.0, "unready_after_failures": 10, "staleness_seconds": 30.0}
    # For the same reason, admission stays out of the way: when scrapes lag, every pick since the
    # last one counts as queued, five such picks per endpoint would make the pool "saturated",
    # and least-bad routing would then override the strategy a test is checking.
    scheduling = {"saturation_queue": 1000.0}
    # Stopped by SIGTERM at teardown: no replica takes its place, so no drain delay.
    server = {"drain_delay_seconds": 0}
    config = {"collector": collector, "scheduling": scheduling, "server": server, **(config or {})}
    path = logs / f"picker-{grpc_port}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    argv += ["--config", str(path)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    argv += extra or []
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    picker = Picker(popen, grpc_port, health_port, metrics_port, log)
    try:
        picker.wait("liveness")
        if ready:
            picker.wait("readiness")
        if workers > 1:  # the shared health port answered for one of them, any one
            for worker in range(workers):
                picker.wait_port(metrics_port + worker)
        yield picker
    finally:
        _stop(popen)


@dataclass
class Stack:
    """An Envoy listener in front of a picker (or of nothing, to test failure modes)."""

    port: int
    envoy: envoy.EnvoyProcess
    envoy_log: Path
    picker: Picker | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        parts = [f"--- envoy ({self.envoy_log})\n{_tail(self.envoy_log)}"]
        if self.picker is not None:
            parts.append(f"--- picker ({self.picker.log})\n{_tail(self.picker.log)}")
        return "\n".join(parts)


@contextlib.contextmanager
def run_envoy(
    logs: Path,
    *,
    extproc: str,
    endpoints: list[str],
    picker: Picker | None,
    failure_mode: FailureMode = "FailClose",
    body_mode: BodyMode = "streamed",
    response_path: envoy_config.ResponsePath = "ended",
    extproc_tls: bool = False,
    extproc_ca: Path | None = None,
    request_timeout_ms: int = 60_000,
    concurrency: int = 1,
) -> Iterator[Stack]:
    port, admin_port = free_port(), free_port()
    config = envoy_config.render_bootstrap(
        port=port,
        extproc=extproc,
        endpoints=endpoints,
        admin_port=admin_port,
        listen_host="127.0.0.1",
        failure_mode=failure_mode,
        body_mode=body_mode,
        response_path=response_path,
        message_timeout_ms=10_000,
        request_timeout_ms=request_timeout_ms,
        extproc_tls=extproc_tls,
        extproc_ca=extproc_ca,
    )
    log = logs / f"envoy-{port}-{failure_mode}-{body_mode}-{response_path}.log"
    with log.open("wb") as out:
        process = envoy.start_envoy(
            config, admin_port=admin_port, concurrency=concurrency, stdout=out, stderr=out
        )
    try:
        process.wait_ready(within=20)
        yield Stack(port, process, log, picker)
    finally:
        process.stop()
