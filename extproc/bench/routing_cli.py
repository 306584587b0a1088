"""`extproc bench routing`: its flags, and the dispatch to the routing matrix (`routing`) or to
the deployment comparisons `--workload pd` and `--fleet mixed` (`disagg`). Kept apart from both
so that neither imports the other, nor the report that imports them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from extproc.bench import disagg
from extproc.bench.envoy_config import EnvoyError
from extproc.bench.processes import (
    run_stoppable,
)
from extproc.bench.report import render_text, write_report
from extproc.bench.routing import (
    DEFAULT_OUTPUT,
    OTHERS,
    WORKLOADS,
    RoutingOptions,
    run_routing,
)
from extproc.bench.runs import PROFILE, RoutingBenchError
from extproc.scheduling.strategies import known_strategies

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
        "--explain",
        action="store_true",
        help="the picker logs each decision's per-endpoint scores to logs/<run>.picker.log "
        "(slower picks: for reading a cell, not for its figures)",
    )
    parser.add_argument(
        "--no-kv-events",
        action="store_true",
        help="the picker does not follow the fleet's KV events (its approximate prefix index "
        "only): what following them costs on the routing path",
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
    if args.explain:
        overrides["explain"] = True
    if args.no_kv_events:
        overrides["kv_events"] = False
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
    if args.workload == "pd" or args.fleet == "mixed":
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
