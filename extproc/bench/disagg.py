"""`extproc bench routing --workload pd` and `--fleet mixed`: deployments, not strategies.

Both compare ways of running the same simulated GPUs behind Envoy and the picker:

- `--workload pd`: the 8 GPUs serving whole requests (`aggregated`, the `cost` strategy), or
  split into prefill and decode endpoints with the KV cache moved between them, the prefill
  named in a header for the decode side's sidecar (`p2p`) or run by the picker itself
  (`centralized`). At several prompt/output length mixes: TTFT (from the request's first
  arrival at any server to its first token), inter-token latency (each request's mean gap
  between tokens), output tokens/s.
- `--fleet mixed`: 4 A100s and 4 H100s, priced per GPU-hour; `cost` (fastest predicted first
  token, blind to price) against `cheapest` (the cheapest endpoint predicted to meet a TTFT
  target, spilling over to faster ones). The bill is each GPU's price x the simulated seconds
  its engine was computing (`busy_seconds`): what an autoscaled or shared fleet pays. Reported
  per million output tokens, beside p90 TTFT and whether the target held.

Each run starts a fresh fleet and picker (`extproc.bench.routing` does the same for its
competitors), with the fleet's roles, GPU types and prices in the picker's config file. TTFT,
ITL and token counts are the simulator's exact per-request records.

One run's mechanics (ports, Envoy, sending, figures) are `runs`', shared with `routing`; the
flags are `routing_cli`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import yaml

from extproc.bench import workloads as wl
from extproc.bench.envoy import running_envoy
from extproc.bench.envoy_config import EnvoyError
from extproc.bench.harness import Progress, run_each, start_picker
from extproc.bench.loadgen import quantile
from extproc.bench.processes import PICKER_PREFIX, picker_argv, run_stoppable
from extproc.bench.runs import (
    CpuMark,
    Ports,
    RoutingBenchError,
    RunResult,
    allocate_ports,
    drive,
    endpoint_addresses,
    envoy_bootstrap,
    fetch_json,
    start_fleet,
    summarize,
)
from extproc.prefix.tokenizers import load_tokenizer
from extproc.sim.fleet import DEFAULT_MODEL

DEFAULT_OUTPUT: Final = Path("reports/disagg")

# Prompt/output length mixes for `--workload pd`, each at a rate that keeps 8 H100s busy
# without overload (simulated requests per second).
PD_MIXES: Final[Mapping[str, tuple[wl.RandomShape, float]]] = {
    "long-prompt": (wl.RandomShape(160, (3000, 6000), (50, 150)), 24.0),
    "balanced": (wl.RandomShape(160, (1000, 3000), (150, 350)), 20.0),
    "long-output": (wl.RandomShape(160, (300, 800), (500, 900)), 12.0),
}

# Assumed on-demand prices per GPU-hour (USD); cloud list prices vary by provider and year,
# so `--prices` overrides them. What matters to routing is their ratio.
PRICES: Final[Mapping[str, float]] = {"a100": 1.80, "h100": 3.50}
# What the operator tells the picker of each GPU's prefill speed (tokens/s): the simulator's
# profiles at 2048 tokens a step (docs/simulator.md), as a profiling run on the real GPUs would.
SPEEDS: Final[Mapping[str, float]] = {"a100": 14_400.0, "h100": 50_500.0}
MIXED_PROFILES: Final = ("a100-8b",) * 4 + ("h100-8b",) * 4


@dataclass(frozen=True, slots=True)
class Setup:
    """One deployment: per server its profile and role, and the picker's settings."""

    name: str
    profiles: tuple[str, ...]
    roles: tuple[str, ...]
    strategy: str = "cost"
    disaggregation: Mapping[str, Any] = field(default_factory=dict)
    ttft_target_seconds: float = 0.5


