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

from extproc.bench.routing import RoutingOptions, RoutingReport
from extproc.bench.runs import PROFILE, RunResult

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
    """The issue's targets, per fleet, workload and rate, for every pair that ran."""
    out: list[Check] = []
    for profile in dict.fromkeys(r.profile for r in report.results):
        out += _checks(report, [r for r in report.results if r.profile == profile])
    return out


def _checks(report: RoutingReport, results: Sequence[RunResult]) -> list[Check]:
    out: list[Check] = []
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
    """The command line that reruns this report (its options that differ from the defaults)."""
    o = report.options
    base = RoutingOptions.quick_options() if o.quick else RoutingOptions()
    words = [".venv/bin/extproc bench routing"] + (["--quick"] if o.quick else [])
    for flag, value, default in (
        ("--pods", o.pods, base.pods),
        ("--profiles", ",".join(o.profiles), ",".join(base.profiles)),
        ("--workloads", ",".join(o.workloads), ",".join(base.workloads)),
        ("--strategies", ",".join(o.strategies), ",".join(base.strategies)),
        ("--others", ",".join(o.others) or "none", ",".join(base.others) or "none"),
        ("--speed", f"{o.speed:g}", f"{base.speed:g}"),
        ("--kv-fraction", f"{o.kv_fraction:g}", f"{base.kv_fraction:g}"),
        ("--seed", o.seed, base.seed),
    ):
        if value != default:
            words.append(f"{flag} {value}")
    if not o.stream:
        words.append("--no-stream")
    return " ".join(words)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def workload_table(report: RoutingReport, workload: str) -> list[str]:
    lines = [
        "| fleet | rate | router | TTFT p50 / p90 / p99 ms | client TTFT p50 / p90 / p99 ms "
        "| tok/s | hit rate | oracle | preempt | errors | outside p90 ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        if r.workload != workload:
            continue
        client = (
            f"{_ms(r.client_ttft_p50_ms)} / {_ms(r.client_ttft_p90_ms)} / "
            f"{_ms(r.client_ttft_p99_ms)}"
            if r.client_ttft_p90_ms
            else "-"
        )
        lines.append(
            f"| {r.profile} | {r.rate:g} | {r.competitor} | {_ms(r.ttft_p50_ms)} / "
            f"{_ms(r.ttft_p90_ms)} / {_ms(r.ttft_p99_ms)} | {client} "
            f"| {r.output_tokens_per_s:,.0f} | {_pct(r.hit_rate)} "
            f"| {_pct(r.oracle_hit_rate)} | {r.preemptions} | {r.errors} "
            f"| {r.outside_p90_ms:.1f} |"
        )
    return lines


def _client_or_engine(r: RunResult) -> tuple[float, float]:
    """p90 and p99 TTFT as the client saw it (streamed runs), else the engine's."""
    if r.client_ttft_p90_ms:
        return r.client_ttft_p90_ms, r.client_ttft_p99_ms
    return r.ttft_p90_ms, r.ttft_p99_ms


def fleet_table(report: RoutingReport) -> list[str]:
    """Per fleet, workload and rate: the default strategy's p90 and p99 TTFT over the best
    peer's (each percentile's best, which may be two different peers) and over round-robin's;
    below 1 is better. `met`: no worse than round-robin and at most 5% behind the best peer on
    both (the issue's bar for every cell). `engine`: the same ratio to the best peer on the
    engines' own TTFT, without the routing path's time: the decisions alone."""
    lines = [
        f"| fleet | workload | rate | {SUBJECT} p90 / p99 ms | best peer p90 / p99 ms "
        f"| {SUBJECT} / best peer p90 / p99 | {SUBJECT} / {BASELINE} p90 / p99 | met "
        "| engine: / best peer p90 / p99 |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    cells = dict.fromkeys((r.profile, r.workload, r.rate) for r in report.results)
    for profile, workload, rate in cells:
        here = [
            r
            for r in report.results
            if (r.profile, r.workload, r.rate) == (profile, workload, rate)
        ]
        subject = next((r for r in here if r.competitor == SUBJECT), None)
        peers = [r for r in here if r.competitor.startswith(PEER_PREFIXES)]
        base = next((r for r in here if r.competitor == BASELINE), None)
        if subject is None or not peers:
            continue
        p90, p99 = _client_or_engine(subject)
        best90 = min(_client_or_engine(r)[0] for r in peers)
        best99 = min(_client_or_engine(r)[1] for r in peers)
        vs_peer = (_ratio(p90, best90), _ratio(p99, best99))
        vs_base = (
            (_ratio(p90, _client_or_engine(base)[0]), _ratio(p99, _client_or_engine(base)[1]))
            if base is not None
            else (float("nan"), float("nan"))
        )
        met = all(v <= 1.05 for v in vs_peer) and all(math.isnan(v) or v <= 1.0 for v in vs_base)
        engine = (
            _ratio(subject.ttft_p90_ms, min(r.ttft_p90_ms for r in peers)),
            _ratio(subject.ttft_p99_ms, min(r.ttft_p99_ms for r in peers)),
        )
        lines.append(
            f"| {profile} | {workload} | {rate:g} | {_ms(p90)} / {_ms(p99)} "
            f"| {_ms(best90)} / {_ms(best99)} | {vs_peer[0]:.2f} / {vs_peer[1]:.2f} "
            f"| {vs_base[0]:.2f} / {vs_base[1]:.2f} | {'yes' if met else '**no**'} "
            f"| {engine[0]:.2f} / {engine[1]:.2f} |"
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
        f"One simulated fleet of {o.pods} servers per profile ("
        + ", ".join(f"`{p}`" for p in o.profiles)
        + f"; rates are for `{PROFILE}`, scaled by each profile's prefill speed; {o.model}) at "
        f"speed {o.speed:g}, "
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
    lines += ["### Every fleet: the default against the best peer", "", *fleet_table(report), ""]
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
    lines += ["", "Every fleet: the default against the best peer", *fleet_table(report)]
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
        # One fleet per plot: the first profile's (the fleet table compares them all).
        first = report.options.profiles[0]
        runs = [r for r in report.results if r.workload == info.name and r.profile == first]
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
