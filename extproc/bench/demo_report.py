"""`extproc demo`'s results and its report: one record per strategy, printed as text and written
as markdown and JSON. Pure functions of a `DemoReport`, except `write_report` (files).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from extproc.bench.demo_plan import (
    CONCENTRATION_REASONS,
    PROFILE,
    STRATEGIES,
    STRATEGY_HEADER,
    STRATEGY_SUMMARIES,
    DemoOptions,
)
from extproc.bench.harness import loopback_endpoints
from extproc.sim.profiles import get_profile

# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request as the client saw it."""

    ok: bool
    ttft: float  # seconds to the first chunk with content; nan when there was none
    output_tokens: int
    prompt_tokens: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class PodCounters:
    """One pod's vLLM counters at a moment (tokens for the prefix cache)."""

    succeeded: float
    cache_queries: float
    cache_hits: float


@dataclass(frozen=True, slots=True)
class StrategyResult:
    strategy: str
    sent: int
    ok: int
    errors: int
    per_pod: tuple[int, ...]  # requests each pod finished; pod i listens on the sim port + i
    ttft_p50_ms: float  # client-side, wall clock
    ttft_p90_ms: float
    ttft_p50_sim_ms: float  # the same x speed: what a real fleet's clients would see
    ttft_p90_sim_ms: float
    output_tokens: int
    seconds: float  # wall clock from the first request sent to the last answer
    output_tokens_per_s: float  # per simulated second
    hit_rate: float  # fleet prefix-cache hits / queries over the run, from the pods' metrics
    prompt_tokens_mean: float
    first_error: str


@dataclass(frozen=True, slots=True)
class Ports:
    sim: int  # first pod; pod i listens on sim + i
    grpc: int
    health: int
    metrics: int
    envoy: int
    admin: int


@dataclass(frozen=True, slots=True)
class DemoReport:
    options: DemoOptions
    ports: Ports
    results: tuple[StrategyResult, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"]["output"] = str(self.options.output)
        data["strategies"] = list(STRATEGIES)
        data["endpoints"] = list(loopback_endpoints(self.ports.sim, self.options.pods))
        data["routing"] = _routing(self.results)
        data["in_short"] = _in_short(self.results)
        data["where_to_look_next"] = [
            f"{what.replace('`', '')}: {why}" for what, why in _next_steps(self.ports)
        ]
        return data


# --- the report -------------------------------------------------------------------------------


def _next_steps(ports: Ports) -> list[tuple[str, str]]:
    return [
        ("`README.md`", "what the picker is; its quick start keeps these processes up"),
        ("`docs/architecture.md`", "the path of a request through the picker, module by module"),
        ("`docs/benchmarks.md`", "what we measured, and the commands that reproduce it"),
        ("`extproc bench overhead`", "the latency the picker adds, measured beside Envoy alone"),
        (
            "`docs/deploy.md`",
            "the same picture on Kubernetes: manifests/ with Envoy Gateway, Gateway API "
            "InferencePools or a plain Envoy ingress, and a real vLLM fleet",
        ),
        ("`docs/observability.md`", "the Grafana dashboard and the metrics behind it"),
        (
            "Prometheus",
            f"the picker's :{ports.metrics}/metrics (extproc_*) and each pod's "
            f":{ports.sim}/metrics (vllm:*), while they run",
        ),
    ]


def _what_ran(report: DemoReport) -> list[tuple[str, str]]:
    o, p = report.options, report.ports
    return [
        (
            "fleet",
            f"`extproc sim --pods {o.pods} --profile {PROFILE} --speed {o.speed:g}` on ports "
            f"{p.sim}-{p.sim + o.pods - 1}: {o.model}, each pod a simulated "
            f"{get_profile(PROFILE).description}",
        ),
        (
            "picker",
            f"`extproc serve --endpoints <the {o.pods} pods>`: ext_proc :{p.grpc}, "
            f"gRPC health :{p.health}, Prometheus :{p.metrics}",
        ),
        (
            "Envoy",
            f"listener :{p.envoy}, admin :{p.admin}; its ext_proc filter asks the picker which "
            "pod serves each request",
        ),
        (
            "cold",
            "the fleet and the picker are restarted before each strategy (empty caches)",
        ),
    ]


def _workload(report: DemoReport) -> str:
    o = report.options
    prompt = max((r.prompt_tokens_mean for r in report.results), default=0.0)
    wall = f" ({o.wall_rate:g}/s wall clock)" if o.speed != 1 else ""
    return (
        f"{o.requests} streaming chat requests, the same for every strategy (seed {o.seed}): "
        f"{o.groups} system prompts of about {prompt:,.0f} tokens with {o.questions} questions "
        f"each, {o.max_tokens[0]}-{o.max_tokens[1]} output tokens, Poisson arrivals at "
        f"{o.rate:g} requests per simulated second{wall}, the strategy named per request in "
        f"the header `{STRATEGY_HEADER}`"
    )


def _legend(speed: float) -> str:
    clock = (
        "wall clock = simulated time at speed 1"
        if speed == 1
        else f"simulated ms = wall clock x speed {speed:g}, wall-clock ms in brackets"
    )
    return (
        f"TTFT: measured by the client to the first chunk with content ({clock}); tok/s: "
        "output tokens per simulated second; hit rate: prefix-cache hits / queries in tokens, "
        "summed over the pods' vLLM metrics"
    )


def _ttft(r: StrategyResult, speed: float) -> str:
    text = f"{r.ttft_p50_sim_ms:.0f} / {r.ttft_p90_sim_ms:.0f}"
    return text if speed == 1 else f"{text} ({r.ttft_p50_ms:.0f} / {r.ttft_p90_ms:.0f})"


def _comparisons(results: Sequence[StrategyResult]) -> list[str]:
    base = results[0]
    lines = []
    for r in results[1:]:
        ratio = r.ttft_p90_ms / base.ttft_p90_ms if base.ttft_p90_ms > 0 else float("nan")
        lines.append(
            f"{r.strategy}: TTFT p90 {ratio:.2f}x {base.strategy}'s, "
            f"hit rate {100 * (r.hit_rate - base.hit_rate):+.1f} points"
        )
    return lines


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text,
        width=96,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_on_hyphens=False,  # keep model names whole
    )


