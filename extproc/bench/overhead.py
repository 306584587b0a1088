"""`extproc bench overhead`: what the picker adds to a request, measured beside Envoy alone.

One Envoy process serves one listener straight to the backend pool and one per picker path
through the ext_proc filter and the picker: a response path (`envoy_config.ResponsePath`: how
the picker learns about responses) in the bundled body mode or, named `<path>-<body mode>`, in
another (`envoy_config.BodyMode`: how the request body reaches the picker). All paths are
driven in the same run, in alternating phases, so the machine's noise hits all of them, and the
report gives the differences:

1. 1 KB bodies, open loop at a fixed rate: added p50/p99, picker CPU per request.
2. 220 KB bodies at concurrency 20 (the GAIE #2928 case).
3. The highest rate each path holds: closed loop at high concurrency, 1 KB bodies.
4. Streamed responses (vLLM's SSE, one event per token) of 1, 100 and 1,000 tokens at a
   moderate concurrency: added TTFT and total time, and the picker's and Envoy's CPU per request
   and per token, read from /proc before and after each phase.

Scenarios 1-3 are the "one-chunk" ones: the backends (`extproc.bench.backend`) answer at once
with a single body. In 4 they stream at a fixed token rate, so a response's cost in each process
grows with its length only if that process handles every chunk.

Long (about 740 lines): its scenarios share one set of options, processes and tables;
splitting them would only spread that shared state over several files.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import aiohttp
import yaml

from extproc.bench import loadgen
from extproc.bench.envoy import running_envoy
from extproc.bench.envoy_config import ResponsePath, render_bootstrap
from extproc.bench.loadgen import Summary, quantile
from extproc.bench.processes import (
    cpu_seconds,
    free_port_range,
    free_ports,
    process,
    wait_for_port,
)
from extproc.config import BodyMode

MODEL = "bench-model"
ENVOY = "envoy"
# Every response path this Envoy config knows, read from the type so the bench follows it as
# paths are added; the defaults are render_bootstrap's.
RESPONSE_PATHS: tuple[str, ...] = tuple(get_args(ResponsePath))
_DEFAULTS = inspect.signature(render_bootstrap).parameters
DEFAULT_RESPONSE_PATH: str = _DEFAULTS["response_path"].default
DEFAULT_BODY_MODE: str = _DEFAULTS["body_mode"].default
BODY_MODES: tuple[str, ...] = tuple(get_args(BodyMode))
# Each response path in the default body mode, and the default one in the other body modes as
# well: the body mode decides the request side's messages (docs/envoy.md, "Body modes").
PICKER_PATHS: tuple[str, ...] = (
    *RESPONSE_PATHS,
    *(f"{DEFAULT_RESPONSE_PATH}-{mode}" for mode in BODY_MODES if mode != DEFAULT_BODY_MODE),
)
Scenarios = Literal["all", "one-chunk", "streamed"]
# The targets (issue 19).
STREAM_CPU_RATIO_TARGET = 1.5  # picker CPU, longest streamed response / shortest
CPU_PER_1KB_REQUEST_TARGET_MS = 0.7
# After a phase, the picker's CPU is read once an interval this long passes with (almost) none
# used, within _QUIET_WITHIN_SECONDS: the "ended" path's usage arrives by the gRPC access log
# 1-4 ms after the response, and the observer's messages may be queued well past the phase.
_SETTLE_SECONDS = 0.3
_QUIET_WITHIN_SECONDS = 6.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Envoy's deferred close of observability-mode ext_proc streams (5 s), and a margin.
_DEFERRED_CLOSE_SECONDS = 5.5
# A streamed request that returned 200 but not the whole stream (token count, usage, [DONE]).
INCOMPLETE_STREAM = -1


def picker_path(name: str) -> str:
    """The listener for `name`: a response path, with `-<body mode>` for a non-default one."""
    return f"picker-{name}"


def path_modes(path: str) -> tuple[str, str]:
    """(response path, body mode) of a picker listener; "envoy" renders like `inline`."""
    if path == ENVOY:
        return "inline", DEFAULT_BODY_MODE
    name = path.removeprefix("picker-")
    response_path, _, body_mode = name.partition("-")
    if response_path not in RESPONSE_PATHS or body_mode not in ("", *BODY_MODES):
        raise ValueError(
            f"unknown picker path {name!r}: expected one of {RESPONSE_PATHS}, "
            f"optionally with -<body mode> ({', '.join(BODY_MODES)})"
        )
    return response_path, body_mode or DEFAULT_BODY_MODE


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
    scenarios: Scenarios = "all"
    stream_tokens: tuple[int, ...] = (1, 100, 1000)
    # Streams started per second, the same for every length, so that only the length differs
    # between the lengths' phases: a picker's CPU per request depends on its request rate (the
    # busier, the more messages share each wake-up; measured: 0.9 ms per 1-token stream with 32
    # back to back, 1.5 ms per 1,000-token stream at 3 per second). 4/s of 1,000 tokens at
    # 100 tokens/s is 40 streams at once and 4,000 chunks/s, which the inline path (one gRPC
    # message per chunk) can still carry on two shared cores.
    stream_rate: float = 4.0
    # Per path and response length, split over `stream_rounds` alternating phases: streams are
    # started for this long, and each phase lasts until the last of them has ended.
    stream_seconds: float = 24.0
    stream_rounds: int = 2
    token_gap_ms: float = 10.0
    backends: int = 4
    envoy_concurrency: int = 2
    # `extproc serve --workers`: picker processes on the one port (CPU is read for all of them).
    picker_workers: int = 1
    strategy: str = "least-request"
    # The picker scrapes every endpoint's /metrics; at the default 50 ms that is ~20 ms/s of CPU
    # whatever the traffic, and still 7-13 ms/s at 0.5 s (measured), which swamps the ~2 ms per
    # request of 1,000-token streams over their 20 s phase. The instant backends' metrics are
    # constant, so a slower scrape changes no decision (staleness is raised with it). What
    # remains is measured in the Envoy-alone phases and subtracted (`picker_idle`).
    collector_interval_seconds: float = 5.0
    picker_paths: tuple[str, ...] = PICKER_PATHS
    output: Path = Path("reports")

    @classmethod
    def quick(cls, output: Path) -> OverheadOptions:
        return cls(
            small_seconds=5,
            large_seconds=5,
            peak_seconds=3,
            stream_seconds=8,
            stream_rounds=1,
            output=output,
        )

    @property
    def paths(self) -> tuple[str, ...]:
        return (ENVOY, *map(picker_path, self.picker_paths))


@dataclass(frozen=True, slots=True)
class PathResult:
    scenario: str
    path: str  # "envoy" (direct) or "picker-<response path>"
    summary: Summary


@dataclass(frozen=True, slots=True)
class CpuUse:
    """Raw CPU seconds of the picker and of Envoy over a path's phases, and their wall time."""

    picker: float = 0.0
    envoy: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: CpuUse) -> CpuUse:
        return CpuUse(
            self.picker + other.picker, self.envoy + other.envoy, self.seconds + other.seconds
        )