@dataclass(frozen=True, slots=True)
class Options:
    kind: str  # "pd" or "mixed"
    speed: float = 2.0
    seed: int = 0
    pd_split: tuple[int, int] = (4, 4)  # prefill, decode servers
    mixes: tuple[str, ...] = tuple(PD_MIXES)
    threshold_tokens: int = 256
    # --fleet mixed: the workload (random prompts), its rates, the p90 TTFT target.
    mixed_rates: tuple[float, ...] = (8.0, 16.0)
    mixed_shape: wl.RandomShape = field(
        default_factory=lambda: wl.RandomShape(requests=200, prompt_tokens=(1000, 4000))
    )
    ttft_target_ms: float = 500.0
    prices: Mapping[str, float] = field(default_factory=lambda: dict(PRICES))
    model: str = DEFAULT_MODEL
    scrape_interval: float = 0.2
    drain_seconds: float = 300.0
    output: Path = DEFAULT_OUTPUT
    quick: bool = False
    requests: int | None = None  # per pd mix (None: the mix's own; --quick 60)

    def setups(self) -> tuple[Setup, ...]:
        if self.kind == "mixed":
            # The picker's target is on its prediction, a typical TTFT: half the p90 target
            # leaves room for the tail.
            predicted = self.ttft_target_ms / 2000
            roles = ("both",) * len(MIXED_PROFILES)
            return (
                Setup("cost", MIXED_PROFILES, roles, "cost", ttft_target_seconds=predicted),
                Setup("cheapest", MIXED_PROFILES, roles, "cheapest", ttft_target_seconds=predicted),
            )
        prefill, decode = self.pd_split
        pods = prefill + decode
        split = ("prefill",) * prefill + ("decode",) * decode
        name = f"{prefill}P+{decode}D"
        gpus = ("h100-8b",) * pods

        def disaggregated(mode: str) -> Setup:
            settings = {"mode": mode, "threshold_tokens": self.threshold_tokens}
            return Setup(f"{mode} {name}", gpus, split, disaggregation=settings)

        return (
            Setup("aggregated", gpus, ("both",) * pods),
            disaggregated("p2p"),
            disaggregated("centralized"),
        )

    @property
    def pods(self) -> int:
        return len(self.setups()[0].profiles)


@dataclass(frozen=True, slots=True)
class Result:
    setup: str
    mix: str
    rate: float
    base: RunResult  # TTFT from the first arrival at any server
    itl_p50_ms: float
    itl_p90_ms: float
    transferred_share: float  # of prompt tokens, moved from a prefill server
    busy_seconds: Mapping[str, float]  # per profile
    cost_per_million: float  # output tokens, at busy-time billing
    per_profile_requests: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Report:
    options: Options
    results: tuple[Result, ...]
    seconds: float


def accelerator(profile: str) -> str:
    return profile.split("-", 1)[0]


def _picker_config(options: Options, setup: Setup, ports: Ports) -> dict[str, Any]:
    endpoints = [
        {"address": address, "role": role, "accelerator": accelerator(profile)}
        for address, role, profile in zip(
            endpoint_addresses(ports, len(setup.profiles)), setup.roles, setup.profiles, strict=True
        )
    ]
    return {
        "server": {"shutdown_grace_seconds": 0, "drain_delay_seconds": 0},
        "kv_events": {"enabled": True},
        "collector": {"interval_seconds": options.scrape_interval},
        "prefix": dict(PICKER_PREFIX),
        "routing": {"strategy": setup.strategy},
        "scheduling": {"ttft_target_seconds": setup.ttft_target_seconds},
        "fleet": {"prices": dict(options.prices), "speeds": dict(SPEEDS)},
        "disaggregation": dict(setup.disaggregation),
        "endpoints": endpoints,
    }


def _sim_config(options: Options, setup: Setup, ports: Ports) -> str:
    return json.dumps(
        {
            "pods": len(setup.profiles),
            "port": ports.sim,
            "model": options.model,
            "profiles": list(setup.profiles),
            "speed": options.speed,
            "kv_events": True,
            "kv_events_port": ports.kv,
            "seed": options.seed,
        }
    )