def _routing(results: Sequence[StrategyResult]) -> list[str]:
    """One line per strategy: what it does and where its requests went."""
    lines = []
    for r in results:
        busiest = max(r.per_pod, default=0) / r.sent if r.sent else 0.0
        what = STRATEGY_SUMMARIES.get(r.strategy, "")
        line = (
            f"{r.strategy}: {what}; requests per pod {' / '.join(map(str, r.per_pod))}, "
            f"the busiest pod took {100 * busiest:.0f}%"
        )
        if busiest > 0.5 and r.strategy in CONCENTRATION_REASONS:
            line += f": {CONCENTRATION_REASONS[r.strategy]}"
        lines.append(line)
    return lines


def _in_short(results: Sequence[StrategyResult]) -> list[str]:
    """The verdict against the first strategy (round-robin), in plain sentences: who gave the
    fastest first tokens, who reused the most cache, and why (or why not this time)."""
    if len(results) < 2:
        return []
    base = results[0]
    fastest = min(results[1:], key=lambda r: r.ttft_p90_sim_ms)
    reuser = max(results[1:], key=lambda r: r.hit_rate)
    lines = []
    faster = fastest.ttft_p90_sim_ms < base.ttft_p90_sim_ms
    if faster:
        speedup = base.ttft_p90_sim_ms / fastest.ttft_p90_sim_ms
        lines.append(
            f"{fastest.strategy} gave the fastest first tokens: p90 "
            f"{fastest.ttft_p90_sim_ms:.0f} ms against {base.ttft_p90_sim_ms:.0f} ms with "
            f"{base.strategy}, {speedup:.1f}x sooner."
        )
    else:
        lines.append(
            f"No strategy beat {base.strategy}'s p90 time to first token "
            f"({base.ttft_p90_sim_ms:.0f} ms) on this run; {fastest.strategy} came closest "
            f"({fastest.ttft_p90_sim_ms:.0f} ms)."
        )
    lines.append(
        f"{reuser.strategy} reused the most: {100 * reuser.hit_rate:.0f}% of prompt tokens were "
        f"already cached on the pod it chose, against {100 * base.hit_rate:.0f}% with "
        f"{base.strategy}."
    )
    if reuser.hit_rate > base.hit_rate:
        if faster:
            lines.append(
                "Why: requests that share a system prompt went where that prompt was already "
                "cached, so those pods skipped most of the prefill; spreading requests blindly "
                "makes every pod compute every prompt."
            )
        else:
            lines.append(
                "Why no faster: at this load the pods are rarely busy, so a cached prompt saves "
                "little time; the saving grows with load and prompt length (the full demo, "
                "docs/benchmarks.md)."
            )
    return lines