@dataclass(frozen=True, slots=True)
class StreamSample:
    ttft: float  # seconds to the first token's event (nan when none came)
    latency: float  # seconds to the end of the stream
    status: int  # 200 only for a complete stream; INCOMPLETE_STREAM; HTTP status; 0
    tokens: int  # token events received


@dataclass(frozen=True, slots=True)
class StreamResult:
    tokens: int  # max_tokens asked for
    path: str
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float
    tokens_received: int  # token events over the complete streams
    cpu: CpuUse
    error_statuses: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(
        cls, tokens: int, path: str, samples: Sequence[StreamSample], cpu: CpuUse
    ) -> StreamResult:
        ok = [s for s in samples if s.status == 200]
        ttft = sorted(s.ttft for s in ok)
        total = sorted(s.latency for s in ok)
        return cls(
            tokens=tokens,
            path=path,
            requests=len(samples),
            errors=len(samples) - len(ok),
            ttft_p50_ms=1000 * quantile(ttft, 0.50),
            ttft_p99_ms=1000 * quantile(ttft, 0.99),
            total_p50_ms=1000 * quantile(total, 0.50),
            total_p99_ms=1000 * quantile(total, 0.99),
            tokens_received=sum(s.tokens for s in ok),
            cpu=cpu,
            error_statuses=tuple(
                sorted(Counter(s.status for s in samples if s.status != 200).items())
            ),
        )