def measure(
    options: Options,
    setup: Setup,
    *,
    mix: str,
    rate: float,
    workload: wl.Workload,
    sent: Sequence[Any],
    records: Sequence[Mapping[str, Any] | None],
    stats: Sequence[Mapping[str, Any]],
    wall_seconds: float,
    cpu: Any,
) -> Result:
    """One run's figures. A disaggregated request's TTFT starts at its first arrival at any
    server (its prefill server's, in `centralized` mode), as its client would see it."""
    first_arrival = [
        None
        if r is None
        else {**r, "arrival": min(r["arrival"], r.get("prefill_arrival") or r["arrival"])}
        for r in records
    ]
    base = summarize(
        workload=workload,
        rate=rate,
        competitor=setup.name,
        speed=options.speed,
        sent=sent,
        records=first_arrival,
        stats=stats,
        pods=len(setup.profiles),
        oracle=workload.oracle_hit_rate(),
        wall_seconds=wall_seconds,
        cpu=cpu,
    )
    ok = [r for r in records if r is not None]
    itls = sorted(float(r["itl_mean"]) for r in ok if r.get("itl_mean") is not None)
    prompt = sum(int(r["prompt_tokens"]) for r in ok)
    moved = sum(int(r.get("transferred_tokens", 0)) for r in ok)
    busy: dict[str, float] = {}
    bill = 0.0
    for server, profile in zip(stats, setup.profiles, strict=True):
        seconds = float(server.get("busy_seconds", 0.0))
        busy[profile] = busy.get(profile, 0.0) + seconds
        bill += seconds / 3600 * options.prices.get(accelerator(profile), 0.0)
    served: dict[str, int] = {}
    for count, profile in zip(base.per_pod, setup.profiles, strict=True):
        served[profile] = served.get(profile, 0) + count
    return Result(
        setup=setup.name,
        mix=mix,
        rate=rate,
        base=base,
        itl_p50_ms=1000 * quantile(itls, 0.5),
        itl_p90_ms=1000 * quantile(itls, 0.9),
        transferred_share=moved / prompt if prompt else 0.0,
        busy_seconds=busy,
        cost_per_million=bill / base.output_tokens * 1e6 if base.output_tokens else float("nan"),
        per_profile_requests=served,
    )


def _one_run(
    options: Options,
    ports: Ports,
    setup: Setup,
    *,
    mix: str,
    workload: wl.Workload,
    rate: float,
    envoy_pid: int,
    logs: Path,
    progress: Progress,
) -> Result:
    tag = f"{mix}-{rate:g}-{setup.name.replace(' ', '-').replace('+', '')}"
    config = logs / f"{tag}.picker.yaml"
    config.write_text(yaml.safe_dump(_picker_config(options, setup, ports), sort_keys=False))
    sim_argv = [
        sys.executable,
        *("-m", "extproc.bench.simhost", _sim_config(options, setup, ports)),
        str(ports.records),
    ]
    bodies = [wl.body_for(r, options.model) for r in workload.requests]
    pods = len(setup.profiles)
    with contextlib.ExitStack() as stack:
        fleet = start_fleet(stack, sim_argv, log=logs / f"{tag}.fleet.log")
        log = logs / f"{tag}.picker.log"
        argv = picker_argv(config, (), grpc=ports.grpc, health=ports.health, metrics=ports.metrics)
        picker = start_picker(
            stack,
            argv,
            grpc=ports.grpc,
            metrics=ports.metrics,
            endpoints=pods,
            log=log,
            error=lambda why: RoutingBenchError(f"{why}; see {log}"),
        )
        mark = CpuMark.now(fleet.pid, picker.pid, envoy_pid)
        total = len(workload.requests)
        sent = asyncio.run(
            drive(
                f"http://127.0.0.1:{ports.envoy_picker}",
                workload,
                bodies,
                rate=rate,
                speed=options.speed,
                headers={"content-type": "application/json"},
                drain_seconds=options.drain_seconds,
                on_answer=lambda n: progress.tick(n, total),
            )
        )
        end = CpuMark.now(fleet.pid, picker.pid, envoy_pid)
        records_url = f"http://127.0.0.1:{ports.records}"
        records = fetch_json(f"{records_url}/records", {"ids": [s.response_id for s in sent]})
        stats = fetch_json(f"{records_url}/stats")["servers"]
    return measure(
        options,
        setup,
        mix=mix,
        rate=rate,
        workload=workload,
        sent=sent,
        records=records["records"],
        stats=stats,
        wall_seconds=end.wall - mark.wall,
        cpu=mark.until(end),
    )


