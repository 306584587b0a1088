"""`extproc bench scrape`: what scraping vLLM metrics costs the picker, and how old its data is.

Metrics-only servers (aiohttp, each port serving the same realistic vLLM `/metrics` page, about
40 KB with histograms, captured from the simulator with LoRA on and some finished requests) run
in ONE separate process; the `MetricsCollector` runs in this process, on uvloop as the picker
does, with its Prometheus metrics on. Per scenario (endpoints x interval):

- collector CPU: this process's user+system CPU time over the measured window / wall time
  (`resource.getrusage`), and per successful scrape; the servers' CPU from /proc for context;
- snapshot age at random instants (exponential gaps, a sampler task on the same loop, so it
  sees what a request handler on that loop would): now - the oldest last-good read among all
  endpoints (the snapshot's age), and now - the read of one endpoint picked at random;
- rounds published per second against the target, and failed scrapes.

Also the two parsers (`parse_vllm_metrics` and the prometheus-client reference) on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from prometheus_client import CollectorRegistry

from extproc.bench.processes import cpu_seconds
from extproc.state.collector import CollectedState, CollectorMetrics, MetricsCollector
from extproc.state.metrics_text import parse_vllm_metrics, parse_vllm_metrics_reference

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Scenario:
    endpoints: int
    interval: float
    seconds: float

    @property
    def name(self) -> str:
        return f"{self.endpoints} endpoints @ {self.interval * 1000:g} ms"


@dataclass(frozen=True, slots=True)
class ScrapeOptions:
    scenarios: tuple[Scenario, ...] = (Scenario(1000, 1.0, 30.0), Scenario(100, 0.05, 20.0))
    samples_per_second: float = 100.0  # snapshot-age sampling rate
    output: Path = Path("reports")

    @classmethod
    def quick(cls, output: Path) -> ScrapeOptions:
        return cls(scenarios=(Scenario(1000, 1.0, 8.0), Scenario(100, 0.05, 5.0)), output=output)


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    scenario: Scenario
    wall_seconds: float
    rounds_per_second: float
    scrapes_ok: int
    scrape_errors: int
    errors_by_reason: dict[str, int]
    collector_cpu_cores: float
    cpu_us_per_scrape: float
    servers_cpu_cores: float
    samples: int
    snapshot_age_p50: float
    snapshot_age_p99: float
    endpoint_age_p50: float
    endpoint_age_p99: float


@dataclass(frozen=True, slots=True)
class ParserTimes:
    page_bytes: int
    page_lines: int
    fast_us: float
    reference_us: float


@dataclass(slots=True)
class ScrapeReport:
    options: ScrapeOptions
    parsers: ParserTimes
    results: list[ScenarioResult] = field(default_factory=list)

    def table(self) -> str:
        p = self.parsers
        rows = [
            f"metrics page: {p.page_bytes} bytes, {p.page_lines} lines; parse per scrape: "
            f"fast {p.fast_us:.1f} us, prometheus-client {p.reference_us:.0f} us",
            "",
            "| scenario | rounds/s (target) | scrapes ok | errors | collector CPU (cores) "
            "| CPU us/scrape | servers CPU (cores) | snapshot age p50 / p99 ms "
            "| one endpoint's age p50 / p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.results:
            s = r.scenario
            rows.append(
                f"| {s.name} | {r.rounds_per_second:.2f} ({1 / s.interval:g}) | {r.scrapes_ok} "
                f"| {r.scrape_errors}{_reasons(r.errors_by_reason)} "
                f"| {r.collector_cpu_cores:.3f} | {r.cpu_us_per_scrape:.0f} "
                f"| {r.servers_cpu_cores:.3f} "
                f"| {r.snapshot_age_p50 * 1000:.0f} / {r.snapshot_age_p99 * 1000:.0f} "
                f"| {r.endpoint_age_p50 * 1000:.0f} / {r.endpoint_age_p99 * 1000:.0f} |"
            )
        return "\n".join(rows)


def _reasons(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{r} {n}' for r, n in counts.items())})" if counts else ""


# -- the page and the parsers ----------------------------------------------------------------


async def capture_sim_page() -> bytes:
    """A realistic page: the simulator's /metrics after a few requests, LoRA on."""
    from extproc.sim import SimConfig, SimFleet

    config = SimConfig(
        tokenizer="bytes",
        speed=20,
        enable_lora=True,
        max_loras=2,
        lora_modules=(("sql-lora", "/adapters/sql"), ("chat-lora", "/adapters/chat")),
    )
    models = [config.model, "sql-lora", "chat-lora"]
    async with SimFleet(config) as fleet, aiohttp.ClientSession() as http:
        url = fleet.urls[0]

        async def one(i: int) -> None:
            body = {"model": models[i % 3], "prompt": f"{i} " + "x" * (50 * i), "max_tokens": 16}
            async with http.post(f"{url}/v1/completions", json=body) as response:
                await response.read()

        await asyncio.gather(*(one(i) for i in range(30)))
        async with http.get(f"{url}/metrics") as response:
            return await response.read()


