"""What `extproc bench chaos` and `extproc bench soak` share: a steady open-loop load whose
every request is recorded (streamed or not), varied prompts, and readings of a running picker
(its /metrics, and its RSS and open file descriptors from /proc).

A streamed request counts as successful only when its stream ends with `data: [DONE]`: a pod
killed mid-stream may leave a stream that Envoy closes cleanly after a few chunks, and that is a
failed request to its client even though the status was 200.

Long (about 710 lines): the rig and the fault parts that `chaos` and `soak` both drive, kept in
one place so the two benchmarks cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from extproc.bench.envoy import running_envoy
from extproc.bench.envoy_config import render_bootstrap
from extproc.bench.harness import start_picker
from extproc.bench.processes import (
    free_port_range,
    free_ports,
    picker_argv,
    run_stoppable,
)
from extproc.bench.tenants import _error_code as error_code
from extproc.bench.workloads import COMPLETIONS_PATH, WORDS
from extproc.sim.fleet import DEFAULT_MODEL

# What the picker's health reports for its ext_proc service (extproc/server/health.py; the
# bench may not import extproc.server).
EXT_PROC_HEALTH_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
OptionsT = TypeVar("OptionsT")
ReportT = TypeVar("ReportT")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Shot:
    """One request as its client saw it; times are seconds after the load's start."""

    sent: float
    finished: float
    status: int  # HTTP status; 0: no answer (connection failed, stream cut, deadline passed)
    reason: str  # "" when it succeeded, else what went wrong (error code, exception, ...)
    streamed: bool

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.reason


@dataclass(frozen=True, slots=True)
class LoadShape:
    """The requests of a steady load: prompt sizes in words, outputs in tokens, and how many
    distinct system prompts the prompts start with (the picker's prefix caches fill with them)."""

    rate: float  # requests per second, evenly spaced
    seconds: float
    streamed_share: float = 1.0  # the rest are not streamed
    prefix_words: tuple[int, int] = (60, 240)
    question_words: tuple[int, int] = (10, 60)
    output_tokens: tuple[int, int] = (8, 32)
    system_prompts: int = 200
    model: str = DEFAULT_MODEL
    # Sent as `Authorization: Bearer KEY` when set: the bundled Envoy strips a client's tenant
    # header, so a key is how a client names its tenant.
    api_key: str = ""
    seed: int = 0


def _words(rng: random.Random, low_high: tuple[int, int]) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(*low_high)))


class Bodies:
    """Request bodies made on the fly (a 30-minute soak sends 36,000: none is planned ahead).
    Request i always gets the same body for the same shape."""

    def __init__(self, shape: LoadShape) -> None:
        self._shape = shape
        rng = random.Random(shape.seed)
        self._systems = [_words(rng, shape.prefix_words) for _ in range(shape.system_prompts)]

    def body(self, index: int) -> tuple[bytes, bool]:
        shape = self._shape
        rng = random.Random(shape.seed * 1_000_003 + index)
        streamed = rng.random() < shape.streamed_share
        body: dict[str, object] = {
            "model": shape.model,
            "prompt": f"{rng.choice(self._systems)}\n\nQ{index}: "
            + _words(rng, shape.question_words),
            "max_tokens": rng.randint(*shape.output_tokens),
        }
        if streamed:
            body["stream"] = True
        return json.dumps(body).encode(), streamed


async def send(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    streamed: bool,
    headers: Mapping[str, str],
    start: float,
) -> Shot:
    sent = time.perf_counter() - start

    def shot(status: int, reason: str) -> Shot:
        return Shot(sent, time.perf_counter() - start, status, reason, streamed)

    try:
        async with http.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                payload = await response.read()
                return shot(response.status, error_code(payload, response.status))
            if not streamed:
                await response.read()
                return shot(200, "")
            async for line in response.content:
                if line.strip() == b"data: [DONE]":
                    return shot(200, "")
            return shot(200, "truncated_stream")  # ended without [DONE]
    except (TimeoutError, aiohttp.ClientError) as exc:
        return shot(0, type(exc).__name__)


