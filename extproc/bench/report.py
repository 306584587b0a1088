"""The routing benchmark's report: markdown tables, target checks, PNG plots and JSON.

Pure functions of a `RoutingReport`, except `write_report` (files) and `plot` (matplotlib with
the Agg backend, so no display is needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from extproc.bench.routing import PROFILE, RoutingReport, RunResult

SUBJECT: Final = "cost"  # the strategy the targets are about
BASELINE: Final = "round-robin"  # the picker's own, through Envoy like the subject
RANDOM_REFERENCE: Final = "least-request"
PEER_PREFIXES: Final = ("sglang-router:", "vllm-router:")
CACHE_WORKLOADS: Final = ("shared-prefix", "multi-turn")


@dataclass(frozen=True, slots=True)
class Check:
    workload: str
    rate: float
    what: str
    value: str
    target: str
    passed: bool


def _get(results: Sequence[RunResult], workload: str, rate: float, name: str) -> RunResult | None:
    return next(
        (r for r in results if (r.workload, r.rate, r.competitor) == (workload, rate, name)), None
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else float("nan")


def checks(report: RoutingReport) -> list[Check]:
    """The issue's targets, per workload and rate, for every pair that ran."""
    out: list[Check] = []
    results = report.results
    peers = [c for c in report.competitors if c.startswith(PEER_PREFIXES)]
    floors = {info.name: info.floor_ttft_p90_ms for info in report.workloads}
    for workload in dict.fromkeys(r.workload for r in results):
        for rate in dict.fromkeys(r.rate for r in results if r.workload == workload):
            subject = _get(results, workload, rate, SUBJECT)
            if subject is None:
                continue
            if workload in CACHE_WORKLOADS:
                base = _get(results, workload, rate, BASELINE)
                if base is not None:
                    ttft = _ratio(base.ttft_p90_ms, subject.ttft_p90_ms)
                    tput = _ratio(subject.output_tokens_per_s, base.output_tokens_per_s)
                    # What the workload allows at all: the baseline over the TTFT floor.
                    floor = floors.get(workload, 0.0)
                    bound = (
                        f" (floor allows {_ratio(base.ttft_p90_ms, floor):.1f}x)" if floor else ""
                    )
                    out.append(
                        Check(
                            workload,
                            rate,
                            f"p90 TTFT, {BASELINE} / {SUBJECT}",
                            f"{ttft:.2f}x{bound}",
                            ">= 5x",
                            ttft >= 5,
                        )
                    )
                    out.append(
                        Check(
                            workload,
                            rate,
                            f"tok/s, {SUBJECT} / {BASELINE}",
                            f"{tput:.2f}x",
                            ">= 1.3x",
                            tput >= 1.3,
                        )
                    )
                for peer in peers:
                    other = _get(results, workload, rate, peer)
                    if other is None:
                        continue
                    out.append(
                        Check(
                            workload,
                            rate,
                            f"p90 TTFT vs {peer}",
                            f"{subject.ttft_p90_ms:.0f} vs {other.ttft_p90_ms:.0f} ms",
                            "<=",
                            subject.ttft_p90_ms <= other.ttft_p90_ms,
                        )
                    )
                    out.append(
                        Check(
                            workload,
                            rate,
                            f"tok/s vs {peer}",
                            f"{subject.output_tokens_per_s:.0f} vs {other.output_tokens_per_s:.0f}",
                            ">=",
                            subject.output_tokens_per_s >= other.output_tokens_per_s,
                        )
                    )
            elif workload == "random":
                ref = _get(results, workload, rate, RANDOM_REFERENCE)
                if ref is None:
                    continue
                ttft = _ratio(subject.ttft_p90_ms, ref.ttft_p90_ms)
                tput = _ratio(subject.output_tokens_per_s, ref.output_tokens_per_s)
                out.append(
                    Check(
                        workload,
                        rate,
                        f"p90 TTFT, {SUBJECT} / {RANDOM_REFERENCE}",
                        f"{ttft:.3f}",
                        "<= 1.05",
                        ttft <= 1.05,
                    )
                )
                out.append(
                    Check(
                        workload,
                        rate,
                        f"tok/s, {SUBJECT} / {RANDOM_REFERENCE}",
                        f"{tput:.3f}",
                        ">= 0.95",
                        tput >= 0.95,
                    )
                )
    return out


