"""`extproc bench NAME`: each benchmark prints a table and writes its report under --output."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    overhead = sub.add_parser(
        "overhead", help="latency and throughput the picker adds, beside Envoy alone"
    )
    overhead.add_argument(
        "--quick", action="store_true", help="short phases (about 5 minutes in all)"
    )
    overhead.add_argument("--rate", type=float, default=200.0, help="open-loop req/s per path")
    overhead.add_argument("--strategy", default="least-request")
    overhead.add_argument(
        "--scenarios",
        choices=("all", "one-chunk", "streamed"),
        default="all",
        help="one-chunk: 1 KB/220 KB/peak with single-body answers; streamed: SSE responses",
    )
    overhead.add_argument(
        "--stream-tokens",
        type=_token_counts,
        default=(1, 100, 1000),
        help="streamed response lengths in tokens, comma-separated (default 1,100,1000)",
    )
    overhead.add_argument(
        "--token-gap-ms",
        type=float,
        default=10.0,
        help="time between a stream's tokens (default 10: 100 tokens/s per stream)",
    )
    overhead.add_argument(
        "--stream-rate",
        type=float,
        default=4.0,
        help="streams started per second, for every length (default 4)",
    )
    overhead.add_argument(
        "--paths",
        type=_picker_paths,
        default=None,
        help="picker paths, comma-separated: response paths (ended, headers, inline, "
        "observer) in the bundled body mode, or with -buffered / -streamed (default "
        "ended,headers,inline,observer,ended-streamed)",
    )
    overhead.add_argument(
        "--picker-workers",
        type=int,
        default=1,
        help="picker processes on the one port (`extproc serve --workers`); Envoy gets as "
        "many worker threads, at least 2",
    )
    overhead.add_argument("--output", type=Path, default=Path("reports"))
    scrape = sub.add_parser(
        "scrape", help="metrics collector CPU and snapshot age: 1000 endpoints @ 1 s, 100 @ 50 ms"
    )
    scrape.add_argument("--quick", action="store_true", help="short phases (about 30 s)")
    scrape.add_argument("--output", type=Path, default=Path("reports"))
    from extproc.bench.routing_cli import add_arguments as add_routing_arguments

    routing = sub.add_parser(
        "routing",
        help="routing quality on a simulated fleet: our strategies, Envoy's, and the peers'",
    )
    add_routing_arguments(routing)
    from extproc.bench.tenants import add_arguments as add_tenants_arguments

    tenants = sub.add_parser(
        "tenants",
        help="noisy neighbour: one tenant floods; TTFT and goodput with fair sharing on and off",
    )
    add_tenants_arguments(tenants)
    from extproc.bench.chaos import add_arguments as add_chaos_arguments

    chaos = sub.add_parser(
        "chaos",
        help="faults under a steady load (pod, picker, replica roll, Redis): failures, leftovers",
    )
    add_chaos_arguments(chaos)
    from extproc.bench.soak import add_arguments as add_soak_arguments

    soak = sub.add_parser(
        "soak", help="a long steady load: the picker's RSS and open files over time"
    )
    add_soak_arguments(soak)
    from extproc.bench.autoscaling import add_arguments as add_autoscaling_arguments

    autoscaling = sub.add_parser(
        "autoscaling", help="autoscalers (KPA, APA, HPA) on a bursty diurnal trace, simulated"
    )
    add_autoscaling_arguments(autoscaling)


def run(args: argparse.Namespace) -> int:
    if args.bench == "overhead":
        from extproc.bench.overhead import OverheadOptions, run_overhead, write_report

        options = (
            OverheadOptions.quick(args.output)
            if args.quick
            else OverheadOptions(output=args.output)
        )
        options = OverheadOptions(
            **{
                **_fields(options),
                "rate": args.rate,
                "strategy": args.strategy,
                "scenarios": args.scenarios,
                "stream_tokens": args.stream_tokens,
                "token_gap_ms": args.token_gap_ms,
                "stream_rate": args.stream_rate,
                "picker_paths": args.paths or options.picker_paths,
                "picker_workers": args.picker_workers,
                "envoy_concurrency": max(options.envoy_concurrency, args.picker_workers),
            }
        )
        print(f"extproc bench overhead: {options}", flush=True)
        report = run_overhead(options)
        print(report.table())
        print(f"\nreport written to {write_report(report, options.output)}")
        return 0
    if args.bench == "scrape":
        from extproc.bench.scrape import ScrapeOptions, run_scrape
        from extproc.bench.scrape import write_report as write_scrape_report

        scrape_options = (
            ScrapeOptions.quick(args.output) if args.quick else ScrapeOptions(output=args.output)
        )
        print(f"extproc bench scrape: {scrape_options}", flush=True)
        scrape_report = run_scrape(scrape_options)
        print(scrape_report.table())
        print(f"\nreport written to {write_scrape_report(scrape_report, scrape_options.output)}")
        return 0
    if args.bench == "routing":
        from extproc.bench.routing_cli import run as run_routing

        return run_routing(args)
    if args.bench == "tenants":
        from extproc.bench.tenants import run as run_tenants

        return run_tenants(args)
    if args.bench == "chaos":
        from extproc.bench.chaos import run as run_chaos

        return run_chaos(args)
    if args.bench == "soak":
        from extproc.bench.soak import run as run_soak

        return run_soak(args)
    if args.bench == "autoscaling":
        from extproc.bench.autoscaling import run as run_autoscaling

        return run_autoscaling(args)
    raise AssertionError(args.bench)


def _token_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,100,1000: {text!r}")
    return counts


def _picker_paths(text: str) -> tuple[str, ...]:
    from extproc.bench.overhead import path_modes, picker_path

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        for name in names:
            path_modes(picker_path(name))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not names:
        raise argparse.ArgumentTypeError("expected at least one picker path")
    return names


def _fields(options: object) -> dict[str, object]:
    from dataclasses import asdict, is_dataclass

    assert is_dataclass(options) and not isinstance(options, type)
    return asdict(options)