async def steady_load(
    envoy_port: int,
    shape: LoadShape,
    *,
    on_tick: Callable[[float], None] | None = None,
    drain_seconds: float = 60.0,
) -> list[Shot]:
    """Send `shape.rate` requests per second for `shape.seconds` through Envoy (open loop:
    whether or not earlier ones have returned), then wait up to `drain_seconds` for answers;
    unanswered ones count as failed ("unfinished"). `on_tick(seconds since start)` is called
    about once a second from the event loop (the soak samples there; keep it short)."""
    url = f"http://127.0.0.1:{envoy_port}{COMPLETIONS_PATH}"
    headers = {"content-type": "application/json"}
    if shape.api_key:
        headers["authorization"] = f"Bearer {shape.api_key}"
    bodies = Bodies(shape)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()
        tasks: list[asyncio.Task[Shot]] = []
        interval, next_tick, index = 1.0 / shape.rate, 1.0, 0
        while (due := index * interval) < shape.seconds:
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body, streamed = bodies.body(index)
            tasks.append(
                asyncio.create_task(
                    send(http, url, body, streamed=streamed, headers=headers, start=start)
                )
            )
            index += 1
            if on_tick is not None and due >= next_tick:
                on_tick(due)
                next_tick += 1.0
        done, pending = (
            await asyncio.wait(tasks, timeout=drain_seconds) if tasks else (set(), set())
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        now = time.perf_counter() - start
        return [
            task.result()
            if task in done and task.exception() is None
            else Shot(i * interval, now, 0, "unfinished", False)
            for i, task in enumerate(tasks)
        ]


def failure_reasons(shots: Sequence[Shot]) -> dict[str, int]:
    return dict(sorted(Counter(s.reason or f"http_{s.status}" for s in shots if not s.ok).items()))


# --- readings of a running picker -------------------------------------------------------------


def metric_samples(metrics_port: int) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """Every sample of the picker's /metrics by name, or None while it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def metric_total(metrics_port: int, name: str) -> float | None:
    """The sum of a metric's samples over its labels; None when /metrics cannot be read."""
    samples = metric_samples(metrics_port)
    if samples is None:
        return None
    return sum(value for _, value in samples.get(name, ()))


@dataclass(frozen=True, slots=True)
class ProcessReading:
    rss_mb: float
    fds: int


def read_process(pid: int) -> ProcessReading | None:
    """RSS (VmRSS) and open file descriptors of a live process, from /proc; None once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss_kb = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
    )
    return ProcessReading(rss_kb / 1024, fds)


# --- the rig: a simulated fleet, picker replicas and one Envoy --------------------------------


@dataclass(frozen=True, slots=True)
class RigPorts:
    sim: int  # server i on sim + i
    records: int  # the simulator host's side door (unused here, but it must listen somewhere)
    control: int  # the fleet's fault control (kill, revive, faults per server)
    envoy: int
    admin: int
    pickers: tuple[tuple[int, int, int], ...]  # (grpc, health, metrics) per picker replica

    def endpoints(self, pods: int) -> list[str]:
        return [f"127.0.0.1:{self.sim + i}" for i in range(pods)]


def allocate_rig_ports(pods: int, *, replicas: int = 1) -> RigPorts:
    singles = free_ports(4 + 3 * replicas)
    picker = singles[4:]
    return RigPorts(
        sim=free_port_range(pods, set(singles)),
        records=singles[0],
        control=singles[1],
        envoy=singles[2],
        admin=singles[3],
        pickers=tuple(
            (picker[3 * i], picker[3 * i + 1], picker[3 * i + 2]) for i in range(replicas)
        ),
    )


def fleet_argv(
    ports: RigPorts, *, pods: int, profile: str, seed: int = 0, kv_events_port: int = 0
) -> list[str]:
    """The simulated fleet in its own process (`extproc.bench.simhost`), with fault control.
    With `kv_events_port`, server i publishes KV events on that port + i (replay: + pods + i)."""
    config: dict[str, Any] = {
        "pods": pods,
        "port": ports.sim,
        "profile": profile,
        "control_port": ports.control,
        "seed": seed,
    }
    if kv_events_port:
        config.update(kv_events=True, kv_events_port=kv_events_port)
    return [
        sys.executable,
        *("-m", "extproc.bench.simhost", json.dumps(config), str(ports.records)),
    ]


def fleet_control(ports: RigPorts, action: str, index: int) -> None:
    """POST /servers/{index}/{action} on the fleet's control port (kill, revive)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports.control}/servers/{index}/{action}", data=b"{}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def write_picker_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def replica_argv(
    config: Path,
    ports: RigPorts,
    *,
    replica: int,
    pods: int,
    probe_dir: Path | None = None,
    trace: bool = False,
    endpoints_from_config: bool = False,
) -> list[str]:
    """`extproc serve` for one replica; with `probe_dir`, under `extproc.bench.picker_probe`
    (object counts, and with `trace` tracemalloc snapshots, on request: the soak's leak hunt).
    `endpoints_from_config`: no `--endpoints`, so the config's `endpoints` (with their KV-event
    publishers) or its `discovery.kubernetes` give them."""
    grpc, health, metrics = ports.pickers[replica]
    endpoints = [] if endpoints_from_config else ports.endpoints(pods)
    argv = picker_argv(config, endpoints, grpc=grpc, health=health, metrics=metrics)
    if probe_dir is None:
        return argv
    # [python, -m, extproc.cli, serve, ...] -> [..., extproc.bench.picker_probe, DIR, serve, ...]
    mode = "trace" if trace else "objects"
    return [*argv[:2], "extproc.bench.picker_probe", str(probe_dir), mode, *argv[3:]]


