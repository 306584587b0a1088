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

Long (about 620 lines): the matrix's options, records and run loop. One run's mechanics are in
`runs`, the flags in `routing_cli`, the tables in `report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from extproc.bench import workloads as wl
from extproc.bench.envoy import running_envoy
from extproc.bench.harness import Progress, run_each, start_picker
from extproc.bench.loadgen import quantile
from extproc.bench.processes import PICKER_PREFIX, picker_argv, picker_pick_mean_ms, process
from extproc.bench.runs import (
    PROFILE,
    CpuMark,
    Ports,
    RoutingBenchError,
    RunResult,
    Sent,
    allocate_ports,
    drive,
    endpoint_addresses,
    envoy_bootstrap,
    fetch_json,
    start_fleet,
    summarize,
)
from extproc.prefix.tokenizers import load_tokenizer
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.scheduling.strategies import known_strategies
from extproc.sim.fleet import DEFAULT_MODEL
from extproc.sim.profiles import get_profile

STRATEGY_HEADER: Final = "x-routing-strategy"
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
    # The picker logs each decision's per-endpoint scores (`scheduling.explain`) into its run's
    # log under `logs/`: how to see why a cell went the way it did. It costs the picker time.
    explain: bool = False
    # The picker follows the fleet's KV events (the prefix-aware strategies' precise index);
    # False leaves it the approximate index alone: what the events cost on the routing path.
    kv_events: bool = True
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


# --- the whole benchmark ----------------------------------------------------------------------


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
            argv = picker_argv(
                config,
                endpoint_addresses(ports, options.pods),
                grpc=ports.grpc,
                health=ports.health,
                metrics=ports.metrics,
                log_level="INFO" if options.explain else "WARNING",
            )
            front = start_picker(
                stack,
                argv,
                grpc=ports.grpc,
                metrics=ports.metrics,
                endpoints=options.pods,
                log=log,
                error=lambda why: RoutingBenchError(f"{why}; see {log}"),
            )
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
        pick_mean_ms = picker_pick_mean_ms(ports.metrics) if competitor.kind == "picker" else 0.0
        records = fetch_json(f"{records_url}/records", {"ids": [s.response_id for s in sent]})
        stats = fetch_json(f"{records_url}/stats")["servers"]
    write_requests(logs / f"{tag}.requests.jsonl", sent, records["records"])
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
        pick_mean_ms=pick_mean_ms,
    )


def write_workload(path: Path, workload: wl.Workload) -> None:
    """One JSON line per request of a workload, written once for every run of it: its session,
    the request it follows (`after`), its prompt and output sizes, its arrival offset and the
    event ids of its prompt's blocks, which say which requests share a prefix."""
    _write_lines(
        path,
        (
            {
                "index": spec.index,
                "session": spec.session,
                "after": spec.after,
                "offset": spec.offset,
                "prompt_tokens": spec.prompt_tokens,
                "max_tokens": spec.max_tokens,
                "blocks": spec.block_ids,
            }
            for spec in workload.requests
        ),
    )


def write_requests(
    path: Path, sent: Sequence[Sent], records: Sequence[Mapping[str, Any] | None]
) -> None:
    """One JSON line per request of a run (`index` as in the workload's file): what the client
    saw (wall seconds from the run's start) and the simulator's record (simulated seconds, the
    server that served it, its cached tokens). With the workload's file and the picker's
    `--explain` log, enough to follow a cell's decisions request by request
    (`benchmarks/predicted_vs_actual.py` does it for the cost's predictions)."""
    _write_lines(
        path,
        (
            {
                "index": s.index,
                "status": s.status,
                "error": s.error,
                "sent": s.sent,
                "first_chunk": s.first_chunk,
                "answered": s.answered,
                "response_id": s.response_id,
                "sim": record,
            }
            for s, record in zip(sent, records, strict=True)
        ),
    )


def _write_lines(path: Path, lines: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w") as out:
        out.writelines(json.dumps(line) + "\n" for line in lines)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """A workload's or a run's records as `write_workload` and `write_requests` wrote them."""
    return [json.loads(text) for text in path.read_text().splitlines()]


def workload_file(logs: Path, run: str) -> Path | None:
    """The records of the workload a run (`<profile>-<workload>-<rate>-<competitor>`) sent."""
    return next(
        (p for p in logs.glob("*.workload.jsonl") if f"-{p.name.split('.')[0]}-" in run), None
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


# A workload with its request bodies, KV blocks per pod and oracle hit rate.
_Plan = tuple[wl.Workload, list[bytes], int, float]


def picker_config(options: RoutingOptions) -> dict[str, Any]:
    """The picker's config for every picker run (written to `logs/picker.yaml`)."""
    # Nothing is in flight between runs, so the picker may stop at once; KV events feed the
    # prefix-aware strategies (the fleet publishes them for every picker run).
    picker: dict[str, Any] = {
        "server": {"shutdown_grace_seconds": 0, "drain_delay_seconds": 0},
        "kv_events": {"enabled": options.kv_events},
        "collector": {"interval_seconds": options.scrape_interval},
        "prefix": dict(PICKER_PREFIX),
    }
    scheduling: dict[str, Any] = {"explain": True} if options.explain else {}
    if options.scheduling:
        scheduling["endpoint_picker_config"] = dict(options.scheduling)
    if scheduling:
        picker["scheduling"] = scheduling
    return picker


def run_routing(options: RoutingOptions, *, progress: bool = True) -> RoutingReport:
    started = time.monotonic()
    competitors = options.competitors()
    output = options.output
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    picker = picker_config(options)
    (logs / "picker.yaml").write_text(yaml.safe_dump(picker, sort_keys=False))
    workloads = build_workloads(options)
    infos = []
    plans: list[_Plan] = []
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
        write_workload(logs / f"{workload.name}.workload.jsonl", workload)
    ports = allocate_ports(options.pods)
    cells = [
        (profile, plan, rate, competitor)
        for profile in options.profiles
        for plan in plans
        for rate in options.rates[plan[0].name]
        for competitor in competitors
    ]

    def label(cell: tuple[str, _Plan, float, Competitor]) -> str:
        profile, (workload, *_), rate, competitor = cell
        where = f"{profile} " if len(options.profiles) > 1 else ""
        return f"{competitor.name} {where}{workload.name} rate {rate:g}"

    def summary(result: RunResult) -> str:
        client = f" (client {result.client_ttft_p90_ms:.0f})" if options.stream else ""
        return (
            f"TTFT p90 {result.ttft_p90_ms:.0f} ms{client}, "
            f"{result.output_tokens_per_s:.0f} tok/s, hit {100 * result.hit_rate:.0f}%"
            + (f", {result.errors} errors" if result.errors else "")
        )

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

        def one(cell: tuple[str, _Plan, float, Competitor], bar: Progress) -> RunResult:
            profile, (workload, bodies, blocks, oracle), rate, competitor = cell
            return _one_run(
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

        results = run_each(
            cells,
            run=one,
            label=label,
            summary=summary,
            skip=(RoutingBenchError,),
            progress=progress,
        )
    return RoutingReport(
        options=options,
        competitors=tuple(c.name for c in competitors),
        workloads=tuple(infos),
        results=tuple(results),
        seconds=time.monotonic() - started,
        peer_notes=_peer_notes(logs),
    )
