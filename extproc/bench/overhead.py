"""`extproc bench overhead`: what the picker adds to a request, measured beside Envoy alone.

One Envoy process serves two listeners on the same backend pool: one straight to the backends
(Envoy's own round robin), one through the ext_proc filter and the picker. Both paths are driven
in the same run, so the machine's noise hits both, and the report gives the difference:

1. 1 KB bodies, open loop at a fixed rate on both paths at once: added p50/p99.
2. 220 KB bodies at concurrency 20 (the GAIE #2928 case), paths alternated in phases.
3. The highest rate each path holds: closed loop at high concurrency, 1 KB bodies, alternated.

The backends answer at once (`extproc.bench.backend`), so latency is the routing path alone.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.bench import loadgen
from extproc.bench.loadgen import Summary
from extproc.bench.processes import cpu_seconds, free_ports, process, wait_for_port
from extproc.envoy_runner import render_bootstrap, running_envoy

MODEL = "bench-model"


@dataclass(frozen=True, slots=True)
class OverheadOptions:
    rate: float = 200.0
    small_seconds: float = 20.0
    large_concurrency: int = 20
    large_seconds: float = 20.0
    # Service time of the backends in the 220 KB scenario: a short prefill, as in the GAIE #2928
    # measurement against real vLLM (0 makes it a saturation test of the routing path alone).
    large_service_ms: float = 100.0
    peak_concurrency: int = 64
    peak_seconds: float = 10.0
    backends: int = 4
    envoy_concurrency: int = 2
    strategy: str = "least-request"
    output: Path = Path("reports")

    @classmethod
    def quick(cls, output: Path) -> OverheadOptions:
        return cls(small_seconds=5, large_seconds=5, peak_seconds=3, output=output)


@dataclass(frozen=True, slots=True)
class PathResult:
    scenario: str
    path: str  # "envoy" (direct) or "picker"
    summary: Summary


@dataclass(slots=True)
class OverheadReport:
    options: dict[str, Any]
    results: list[PathResult] = field(default_factory=list)
    picker_cpu_ms_per_request: float = float("nan")

    def get(self, scenario: str, path: str) -> Summary:
        return next(r.summary for r in self.results if (r.scenario, r.path) == (scenario, path))

    def table(self) -> str:
        rows = [
            "| scenario | path | requests | errors | p50 ms | p99 ms | req/s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.results:
            s = r.summary
            rows.append(
                f"| {r.scenario} | {r.path} | {s.count} | {s.errors} | {s.p50_ms:.2f} | "
                f"{s.p99_ms:.2f} | {s.rate:.0f} |"
            )
        rate = self.options["rate"]
        service = self.options["large_service_ms"]
        rows += [
            "",
            "| added by the picker | inline (default) | observer | target |",
            "|---|---:|---:|---:|",
        ]
        picked = ("picker", "picker-observer")

        def added(scenario: str, field: str) -> str:
            base = getattr(self.get(scenario, "envoy"), field)
            return " | ".join(
                f"{getattr(self.get(scenario, p), field) - base:.2f} ms" for p in picked
            )

        peak = self.get("1KB peak", "envoy").rate
        rows += [
            f"| 1 KB at {rate:.0f} req/s, p50 | {added('1KB open', 'p50_ms')} | |",
            f"| 1 KB at {rate:.0f} req/s, p99 | {added('1KB open', 'p99_ms')} | <= 3 ms |",
            f"| 220 KB at concurrency 20, {service:g} ms backends, p50 | "
            f"{added('220KB c20', 'p50_ms')} | |",
            f"| 220 KB at concurrency 20, {service:g} ms backends, p99 | "
            f"{added('220KB c20', 'p99_ms')} | <= 20 ms |",
            f"| 220 KB at concurrency 20, instant backends, p99 | "
            f"{added('220KB c20 instant', 'p99_ms')} | |",
            "| peak rate, picker / Envoy alone | "
            + " | ".join(f"{self.get('1KB peak', p).rate / peak:.0%}" for p in picked)
            + " | >= 50% |",
            f"| picker CPU per request (both) | {self.picker_cpu_ms_per_request:.3f} ms | | |",
        ]
        errors = [
            f"{r.scenario}/{r.path}: {dict(r.summary.error_statuses)}"
            for r in self.results
            if r.summary.errors
        ]
        if errors:
            rows += ["", "Errors by HTTP status (0 = connection failed): " + "; ".join(errors)]
        return "\n".join(rows)


def bootstrap_with_direct_listener(
    *,
    picked_port: int,
    direct_port: int,
    observer_port: int,
    extproc: str,
    endpoints: Sequence[str],
    admin_port: int,
) -> str:
    """The bundled bootstrap, plus a listener with the ext_proc filter taken out and one with the
    response observer (`extproc envoy --response-path observer`)."""
    config = yaml.safe_load(
        render_bootstrap(
            port=picked_port,
            extproc=extproc,
            endpoints=endpoints,
            admin_port=admin_port,
            listen_host="127.0.0.1",
            access_log=False,
        )
    )
    listeners = config["static_resources"]["listeners"]
    direct = copy.deepcopy(listeners[0])
    direct["name"] = "direct"
    direct["address"]["socket_address"]["port_value"] = direct_port
    hcm = direct["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "direct"
    hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_proc" not in f["name"]]
    listeners.append(direct)
    # And the response observer (a non-blocking second ext_proc filter on the response path).
    observer_config = yaml.safe_load(
        render_bootstrap(
            port=observer_port,
            extproc=extproc,
            endpoints=endpoints,
            admin_port=admin_port,
            listen_host="127.0.0.1",
            access_log=False,
            response_path="observer",
        )
    )
    observed = observer_config["static_resources"]["listeners"][0]
    observed["name"] = "observer"
    listeners.append(observed)
    return str(yaml.safe_dump(config, sort_keys=False, width=1000))


def request_body(size: int) -> bytes:
    """A completion request of about `size` bytes: a prose prompt padded to length."""
    filler = "The quick brown fox jumps over the lazy dog. "
    head = {"model": MODEL, "max_tokens": 1, "prompt": ""}
    room = size - len(json.dumps(head))
    head["prompt"] = (filler * (room // len(filler) + 1))[:room]
    return json.dumps(head).encode()


async def _measure(
    options: OverheadOptions, urls: dict[str, str], picker_pid: int
) -> OverheadReport:
    report = OverheadReport(
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    )
    headers = {"content-type": "application/json"}
    small, large = request_body(1024), request_body(220 * 1024)
    async with loadgen.new_session() as session:
        # Warm up connections and the picker's first decisions on both paths.
        await loadgen.open_loop(session, urls, small, rate=50, duration=1.0, headers=headers)

        # Each path alone at the fixed rate, in alternating phases, so each sees the load the
        # target names (not the sum of all paths) and drifting background load hits all.
        collected_open: dict[str, list[loadgen.Sample]] = {path: [] for path in urls}
        picker_cpu = 0.0
        for _ in range(2):
            for path, url in urls.items():
                cpu_before = cpu_seconds(picker_pid)
                got = await loadgen.open_loop(
                    session,
                    {path: url},
                    small,
                    rate=options.rate,
                    duration=options.small_seconds / 2,
                    headers=headers,
                )
                if path != "envoy":
                    picker_cpu += cpu_seconds(picker_pid) - cpu_before
                collected_open[path] += got[path]
        picked = sum(len(v) for k, v in collected_open.items() if k != "envoy")
        report.picker_cpu_ms_per_request = 1000 * picker_cpu / max(1, picked)
        for path, path_samples in collected_open.items():
            report.results.append(
                PathResult("1KB open", path, Summary.of(path_samples, options.small_seconds))
            )

        service = {**headers, "x-bench-delay-ms": f"{options.large_service_ms:g}"}
        for scenario, body, concurrency, seconds, scenario_headers in (
            ("220KB c20", large, options.large_concurrency, options.large_seconds, service),
            ("220KB c20 instant", large, options.large_concurrency, options.large_seconds, headers),
            ("1KB peak", small, options.peak_concurrency, options.peak_seconds, headers),
        ):
            collected: dict[str, list[loadgen.Sample]] = {path: [] for path in urls}
            elapsed = dict.fromkeys(urls, 0.0)
            # Alternate the paths in short phases so drifting background load hits both.
            for _ in range(2):
                for path, url in urls.items():
                    samples, took = await loadgen.closed_loop(
                        session,
                        url,
                        body,
                        concurrency=concurrency,
                        duration=seconds / 2,
                        headers=scenario_headers,
                    )
                    collected[path] += samples
                    elapsed[path] += took
            for path in urls:
                report.results.append(
                    PathResult(scenario, path, Summary.of(collected[path], elapsed[path]))
                )
    return report


def run_overhead(options: OverheadOptions) -> OverheadReport:
    backend_ports = free_ports(options.backends)
    grpc_port, health_port, metrics_port, picked, direct, observer, admin = free_ports(7)
    endpoints = [f"127.0.0.1:{p}" for p in backend_ports]
    python = sys.executable
    backend_cmd = [python, "-m", "extproc.bench.backend", MODEL, *map(str, backend_ports)]
    picker_cmd = [
        python,
        "-m",
        "extproc.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--endpoints",
        ",".join(endpoints),
        "--strategy",
        options.strategy,
        "--grpc-port",
        str(grpc_port),
        "--health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "WARNING",
    ]
    bootstrap = bootstrap_with_direct_listener(
        picked_port=picked,
        observer_port=observer,
        direct_port=direct,
        extproc=f"127.0.0.1:{grpc_port}",
        endpoints=endpoints,
        admin_port=admin,
    )
    with process(backend_cmd, ready_line="ready"), process(picker_cmd) as picker:
        wait_for_port(grpc_port)
        with running_envoy(bootstrap, admin_port=admin, concurrency=options.envoy_concurrency):
            urls = {
                "envoy": f"http://127.0.0.1:{direct}/v1/completions",
                "picker": f"http://127.0.0.1:{picked}/v1/completions",
                "picker-observer": f"http://127.0.0.1:{observer}/v1/completions",
            }
            return asyncio.run(_measure(options, urls, picker.pid))


def write_report(report: OverheadReport, output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / "overhead.md"
    path.write_text(
        f"# extproc bench overhead\n\nOptions: `{json.dumps(report.options)}`\n\n{report.table()}\n"
    )
    (output / "overhead.json").write_text(
        json.dumps(
            {
                "options": report.options,
                "picker_cpu_ms_per_request": report.picker_cpu_ms_per_request,
                "results": [
                    {"scenario": r.scenario, "path": r.path, **asdict(r.summary)}
                    for r in report.results
                ],
            },
            indent=2,
        )
    )
    return path