def _plan(options: Options) -> list[tuple[str, wl.Workload, float]]:
    tokenizer = load_tokenizer("cl100k_base")
    if options.kind == "mixed":
        workload = wl.random_prompts(tokenizer, shape=options.mixed_shape, seed=options.seed)
        return [("random", workload, rate) for rate in options.mixed_rates]
    plan = []
    for mix in options.mixes:
        shape, rate = PD_MIXES[mix]
        if options.requests is not None:
            shape = replace(shape, requests=options.requests)
        workload = wl.random_prompts(tokenizer, shape=shape, seed=options.seed)
        plan.append((mix, workload, rate))
    return plan


def run_disagg(options: Options, *, progress: bool = True) -> Report:
    started = time.monotonic()
    logs = options.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    plan = _plan(options)
    setups = options.setups()
    ports = allocate_ports(options.pods)
    cells = [(mix, workload, rate, setup) for mix, workload, rate in plan for setup in setups]

    def summary(result: Result) -> str:
        return (
            f"TTFT p90 {result.base.ttft_p90_ms:.0f} ms, ITL p90 {result.itl_p90_ms:.1f} "
            f"ms, {result.base.output_tokens_per_s:.0f} tok/s"
            + (f", {result.base.errors} errors" if result.base.errors else "")
        )

    with (
        (logs / "envoy.log").open("w") as envoy_log,
        running_envoy(
            envoy_bootstrap(ports, endpoint_addresses(ports, options.pods)),
            admin_port=ports.admin,
            stdout=subprocess.DEVNULL,
            stderr=envoy_log,
        ) as envoy,
    ):

        def one(cell: tuple[str, wl.Workload, float, Setup], bar: Progress) -> Result:
            mix, workload, rate, setup = cell
            return _one_run(
                options,
                ports,
                setup,
                mix=mix,
                workload=workload,
                rate=rate,
                envoy_pid=envoy.pid,
                logs=logs,
                progress=bar,
            )

        results = run_each(
            cells,
            run=one,
            label=lambda cell: f"{cell[3].name} {cell[0]} rate {cell[2]:g}",
            summary=summary,
            skip=(RoutingBenchError,),
            progress=progress,
        )
    return Report(options, tuple(results), time.monotonic() - started)


# --- the report --------------------------------------------------------------------------------


def command(options: Options) -> str:
    if options.kind == "mixed":
        rates = ",".join(f"{r:g}" for r in options.mixed_rates)
        return f"extproc bench routing --fleet mixed --rates {rates}" + (
            " --quick" if options.quick else ""
        )
    split = f"{options.pd_split[0]}:{options.pd_split[1]}"
    return f"extproc bench routing --workload pd --pd-split {split}" + (
        " --quick" if options.quick else ""
    )


