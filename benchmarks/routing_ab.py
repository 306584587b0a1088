"""Two versions of the picker on the same routing cells, seed by seed: a change, or noise?

`extproc bench routing --quick` runs each strategy once per cell, and a quick cell's p90 is one
of its five or six worst requests: the same code on the same seed gave 430 and 567 ms on the
l4 multi-turn cell, and one run in nine on another seed preempted a request and read p99
5 s. A single sweep cannot tell a change from that. This runs one strategy of two checkouts
(a git ref, checked out into a worktree with its own virtualenv, and this working tree) on the
same cells over several seeds, the two alternating seed by seed so the shared machine's load
falls on both alike, and prints, per cell, this tree / base on engine p90 and p99 and client
p90: each seed's ratio, their geometric mean and their range.

    .venv/bin/python benchmarks/routing_ab.py --base HEAD~1 --profiles h100-8b,l4-8b \\
        --workloads multi-turn --seeds 0-7 --output reports/ab

The base worktree (`<output>/base-<commit>`, made with `make setup` the first time, about a
minute) is kept for the next run; `git worktree remove` it when done. Each run's own report is
under `<output>/<base|this>/<profile>-<workload>-s<seed>/`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Run:
    p90: float
    p99: float
    client_p90: float
    hit_rate: float
    preemptions: int


@dataclass(frozen=True, slots=True)
class Pair:
    profile: str
    workload: str
    seed: int
    base: Run
    this: Run


def seeds(spec: str) -> list[int]:
    """`0-7` or `0,2,5`."""
    if "-" in spec:
        low, high = spec.split("-", 1)
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in spec.split(",")]


def base_tree(ref: str, output: Path) -> Path:
    """A worktree of `ref` with its own virtualenv (the editable install of this tree would
    otherwise shadow it in every process the benchmark starts)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tree = (output / f"base-{commit[:10]}").resolve()
    if not tree.exists():
        output.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True
        )
    if not (tree / ".venv" / "bin" / "extproc").exists():
        subprocess.run(["make", "setup"], cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return tree


def run_cell(tree: Path, args: argparse.Namespace, cell: tuple[str, str, int], out: Path) -> Run:
    profile, workload, seed = cell
    command = [
        str(tree / ".venv" / "bin" / "extproc"),
        "bench",
        "routing",
        "--quick",
        "--pods",
        str(args.pods),
        "--profiles",
        profile,
        "--workloads",
        workload,
        "--strategies",
        args.strategy,
        "--others",
        "none",
        "--seed",
        str(seed),
        "--output",
        str(out),
    ]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "routing.json").read_text())["results"][0]
    return Run(
        p90=float(result["ttft_p90_ms"]),
        p99=float(result["ttft_p99_ms"]),
        client_p90=float(result["client_ttft_p90_ms"]),
        hit_rate=float(result["hit_rate"]),
        preemptions=int(result["preemptions"]),
    )


def ratios(pairs: list[Pair], field: str) -> list[float]:
    return [getattr(p.this, field) / getattr(p.base, field) for p in pairs]


def render(pairs: list[Pair], base: str) -> str:
    lines = [
        f"this tree against {base}; ratios this / base, below 1 is better",
        "",
        "| cell | seed | base p90 / p99 ms | this p90 / p99 ms | p90 | p99 | client p90 | hit rate"
        " base / this | preempt base / this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pairs:
        lines.append(
            f"| {p.profile} {p.workload} | {p.seed} | {p.base.p90:.0f} / {p.base.p99:.0f} "
            f"| {p.this.p90:.0f} / {p.this.p99:.0f} | {p.this.p90 / p.base.p90:.2f} "
            f"| {p.this.p99 / p.base.p99:.2f} | {p.this.client_p90 / p.base.client_p90:.2f} "
            f"| {p.base.hit_rate:.1%} / {p.this.hit_rate:.1%} "
            f"| {p.base.preemptions} / {p.this.preemptions} |"
        )
    lines += [
        "",
        "| cell | seeds | p90 geomean (range) | p99 geomean (range) | client p90 geomean (range) |",
        "|---|---:|---:|---:|---:|",
    ]
    for cell in dict.fromkeys((p.profile, p.workload) for p in pairs):
        inside = [p for p in pairs if (p.profile, p.workload) == cell]
        summary = []
        for field in ("p90", "p99", "client_p90"):
            values = ratios(inside, field)
            summary.append(
                f"{statistics.geometric_mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"
            )
        lines.append(f"| {cell[0]} {cell[1]} | {len(inside)} | {' | '.join(summary)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git ref to compare this tree against")
    parser.add_argument("--strategy", default="cost")
    parser.add_argument("--profiles", default="h100-8b")
    parser.add_argument("--workloads", default="multi-turn")
    parser.add_argument("--seeds", default="0-3", help="e.g. 0-7 or 0,2,5")
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("reports/ab"))
    args = parser.parse_args()
    output: Path = args.output
    trees = {"base": base_tree(args.base, output), "this": ROOT}
    pairs = []
    for profile in args.profiles.split(","):
        for workload in args.workloads.split(","):
            for seed in seeds(args.seeds):
                runs = {
                    name: run_cell(
                        tree,
                        args,
                        (profile, workload, seed),
                        (output / name / f"{profile}-{workload}-s{seed}").resolve(),
                    )
                    for name, tree in trees.items()
                }
                pairs.append(Pair(profile, workload, seed, runs["base"], runs["this"]))
                print(f"{profile} {workload} seed {seed}: {runs['base']} -> {runs['this']}")
    text = render(pairs, args.base)
    print("\n" + text)
    (output / "ab.md").write_text(text + "\n")
    (output / "ab.json").write_text(json.dumps([asdict(p) for p in pairs], indent=1) + "\n")


if __name__ == "__main__":
    main()