@dataclass(slots=True)
class OverheadReport:
    options: dict[str, Any]
    results: list[PathResult] = field(default_factory=list)
    # 1 KB open loop: CPU per path (the Envoy-alone phases give the picker's idle use).
    open_cpu: dict[str, CpuUse] = field(default_factory=dict)
    open_requests: dict[str, int] = field(default_factory=dict)
    streamed: list[StreamResult] = field(default_factory=list)

    @property
    def picker_paths(self) -> list[str]:
        seen = {r.path for r in self.results} | {r.path for r in self.streamed}
        named = [picker_path(p) for p in self.options.get("picker_paths", PICKER_PATHS)]
        return [p for p in named if p in seen]

    def picker_idle(self) -> float:
        """The picker's CPU seconds per second while only Envoy-alone traffic runs: its own
        background work (scrapes, discovery), charged to no request."""
        phases = [self.open_cpu.get(ENVOY, CpuUse())]
        phases += [r.cpu for r in self.streamed if r.path == ENVOY]
        total = sum(phases, CpuUse())
        return total.picker / total.seconds if total.seconds > 0 else 0.0

    def _per_request_ms(self, cpu: CpuUse, requests: int) -> tuple[float, float]:
        """(picker, Envoy) CPU ms per request; the picker's net of its idle use."""
        if requests <= 0:
            return float("nan"), float("nan")
        picker = cpu.picker - self.picker_idle() * cpu.seconds
        return 1000 * picker / requests, 1000 * cpu.envoy / requests

    def picker_cpu_ms_per_request(self, path: str) -> float:
        """1 KB bodies, one-chunk answers, open loop (the `target <= 0.7 ms` figure)."""
        return self._per_request_ms(
            self.open_cpu.get(path, CpuUse()), self.open_requests.get(path, 0)
        )[0]

    def stream_cpu_ms(self, result: StreamResult) -> tuple[float, float]:
        return self._per_request_ms(result.cpu, result.requests)

    def get(self, scenario: str, path: str) -> Summary:
        return next(r.summary for r in self.results if (r.scenario, r.path) == (scenario, path))

    def table(self) -> str:
        sections = []
        if self.results:
            sections.append(self._one_chunk_table())
        if self.streamed:
            sections.append(self._streamed_table())
        sections.append(self._targets_table())
        errors = [
            f"{r.scenario}/{r.path}: {dict(r.summary.error_statuses)}"
            for r in self.results
            if r.summary.errors
        ] + [
            f"streamed {r.tokens}/{r.path}: {dict(r.error_statuses)}"
            for r in self.streamed
            if r.errors
        ]
        if errors:
            sections.append(
                "Errors by status (0 = connection failed, -1 = incomplete stream): "
                + "; ".join(errors)
            )
        return "\n\n".join(sections)

    def _column(self, path: str) -> str:
        name = path.removeprefix("picker-")
        return f"{name} (default)" if name == DEFAULT_RESPONSE_PATH else name

    def _one_chunk_table(self) -> str:
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
        picked = self.picker_paths
        rows += [
            "",
            "| added by the picker | " + " | ".join(map(self._column, picked)) + " | target |",
            "|---|" + "---:|" * (len(picked) + 1),
        ]

        def added(scenario: str, field: str) -> str:
            base = getattr(self.get(scenario, ENVOY), field)
            return " | ".join(
                f"{getattr(self.get(scenario, p), field) - base:.2f} ms" for p in picked
            )

        peak = self.get("1KB peak", ENVOY).rate
        cpu = " | ".join(f"{self.picker_cpu_ms_per_request(p):.3f} ms" for p in picked)
        envoy_cpu = " | ".join(
            f"{self._per_request_ms(self.open_cpu[p], self.open_requests[p])[1]:.3f} ms"
            for p in picked
        )
        base_envoy = self._per_request_ms(self.open_cpu[ENVOY], self.open_requests[ENVOY])[1]
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
            f"| picker CPU per 1 KB request | {cpu} | <= {CPU_PER_1KB_REQUEST_TARGET_MS} ms |",
            f"| Envoy CPU per 1 KB request (alone: {base_envoy:.3f} ms) | {envoy_cpu} | |",
        ]
        return "\n".join(rows)

    def _streamed_table(self) -> str:
        gap = self.options["token_gap_ms"]
        rate = self.options["stream_rate"]
        rows = [
            f"Streamed responses ({rate:g} started per second, one event per token every "
            f"{gap:g} ms). "
            "Envoy rows: absolute ms; picker rows: ms added vs Envoy alone. Picker CPU is net "
            f"of its idle use ({1000 * self.picker_idle():.1f} ms/s, from the Envoy-alone "
            "phases).",
            "",
            "| tokens | path | requests | errors | TTFT p50 | TTFT p99 | total p50 | total p99 "
            "| picker CPU ms/req | picker CPU µs/token | Envoy CPU ms/req |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.streamed:
            base = next(b for b in self.streamed if b.tokens == r.tokens and b.path == ENVOY)
            sign = "" if r.path == ENVOY else "+"

            def ms(value: float, base_value: float, sign: str = sign, path: str = r.path) -> str:
                return f"{value:.1f}" if path == ENVOY else f"{sign}{value - base_value:.1f}"

            picker_ms, envoy_ms = self.stream_cpu_ms(r)
            per_token = 1000 * picker_ms / r.tokens
            picker_cells = (
                "-" if r.path == ENVOY else f"{picker_ms:.2f}",
                "-" if r.path == ENVOY else f"{per_token:.1f}",
            )
            rows.append(
                f"| {r.tokens} | {r.path} | {r.requests} | {r.errors} | "
                f"{ms(r.ttft_p50_ms, base.ttft_p50_ms)} | {ms(r.ttft_p99_ms, base.ttft_p99_ms)} | "
                f"{ms(r.total_p50_ms, base.total_p50_ms)} | "
                f"{ms(r.total_p99_ms, base.total_p99_ms)} | "
                f"{picker_cells[0]} | {picker_cells[1]} | {envoy_ms:.2f} |"
            )
        return "\n".join(rows)

    def stream_cpu_ratio(self, path: str) -> float:
        """Picker CPU per request, longest streamed response over shortest."""
        mine = sorted((r for r in self.streamed if r.path == path), key=lambda r: r.tokens)
        if len(mine) < 2:
            return float("nan")
        longest, shortest = self.stream_cpu_ms(mine[-1])[0], self.stream_cpu_ms(mine[0])[0]
        # Net of idle use, a figure can fall to or below zero in noise: no ratio then.
        if longest <= 0 or shortest <= 0:
            return float("nan")
        return longest / shortest

    def _targets_table(self) -> str:
        picked = self.picker_paths

        def verdict(value: float, limit: float, unit: str) -> str:
            if math.isnan(value):
                return "n/a"
            digits = 2 if unit == "x" else 3
            return f"{value:.{digits}f}{unit} ({'met' if value <= limit else 'not met'})"

        def row(label: str, values: dict[str, float], limit: float, unit: str) -> str:
            cells = " | ".join(verdict(values.get(p, float("nan")), limit, unit) for p in picked)
            return f"| {label} | {cells} | <= {limit}{unit} |"

        rows = [
            "| issue 19 target | " + " | ".join(map(self._column, picked)) + " | target |",
            "|---|" + "---:|" * (len(picked) + 1),
        ]
        lengths = sorted({r.tokens for r in self.streamed})
        if len(lengths) >= 2:
            rows.append(
                row(
                    f"picker CPU, {lengths[-1]}-token stream / {lengths[0]}-token stream",
                    {p: self.stream_cpu_ratio(p) for p in picked},
                    STREAM_CPU_RATIO_TARGET,
                    "x",
                )
            )
        if self.open_requests:
            rows.append(
                row(
                    "picker CPU per 1 KB request (one chunk, open loop)",
                    {p: self.picker_cpu_ms_per_request(p) for p in picked},
                    CPU_PER_1KB_REQUEST_TARGET_MS,
                    " ms",
                )
            )
        one_token = {
            r.path: self.stream_cpu_ms(r)[0]
            for r in self.streamed
            if r.tokens == 1 and r.path != ENVOY
        }
        if one_token:
            rows.append(
                row(
                    "picker CPU per 1 KB request (1-token stream)",
                    one_token,
                    CPU_PER_1KB_REQUEST_TARGET_MS,
                    " ms",
                )
            )
        return "\n".join(rows)


def bootstrap_with_direct_listener(
    *,
    ports: Mapping[str, int],
    extproc: str,
    endpoints: Sequence[str],
    admin_port: int,
) -> str:
    """One Envoy config with a listener per path in `ports` ("envoy" or a `picker_path`), all on
    the same clusters: the bundled bootstrap rendered for each path's response path and body
    mode, and, for "envoy", the inline rendering with the ext_proc filter taken out (inline has
    no usage filter or access log to the picker, so Envoy alone does only what Envoy alone
    does)."""
    config: dict[str, Any] | None = None
    listeners: list[dict[str, Any]] = []
    for path, port in ports.items():
        response_path, body_mode = path_modes(path)
        rendered = yaml.safe_load(
            render_bootstrap(
                port=port,
                extproc=extproc,
                endpoints=endpoints,
                admin_port=admin_port,
                listen_host="127.0.0.1",
                access_log=False,
                response_path=response_path,  # type: ignore[arg-type]  # checked by render
                body_mode=body_mode,  # type: ignore[arg-type]  # checked by render
            )
        )
        listener = copy.deepcopy(rendered["static_resources"]["listeners"][0])
        listener["name"] = path
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = path.replace("-", "_")
        if path == ENVOY:
            hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_proc" not in f["name"]]
        listeners.append(listener)
        config = config or rendered
    assert config is not None, "no path to serve"
    config["static_resources"]["listeners"] = listeners
    return str(yaml.safe_dump(config, sort_keys=False, width=1000))


def request_body(size: int, *, tokens: int = 1, stream: bool = False) -> bytes:
    """A completion request of about `size` bytes: a prose prompt padded to length. Streamed
    ones ask for usage at the end, as clients that count tokens do."""
    filler = "The quick brown fox jumps over the lazy dog. "
    head: dict[str, Any] = {"model": MODEL, "max_tokens": tokens, "prompt": ""}
    if stream:
        head |= {"stream": True, "stream_options": {"include_usage": True}}
    room = size - len(json.dumps(head))
    head["prompt"] = (filler * (room // len(filler) + 1))[:room]
    return json.dumps(head).encode()


async def send_streamed(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    tokens: int,
    headers: Mapping[str, str],
) -> StreamSample:
    """One streamed request: TTFT is the first token's event; complete means `tokens` token
    events, a usage chunk that counts them, and [DONE]."""
    started = time.perf_counter()
    ttft = float("nan")
    received = 0
    usage_ok = done = False
    try:
        async with session.post(url, data=body, headers=headers) as response:
            status = response.status
            if status != 200:
                await response.read()
            else:
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    chunk = json.loads(payload)
                    if chunk["choices"]:
                        if not received:
                            ttft = time.perf_counter() - started
                        received += 1
                    elif chunk.get("usage"):
                        usage_ok = chunk["usage"]["completion_tokens"] == tokens
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    except (ValueError, KeyError, TypeError):
        status = INCOMPLETE_STREAM
    if status == 200 and not (done and usage_ok and received == tokens):
        status = INCOMPLETE_STREAM
    return StreamSample(ttft, time.perf_counter() - started, status, received)


async def streamed_open_loop(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    tokens: int,
    rate: float,
    duration: float,
    headers: Mapping[str, str],
) -> list[StreamSample]:
    """Streams started `rate` per second for `duration` s (at least one), however long each
    takes; returns once all of them have ended."""
    started = time.perf_counter()
    streams = []
    for n in range(max(1, round(rate * duration))):
        await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        streams.append(
            asyncio.create_task(send_streamed(session, url, body, tokens=tokens, headers=headers))
        )
    return list(await asyncio.gather(*streams))


@dataclass(frozen=True, slots=True)
class _Meter:
    """CPU of the picker and Envoy across one phase."""

    picker_pid: int
    envoy_pid: int

    def read(self) -> CpuUse:
        return CpuUse(cpu_seconds(self.picker_pid), cpu_seconds(self.envoy_pid), time.monotonic())

    async def since(self, before: CpuUse, *, path: str) -> CpuUse:
        """CPU used since `before`, read once the picker has gone quiet: work Envoy does not
        wait for (the observer's messages, the access log) belongs to the phase that caused
        it, not to the next one, where it would count as idle use (measured: 18 ms/s of
        "idle" after observer phases, against 2-3 ms/s really idle). Envoy closes observer
        streams only after its deferred-close delay, so that work arrives seconds later."""
        if path != ENVOY and path_modes(path)[0] == "observer":
            await asyncio.sleep(_DEFERRED_CLOSE_SECONDS)
        deadline = time.monotonic() + _QUIET_WITHIN_SECONDS
        last = cpu_seconds(self.picker_pid)
        while time.monotonic() < deadline:
            await asyncio.sleep(_SETTLE_SECONDS)
            now = cpu_seconds(self.picker_pid)
            # /proc counts in clock ticks (10 ms): at most one tick in 0.3 s is idle noise.
            if now - last <= 1.01 / _CLOCK_TICKS:
                break
            last = now
        after = self.read()
        return CpuUse(
            after.picker - before.picker,
            after.envoy - before.envoy,
            after.seconds - before.seconds,
        )


async def _one_chunk(
    options: OverheadOptions,
    urls: dict[str, str],
    meter: _Meter,
    report: OverheadReport,
    session: aiohttp.ClientSession,
) -> None:
    headers = {"content-type": "application/json"}
    small, large = request_body(1024), request_body(220 * 1024)
    # Each path alone at the fixed rate, in alternating phases, so each sees the load the
    # target names (not the sum of all paths) and drifting background load hits all.
    collected_open: dict[str, list[loadgen.Sample]] = {path: [] for path in urls}
    cpu = dict.fromkeys(urls, CpuUse())
    for _ in range(2):
        for path, url in urls.items():
            before = meter.read()
            got = await loadgen.open_loop(
                session,
                {path: url},
                small,
                rate=options.rate,
                duration=options.small_seconds / 2,
                headers=headers,
            )
            cpu[path] += await meter.since(before, path=path)
            collected_open[path] += got[path]
    report.open_cpu = cpu
    report.open_requests = {path: len(samples) for path, samples in collected_open.items()}
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
        # Alternate the paths in short phases so drifting background load hits all.
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


async def _streamed(
    options: OverheadOptions, urls: dict[str, str], meter: _Meter, report: OverheadReport
) -> None:
    headers = {
        "content-type": "application/json",
        "x-bench-token-gap-ms": f"{options.token_gap_ms:g}",
    }
    # No overall deadline: a stream lasts tokens x gap; a stalled one still ends on sock_read.
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    # Every stream of the longest phase may be open at once.
    longest = max(options.stream_tokens) * options.token_gap_ms / 1000
    connector = aiohttp.TCPConnector(limit=int(options.stream_rate * (longest + 5)) + 16)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for tokens in options.stream_tokens:
            body = request_body(1024, tokens=tokens, stream=True)
            collected: dict[str, list[StreamSample]] = {path: [] for path in urls}
            cpu = dict.fromkeys(urls, CpuUse())
            for _ in range(options.stream_rounds):
                for path, url in urls.items():
                    before = meter.read()
                    collected[path] += await streamed_open_loop(
                        session,
                        url,
                        body,
                        tokens=tokens,
                        rate=options.stream_rate,
                        duration=options.stream_seconds / options.stream_rounds,
                        headers=headers,
                    )
                    cpu[path] += await meter.since(before, path=path)
            for path in urls:
                report.streamed.append(StreamResult.of(tokens, path, collected[path], cpu[path]))


async def _measure(options: OverheadOptions, urls: dict[str, str], meter: _Meter) -> OverheadReport:
    report = OverheadReport(
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    )
    async with loadgen.new_session() as session:
        # Warm up connections and the picker's first decisions on every path.
        await loadgen.open_loop(
            session,
            urls,
            request_body(1024),
            rate=50,
            duration=1.0,
            headers={"content-type": "application/json"},
        )
        if options.scenarios in ("all", "one-chunk"):
            await _one_chunk(options, urls, meter, report, session)
    if options.scenarios in ("all", "streamed"):
        await _streamed(options, urls, meter, report)
    return report


def run_overhead(options: OverheadOptions) -> OverheadReport:
    backend_ports = free_ports(options.backends)
    grpc_port, health_port, admin = free_ports(3)
    # Worker i serves its metrics on metrics_port + i.
    metrics_port = free_port_range(options.picker_workers, avoid=(grpc_port, health_port, admin))
    listener_ports = dict(zip(options.paths, free_ports(len(options.paths)), strict=True))
    endpoints = [f"127.0.0.1:{p}" for p in backend_ports]
    python = sys.executable
    backend_cmd = [python, "-m", "extproc.bench.backend", MODEL, *map(str, backend_ports)]
    bootstrap = bootstrap_with_direct_listener(
        ports=listener_ports,
        extproc=f"127.0.0.1:{grpc_port}",
        endpoints=endpoints,
        admin_port=admin,
    )
    with tempfile.TemporaryDirectory(prefix="extproc-overhead-") as scratch:
        config = Path(scratch) / "picker.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "collector": {
                        "interval_seconds": options.collector_interval_seconds,
                        "staleness_seconds": 4 * options.collector_interval_seconds,
                    }
                }
            )
        )
        picker_cmd = [
            *(python, "-m", "extproc.cli", "serve", "--config", str(config)),
            *("--host", "127.0.0.1", "--endpoints", ",".join(endpoints)),
            *("--strategy", options.strategy, "--grpc-port", str(grpc_port)),
            *("--health-port", str(health_port), "--metrics-port", str(metrics_port)),
            *("--log-level", "WARNING", "--workers", str(options.picker_workers)),
        ]
        with process(backend_cmd, ready_line="ready"), process(picker_cmd) as picker:
            # Every worker up before Envoy connects, or the kernel hands it only those that are
            # (each serves its metrics just before it takes ext_proc streams).
            for port in range(metrics_port, metrics_port + options.picker_workers):
                wait_for_port(port)
            wait_for_port(grpc_port)
            with running_envoy(
                bootstrap, admin_port=admin, concurrency=options.envoy_concurrency
            ) as envoy:
                urls = {
                    path: f"http://127.0.0.1:{port}/v1/completions"
                    for path, port in listener_ports.items()
                }
                return asyncio.run(_measure(options, urls, _Meter(picker.pid, envoy.pid)))


def write_report(report: OverheadReport, output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / "overhead.md"
    path.write_text(
        f"# extproc bench overhead\n\nOptions: `{json.dumps(report.options)}`\n\n{report.table()}\n"
    )
    picked = report.picker_paths
    (output / "overhead.json").write_text(
        json.dumps(
            {
                "options": report.options,
                "picker_idle_cpu_ms_per_s": 1000 * report.picker_idle(),
                "picker_cpu_ms_per_request": {
                    p: report.picker_cpu_ms_per_request(p) for p in picked if report.open_requests
                },
                "results": [
                    {"scenario": r.scenario, "path": r.path, **asdict(r.summary)}
                    for r in report.results
                ],
                "streamed": [
                    {
                        **asdict(r),
                        "picker_cpu_ms_per_request": report.stream_cpu_ms(r)[0],
                        "envoy_cpu_ms_per_request": report.stream_cpu_ms(r)[1],
                    }
                    for r in report.streamed
                ],
                "stream_cpu_ratio": {p: report.stream_cpu_ratio(p) for p in picked},
            },
            indent=2,
        )
    )
    return path
