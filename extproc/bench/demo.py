"""`extproc demo`: a simulated vLLM fleet, the picker and the real Envoy, one workload per strategy.

What runs, all on 127.0.0.1 and each as its own process, stopped by PID at the end (also on
Ctrl-C, SIGTERM or an error):

    client (this process) --HTTP--> Envoy --HTTP--> simulated vLLM pods (`extproc sim`)
                                      |
                                      +--ext_proc gRPC--> picker (`extproc serve`)

The same shared-prefix chat workload (fixed seed, Poisson arrivals, streaming) is sent once per
strategy in `STRATEGIES`, choosing the strategy per request with the `x-routing-strategy` header.
The fleet and the picker are restarted before each strategy so every strategy starts with empty
prefix caches and a picker that has learned nothing; Envoy stays up. TTFT is measured in the
client; the spread over pods and the prefix-cache hit rate come from the simulator's own vLLM
metrics. The report is printed and written as markdown and JSON.

Processes and the picker come from `extproc.bench.processes` and `extproc.bench.harness`, quantiles
from `extproc.bench.loadgen`, Envoy from `extproc.bench.envoy`; the options and workload from
`demo_plan`, the report from `demo_report`. This module runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.bench import loadgen
from extproc.bench.demo_plan import (
    DEFAULT_OUTPUT,
    PROFILE,
    STRATEGIES,
    STRATEGY_HEADER,
    DemoOptions,
    PlannedRequest,
    build_workload,
)
from extproc.bench.demo_report import (
    DemoReport,
    Outcome,
    PodCounters,
    Ports,
    StrategyResult,
    render_text,
    write_report,
)
from extproc.bench.envoy import running_envoy
from extproc.bench.envoy_config import EnvoyError, render_bootstrap
from extproc.bench.harness import Progress, loopback_endpoints, run_each, start_picker
from extproc.bench.processes import (
    PICKER_PREFIX,
    free_port_range,
    free_ports,
    picker_argv,
    process,
    run_stoppable,
)
from extproc.sim.fleet import READY_LINE

# request_success_total has a series per finished_reason, abort and error included (as in vLLM);
# those requests did not succeed.
_NOT_SUCCESS: Final = frozenset({"abort", "error"})


class DemoError(RuntimeError):
    """A part of the demo did not start or did not answer; the message says which and why."""


# --- running the processes --------------------------------------------------------------------


def _python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc.cli", *args]


def _sim_argv(options: DemoOptions, ports: Ports) -> list[str]:
    return _python_cli(
        "sim",
        *("--pods", str(options.pods), "--port", str(ports.sim), "--profile", PROFILE),
        *("--speed", f"{options.speed:g}", "--model", options.model, "--seed", str(options.seed)),
        *("--log-level", "WARNING"),
    )


def _shown(argv: Sequence[str]) -> str:
    """The command as a person would type it."""
    return " ".join(["extproc", *argv[3:]])


@contextlib.contextmanager
def _fleet_and_picker(options: DemoOptions, ports: Ports, *, picker_config: Path) -> Iterator[None]:
    """A fresh fleet and a fresh picker on the given ports; both stopped by PID on exit."""
    sim_argv = _sim_argv(options, ports)
    argv = picker_argv(
        picker_config,
        loopback_endpoints(ports.sim, options.pods),
        grpc=ports.grpc,
        health=ports.health,
        metrics=ports.metrics,
    )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(process(sim_argv, ready_line=READY_LINE))
        except RuntimeError as exc:
            last = ports.sim + options.pods - 1
            raise DemoError(
                f"the simulated fleet did not start on ports {ports.sim}-{last}; "
                f"run `{_shown(sim_argv)}` to see why"
            ) from exc
        start_picker(
            stack,
            argv,
            grpc=ports.grpc,
            metrics=ports.metrics,
            endpoints=options.pods,
            error=lambda why: DemoError(f"{why}; run `{_shown(argv)}` to see why"),
        )
        yield


# --- the workload -----------------------------------------------------------------------------


async def _send(
    session: aiohttp.ClientSession, url: str, *, request: PlannedRequest, strategy: str
) -> Outcome:
    headers = {"content-type": "application/json", STRATEGY_HEADER: strategy}
    started = time.perf_counter()
    ttft = float("nan")
    usage: dict[str, Any] | None = None
    try:
        async with session.post(url, data=request.body, headers=headers) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                return Outcome(False, ttft, 0, 0, f"HTTP {response.status} {text}".strip())
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                # TTFT ends at the first token, not at the role-only chunk that precedes it.
                if math.isnan(ttft) and any(
                    c.get("delta", {}).get("content") for c in chunk.get("choices", ())
                ):
                    ttft = time.perf_counter() - started
                usage = chunk.get("usage") or usage
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Outcome(False, ttft, 0, 0, f"{type(exc).__name__}: {exc}")
    if usage is None or math.isnan(ttft):
        return Outcome(False, ttft, 0, 0, "stream ended without tokens or usage")
    return Outcome(True, ttft, int(usage["completion_tokens"]), int(usage["prompt_tokens"]))


async def _scrape(session: aiohttp.ClientSession, ports: Ports, *, pods: int) -> list[PodCounters]:
    counters = []
    for address in loopback_endpoints(ports.sim, pods):
        try:
            async with session.get(f"http://{address}/metrics") as response:
                response.raise_for_status()
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DemoError(f"could not read the metrics of the pod at {address}: {exc}") from exc
        values = {"success": 0.0, "queries": 0.0, "hits": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vllm:request_success_total":
                    if sample.labels.get("finished_reason") not in _NOT_SUCCESS:
                        values["success"] += sample.value
                elif sample.name == "vllm:prefix_cache_queries_total":
                    values["queries"] += sample.value
                elif sample.name == "vllm:prefix_cache_hits_total":
                    values["hits"] += sample.value
        counters.append(PodCounters(values["success"], values["queries"], values["hits"]))
    return counters


async def _run_workload(
    options: DemoOptions, ports: Ports, *, workload: Sequence[PlannedRequest], strategy: str
) -> StrategyResult:
    url = f"http://127.0.0.1:{ports.envoy}/v1/chat/completions"
    async with loadgen.new_session() as session:
        before = await _scrape(session, ports, pods=options.pods)
        tasks = []
        start = time.perf_counter()
        for request in workload:
            # Open loop: send on schedule whether or not earlier requests have returned.
            delay = start + request.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(_send(session, url, request=request, strategy=strategy))
            )
        outcomes = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
        after = await _scrape(session, ports, pods=options.pods)
    return _summarize(
        strategy, options, outcomes=outcomes, before=before, after=after, seconds=seconds
    )


def _summarize(
    strategy: str,
    options: DemoOptions,
    *,
    outcomes: Sequence[Outcome],
    before: Sequence[PodCounters],
    after: Sequence[PodCounters],
    seconds: float,
) -> StrategyResult:
    ok = [o for o in outcomes if o.ok]
    ttfts = sorted(o.ttft for o in ok)
    p50, p90 = 1000 * loadgen.quantile(ttfts, 0.5), 1000 * loadgen.quantile(ttfts, 0.9)
    queries = sum(a.cache_queries - b.cache_queries for a, b in zip(after, before, strict=True))
    hits = sum(a.cache_hits - b.cache_hits for a, b in zip(after, before, strict=True))
    output_tokens = sum(o.output_tokens for o in ok)
    return StrategyResult(
        strategy=strategy,
        sent=len(outcomes),
        ok=len(ok),
        errors=len(outcomes) - len(ok),
        per_pod=tuple(round(a.succeeded - b.succeeded) for a, b in zip(after, before, strict=True)),
        ttft_p50_ms=p50,
        ttft_p90_ms=p90,
        ttft_p50_sim_ms=p50 * options.speed,
        ttft_p90_sim_ms=p90 * options.speed,
        output_tokens=output_tokens,
        seconds=seconds,
        output_tokens_per_s=output_tokens / (seconds * options.speed) if seconds > 0 else 0.0,
        hit_rate=hits / queries if queries > 0 else 0.0,
        prompt_tokens_mean=sum(o.prompt_tokens for o in ok) / len(ok) if ok else 0.0,
        first_error=next((o.error for o in outcomes if not o.ok), ""),
    )


def run_demo(options: DemoOptions, *, progress: bool = True) -> DemoReport:
    started = time.monotonic()
    grpc_port, health, metrics, envoy_port, admin = free_ports(5)
    ports = Ports(
        sim=free_port_range(options.pods, avoid=(grpc_port, health, metrics, envoy_port, admin)),
        grpc=grpc_port,
        health=health,
        metrics=metrics,
        envoy=envoy_port,
        admin=admin,
    )
    endpoints = loopback_endpoints(ports.sim, options.pods)
    workload = build_workload(options)

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    bootstrap = render_bootstrap(
        port=ports.envoy,
        extproc=f"127.0.0.1:{ports.grpc}",
        endpoints=endpoints,
        admin_port=ports.admin,
        listen_host="127.0.0.1",
        access_log=False,
    )
    options.output.mkdir(parents=True, exist_ok=True)
    say(f"extproc demo: starting Envoy on :{ports.envoy} (log: {options.output / 'envoy.log'})")
    with (
        (options.output / "envoy.log").open("w") as envoy_log,
        running_envoy(
            bootstrap,
            admin_port=ports.admin,
            concurrency=1,
            stdout=subprocess.DEVNULL,
            stderr=envoy_log,
        ),
    ):
        # On SIGTERM the picker waits up to shutdown_grace_seconds (5 s) for open ext_proc
        # streams, and Envoy can keep a finished request's stream open for seconds (seen with
        # the observability-mode response filter: every stream still open 1 s after the run).
        # Between strategies nothing is in flight, so the demo's picker stops at once.
        picker_config = options.output / "picker.yaml"
        picker = {
            "server": {"shutdown_grace_seconds": 0, "drain_delay_seconds": 0},
            "prefix": dict(PICKER_PREFIX),
        }
        picker_config.write_text(yaml.safe_dump(picker, sort_keys=False))

        def one(strategy: str, _: Progress) -> StrategyResult:
            with _fleet_and_picker(options, ports, picker_config=picker_config):
                return asyncio.run(
                    _run_workload(options, ports, workload=workload, strategy=strategy)
                )

        results = run_each(
            STRATEGIES,
            run=one,
            label=lambda strategy: (
                f"extproc demo: {strategy}: a fresh fleet ({options.pods} pods from "
                f":{ports.sim}) and picker (:{ports.grpc}); {len(workload)} requests over "
                f"~{workload[-1].at:.0f} s"
            ),
            summary=lambda r: (
                f"TTFT p90 {r.ttft_p90_sim_ms:.0f} ms, prefix-cache hits {100 * r.hit_rate:.0f}%"
                + (f", {r.errors} failed" if r.errors else "")
            ),
            progress=progress,
        )
    return DemoReport(
        options=options,
        ports=ports,
        results=tuple(results),
        seconds=time.monotonic() - started,
    )


# --- the sub-command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoOptions()
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests: under a minute in all (tests, CI)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where demo.md and demo.json go (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--pods", type=int, default=defaults.pods, help=f"simulated pods ({defaults.pods})"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=defaults.speed,
        help=f"simulated time runs this many times faster than the wall clock ({defaults.speed:g})",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="workload and simulator seed"
    )


def run(args: argparse.Namespace) -> int:
    try:
        options = DemoOptions.from_args(args)
    except ValueError as exc:
        print(f"extproc demo: {exc}", file=sys.stderr)
        return 2
    report = run_stoppable(
        "extproc demo", lambda: run_demo(options), (DemoError, EnvoyError, OSError)
    )
    if isinstance(report, int):
        return report
    markdown, data = write_report(report)
    print(render_text(report))
    print(f"\nReport: {markdown} and {data} ({report.seconds:.0f} s in all)")
    failed = sum(r.errors for r in report.results)
    if failed:
        print(f"extproc demo: {failed} requests failed (first errors above)", file=sys.stderr)
        return 1
    return 0