def start_replica(
    stack: contextlib.ExitStack,
    config: Path,
    ports: RigPorts,
    *,
    replica: int,
    pods: int,
    log: Path | None = None,
    probe_dir: Path | None = None,
    trace: bool = False,
    endpoints_from_config: bool = False,
) -> subprocess.Popen[str]:
    """Start one picker replica inside `stack` (stopped by PID when it unwinds) and wait until it
    sees every endpoint ready."""
    grpc, _, metrics = ports.pickers[replica]
    return start_picker(
        stack,
        replica_argv(
            config,
            ports,
            replica=replica,
            pods=pods,
            probe_dir=probe_dir,
            trace=trace,
            endpoints_from_config=endpoints_from_config,
        ),
        grpc=grpc,
        metrics=metrics,
        endpoints=pods,
        log=log,
        error=lambda why: RuntimeError(f"picker replica {replica}: {why}; see {log}"),
        # Under tracemalloc the picker took ~30 s to its first log line (1 s without), which left
        # the soak's traced run failing now and then on the usual 30 s; its imports alone still
        # take ~22 s traced since the Kubernetes client is no longer loaded (2026-12-07).
        within=120.0 if trace else 30.0,
    )


def envoy_bootstrap(ports: RigPorts, *, pods: int, health_checks: bool = False) -> str:
    """The bundled Envoy bootstrap, with every picker replica a host of its `extproc` cluster.
    `render_bootstrap` takes one picker address; the others are added here to the rendered
    config (the cluster balances ext_proc streams round robin over its hosts).

    `health_checks`: the bundled check of each replica's ext_proc port (service
    `envoy.service.ext_proc.v3.ExternalProcessor`, every 0.5 s) gets `no_traffic_interval: 0.5s`.
    Without it Envoy's default of 60 s applies: the first check runs before any traffic and
    schedules the next one 60 s later, so a replica that starts draining within that minute is
    never seen NOT_SERVING (`extproc bench chaos` (c) against (c2) measures the difference)."""
    grpc = [g for g, _, _ in ports.pickers]
    text = render_bootstrap(
        port=ports.envoy,
        extproc=f"127.0.0.1:{grpc[0]}",
        endpoints=ports.endpoints(pods),
        admin_port=ports.admin,
        listen_host="127.0.0.1",
        access_log=False,
    )
    if len(grpc) == 1 and not health_checks:
        return text
    config = yaml.safe_load(text)
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extproc")
    cluster["load_assignment"]["endpoints"] = [
        {
            "lb_endpoints": [
                {
                    "endpoint": {
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": g}}
                    }
                }
                for g in grpc
            ]
        }
    ]
    if health_checks:
        checks = cluster.get("health_checks") or [
            {  # a bundled config without a check of its own (before the drain fix)
                "timeout": "1s",
                "interval": "0.5s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": EXT_PROC_HEALTH_SERVICE},
            }
        ]
        for check in checks:
            check["no_traffic_interval"] = "0.5s"
        cluster["health_checks"] = checks
    dumped: str = yaml.safe_dump(config, sort_keys=False, width=1000)
    return dumped