def _command(report: RoutingReport) -> str:
    o = report.options
    return ".venv/bin/extproc bench routing" + (" --quick" if o.quick else "")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def workload_table(report: RoutingReport, workload: str) -> list[str]:
    lines = [
        "| rate | router | TTFT p50 / p90 / p99 ms | tok/s | hit rate | oracle | preempt "
        "| errors | outside p90 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        if r.workload != workload:
            continue
        lines.append(
            f"| {r.rate:g} | {r.competitor} | {_ms(r.ttft_p50_ms)} / {_ms(r.ttft_p90_ms)} / "
            f"{_ms(r.ttft_p99_ms)} | {r.output_tokens_per_s:,.0f} | {_pct(r.hit_rate)} "
            f"| {_pct(r.oracle_hit_rate)} | {r.preemptions} | {r.errors} "
            f"| {r.outside_p90_ms:.1f} |"
        )
    return lines


def load_summary(report: RoutingReport) -> str:
    if not report.results:
        return "no runs"
    cores = os.cpu_count() or 0
    runs = report.results

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    machine = [r.cpu.machine for r in runs]
    return (
        f"machine busy {mean(machine):.2f} cores on average over the runs (max "
        f"{max(machine):.2f}) of {cores}; per run on average: fleet "
        f"{mean([r.cpu.fleet for r in runs]):.2f}, picker or peer router "
        f"{mean([r.cpu.front for r in runs]):.2f}, Envoy {mean([r.cpu.envoy for r in runs]):.2f}, "
        f"load generator {mean([r.cpu.loadgen for r in runs]):.2f} cores; largest arrival skew "
        f"{max(r.arrival_skew_ms for r in runs):,.0f} simulated ms"
    )


def render_markdown(report: RoutingReport) -> str:
    o = report.options
    lines = ["## Routing: `extproc bench routing`", "", "```sh", _command(report), "```", ""]
    lines += [
        f"One simulated fleet of {o.pods} servers (`{PROFILE}`, {o.model}) at speed {o.speed:g}, "
        f"restarted cold for every run; its KV cache is sized per workload so that the "
        f"workload's KV demand is {o.kv_fraction:.0%} of the fleet's blocks. Competitors: "
        + ", ".join(f"`{c}`" for c in report.competitors)
        + ". Our strategies run behind the real Envoy (ext_proc), named per request in "
        "`x-routing-strategy`; `envoy:*` is the same Envoy without the ext_proc filter and its "
        "own LB policy; the peers are HTTP proxies in front of the same fleet.",
        "",
        "TTFT: simulated time from a request's arrival at its server to its first token, read "
        "from the simulator's per-request records (exact; the routing path's own time is not in "
        "it, see `outside`). tok/s: output tokens per simulated second, first send to last "
        "answer. hit rate: prefix-cache hits / queries in tokens, from the simulator's counters. "
        "oracle: the best hit rate any router could reach on the workload (infinite cache, "
        "perfect routing; `extproc.bench.workloads.oracle_hit_rate`). preempt: the fleet's "
        "preemptions. outside p90: wall ms a request took beyond its engine time / speed: the "
        "routing path (Envoy, picker or router), HTTP, the simulator's tokenizing, and the "
        "simulator's event loop running behind simulated time under load. arrival skew (below): "
        "the largest spread, on one server, of (simulated arrival - client send x speed); "
        "it grows when the fleet process runs behind, which compresses arrivals.",
        "",
    ]
    for info in report.workloads:
        lines += [
            f"### {info.name}",
            "",
            f"{info.description}. {info.requests} requests, prompts {info.prompt_tokens_mean:,.0f} "
            f"tokens on average (max {info.prompt_tokens_max:,}); KV demand "
            f"{info.kv_demand_tokens:,} tokens; {info.gpu_blocks_per_pod:,} blocks per server; "
            f"oracle hit rate {_pct(info.oracle_hit_rate)}; TTFT floor p90 "
            f"{info.floor_ttft_p90_ms:.0f} ms (oracle hits on idle engines: no router does "
            "better).",
            "",
            *workload_table(report, info.name),
            "",
            f"![{info.name}](routing-{info.name}.png)",
            "",
        ]
    found = checks(report)
    lines += ["### Targets", ""]
    if found:
        lines += [
            "| workload | rate | check | value | target | met |",
            "|---|---:|---|---:|---|---|",
        ]
        lines += [
            f"| {c.workload} | {c.rate:g} | {c.what} | {c.value} | {c.target} | "
            f"{'yes' if c.passed else '**no**'} |"
            for c in found
        ]
    else:
        lines.append(f"`{SUBJECT}` did not run (not a known strategy yet), so no target applies.")
    lines += ["", "### How loaded the machine was", "", load_summary(report) + ".", ""]
    if report.peer_notes:
        lines += ["### Peers' tokenizers", ""]
        lines += [f"- `{note}`" for note in report.peer_notes]
        lines.append("")
    lines.append(f"{len(report.results)} runs in {report.seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def render_text(report: RoutingReport) -> str:
    """The same tables, for a terminal (markdown tables read fine as text)."""
    lines = [f"extproc bench routing: {len(report.results)} runs in {report.seconds:.0f} s"]
    for info in report.workloads:
        lines += [
            "",
            f"{info.name}: oracle hit rate {_pct(info.oracle_hit_rate)}, "
            f"TTFT floor p90 {info.floor_ttft_p90_ms:.0f} ms",
        ]
        lines += workload_table(report, info.name)
    found = checks(report)
    if found:
        lines += ["", "Targets"]
        lines += [
            f"  {c.workload} rate {c.rate:g}: {c.what}: {c.value} (target {c.target}) "
            f"{'met' if c.passed else 'NOT MET'}"
            for c in found
        ]
    lines += ["", load_summary(report)]
    return "\n".join(lines)


def plot(report: RoutingReport, output: Path) -> list[Path]:
    """One PNG per workload: p90 TTFT and output tokens/s against the rate, a line per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for info in report.workloads:
        runs = [r for r in report.results if r.workload == info.name]
        if not runs:
            continue
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in report.competitors:
            mine = sorted((r for r in runs if r.competitor == name), key=lambda r: r.rate)
            if not mine:
                continue
            style = "-" if ":" not in name else "--"
            rates = [r.rate for r in mine]
            left.plot(rates, [r.ttft_p90_ms for r in mine], style, marker="o", label=name)
            right.plot(rates, [r.output_tokens_per_s for r in mine], style, marker="o", label=name)
        left.set_yscale("log")
        left.set_title(f"{info.name}: p90 TTFT (simulated ms, log scale)")
        right.set_title(f"{info.name}: output tokens per simulated second")
        for axis in (left, right):
            axis.set_xlabel("offered rate (requests per simulated second)")
            axis.grid(True, alpha=0.3)
        right.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = output / f"routing-{info.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def to_json(report: RoutingReport) -> dict[str, Any]:
    data = asdict(report)
    options = data["options"]
    options["output"] = str(report.options.output)
    options["rates"] = {k: list(v) for k, v in report.options.rates.items()}
    data["targets"] = [asdict(c) for c in checks(report)]
    data["command"] = _command(report)
    return data


def write_report(report: RoutingReport) -> list[Path]:
    output = report.options.output
    output.mkdir(parents=True, exist_ok=True)
    markdown, data = output / "routing.md", output / "routing.json"
    markdown.write_text(render_markdown(report))
    data.write_text(json.dumps(to_json(report), indent=2, default=str) + "\n")
    return [markdown, data, *plot(report, output)]
