"""The fleet table of `extproc bench routing` over several seeds: each cell's ratios per seed, so
the noise between seeds shows beside the figures.

    .venv/bin/python benchmarks/routing_seeds.py reports/routing-s0/routing.json \\
        reports/routing-s1/routing.json

Per fleet, workload and rate: the default strategy's (`cost`) client p90 / p99 TTFT over the best
peer's (sglang-router or vllm-router cache_aware, each percentile's best) and over round-robin's,
and the same ratio on the engines' own TTFT (the decisions without the routing path's time), one
column per seed; `met` when every seed meets the issue's bar (<= 1.05 of the best peer and <= 1
of round-robin on both percentiles).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUBJECT = "cost"
BASELINE = "round-robin"
PEERS = ("sglang-router:", "vllm-router:")

Run = Mapping[str, Any]


def _client(run: Run, percentile: str) -> float:
    """The client's TTFT when the run streamed, else the engine's."""
    value = float(run[f"client_ttft_{percentile}_ms"])
    return value if value > 0 else float(run[f"ttft_{percentile}_ms"])


def cell_ratios(runs: Sequence[Run]) -> dict[str, tuple[float, float]] | None:
    """One seed's ratios for one cell (None when the subject or every peer is missing)."""
    subject = next((r for r in runs if r["competitor"] == SUBJECT), None)
    base = next((r for r in runs if r["competitor"] == BASELINE), None)
    peers = [r for r in runs if str(r["competitor"]).startswith(PEERS)]
    if subject is None or not peers:
        return None
    out = {}
    for name, read in (
        ("client", _client),
        ("engine", lambda r, p: float(r[f"ttft_{p}_ms"])),
    ):
        out[name] = (
            read(subject, "p90") / min(read(r, "p90") for r in peers),
            read(subject, "p99") / min(read(r, "p99") for r in peers),
        )
    if base is not None:
        out["round-robin"] = (
            _client(subject, "p90") / _client(base, "p90"),
            _client(subject, "p99") / _client(base, "p99"),
        )
    return out


def table(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    seeds = [int(r["options"]["seed"]) for r in reports]
    cells: dict[tuple[str, str, float], list[dict[str, tuple[float, float]] | None]] = {}
    for report in reports:
        keys = dict.fromkeys((r["profile"], r["workload"], r["rate"]) for r in report["results"])
        for key in keys:
            runs = [r for r in report["results"] if (r["profile"], r["workload"], r["rate"]) == key]
            cells.setdefault(key, []).append(cell_ratios(runs))
    label = " / ".join(f"seed {s}" for s in seeds)
    lines = [
        f"| fleet | workload | rate | {SUBJECT} / best peer, client p90 ({label}) | client p99 "
        f"| {SUBJECT} / {BASELINE}, p90 | p99 | engine p90 | engine p99 | met in every seed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def col(found: Sequence[dict[str, tuple[float, float]]], name: str, i: int) -> str:
        return " / ".join(f"{f[name][i]:.2f}" if name in f else "-" for f in found)

    for (profile, workload, rate), per_seed in cells.items():
        found = [f for f in per_seed if f is not None]
        if not found:
            continue
        met = len(found) == len(reports) and all(
            max(f["client"]) <= 1.05 and max(f.get("round-robin", (0.0, 0.0))) <= 1.0 for f in found
        )
        lines.append(
            f"| {profile} | {workload} | {rate:g} | {col(found, 'client', 0)} "
            f"| {col(found, 'client', 1)} | {col(found, 'round-robin', 0)} "
            f"| {col(found, 'round-robin', 1)} | {col(found, 'engine', 0)} "
            f"| {col(found, 'engine', 1)} | {'yes' if met else '**no**'} |"
        )
    return lines


def main(paths: Sequence[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    reports = [json.loads(Path(p).read_text()) for p in paths]
    print("\n".join(table(reports)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
