"""`extproc bench routing`: routing quality on a simulated fleet, ours beside Envoy's and peers'.

For every workload (`extproc.bench.workloads`), every rate and every competitor, one run:

    this process (load generator) --HTTP--> front --HTTP--> simulated fleet (own process)

where the front is one of
- Envoy + the picker (`extproc serve`), the strategy named per request in `x-routing-strategy`;
- Envoy alone with its own ROUND_ROBIN or LEAST_REQUEST pool (the same bootstrap without the
  ext_proc filter);
- `sglang-router --policy cache_aware`, `vllm-router --policy cache_aware|kv_aware` (PyPI wheels),
  HTTP proxies in front of the same fleet.

Every run starts a fresh fleet (empty prefix caches) and a fresh picker or peer router, so every
competitor starts cold; Envoy stays up for the whole benchmark (it holds no routing state beyond
its round-robin cursor and connection pools). The fleet runs in `extproc.bench.simhost`, which
also hands out the simulator's exact per-request records: TTFT is the simulated time from the
request's arrival at its server to its first token, read from those records (see `simhost` for
why), and, for streamed requests (the default), also at the client: send to the first SSE event
that carries a token, routing path included. `--profiles` runs the whole matrix once per fleet
profile, the picker told nothing about which.

Every child process is stopped by its PID at the end of its run, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import yaml

from extproc.bench import workloads as wl
from extproc.bench.loadgen import quantile
from extproc.bench.processes import (
    ChildDidNotStart,
    cpu_seconds,
    free_port_range,
    free_ports,
    picker_argv,
    process,
    run_stoppable,
    wait_picker,
)
from extproc.envoy_runner import EnvoyError, render_bootstrap, running_envoy
from extproc.prefix.tokenizers import load_tokenizer
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.scheduling.strategies import known_strategies
from extproc.sim.fleet import DEFAULT_MODEL, READY_LINE
from extproc.sim.profiles import get_profile

PROFILE: Final = "h100-8b"
STRATEGY_HEADER: Final = "x-routing-strategy"
SESSION_HEADER: Final = "x-session-id"
DEFAULT_OUTPUT: Final = Path("reports/routing")
WORKLOADS: Final = ("shared-prefix", "multi-turn", "random", "hot-documents", "agent-fan-out")
OTHERS: Final = (
    "envoy:round-robin",
    "envoy:least-request",
    "sglang-router:cache_aware",
    "vllm-router:cache_aware",
    "vllm-router:kv_aware",
)

Kind = Literal["picker", "envoy", "sglang-router", "vllm-router"]


class RoutingBenchError(RuntimeError):
    """A part of the benchmark did not start or did not answer; the message says which."""


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Competitor:
    """One router under test. `name` is how tables and `--strategies`/`--others` spell it."""

    kind: Kind
    policy: str

    @property
    def name(self) -> str:
        return self.policy if self.kind == "picker" else f"{self.kind}:{self.policy}"

    @property
    def kv_events(self) -> bool:
        # The picker follows KV events when its strategies want them; kv_aware needs them.
        return self.kind == "picker" or self.policy == "kv_aware"

    @classmethod
    def parse(cls, name: str) -> Competitor:
        kind, sep, policy = name.partition(":")
        if not sep:
            return cls("picker", name)
        if kind not in ("envoy", "sglang-router", "vllm-router"):
            raise ValueError(f"unknown competitor {name!r}; others: {', '.join(OTHERS)}")
        if kind == "envoy" and policy not in ("round-robin", "least-request"):
            raise ValueError("Envoy's policies here: round-robin, least-request")
        return cls(kind, policy)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RoutingOptions:
    pods: int = 8
    speed: float = 2.0
    seed: int = 0
    kv_fraction: float = 0.7  # the workload's KV demand / the fleet's KV blocks
    workloads: tuple[str, ...] = WORKLOADS
    # Requests per simulated second, per workload.
    rates: Mapping[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "shared-prefix": (5.0, 10.0, 20.0, 30.0),
            "multi-turn": (5.0, 10.0, 20.0, 30.0),
            "random": (5.0, 10.0, 20.0),
            "hot-documents": (10.0, 20.0, 30.0),
            "agent-fan-out": (10.0, 20.0, 30.0),
        }
    )
    # The fleet: one profile per run (`extproc.sim.profiles`), the picker told nothing about
    # which. `rates` are for h100-8b; a slower profile's rates are scaled by its prefill speed
    # (`rate_for`), so every fleet is offered the same share of what it can compute.
    profiles: tuple[str, ...] = (PROFILE,)
    # Streamed answers (one SSE chunk per token, as vLLM sends by default), their TTFT also
    # timed at the client to the first event carrying a token; False: one JSON answer each.
    stream: bool = True
    hot_documents: wl.HotDocumentsShape = field(default_factory=wl.HotDocumentsShape)
    agent_fan_out: wl.AgentFanOutShape = field(default_factory=wl.AgentFanOutShape)
    shared_prefix: wl.SharedPrefixShape = field(default_factory=wl.SharedPrefixShape)
    multi_turn: wl.MultiTurnShape = field(default_factory=wl.MultiTurnShape)
    random: wl.RandomShape = field(default_factory=wl.RandomShape)
    strategies: tuple[str, ...] = ()  # ours; empty: every known strategy at run time
    others: tuple[str, ...] = OTHERS
    # An EndpointPickerConfig for the picker: its profiles can be named in `strategies`, so
    # variants of a strategy (a cost-scorer parameter, other weights) run side by side.
    scheduling: Mapping[str, Any] = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    envoy_concurrency: int = 1
    # The picker's scrape interval (wall seconds). Its default, 50 ms, makes 8 simulated servers
    # render /metrics 160 times a second (3 ms each): half a core inside the fleet's one event
    # loop, which then runs behind simulated time and compresses arrivals for picker runs only
    # (the peers and Envoy do not scrape). 200 ms keeps that cost near 0.1 core.
    scrape_interval: float = 0.2
    drain_seconds: float = 300.0  # wall seconds a run may take after its last planned send
    output: Path = DEFAULT_OUTPUT
    quick: bool = False

    def __post_init__(self) -> None:
        if self.pods < 1:
            raise ValueError("--pods must be at least 1")
        if self.speed <= 0:
            raise ValueError("--speed must be positive")
        for profile in self.profiles:
            get_profile(profile)  # ValueError names the known ones
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
        for name in self.others:
            Competitor.parse(name)
        if self.scheduling:
            parse_endpoint_picker_config(self.scheduling)  # ConfigError names the bad key

    @classmethod
    def quick_options(cls, **overrides: Any) -> RoutingOptions:
        """About 2 minutes: one rate per workload, fewer requests, fewer competitors.

        Ours: round-robin (the baseline), least-request (the random workload's reference),
        prefix-cache and cost (those that exist at run time). Others: Envoy's round robin and the
        two cache_aware peers (kv_aware and Envoy's least-request only in the full run).
        """
        known = known_strategies()
        base: dict[str, Any] = {
            "quick": True,
            "speed": 2.0,
            "rates": {
                "shared-prefix": (20.0,),
                "multi-turn": (20.0,),
                "random": (10.0,),
                "hot-documents": (20.0,),
                "agent-fan-out": (20.0,),
            },
            "hot_documents": wl.HotDocumentsShape(documents=16, requests=64),
            "agent_fan_out": wl.AgentFanOutShape(tasks=8),
            "shared_prefix": wl.SharedPrefixShape(groups=16, questions=4),
            "multi_turn": wl.MultiTurnShape(sessions=14, turns=(3, 5), think_seconds=0.5),
            "random": wl.RandomShape(requests=48),
            "strategies": tuple(
                s for s in ("round-robin", "least-request", "prefix-cache", "cost") if s in known
            ),
            "others": ("envoy:round-robin", "sglang-router:cache_aware", "vllm-router:cache_aware"),
            "drain_seconds": 60.0,
        }
        return cls(**{**base, **overrides})

    def competitors(self) -> tuple[Competitor, ...]:
        ours = self.strategies or tuple(known_strategies())
        return tuple(Competitor("picker", s) for s in ours) + tuple(
            Competitor.parse(o) for o in self.others
        )


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuUse:
    """Cores used during a run (CPU seconds / wall seconds), from /proc."""

    machine: float  # every process on the machine (of os.cpu_count() cores)
    fleet: float
    front: float  # the picker or the peer router (0 for Envoy alone)
    envoy: float
    loadgen: float  # this process


@dataclass(frozen=True, slots=True)
class RunResult:
    workload: str
    profile: str  # the fleet's step-time profile
    rate: float  # requests per simulated second (offered; multi-turn: at mean think times)
    competitor: str
    sent: int
    ok: int
    errors: int
    first_error: str
    ttft_p50_ms: float  # simulated, from the simulator's records
    ttft_p90_ms: float
    ttft_p99_ms: float
    # Streamed runs: send to the first chunk at the client (routing path included), wall ms x
    # speed, so on the same scale as the simulated figures; 0 for one-chunk runs.
    client_ttft_p50_ms: float
    client_ttft_p90_ms: float
    client_ttft_p99_ms: float
    e2e_p90_ms: float  # simulated, arrival at the server to last token
    output_tokens: int
    makespan_s: float  # simulated, first send to last answer
    output_tokens_per_s: float  # per simulated second
    hit_rate: float  # fleet prefix-cache hits / queries (tokens), from the simulator's counters
    oracle_hit_rate: float
    preemptions: int
    per_pod: tuple[int, ...]  # requests each pod served
    outside_p90_ms: float  # wall ms per request outside the engine: routing path, HTTP, tokenizing
    arrival_skew_ms: float  # spread of (server arrival - client send) in simulated ms; see report
    wall_seconds: float
    cpu: CpuUse


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    name: str
    description: str
    requests: int
    prompt_tokens_mean: float
    prompt_tokens_max: int
    kv_demand_tokens: int
    gpu_blocks_per_pod: int
    oracle_hit_rate: float
    # p90 of the TTFT no router can beat (`Workload.ttft_floor`): oracle hits, idle engines.
    floor_ttft_p90_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class RoutingReport:
    options: RoutingOptions
    competitors: tuple[str, ...]
    workloads: tuple[WorkloadInfo, ...]
    results: tuple[RunResult, ...]
    seconds: float
    peer_notes: tuple[str, ...]


# --- ports and processes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ports:
    sim: int  # server i on sim + i
    kv: int  # server i publishes on kv + i, replays on kv + pods + i
    records: int
    grpc: int
    health: int
    metrics: int
    envoy_picker: int
    envoy_round_robin: int
    envoy_least_request: int
    admin: int
    router: int
    router_metrics: int


def allocate_ports(pods: int) -> Ports:
    singles = free_ports(10)
    sim = free_port_range(pods, set(singles))
    kv = free_port_range(2 * pods, {*singles, *range(sim, sim + pods)})
    return Ports(sim, kv, *singles)


def endpoint_addresses(ports: Ports, pods: int) -> tuple[str, ...]:
    # Envoy's pool and the picker's --endpoints must name the same ip:port strings.
    return tuple(f"127.0.0.1:{ports.sim + i}" for i in range(pods))


def start_fleet(
    stack: contextlib.ExitStack, argv: Sequence[str], *, log: Path, attempts: int = 3
) -> subprocess.Popen[str]:
    """The fleet for one run. Its ports were chosen free at the start of the benchmark (Envoy's
    clusters name them), but another process on the machine may hold one for a moment between
    runs: try again a little later before giving up."""
    for _ in range(attempts - 1):
        try:
            return stack.enter_context(process(argv, log=log, ready_line=READY_LINE))
        except ChildDidNotStart:
            time.sleep(2.0)
    try:
        return stack.enter_context(process(argv, log=log, ready_line=READY_LINE))
    except ChildDidNotStart as exc:
        raise RoutingBenchError(str(exc)) from exc


def _sim_config(
    options: RoutingOptions, ports: Ports, *, profile: str, blocks: int, kv: bool
) -> str:
    return json.dumps(
        {
            "pods": options.pods,
            "port": ports.sim,
            "model": options.model,
            "profile": profile,
            "speed": options.speed,
            "num_gpu_blocks": blocks,
            "kv_events": kv,
            "kv_events_port": ports.kv,
            "seed": options.seed,
        }
    )


def _binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RoutingBenchError(f"{name} is not installed (pip install {name})")
    return found


def _router_argv(competitor: Competitor, options: RoutingOptions, ports: Ports) -> list[str]:
    urls = [f"http://{e}" for e in endpoint_addresses(ports, options.pods)]
    listen = ["--host", "127.0.0.1", "--port", str(ports.router)]
    metrics = ["--prometheus-port", str(ports.router_metrics)]
    policy = ["--policy", competitor.policy]
    if competitor.kind == "sglang-router":
        return [
            _binary("sglang-router"),
            "launch",
            *listen,
            *policy,
            *metrics,
            "--worker-urls",
            *urls,
        ]
    argv = [_binary("vllm-router"), *listen, *policy, *metrics, "--worker-urls", *urls]
    if competitor.policy == "kv_aware":
        argv += ["--kv-event-model", options.model]
        for i, url in enumerate(urls):
            argv += ["--kv-event-source", f"{url}=tcp://127.0.0.1:{ports.kv + i}"]
            replay = ports.kv + options.pods + i
            argv += ["--kv-event-replay-source", f"{url}=tcp://127.0.0.1:{replay}"]
    return argv


def _picker_argv(options: RoutingOptions, ports: Ports, *, config: Path) -> list[str]:
    return picker_argv(
        config,
        endpoint_addresses(ports, options.pods),
        grpc=ports.grpc,
        health=ports.health,
        metrics=ports.metrics,
    )


def _wait_picker(child: subprocess.Popen[str], ports: Ports, pods: int, log: Path) -> None:
    problem = wait_picker(child, grpc=ports.grpc, metrics=ports.metrics, endpoints=pods)
    if problem is not None:
        raise RoutingBenchError(f"{problem}; see {log}")


def _wait_router(child: subprocess.Popen[str], port: int, log: Path) -> None:
    """Until the router's /health answers 200 (both routers probe their workers first)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RoutingBenchError(f"the router exited with code {child.returncode}; see {log}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RoutingBenchError(f"the router on :{port} was not healthy within 60 s; see {log}")


def envoy_bootstrap(ports: Ports, endpoints: Sequence[str]) -> str:
    """The bundled bootstrap (listener through the picker), plus one listener per Envoy policy.

    Those are the same listener with the ext_proc filter taken out, routing to a copy of the
    `pool` cluster whose override_host policy is replaced by Envoy's own ROUND_ROBIN or
    LEAST_REQUEST (Envoy's default for it: the less loaded of two random hosts).
    """
    config = yaml.safe_load(
        render_bootstrap(
            port=ports.envoy_picker,
            extproc=f"127.0.0.1:{ports.grpc}",
            endpoints=endpoints,
            admin_port=ports.admin,
            listen_host="127.0.0.1",
            access_log=False,
        )
    )
    resources = config["static_resources"]
    ingress = resources["listeners"][0]
    pool = next(c for c in resources["clusters"] if c["name"] == "pool")
    for policy, port in (
        ("ROUND_ROBIN", ports.envoy_round_robin),
        ("LEAST_REQUEST", ports.envoy_least_request),
    ):
        name = f"pool_{policy.lower()}"
        cluster = copy.deepcopy(pool)
        cluster["name"] = name
        cluster["load_assignment"]["cluster_name"] = name
        del cluster["load_balancing_policy"]
        cluster["lb_policy"] = policy
        resources["clusters"].append(cluster)
        listener = copy.deepcopy(ingress)
        listener["name"] = f"direct_{policy.lower()}"
        listener["address"]["socket_address"]["port_value"] = port
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = listener["name"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_proc" not in f["name"]]
        for host in hcm["route_config"]["virtual_hosts"]:
            for route in host["routes"]:
                if "route" in route:  # not the allow-list's direct 404
                    route["route"]["cluster"] = name
        resources["listeners"].append(listener)
    return str(yaml.safe_dump(config, sort_keys=False, width=1000))


# --- machine load -----------------------------------------------------------------------------


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass(frozen=True, slots=True)
class CpuMark:
    wall: float
    machine_busy: float
    fleet: float
    front: float
    envoy: float
    loadgen: float

    @classmethod
    def now(cls, fleet: int, front: int | None, envoy: int) -> CpuMark:
        return cls(
            time.monotonic(),
            _machine_busy()[0],
            _cpu_of(fleet),
            _cpu_of(front),
            _cpu_of(envoy),
            time.process_time(),
        )

    def until(self, end: CpuMark) -> CpuUse:
        wall = max(end.wall - self.wall, 1e-9)
        return CpuUse(
            machine=(end.machine_busy - self.machine_busy) / wall,
            fleet=(end.fleet - self.fleet) / wall,
            front=(end.front - self.front) / wall,
            envoy=(end.envoy - self.envoy) / wall,
            loadgen=(end.loadgen - self.loadgen) / wall,
        )


# --- driving one run --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sent:
    index: int
    status: int  # HTTP status, 0 when the connection failed or the run's deadline passed
    sent: float  # wall seconds after the run's start
    answered: float
    response_id: str
    output_tokens: int
    error: str
    first_chunk: float | None = None  # streamed: wall seconds after the run's start


async def _send(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    index: int,
    start: float,
) -> _Sent:
    sent = time.perf_counter() - start
    first: float | None = None
    chunks: list[bytes] = []
    try:
        async with http.post(url, data=body, headers=headers) as response:
            status = response.status
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
                if first is None and _has_token(b"".join(chunks)):
                    first = time.perf_counter() - start
    except aiohttp.ClientError as exc:
        return _Sent(index, 0, sent, time.perf_counter() - start, "", 0, f"{type(exc).__name__}")
    answered = time.perf_counter() - start
    payload = b"".join(chunks)
    if status != 200:
        return _Sent(index, status, sent, answered, "", 0, payload[:200].decode(errors="replace"))
    streamed = payload.startswith(b"data:")
    data = _last_event(payload) if streamed else json.loads(payload)
    tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
    return _Sent(
        index,
        status,
        sent,
        answered,
        str(data.get("id", "")),
        tokens,
        "",
        first_chunk=first if streamed else None,
    )


def _has_token(received: bytes) -> bool:
    """Whether an SSE answer so far holds a generated token: the first event of a chat answer
    carries only the assistant's role, sent before any token (vLLM does the same)."""
    for line in received.split(b"\n"):
        if not line.startswith(b"data:") or not line.endswith(b"}"):
            continue  # not an event, or one still arriving
        for choice in json.loads(line[5:]).get("choices") or ():
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                return True
    return False


def _last_event(payload: bytes) -> dict[str, Any]:
    """The last JSON event of an SSE answer (with `include_usage`, the one with the usage)."""
    events = [
        line[5:].strip()
        for line in payload.split(b"\n")
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"
    ]
    return dict(json.loads(events[-1])) if events else {}


async def drive(
    base_url: str,
    workload: wl.Workload,
    bodies: Sequence[bytes],
    *,
    rate: float,
    speed: float,
    headers: Mapping[str, str],
    drain_seconds: float,
    on_answer: Callable[[int], None],
) -> list[_Sent]:
    """Send the workload open loop (multi-turn: each turn after its predecessor's answer)."""
    requests = workload.requests
    answered = [asyncio.Event() for _ in requests]
    done = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()

        async def one(spec: wl.RequestSpec) -> _Sent:
            nonlocal done
            if spec.after < 0:
                # Open loop: on schedule whether or not earlier requests have returned.
                delay = start + spec.offset / rate / speed - time.perf_counter()
            else:
                await answered[spec.after].wait()
                delay = spec.think / speed
            if delay > 0:
                await asyncio.sleep(delay)
            extra = {SESSION_HEADER: spec.session} if spec.session else {}
            try:
                return await _send(
                    http,
                    base_url + spec.path,
                    bodies[spec.index],
                    {**headers, **extra},
                    index=spec.index,
                    start=start,
                )
            finally:
                answered[spec.index].set()
                done += 1
                on_answer(done)

        tasks = [asyncio.create_task(one(spec)) for spec in requests]
        last_planned = max((r.offset for r in requests), default=0.0) / rate / speed
        finished, pending = await asyncio.wait(tasks, timeout=last_planned + drain_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        now = time.perf_counter() - start
        results = []
        for spec, task in zip(requests, tasks, strict=True):
            if task in finished and task.exception() is None:
                results.append(task.result())
            else:
                results.append(_Sent(spec.index, 0, now, now, "", 0, "the run's deadline passed"))
        return results


def fetch_json(url: str, payload: Any | None = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def summarize(
    *,
    workload: wl.Workload,
    profile: str = PROFILE,
    rate: float,
    competitor: str,
    speed: float,
    sent: Sequence[_Sent],
    records: Sequence[Mapping[str, Any] | None],
    stats: Sequence[Mapping[str, Any]],
    pods: int,
    oracle: float,
    wall_seconds: float,
    cpu: CpuUse,
) -> RunResult:
    """One run's figures from the client's log, the simulator's records and its counters."""
    ok = [(s, r) for s, r in zip(sent, records, strict=True) if s.status == 200 and r is not None]
    ttfts = sorted(r["first_token"] - r["arrival"] for _, r in ok if r["first_token"] is not None)
    client = sorted((s.first_chunk - s.sent) * speed for s, _ in ok if s.first_chunk is not None)
    e2es = sorted(r["finished"] - r["arrival"] for _, r in ok)
    # A request's answer on the workload's simulated timeline: its send (wall x speed) plus the
    # time it spent in its server (exact). The routing path's own time is not in it (it is in
    # `outside`), so wall-clock noise x speed never inflates throughput figures.
    ends = [s.sent * speed + (r["finished"] - r["arrival"]) for s, r in ok]
    first_send = min((s.sent * speed for s in sent), default=0.0)
    makespan = max(ends, default=0.0) - first_send
    output_tokens = sum(int(r["output_tokens"]) for _, r in ok)
    outside = sorted(
        1000 * ((s.answered - s.sent) - (r["finished"] - r["arrival"]) / speed) for s, r in ok
    )
    skews: dict[int, list[float]] = {}
    for s, r in ok:
        skews.setdefault(int(r["server"]), []).append(r["arrival"] - s.sent * speed)
    skew = max((max(v) - min(v) for v in skews.values()), default=0.0)
    per_pod = [0] * pods
    for _, r in ok:
        per_pod[int(r["server"])] += 1
    queries = sum(int(s["prefix_cache_queries"]) for s in stats)
    hits = sum(int(s["prefix_cache_hits"]) for s in stats)
    errors = [s for s in sent if s.status != 200]
    missing = sum(1 for s, r in zip(sent, records, strict=True) if s.status == 200 and r is None)
    first_error = errors[0].error or f"HTTP {errors[0].status}" if errors else ""
    if missing and not first_error:
        first_error = f"{missing} answers had no simulator record"
    return RunResult(
        workload=workload.name,
        profile=profile,
        rate=rate,
        competitor=competitor,
        sent=len(sent),
        ok=len(ok),
        errors=len(sent) - len(ok),
        first_error=first_error,
        ttft_p50_ms=1000 * quantile(ttfts, 0.5),
        ttft_p90_ms=1000 * quantile(ttfts, 0.9),
        ttft_p99_ms=1000 * quantile(ttfts, 0.99),
        client_ttft_p50_ms=1000 * quantile(client, 0.5) if client else 0.0,
        client_ttft_p90_ms=1000 * quantile(client, 0.9) if client else 0.0,
        client_ttft_p99_ms=1000 * quantile(client, 0.99) if client else 0.0,
        e2e_p90_ms=1000 * quantile(e2es, 0.9),
        output_tokens=output_tokens,
        makespan_s=makespan,
        output_tokens_per_s=output_tokens / makespan if makespan > 0 else 0.0,
        hit_rate=hits / queries if queries else 0.0,
        oracle_hit_rate=oracle,
        preemptions=sum(int(s["preemptions"]) for s in stats),
        per_pod=tuple(per_pod),
        outside_p90_ms=quantile(outside, 0.9),
        arrival_skew_ms=1000 * skew,
        wall_seconds=wall_seconds,
        cpu=cpu,
    )


# --- the whole benchmark ----------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr: `[####    ] 12/40 cost shared-prefix rate 4`."""

    def __init__(self, total: int, *, enabled: bool = True, width: int = 24) -> None:
        self.total = total
        self.enabled = enabled
        self.width = width
        self.tty = sys.stderr.isatty()
        self.done = 0
        self.label = ""

    def line(self, detail: str = "") -> str:
        filled = round(self.width * self.done / self.total) if self.total else self.width
        bar = "#" * filled + " " * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total} {self.label}{detail}"

    def start(self, label: str) -> None:
        self.label = label
        if self.enabled:
            self._show(self.line(), final=not self.tty)

    def tick(self, answered: int, of: int) -> None:
        # Redrawn in place on a terminal only; a log file gets one line per run.
        if self.enabled and self.tty:
            self._show(self.line(f" ({answered}/{of} answered)"), final=False)

    def finish_run(self, summary: str) -> None:
        self.done += 1
        if self.enabled:
            self._show(self.line(f": {summary}"), final=True)

    def _show(self, text: str, *, final: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def build_workloads(options: RoutingOptions) -> list[wl.Workload]:
    tokenizer = load_tokenizer("cl100k_base")  # the simulator's default: blocks hash alike
    makers: dict[str, Callable[[], wl.Workload]] = {
        "shared-prefix": lambda: wl.shared_prefix(
            tokenizer, shape=options.shared_prefix, seed=options.seed
        ),
        "multi-turn": lambda: wl.multi_turn(tokenizer, shape=options.multi_turn, seed=options.seed),
        "random": lambda: wl.random_prompts(tokenizer, shape=options.random, seed=options.seed),
        "hot-documents": lambda: wl.hot_documents(
            tokenizer, shape=options.hot_documents, seed=options.seed
        ),
        "agent-fan-out": lambda: wl.agent_fan_out(
            tokenizer, shape=options.agent_fan_out, seed=options.seed
        ),
    }
    return [makers[name]() for name in options.workloads]


def rate_for(profile: str, rate: float) -> float:
    """A rate given for h100-8b, on a fleet of `profile`: scaled by its prefill speed."""
    reference = get_profile(PROFILE).prefill_tokens_per_second()
    return rate * get_profile(profile).prefill_tokens_per_second() / reference


def _one_run(
    options: RoutingOptions,
    ports: Ports,
    *,
    profile: str,
    workload: wl.Workload,
    bodies: Sequence[bytes],
    blocks: int,
    oracle: float,
    rate: float,
    competitor: Competitor,
    envoy_pid: int,
    logs: Path,
    progress: Progress,
) -> RunResult:
    tag = f"{profile}-{workload.name}-{rate:g}-{competitor.name.replace(':', '-')}"
    sim_argv = [
        sys.executable,
        *(
            "-m",
            "extproc.bench.simhost",
            _sim_config(options, ports, profile=profile, blocks=blocks, kv=competitor.kv_events),
        ),
        str(ports.records),
    ]
    headers = {"content-type": "application/json"}
    with contextlib.ExitStack() as stack:
        fleet = start_fleet(stack, sim_argv, log=logs / f"{tag}.fleet.log")
        front: subprocess.Popen[str] | None = None
        if competitor.kind == "picker":
            config = logs / "picker.yaml"
            log = logs / f"{tag}.picker.log"
            front = stack.enter_context(
                process(_picker_argv(options, ports, config=config), log=log)
            )
            _wait_picker(front, ports, options.pods, log)
            base_url = f"http://127.0.0.1:{ports.envoy_picker}"
            headers[STRATEGY_HEADER] = competitor.policy
        elif competitor.kind == "envoy":
            port = (
                ports.envoy_round_robin
                if competitor.policy == "round-robin"
                else ports.envoy_least_request
            )
            base_url = f"http://127.0.0.1:{port}"
        else:
            log = logs / f"{tag}.router.log"
            # Offline, both routers fail to fetch the model's tokenizer from the Hugging Face
            # hub; HF_HUB_OFFLINE makes that fail at once instead of after network timeouts.
            front = stack.enter_context(
                process(
                    _router_argv(competitor, options, ports), log=log, env={"HF_HUB_OFFLINE": "1"}
                )
            )
            _wait_router(front, ports.router, log)
            base_url = f"http://127.0.0.1:{ports.router}"
        records_url = f"http://127.0.0.1:{ports.records}"
        front_pid = front.pid if front is not None else None
        mark = CpuMark.now(fleet.pid, front_pid, envoy_pid)
        total = len(workload.requests)
        sent = asyncio.run(
            drive(
                base_url,
                workload,
                bodies,
                rate=rate_for(profile, rate),
                speed=options.speed,
                headers=headers,
                drain_seconds=options.drain_seconds,
                on_answer=lambda n: progress.tick(n, total),
            )
        )
        end = CpuMark.now(fleet.pid, front_pid, envoy_pid)
        records = fetch_json(f"{records_url}/records", {"ids": [s.response_id for s in sent]})
        stats = fetch_json(f"{records_url}/stats")["servers"]
    return summarize(
        workload=workload,
        profile=profile,
        rate=rate,
        competitor=competitor.name,
        speed=options.speed,
        sent=sent,
        records=records["records"],
        stats=stats,
        pods=options.pods,
        oracle=oracle,
        wall_seconds=end.wall - mark.wall,
        cpu=mark.until(end),
    )


def _peer_notes(logs: Path) -> tuple[str, ...]:
    """What the peers' logs say about their tokenizer (they cannot download it offline)."""
    notes = []
    for log in sorted(logs.glob("*.router.log")):
        text = log.read_text(errors="replace")
        lines = [
            line.strip()
            for line in text.splitlines()
            if "tokenizer" in line.lower() and ("fail" in line.lower() or "warn" in line.lower())
        ]
        if lines:
            notes.append(f"{log.name}: {lines[0][:300]}")
    return tuple(notes)


def run_routing(options: RoutingOptions, *, progress: bool = True) -> RoutingReport:
    started = time.monotonic()
    competitors = options.competitors()
    output = options.output
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Nothing is in flight between runs, so the picker may stop at once; KV events feed the
    # prefix-aware strategies (the fleet publishes them for every picker run).
    picker: dict[str, Any] = {
        "server": {"shutdown_grace_seconds": 0, "drain_delay_seconds": 0},
        "kv_events": {"enabled": True},
        "collector": {"interval_seconds": options.scrape_interval},
    }
    if options.scheduling:
        picker["scheduling"] = {"endpoint_picker_config": dict(options.scheduling)}
    (logs / "picker.yaml").write_text(yaml.safe_dump(picker, sort_keys=False))
    workloads = build_workloads(options)
    infos = []
    plans = []
    for workload in workloads:
        blocks = wl.gpu_blocks_for(workload, pods=options.pods, fraction=options.kv_fraction)
        oracle = workload.oracle_hit_rate()
        sizes = wl.describe_tokens(workload)
        infos.append(
            WorkloadInfo(
                name=workload.name,
                description=workload.description,
                requests=sizes["requests"],
                prompt_tokens_mean=sizes["prompt_tokens_mean"],
                prompt_tokens_max=sizes["prompt_tokens_max"],
                kv_demand_tokens=sizes["kv_demand_tokens"],
                gpu_blocks_per_pod=blocks,
                oracle_hit_rate=oracle,
                floor_ttft_p90_ms=1000
                * quantile(sorted(workload.ttft_floor(get_profile(PROFILE))), 0.9),
            )
        )
        bodies = [wl.body_for(r, options.model, stream=options.stream) for r in workload.requests]
        plans.append((workload, bodies, blocks, oracle))
    total = (
        sum(len(options.rates[w.name]) for w in workloads)
        * len(competitors)
        * len(options.profiles)
    )
    bar = Progress(total, enabled=progress)
    ports = allocate_ports(options.pods)
    results: list[RunResult] = []
    with (
        (logs / "envoy.log").open("w") as envoy_log,
        running_envoy(
            envoy_bootstrap(ports, endpoint_addresses(ports, options.pods)),
            admin_port=ports.admin,
            concurrency=options.envoy_concurrency,
            stdout=subprocess.DEVNULL,
            stderr=envoy_log,
        ) as envoy,
    ):
        cells = [
            (profile, plan, rate)
            for profile in options.profiles
            for plan in plans
            for rate in options.rates[plan[0].name]
        ]
        for profile, (workload, bodies, blocks, oracle), rate in cells:
            for competitor in competitors:
                where = f"{profile} " if len(options.profiles) > 1 else ""
                bar.start(f"{competitor.name} {where}{workload.name} rate {rate:g}")
                try:
                    result = _one_run(
                        options,
                        ports,
                        profile=profile,
                        workload=workload,
                        bodies=bodies,
                        blocks=blocks,
                        oracle=oracle,
                        rate=rate,
                        competitor=competitor,
                        envoy_pid=envoy.pid,
                        logs=logs,
                        progress=bar,
                    )
                except RoutingBenchError as exc:
                    # One run that could not start (a port taken by another process on the
                    # machine) costs its row, not the hours of runs around it.
                    bar.finish_run(f"FAILED, left out of the report: {exc}")
                    continue
                results.append(result)
                client = f" (client {result.client_ttft_p90_ms:.0f})" if options.stream else ""
                bar.finish_run(
                    f"TTFT p90 {result.ttft_p90_ms:.0f} ms{client}, "
                    f"{result.output_tokens_per_s:.0f} tok/s, hit {100 * result.hit_rate:.0f}%"
                    + (f", {result.errors} errors" if result.errors else "")
                )
    return RoutingReport(
        options=options,
        competitors=tuple(c.name for c in competitors),
        workloads=tuple(infos),
        results=tuple(results),
        seconds=time.monotonic() - started,
        peer_notes=_peer_notes(logs),
    )


# --- the sub-command --------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip() and part != "none")


def _rates(text: str) -> tuple[float, ...]:
    rates = tuple(float(part) for part in text.split(",") if part.strip())
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma-separated")
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RoutingOptions()
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about 2 minutes: one rate per workload, fewer requests and competitors",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where routing.md, routing.json, the PNGs and logs/ go (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--strategies",
        type=_names,
        default=None,
        help="our strategies, comma-separated (default: every known strategy: "
        + ", ".join(known_strategies())
        + ")",
    )
    parser.add_argument(
        "--others",
        type=_names,
        default=None,
        help=f"Envoy policies and peers, comma-separated or 'none' (default: {', '.join(OTHERS)})",
    )
    parser.add_argument(
        "--workloads",
        type=_names,
        default=None,
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument(
        "--rates", type=_rates, default=None, help="requests per simulated second, every workload"
    )
    parser.add_argument(
        "--profiles",
        type=_names,
        default=None,
        help="the fleet: simulator profiles, one fleet each, comma-separated (default "
        f"{PROFILE}; rates are for {PROFILE} and scale with a profile's prefill speed)",
    )
    parser.add_argument(
        "--no-stream",
        action="store_true",
        help="one JSON answer per request instead of a streamed one (SSE, one chunk per token)",
    )
    parser.add_argument("--pods", type=int, default=None, help=f"({defaults.pods})")
    parser.add_argument(
        "--speed",
        type=float,
        default=None,
        help=f"simulated time runs this many times faster than the wall clock ({defaults.speed:g};"
        " --quick 4)",
    )
    parser.add_argument(
        "--kv-fraction",
        type=float,
        default=None,
        help=f"workload KV demand / fleet KV blocks ({defaults.kv_fraction:g})",
    )
    parser.add_argument("--seed", type=int, default=None, help="workload and simulator seed (0)")
    parser.add_argument(
        "--scheduling",
        type=Path,
        default=None,
        help="an EndpointPickerConfig YAML for the picker; --strategies may name its profiles",
    )
    parser.add_argument(
        "--workload",
        choices=("pd",),
        default=None,
        help="pd: prefill/decode disaggregation (p2p, centralized) against aggregated serving "
        "on the same GPUs, at several prompt/output mixes (extproc.bench.disagg)",
    )
    parser.add_argument(
        "--fleet",
        choices=("mixed",),
        default=None,
        help="mixed: 4 A100 + 4 H100, price-blind `cost` against `cheapest` "
        "(cost per million tokens at a p90 TTFT target)",
    )
    parser.add_argument(
        "--pd-split", default=None, help="--workload pd: prefill:decode servers (4:4)"
    )
    parser.add_argument(
        "--prices",
        default=None,
        help="--fleet mixed: cost per GPU-hour, e.g. a100=1.8,h100=3.5 (assumed list prices)",
    )


def options_from_args(args: argparse.Namespace) -> RoutingOptions:
    overrides: dict[str, Any] = {"output": args.output}
    names = (
        "strategies",
        "others",
        "workloads",
        "profiles",
        "pods",
        "speed",
        "kv_fraction",
        "seed",
    )
    for name in names:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.scheduling is not None:
        overrides["scheduling"] = _scheduling(args.scheduling)
    if args.no_stream:
        overrides["stream"] = False
    options = (
        RoutingOptions.quick_options(**overrides) if args.quick else RoutingOptions(**overrides)
    )
    if args.rates is not None:
        options = replace(options, rates=dict.fromkeys(WORKLOADS, args.rates))
    return options


def _scheduling(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--scheduling {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--scheduling {path}: expected an EndpointPickerConfig mapping")
    return data


def run(args: argparse.Namespace) -> int:
    from extproc.bench.report import render_text, write_report

    if args.workload == "pd" or args.fleet == "mixed":
        from extproc.bench import disagg

        return disagg.run(args)

    try:
        options = options_from_args(args)
    except ValueError as exc:  # ConfigError is one
        print(f"extproc bench routing: {exc}", file=sys.stderr)
        return 2
    report = run_stoppable(
        "extproc bench routing",
        lambda: run_routing(options),
        (RoutingBenchError, EnvoyError, OSError),
    )
    if isinstance(report, int):
        return report
    paths = write_report(report)
    print(render_text(report))
    print(f"\nReport: {', '.join(str(p) for p in paths)} ({report.seconds:.0f} s in all)")
    return 0