def time_parsers(page: bytes, *, seconds: float = 1.0) -> ParserTimes:
    """Microseconds per parse of `page`, each parser run for about `seconds`."""

    def per_call(parse: object) -> float:
        assert callable(parse)
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(10):
                parse(page, read_at=0.0)
            calls += 10
        return elapsed / calls * 1e6

    assert parse_vllm_metrics(page, read_at=0.0) == parse_vllm_metrics_reference(page, read_at=0.0)
    return ParserTimes(
        page_bytes=len(page),
        page_lines=page.count(b"\n"),
        fast_us=per_call(parse_vllm_metrics),
        reference_us=per_call(parse_vllm_metrics_reference),
    )


# -- the metrics-only servers (a child process) ----------------------------------------------


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(page: bytes, count: int) -> None:
    import socket

    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(count):
        # Bound here and reported back: no window in which another process takes the port.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        await web.SockSite(runner, sock).start()
        ports.append(sock.getsockname()[1])
    print("ready " + json.dumps(ports), flush=True)
    await asyncio.Event().wait()


def serve_main(argv: list[str]) -> None:
    """`python -m extproc.bench.scrape PAGE_FILE COUNT`: COUNT ports serving PAGE_FILE."""
    _raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        _run(_serve(Path(argv[0]).read_bytes(), int(argv[1])))


