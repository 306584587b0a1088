"""`extproc bench routing --quick` on the random workload with more requests than its 48.

The quick random cell's p90 is its fifth-worst request, and its 48 requests last about 25 wall
seconds: too few to tell two strategies apart, and too short to see past the cost model's first
seconds on a slow fleet. This runs the same cell (quick rates, four pods, no peers) with
`--requests` of them and writes the same report (routing.md, routing.json).

    .venv/bin/python benchmarks/routing_random_long.py --seed 2 --requests 160 \\
        --profile l4-8b --strategies cost,round-robin,least-request --output reports/random-s2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from extproc.bench import workloads as wl
from extproc.bench.report import render_text, write_report
from extproc.bench.routing import RoutingOptions, run_routing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--profile", default="l4-8b")
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--strategies", default="cost,round-robin,least-request")
    parser.add_argument("--output", type=Path, default=Path("reports/random-long"))
    args = parser.parse_args()
    options = RoutingOptions.quick_options(
        seed=args.seed,
        pods=args.pods,
        profiles=(args.profile,),
        workloads=("random",),
        strategies=tuple(args.strategies.split(",")),
        others=(),
        output=args.output,
        random=wl.RandomShape(requests=args.requests),
    )
    report = run_routing(options)
    paths = write_report(report)
    print(render_text(report))
    print(f"\nReport: {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