def render_markdown(report: Report) -> str:
    options = report.options
    lines = [f"Command: `{command(options)}` ({report.seconds:.0f} s)", ""]
    if options.kind == "mixed":
        lines += [
            f"Fleet: {', '.join(MIXED_PROFILES)}; prices per GPU-hour: "
            + ", ".join(f"{k} {v:g}" for k, v in options.prices.items())
            + f"; p90 TTFT target {options.ttft_target_ms:g} ms.",
            "",
            "| rate | strategy | TTFT p50 | TTFT p90 | target met | tok/s | cost / M output "
            "tokens | busy s (A100 / H100) | requests (A100 / H100) | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report.results:
            b = r.base
            busy = " / ".join(f"{r.busy_seconds.get(p, 0):.1f}" for p in ("a100-8b", "h100-8b"))
            served = " / ".join(
                str(r.per_profile_requests.get(p, 0)) for p in ("a100-8b", "h100-8b")
            )
            lines.append(
                f"| {r.rate:g} | {r.setup} | {b.ttft_p50_ms:.0f} | {b.ttft_p90_ms:.0f} | "
                f"{'yes' if b.ttft_p90_ms <= options.ttft_target_ms else 'no'} | "
                f"{b.output_tokens_per_s:.0f} | {r.cost_per_million:.3f} | {busy} | {served} | "
                f"{b.errors} |"
            )
        return "\n".join(lines) + "\n"
    lines += [
        "| mix | rate | setup | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p90 | tok/s | "
        "moved | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        b = r.base
        lines.append(
            f"| {r.mix} | {r.rate:g} | {r.setup} | {b.ttft_p50_ms:.0f} | {b.ttft_p90_ms:.0f} | "
            f"{b.ttft_p99_ms:.0f} | {r.itl_p50_ms:.1f} | {r.itl_p90_ms:.1f} | "
            f"{b.output_tokens_per_s:.0f} | {100 * r.transferred_share:.0f}% | {b.errors} |"
        )
    lines += [
        "",
        "Mixes: "
        + "; ".join(
            f"{name}: prompts {s.prompt_tokens[0]}-{s.prompt_tokens[1]}, output "
            f"{s.output_tokens[0]}-{s.output_tokens[1]} tokens"
            for name, (s, _) in PD_MIXES.items()
            if name in options.mixes
        )
        + ". TTFT from the first arrival at any server; ITL: each request's mean gap between "
        "tokens; moved: prompt tokens pulled from a prefill server.",
    ]
    return "\n".join(lines) + "\n"


def write_report(report: Report) -> list[Path]:
    output = report.options.output
    output.mkdir(parents=True, exist_ok=True)
    name = "mixed" if report.options.kind == "mixed" else "pd"
    markdown = output / f"{name}.md"
    markdown.write_text(render_markdown(report))
    data = output / f"{name}.json"
    data.write_text(json.dumps(asdict(report), indent=1, default=str))
    return [markdown, data]


def options_from_args(args: argparse.Namespace) -> Options:
    kind = "mixed" if args.fleet == "mixed" else "pd"
    overrides: dict[str, Any] = {"kind": kind, "quick": args.quick}
    if args.output is not None and args.output != Path("reports/routing"):
        overrides["output"] = args.output
    if args.speed is not None:
        overrides["speed"] = args.speed
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.pd_split is not None:
        prefill, _, decode = args.pd_split.partition(":")
        overrides["pd_split"] = (int(prefill), int(decode))
        if min(overrides["pd_split"]) < 1:
            raise ValueError("--pd-split needs at least one prefill and one decode server")
    if args.rates is not None and kind == "mixed":
        overrides["mixed_rates"] = args.rates
    if args.prices is not None:
        overrides["prices"] = {
            k.strip(): float(v) for k, _, v in (p.partition("=") for p in args.prices.split(","))
        }
    if args.quick and kind == "mixed":
        overrides.setdefault("mixed_rates", (12.0,))
        overrides["mixed_shape"] = wl.RandomShape(requests=80, prompt_tokens=(1000, 4000))
    if args.quick and kind == "pd":
        overrides["mixes"] = ("long-prompt",)
        overrides["requests"] = 60
    return Options(**overrides)


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"extproc bench routing: {exc}", file=sys.stderr)
        return 2
    report = run_stoppable(
        "extproc bench routing",
        lambda: run_disagg(options),
        (RoutingBenchError, EnvoyError, OSError),
    )
    if isinstance(report, int):
        return report
    paths = write_report(report)
    print(render_markdown(report))
    print(f"Report: {', '.join(str(p) for p in paths)} ({report.seconds:.0f} s in all)")
    return 0