@contextlib.contextmanager
def metrics_servers(page: bytes, count: int) -> Iterator[tuple[int, list[int]]]:
    """(pid, ports) of a child process serving `page` on `count` ports; stopped by PID."""
    with tempfile.NamedTemporaryFile(suffix=".prom") as page_file:
        page_file.write(page)
        page_file.flush()
        child = subprocess.Popen(
            [sys.executable, "-m", "extproc.bench.scrape", page_file.name, str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.startswith("ready "):
                raise RuntimeError(f"metrics servers did not start: {line!r}")
            yield child.pid, json.loads(line.removeprefix("ready "))
        finally:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one scenario ----------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(
    scenario: Scenario, ports: list[int], server_pid: int, *, samples_per_second: float
) -> ScenarioResult:
    addresses = [f"127.0.0.1:{p}" for p in ports[: scenario.endpoints]]
    registry = CollectorRegistry()
    latest: list[CollectedState] = []
    oldest: list[float] = [0.0]  # the current state's oldest read, computed once per round

    def publish(state: CollectedState) -> None:
        latest[:] = [state]
        read = state.oldest_read_at()
        oldest[0] = read if read is not None else float("-inf")

    collector = MetricsCollector(
        publish, interval=scenario.interval, metrics=CollectorMetrics(registry)
    )
    collector.set_endpoints(addresses)
    # One kept-alive connection per endpoint (see the collector's docstring).
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        task = asyncio.create_task(collector.run(session))
        try:
            # Warm up: every endpoint read once (connections open) and two more rounds.
            for _ in range(int(60 / scenario.interval)):
                if latest and all(r.stats for r in latest[0].endpoints.values()):
                    break
                await asyncio.sleep(scenario.interval)
            warm_round = latest[0].round if latest else 0
            for _ in range(1000):
                if latest and latest[0].round >= warm_round + 2:
                    break
                await asyncio.sleep(scenario.interval / 4)

            def counted(name: str, reason: str | None = None) -> float:
                return sum(
                    s.value
                    for metric in registry.collect()
                    for s in metric.samples
                    if s.name == name and reason in (None, s.labels.get("reason"))
                )

            reasons = ("timeout", "connection", "http_status", "parse", "other")
            by_reason0 = {r: counted("extproc_scrape_errors_total", r) for r in reasons}

            ok0 = counted("extproc_scrape_duration_seconds_count")
            errors0 = counted("extproc_scrape_errors_total")
            round0 = latest[0].round
            cpu0, server0 = _own_cpu_seconds(), cpu_seconds(server_pid)
            loop = asyncio.get_running_loop()
            wall0 = loop.time()
            snapshot_ages: list[float] = []
            endpoint_ages: list[float] = []
            rng = random.Random(1)
            while (now := loop.time()) - wall0 < scenario.seconds:
                snapshot_ages.append(now - oldest[0])
                reading = latest[0].endpoints[rng.choice(addresses)]
                if reading.stats is not None:
                    endpoint_ages.append(now - reading.stats.read_at)
                await asyncio.sleep(rng.expovariate(samples_per_second))
            wall = loop.time() - wall0
            cpu = _own_cpu_seconds() - cpu0
            server_cpu = cpu_seconds(server_pid) - server0
            rounds = latest[0].round - round0
            ok = counted("extproc_scrape_duration_seconds_count") - ok0
            errors = counted("extproc_scrape_errors_total") - errors0
            by_reason = {
                r: int(counted("extproc_scrape_errors_total", r) - by_reason0[r]) for r in reasons
            }
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return ScenarioResult(
        scenario=scenario,
        wall_seconds=wall,
        rounds_per_second=rounds / wall,
        scrapes_ok=int(ok),
        scrape_errors=int(errors),
        errors_by_reason={r: n for r, n in by_reason.items() if n},
        collector_cpu_cores=cpu / wall,
        cpu_us_per_scrape=cpu / ok * 1e6 if ok else float("nan"),
        servers_cpu_cores=server_cpu / wall,
        samples=len(snapshot_ages),
        snapshot_age_p50=statistics.median(snapshot_ages),
        snapshot_age_p99=_percentile(snapshot_ages, 0.99),
        endpoint_age_p50=statistics.median(endpoint_ages),
        endpoint_age_p99=_percentile(endpoint_ages, 0.99),
    )


def run_scrape(options: ScrapeOptions) -> ScrapeReport:
    _raise_fd_limit()
    page = _run(capture_sim_page())
    report = ScrapeReport(options=options, parsers=time_parsers(page))
    count = max(s.endpoints for s in options.scenarios)
    with metrics_servers(page, count) as (pid, ports):
        for scenario in options.scenarios:
            print(f"  {scenario.name} for {scenario.seconds:g} s ...", flush=True)
            result = _run(
                measure(scenario, ports, pid, samples_per_second=options.samples_per_second)
            )
            report.results.append(result)
    return report


def write_report(report: ScrapeReport, output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / "scrape.md"
    raw = {
        "options": asdict(report.options),
        "parsers": asdict(report.parsers),
        "results": [asdict(r) for r in report.results],
    }
    path.write_text(
        "# Scrape load (`extproc bench scrape`)\n\n"
        f"Machine: {os.cpu_count()} cores; collector on uvloop in the benchmark process, "
        "metrics-only aiohttp servers in one child process.\n\n"
        f"{report.table()}\n\n"
        "Snapshot age: now minus the oldest last-good read among all endpoints, sampled at "
        "random instants on the collector's event loop. CPU: process user+system time over "
        "the measured window (after warm-up) divided by wall time.\n\n"
        f"```json\n{json.dumps(raw, indent=2, default=str)}\n```\n"
    )
    return path


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it imports, as `extproc serve` does."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


if __name__ == "__main__":
    serve_main(sys.argv[1:])
