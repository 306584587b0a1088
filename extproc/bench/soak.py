"""`extproc bench soak`: a steady load for a long time, watching the picker's memory and files.

    this process (open loop, evenly spaced, half streamed, varied prompts)
        --HTTP--> Envoy --ext_proc--> the picker (`extproc serve`, default strategy `cost`)
        --HTTP--> a simulated fleet (`extproc.bench.simhost`, own process)

Every `interval` seconds the picker's RSS (VmRSS) and open file descriptors are read from
/proc/PID. Prompts start with one of a few hundred system prompts and end with a question of
their own, so the picker's prefix caches (capped: `extproc/prefix/cache.py`) fill during the
warm-up and then only churn: after the warm-up a picker that holds nothing per request should
stay flat. The report gives the table over time and the growth after the warm-up (first to last
reading, and the least-squares slope per minute).

With `--tracemalloc` the picker runs under `extproc.bench.picker_probe`: a tracemalloc snapshot
and live-object counts are taken at the end of the warm-up and at the end, and the report lists
the allocation sites and object types that grew most in between (the leak hunt of
docs/benchmarks.md). tracemalloc slows the picker and its traces add to its RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from extproc.bench import faultload as fl
from extproc.bench.envoy_config import EnvoyError
from extproc.bench.picker_probe import request_dump
from extproc.bench.processes import process
from extproc.sim.fleet import READY_LINE

DEFAULT_OUTPUT: Final = Path("reports/soak")


@dataclass(frozen=True, slots=True)
class SoakOptions:
    minutes: float = 30.0
    rate: float = 20.0
    interval: float = 30.0  # seconds between readings
    warmup_minutes: float = 5.0  # capped at half the run
    streamed_share: float = 0.5
    pods: int = 4
    profile: str = "h100-8b"
    system_prompts: int = 300
    # Words of each prompt's own question, after its system prompt: the text no cache has seen,
    # so how fast the picker's caches fill (more words: their caps are reached sooner).
    question_words: tuple[int, int] = (10, 60)
    strategy: str = "cost"
    tracemalloc: bool = False
    objects: bool = False  # live-object counts at the warm-up's end and the end (no tracing)
    seed: int = 0
    output: Path = DEFAULT_OUTPUT

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.rate <= 0 or self.interval <= 0:
            raise ValueError("--minutes, --rate and --interval must be positive")

    @property
    def warmup_seconds(self) -> float:
        return min(60 * self.warmup_minutes, 30 * self.minutes)


@dataclass(frozen=True, slots=True)
class Reading:
    seconds: float  # since the load started
    rss_mb: float
    fds: int


@dataclass(frozen=True, slots=True)
class Growth:
    """From the first reading at or after the warm-up to the last one under load."""

    since_seconds: float
    rss_mb: float
    rss_mb_per_minute: float  # least-squares slope
    fds: int
    fds_per_minute: float


@dataclass(frozen=True, slots=True)
class SoakReport:
    options: SoakOptions
    readings: tuple[Reading, ...]
    after_drain: Reading | None
    sent: int
    failed: int
    failures: dict[str, int]
    growth: Growth | None
    # With --tracemalloc: the allocation sites and object types that grew most after warm-up.
    top_allocations: tuple[str, ...] = ()
    object_growth: dict[str, int] = field(default_factory=dict)
    traced_mb: tuple[float, float] = (math.nan, math.nan)  # at warm-up end, at the end
    seconds: float = 0.0


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute; 0 with fewer than two."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return 60 * sum((x - mx) * (y - my) for x, y in points) / sxx


def growth_after(readings: list[Reading], warmup_seconds: float) -> Growth | None:
    after = [r for r in readings if r.seconds >= warmup_seconds]
    if len(after) < 2:
        return None
    first, last = after[0], after[-1]
    return Growth(
        since_seconds=first.seconds,
        rss_mb=last.rss_mb - first.rss_mb,
        rss_mb_per_minute=slope_per_minute([(r.seconds, r.rss_mb) for r in after]),
        fds=last.fds - first.fds,
        fds_per_minute=slope_per_minute([(r.seconds, float(r.fds)) for r in after]),
    )


def diff_probe(
    probe: Path, before: str, after: str
) -> tuple[list[str], dict[str, int], float, float]:
    """Top allocation sites by growth (tracemalloc, grouped by line, when traced) and object
    types by growth between two picker_probe dumps."""
    top: list[str] = []
    if (probe / f"{after}.tracemalloc").exists():
        old = tracemalloc.Snapshot.load(str(probe / f"{before}.tracemalloc"))
        new = tracemalloc.Snapshot.load(str(probe / f"{after}.tracemalloc"))
        top = [
            f"{stat.size_diff / 1024:+,.0f} KiB ({stat.count_diff:+,} blocks) "
            f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}"
            for stat in new.compare_to(old, "lineno")[:15]
        ]
    objects = [json.loads((probe / f"{n}.objects.json").read_text()) for n in (before, after)]
    counts = {
        name: objects[1]["objects"].get(name, 0) - objects[0]["objects"].get(name, 0)
        for name in objects[1]["objects"]
    }
    growth = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:15])
    return top, growth, objects[0]["traced_bytes"] / 2**20, objects[1]["traced_bytes"] / 2**20


def run_soak(options: SoakOptions) -> SoakReport:
    started = time.monotonic()
    options.output.mkdir(parents=True, exist_ok=True)
    ports = fl.allocate_rig_ports(options.pods)
    config = fl.write_picker_config(
        options.output / "picker.yaml",
        {
            "server": {"shutdown_grace_seconds": 0, "drain_delay_seconds": 0},
            "routing": {"strategy": options.strategy},
        },
    )
    probe = options.output / "probe" if options.tracemalloc or options.objects else None
    if probe is not None:
        for old in probe.glob("*"):
            old.unlink()
    shape = fl.LoadShape(
        rate=options.rate,
        seconds=60 * options.minutes,
        streamed_share=options.streamed_share,
        system_prompts=options.system_prompts,
        question_words=options.question_words,
        seed=options.seed,
    )
    readings: list[Reading] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            process(
                fl.fleet_argv(ports, pods=options.pods, profile=options.profile, seed=options.seed),
                ready_line=READY_LINE,
            )
        )
        picker = fl.start_replica(
            stack,
            config,
            ports,
            replica=0,
            pods=options.pods,
            log=options.output / "picker.log",
            probe_dir=probe,
            trace=options.tracemalloc,
        )
        fl.start_envoy_in(stack, ports, pods=options.pods)
        next_at = 0.0

        def on_tick(seconds: float) -> None:
            nonlocal next_at
            if probe is not None and seconds >= options.warmup_seconds:
                marker = probe / "request-warm"
                if not marker.exists():
                    marker.touch()  # answered by the picker's probe thread
            if seconds < next_at:
                return
            next_at += options.interval
            reading = fl.read_process(picker.pid)
            if reading is not None:
                readings.append(Reading(seconds, reading.rss_mb, reading.fds))
                _log(f"{seconds / 60:5.1f} min  RSS {reading.rss_mb:7.1f} MB  fds {reading.fds}")

        first = fl.read_process(picker.pid)
        if first is not None:
            readings.append(Reading(0.0, first.rss_mb, first.fds))
            next_at = options.interval
        shots = asyncio.run(fl.steady_load(ports.envoy, shape, on_tick=on_tick))
        last = fl.read_process(picker.pid)
        if last is not None:
            readings.append(Reading(shape.seconds, last.rss_mb, last.fds))
        time.sleep(3)
        drained = fl.read_process(picker.pid)
        top: list[str] = []
        objects: dict[str, int] = {}
        traced = (math.nan, math.nan)
        if probe is not None and request_dump(probe, "end") and (probe / "warm.done").exists():
            top, objects, *pair = diff_probe(probe, "warm", "end")
            traced = (pair[0], pair[1])
    failed = [s for s in shots if not s.ok]
    return SoakReport(
        options=options,
        readings=tuple(readings),
        after_drain=None if drained is None else Reading(-1, drained.rss_mb, drained.fds),
        sent=len(shots),
        failed=len(failed),
        failures=fl.failure_reasons(shots),
        growth=growth_after(readings, options.warmup_seconds),
        top_allocations=tuple(top),
        object_growth=objects,
        traced_mb=traced,
        seconds=time.monotonic() - started,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def render_markdown(report: SoakReport) -> str:
    o = report.options
    lines = [
        f"Load: {o.rate:g} req/s for {o.minutes:g} min through Envoy, {o.streamed_share:.0%} "
        f"streamed, prompts from {o.system_prompts} system prompts plus a question of "
        f"{o.question_words[0]}-{o.question_words[1]} words each; "
        f"{o.pods} simulated {o.profile} servers; strategy {o.strategy}"
        f"{'; picker under tracemalloc' if o.tracemalloc else ''}. Sent {report.sent}, failed "
        f"{report.failed}"
        + (
            f" ({', '.join(f'{n} {r}' for r, n in report.failures.items())})"
            if report.failed
            else ""
        )
        + ".",
        "",
        "| minute | picker RSS MB | open fds |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r.seconds / 60:.1f} | {r.rss_mb:.1f} | {r.fds} |" for r in report.readings]
    if report.after_drain is not None:
        lines.append(
            f"| after the load (3 s idle) | {report.after_drain.rss_mb:.1f} | "
            f"{report.after_drain.fds} |"
        )
    g = report.growth
    lines.append("")
    if g is None:
        lines.append("Too few readings after the warm-up to give a growth.")
    else:
        lines.append(
            f"After the warm-up (from minute {g.since_seconds / 60:.1f}): RSS {g.rss_mb:+.1f} MB "
            f"({g.rss_mb_per_minute:+.2f} MB/min, least squares), open fds {g.fds:+d} "
            f"({g.fds_per_minute:+.2f}/min)."
        )
    if report.top_allocations:
        lines += [
            "",
            f"tracemalloc, end of warm-up to end: traced {report.traced_mb[0]:.1f} -> "
            f"{report.traced_mb[1]:.1f} MB. Allocation sites that grew most:",
            "",
            *(f"    {line}" for line in report.top_allocations),
        ]
    if report.object_growth:
        lines += [
            "",
            "Live objects that grew most from the warm-up's end to the end (count): "
            + ", ".join(f"{name} {n:+,}" for name, n in report.object_growth.items()),
        ]
    lines += ["", f"{report.seconds:.0f} s in all."]
    return "\n".join(lines) + "\n"


def to_json(report: SoakReport) -> dict[str, Any]:
    data = asdict(report)
    data["options"]["output"] = str(report.options.output)
    data["traced_mb"] = [None if math.isnan(v) else v for v in report.traced_mb]
    return data


def write_report(report: SoakReport) -> list[Path]:
    return fl.write_pair(
        report.options.output,
        "soak",
        "Soak (`extproc bench soak`)",
        to_json(report),
        render_markdown(report),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SoakOptions()
    parser.add_argument("--minutes", type=float, default=d.minutes, help=f"({d.minutes:g})")
    parser.add_argument("--rate", type=float, default=d.rate, help=f"req/s ({d.rate:g})")
    parser.add_argument(
        "--interval",
        type=float,
        default=d.interval,
        help=f"seconds between readings ({d.interval:g})",
    )
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=d.warmup_minutes,
        help=f"not counted in the growth; at most half the run ({d.warmup_minutes:g})",
    )
    parser.add_argument("--strategy", default=d.strategy, help=f"the picker's ({d.strategy})")
    parser.add_argument(
        "--question-words",
        type=int,
        nargs=2,
        default=d.question_words,
        metavar=("LOW", "HIGH"),
        help="words of each prompt's own part; more fill the caches sooner "
        f"({d.question_words[0]} {d.question_words[1]})",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="run the picker under tracemalloc and report what grew after the warm-up",
    )
    parser.add_argument(
        "--objects",
        action="store_true",
        help="count the picker's live objects by type after the warm-up and at the end",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"({DEFAULT_OUTPUT})")


def options_from_args(args: argparse.Namespace) -> SoakOptions:
    return SoakOptions(
        minutes=args.minutes,
        rate=args.rate,
        interval=args.interval,
        warmup_minutes=args.warmup_minutes,
        strategy=args.strategy,
        question_words=tuple(args.question_words),
        tracemalloc=args.tracemalloc,
        objects=args.objects,
        seed=args.seed,
        output=args.output,
    )


def run(args: argparse.Namespace) -> int:
    return fl.run_command(
        "extproc bench soak",
        lambda: options_from_args(args),
        run_soak,
        errors=(EnvoyError, OSError, RuntimeError),
        write=write_report,
        render=render_markdown,
    )