def render_text(report: DemoReport) -> str:
    speed = report.options.speed
    lines = ["extproc demo: one workload, routed by each strategy in turn, through the real Envoy"]
    lines += ["", "What ran (all on 127.0.0.1, each process stopped by PID at the end)"]
    for label, text in _what_ran(report):
        lines += _wrap(f"{label:<8}{text.replace('`', '')}", "  ")
    lines += ["", "Workload"]
    lines += _wrap(_workload(report).replace("`", ""), "  ")
    table = [
        ("strategy", "sent", "ok", "errors", "per pod", "TTFT p50 / p90 ms", "tok/s", "hit rate")
    ]
    table += [
        (
            r.strategy,
            str(r.sent),
            str(r.ok),
            str(r.errors),
            " ".join(map(str, r.per_pod)),
            _ttft(r, speed),
            f"{r.output_tokens_per_s:.0f}",
            f"{100 * r.hit_rate:.1f}%",
        )
        for r in report.results
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["", "Results"]
    for row in table:
        cells = [
            cell.ljust(width) if i in (0, 4) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    lines += _wrap(_legend(speed), "  ")
    lines += [
        f"  first error with {r.strategy}: {r.first_error}" for r in report.results if r.errors
    ]
    if len(report.results) > 1:
        lines += ["", f"Compared with {report.results[0].strategy}"]
        lines += [f"  {line}" for line in _comparisons(report.results)]
    lines += ["", "How requests were routed (the picker chose a pod per request, Envoy sent it)"]
    for line in _routing(report.results):
        lines += _wrap(line, "  ")
    verdict = _in_short(report.results)
    if verdict:
        lines += ["", "In short"]
        for line in verdict:
            lines += _wrap(line, "  ")
    lines += ["", "Where to look next"]
    steps = [(what.replace("`", ""), why) for what, why in _next_steps(report.ports)]
    width = max(len(what) for what, _ in steps)
    for what, why in steps:
        lines += _wrap(f"{what:<{width}}  {why}", "  ")
    return "\n".join(lines)


def render_markdown(report: DemoReport) -> str:
    speed = report.options.speed
    lines = ["# extproc demo", "", "One workload, routed by each strategy in turn, through Envoy."]
    lines += ["", "## What ran", ""]
    lines += [f"- {label}: {text}" for label, text in _what_ran(report)]
    lines += ["", "## Workload", "", _workload(report), "", "## Results", ""]
    lines += [
        "| strategy | sent | ok | errors | requests per pod | TTFT p50 / p90 ms | tok/s "
        "| hit rate |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.strategy} | {r.sent} | {r.ok} | {r.errors} | {' / '.join(map(str, r.per_pod))} "
        f"| {_ttft(r, speed)} | {r.output_tokens_per_s:.0f} | {100 * r.hit_rate:.1f}% |"
        for r in report.results
    ]
    lines += ["", _legend(speed) + "."]
    lines += [
        f"\nFirst error with {r.strategy}: `{r.first_error}`" for r in report.results if r.errors
    ]
    if len(report.results) > 1:
        lines += ["", f"## Compared with {report.results[0].strategy}", ""]
        lines += [f"- {line}" for line in _comparisons(report.results)]
    lines += ["", "## How requests were routed", ""]
    lines += [f"- {line}" for line in _routing(report.results)]
    verdict = _in_short(report.results)
    if verdict:
        lines += ["", "## In short", "", " ".join(verdict)]
    lines += ["", "## Where to look next", ""]
    lines += [f"- {what}: {why}" for what, why in _next_steps(report.ports)]
    return "\n".join(lines) + "\n"


def write_report(report: DemoReport) -> tuple[Path, Path]:
    output = report.options.output
    output.mkdir(parents=True, exist_ok=True)
    markdown, data = output / "demo.md", output / "demo.json"
    markdown.write_text(render_markdown(report))
    data.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return markdown, data