def start_envoy_in(
    stack: contextlib.ExitStack, ports: RigPorts, *, pods: int, health_checks: bool = False
) -> int:
    """Envoy (one worker) in `stack`, stopped at the end; returns its PID."""
    envoy = stack.enter_context(
        running_envoy(
            envoy_bootstrap(ports, pods=pods, health_checks=health_checks),
            admin_port=ports.admin,
            concurrency=1,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    return envoy.pid


def collector_argv(
    config: Path, endpoints: Sequence[str], *, port: int, metrics_port: int
) -> list[str]:
    """`extproc collector` on loopback: the state side pickers follow (`collector.source`)."""
    return [
        sys.executable,
        *("-m", "extproc.cli", "collector", "--config", str(config), "--host", "127.0.0.1"),
        *("--endpoints", ",".join(endpoints), "--port", str(port)),
        *("--metrics-port", str(metrics_port), "--log-level", "WARNING"),
    ]


# --- parts the chaos benchmark cuts and restores: on a loop of their own ----------------------


class LoopThread:
    """An asyncio loop on its own thread. The relay and the fake Kubernetes API run here, beside
    the load (the main thread's loop) and the fault script (a plain thread that blocks), so a
    fault can be switched from the script with `call` without either loop waiting on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], *, timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what still runs there (a relay's pipes, a watch), then stop the loop."""
        with contextlib.suppress(Exception):  # closing must not hide the error that led here
            self.call(_cancel_the_rest(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class TcpRelay:
    """Loopback TCP relays, `listen port -> target port`, each connection piped both ways.
    `cut` resets every connection and stops listening; `restore` listens again. Between a ZMQ
    subscriber and its publisher this is the network failing, neither process touched: the
    subscriber sees its connection drop, then refused reconnects, then its stream come back."""

    def __init__(self, routes: Mapping[int, int]) -> None:
        self._routes = dict(routes)
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0  # accepted so far

    async def restore(self) -> None:
        for listen, target in self._routes.items():
            server = await asyncio.start_server(
                functools.partial(self._pipe, target), "127.0.0.1", listen, reuse_address=True
            )
            self._servers.append(server)

    async def cut(self) -> None:
        for server in self._servers:
            server.close()  # Python 3.11: stops listening, leaves open connections alone
        self._servers.clear()
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, as a dead link or host gives
        self._writers.clear()

    async def _pipe(
        self, target: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._writers.update(pair)
        copies = [
            asyncio.ensure_future(_copy(reader, up_writer)),
            asyncio.ensure_future(_copy(up_reader, writer)),
        ]
        try:
            await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in copies:
                task.cancel()
            for w in pair:
                w.transport.abort()
                self._writers.discard(w)
            await asyncio.gather(*copies, return_exceptions=True)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


KUBE_POOL_PATH = "/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools"
KUBE_POD_PATH = "/api/v1/namespaces/{namespace}/pods"


def kube_objects(
    endpoints: Sequence[str], *, namespace: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One InferencePool and one Ready pod per endpoint `127.0.0.1:port`: every pod has the same
    IP (loopback), so each pool selects its own pod by a label and names that pod's port."""
    pools, pods = [], []
    for i, endpoint in enumerate(endpoints):
        ip, _, port = endpoint.rpartition(":")
        labels = {"extproc-chaos/server": str(i)}
        meta = {"namespace": namespace, "resourceVersion": "1"}
        pools.append(
            {
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": f"sim-{i}", **meta},
                "spec": {
                    "selector": {"matchLabels": labels},
                    "targetPorts": [{"number": int(port)}],
                    "endpointPickerRef": {"name": "extproc-picker", "port": {"number": 9002}},
                },
            }
        )
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"sim-{i}", "labels": labels, **meta},
                "status": {
                    "podIP": ip,
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
    return pools, pods


def write_kubeconfig(path: Path, *, port: int, namespace: str) -> Path:
    """A kubeconfig for the fake API: plain HTTP on loopback, no credentials."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "chaos", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "chaos", "user": {}}],
        "contexts": [
            {
                "name": "chaos",
                "context": {"cluster": "chaos", "user": "chaos", "namespace": namespace},
            }
        ],
        "current-context": "chaos",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


class FakeKubeApi:
    """The least of a Kubernetes API that `discovery.kubernetes` needs: list and watch of one
    namespace's InferencePools and pods, which never change (a watch stays open, silent, until
    its `timeoutSeconds`). `cut` takes the API away (open watches reset, connections refused)
    and `restore` brings it back. The tests use kmock's emulator instead; it is a test-only
    dependency, and this benchmark ships with the package."""

    def __init__(
        self,
        port: int,
        *,
        namespace: str,
        pools: Sequence[Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> None:
        self.port = port
        self.requests: list[tuple[float, str]] = []  # (time.monotonic(), "list pods"...)
        self._lists = {
            KUBE_POOL_PATH.format(namespace=namespace): ("InferencePoolList", list(pools)),
            KUBE_POD_PATH.format(namespace=namespace): ("PodList", list(pods)),
        }
        self._runner: web.AppRunner | None = None
        self._watches: set[asyncio.Transport] = set()  # open watch connections
        self._gone = asyncio.Event()

    async def restore(self) -> None:
        self._gone = asyncio.Event()
        app = web.Application()
        for path in self._lists:
            app.router.add_get(path, self._serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def cut(self) -> None:
        for transport in list(self._watches):
            transport.abort()  # a reset, as a dead API server's host gives
        self._gone.set()  # the watch handlers return (their connections are already reset)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        kind, items = self._lists[request.path]
        watch = request.query.get("watch", "").lower() in ("true", "1")
        what = "pods" if kind == "PodList" else "pools"
        self.requests.append((time.monotonic(), f"{'watch' if watch else 'list'} {what}"))
        if not watch:
            return web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": kind,
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                }
            )
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(request)
        transport = request.transport
        if transport is not None:
            self._watches.add(transport)
        try:
            with contextlib.suppress(TimeoutError):
                timeout = float(request.query.get("timeoutSeconds", "300"))
                await asyncio.wait_for(self._gone.wait(), timeout)
        finally:
            if transport is not None:
                self._watches.discard(transport)
        return response


# --- the sub-commands' shell ------------------------------------------------------------------


def write_pair(
    out: Path, stem: str, title: str, data: Mapping[str, Any], markdown: str
) -> list[Path]:
    """`stem.json` and `stem.md` (under a `# title`) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(f"# {title}\n\n{markdown}")
    return [json_path, md_path]


def run_command(
    command: str,
    parse: Callable[[], OptionsT],
    work: Callable[[OptionsT], ReportT],
    *,
    errors: tuple[type[BaseException], ...],
    write: Callable[[ReportT], list[Path]],
    render: Callable[[ReportT], str],
) -> int:
    """Options (a ValueError is a usage error: exit 2), the run (stopped cleanly on SIGTERM or
    Ctrl-C; one of `errors` exits 1), then the report written and printed."""
    try:
        options = parse()
    except ValueError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    report = run_stoppable(command, lambda: work(options), errors)
    if isinstance(report, int):
        return report
    paths = write(report)
    print(render(report))
    print(f"Report: {', '.join(str(p) for p in paths)}")
    return 0
