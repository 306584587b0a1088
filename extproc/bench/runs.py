"""One run of a load against a simulated fleet behind a front, as `extproc bench routing` and its
`--workload pd` / `--fleet mixed` variants (`extproc.bench.disagg`) do it: ports, the fleet,
Envoy's bootstrap with its own policies beside the picker, open-loop sending, CPU accounting,
and the run's figures (`summarize`) from the client's log and the simulator's exact records.

Nothing here knows which router is under test; `routing` and `disagg` choose and start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

from extproc.bench import workloads as wl
from extproc.bench.envoy_config import render_bootstrap
from extproc.bench.harness import cpu_of, loopback_endpoints
from extproc.bench.loadgen import quantile
from extproc.bench.processes import (
    ChildDidNotStart,
    free_port_range,
    free_ports,
    process,
)
from extproc.sim.fleet import READY_LINE

PROFILE: Final = "h100-8b"
SESSION_HEADER: Final = "x-session-id"


class RoutingBenchError(RuntimeError):
    """A part of the benchmark did not start or did not answer; the message says which."""


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuUse:
    """Cores used during a run (CPU seconds / wall seconds), from /proc."""

    machine: float  # every process on the machine (of os.cpu_count() cores)
    fleet: float
    front: float  # the picker or the peer router (0 for Envoy alone)
    envoy: float
    loadgen: float  # this process


@dataclass(frozen=True, slots=True)
class RunResult:
    workload: str
    profile: str  # the fleet's step-time profile
    rate: float  # requests per simulated second (offered; multi-turn: at mean think times)
    competitor: str
    sent: int
    ok: int
    errors: int
    first_error: str
    ttft_p50_ms: float  # simulated, from the simulator's records
    ttft_p90_ms: float
    ttft_p99_ms: float
    # Streamed runs: send to the first chunk at the client (routing path included), wall ms x
    # speed, so on the same scale as the simulated figures; 0 for one-chunk runs.
    client_ttft_p50_ms: float
    client_ttft_p90_ms: float
    client_ttft_p99_ms: float
    e2e_p90_ms: float  # simulated, arrival at the server to last token
    output_tokens: int
    makespan_s: float  # simulated, first send to last answer
    output_tokens_per_s: float  # per simulated second
    hit_rate: float  # fleet prefix-cache hits / queries (tokens), from the simulator's counters
    oracle_hit_rate: float
    preemptions: int
    per_pod: tuple[int, ...]  # requests each pod served
    outside_p90_ms: float  # wall ms per request outside the engine: routing path, HTTP, tokenizing
    arrival_skew_ms: float  # spread of (server arrival - client send) in simulated ms; see report
    wall_seconds: float
    cpu: CpuUse
    # The picker's mean time from the request body to its decision, wall ms, from its
    # `extproc_pick_duration_seconds` at the end of the run; 0 for the peers and Envoy alone.
    pick_mean_ms: float = 0.0


# --- ports and processes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ports:
    sim: int  # server i on sim + i
    kv: int  # server i publishes on kv + i, replays on kv + pods + i
    records: int
    grpc: int
    health: int
    metrics: int
    envoy_picker: int
    envoy_round_robin: int
    envoy_least_request: int
    admin: int
    router: int
    router_metrics: int


def allocate_ports(pods: int) -> Ports:
    singles = free_ports(10)
    sim = free_port_range(pods, set(singles))
    kv = free_port_range(2 * pods, {*singles, *range(sim, sim + pods)})
    return Ports(sim, kv, *singles)


def endpoint_addresses(ports: Ports, pods: int) -> tuple[str, ...]:
    return loopback_endpoints(ports.sim, pods)


def start_fleet(
    stack: contextlib.ExitStack, argv: Sequence[str], *, log: Path, attempts: int = 3
) -> subprocess.Popen[str]:
    """The fleet for one run. Its ports were chosen free at the start of the benchmark (Envoy's
    clusters name them), but another process on the machine may hold one for a moment between
    runs: try again a little later before giving up."""
    for _ in range(attempts - 1):
        try:
            return stack.enter_context(process(argv, log=log, ready_line=READY_LINE))
        except ChildDidNotStart:
            time.sleep(2.0)
    try:
        return stack.enter_context(process(argv, log=log, ready_line=READY_LINE))
    except ChildDidNotStart as exc:
        raise RoutingBenchError(str(exc)) from exc


def envoy_bootstrap(ports: Ports, endpoints: Sequence[str]) -> str:
    """The bundled bootstrap (listener through the picker), plus one listener per Envoy policy.

    Those are the same listener with the ext_proc filter taken out, routing to a copy of the
    `pool` cluster whose override_host policy is replaced by Envoy's own ROUND_ROBIN or
    LEAST_REQUEST (Envoy's default for it: the less loaded of two random hosts).
    """
    config = yaml.safe_load(
        render_bootstrap(
            port=ports.envoy_picker,
            extproc=f"127.0.0.1:{ports.grpc}",
            endpoints=endpoints,
            admin_port=ports.admin,
            listen_host="127.0.0.1",
            access_log=False,
        )
    )
    resources = config["static_resources"]
    ingress = resources["listeners"][0]
    pool = next(c for c in resources["clusters"] if c["name"] == "pool")
    for policy, port in (
        ("ROUND_ROBIN", ports.envoy_round_robin),
        ("LEAST_REQUEST", ports.envoy_least_request),
    ):
        name = f"pool_{policy.lower()}"
        cluster = copy.deepcopy(pool)
        cluster["name"] = name
        cluster["load_assignment"]["cluster_name"] = name
        del cluster["load_balancing_policy"]
        cluster["lb_policy"] = policy
        resources["clusters"].append(cluster)
        listener = copy.deepcopy(ingress)
        listener["name"] = f"direct_{policy.lower()}"
        listener["address"]["socket_address"]["port_value"] = port
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = listener["name"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if "ext_proc" not in f["name"]]
        for host in hcm["route_config"]["virtual_hosts"]:
            for route in host["routes"]:
                if "route" in route:  # not the allow-list's direct 404
                    route["route"]["cluster"] = name
        resources["listeners"].append(listener)
    return str(yaml.safe_dump(config, sort_keys=False, width=1000))


# --- machine load -----------------------------------------------------------------------------


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


@dataclass(frozen=True, slots=True)
class CpuMark:
    wall: float
    machine_busy: float
    fleet: float
    front: float
    envoy: float
    loadgen: float

    @classmethod
    def now(cls, fleet: int, front: int | None, envoy: int) -> CpuMark:
        return cls(
            time.monotonic(),
            _machine_busy()[0],
            cpu_of(fleet),
            cpu_of(front),
            cpu_of(envoy),
            time.process_time(),
        )

    def until(self, end: CpuMark) -> CpuUse:
        wall = max(end.wall - self.wall, 1e-9)
        return CpuUse(
            machine=(end.machine_busy - self.machine_busy) / wall,
            fleet=(end.fleet - self.fleet) / wall,
            front=(end.front - self.front) / wall,
            envoy=(end.envoy - self.envoy) / wall,
            loadgen=(end.loadgen - self.loadgen) / wall,
        )


# --- driving one run --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    index: int
    status: int  # HTTP status, 0 when the connection failed or the run's deadline passed
    sent: float  # wall seconds after the run's start
    answered: float
    response_id: str
    output_tokens: int
    error: str
    first_chunk: float | None = None  # streamed: wall seconds after the run's start


async def _send(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    index: int,
    start: float,
) -> Sent:
    sent = time.perf_counter() - start
    first: float | None = None
    chunks: list[bytes] = []
    try:
        async with http.post(url, data=body, headers=headers) as response:
            status = response.status
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
                if first is None and _has_token(b"".join(chunks)):
                    first = time.perf_counter() - start
    except aiohttp.ClientError as exc:
        return Sent(index, 0, sent, time.perf_counter() - start, "", 0, f"{type(exc).__name__}")
    answered = time.perf_counter() - start
    payload = b"".join(chunks)
    if status != 200:
        return Sent(index, status, sent, answered, "", 0, payload[:200].decode(errors="replace"))
    streamed = payload.startswith(b"data:")
    data = _last_event(payload) if streamed else json.loads(payload)
    tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
    return Sent(
        index,
        status,
        sent,
        answered,
        str(data.get("id", "")),
        tokens,
        "",
        first_chunk=first if streamed else None,
    )


def _has_token(received: bytes) -> bool:
    """Whether an SSE answer so far holds a generated token: the first event of a chat answer
    carries only the assistant's role, sent before any token (vLLM does the same)."""
    for line in received.split(b"\n"):
        if not line.startswith(b"data:") or not line.endswith(b"}"):
            continue  # not an event, or one still arriving
        for choice in json.loads(line[5:]).get("choices") or ():
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                return True
    return False


def _last_event(payload: bytes) -> dict[str, Any]:
    """The last JSON event of an SSE answer (with `include_usage`, the one with the usage)."""
    events = [
        line[5:].strip()
        for line in payload.split(b"\n")
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"
    ]
    return dict(json.loads(events[-1])) if events else {}


async def drive(
    base_url: str,
    workload: wl.Workload,
    bodies: Sequence[bytes],
    *,
    rate: float,
    speed: float,
    headers: Mapping[str, str],
    drain_seconds: float,
    on_answer: Callable[[int], None],
) -> list[Sent]:
    """Send the workload open loop (multi-turn: each turn after its predecessor's answer)."""
    requests = workload.requests
    answered = [asyncio.Event() for _ in requests]
    done = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()

        async def one(spec: wl.RequestSpec) -> Sent:
            nonlocal done
            if spec.after < 0:
                # Open loop: on schedule whether or not earlier requests have returned.
                delay = start + spec.offset / rate / speed - time.perf_counter()
            else:
                await answered[spec.after].wait()
                delay = spec.think / speed
            if delay > 0:
                await asyncio.sleep(delay)
            extra = {SESSION_HEADER: spec.session} if spec.session else {}
            try:
                return await _send(
                    http,
                    base_url + spec.path,
                    bodies[spec.index],
                    {**headers, **extra},
                    index=spec.index,
                    start=start,
                )
            finally:
                answered[spec.index].set()
                done += 1
                on_answer(done)

        tasks = [asyncio.create_task(one(spec)) for spec in requests]
        last_planned = max((r.offset for r in requests), default=0.0) / rate / speed
        finished, pending = await asyncio.wait(tasks, timeout=last_planned + drain_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        now = time.perf_counter() - start
        results = []
        for spec, task in zip(requests, tasks, strict=True):
            if task in finished and task.exception() is None:
                results.append(task.result())
            else:
                results.append(Sent(spec.index, 0, now, now, "", 0, "the run's deadline passed"))
        return results


def fetch_json(url: str, payload: Any | None = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def summarize(
    *,
    workload: wl.Workload,
    profile: str = PROFILE,
    rate: float,
    competitor: str,
    speed: float,
    sent: Sequence[Sent],
    records: Sequence[Mapping[str, Any] | None],
    stats: Sequence[Mapping[str, Any]],
    pods: int,
    oracle: float,
    wall_seconds: float,
    cpu: CpuUse,
    pick_mean_ms: float = 0.0,
) -> RunResult:
    """One run's figures from the client's log, the simulator's records and its counters."""
    ok = [(s, r) for s, r in zip(sent, records, strict=True) if s.status == 200 and r is not None]
    ttfts = sorted(r["first_token"] - r["arrival"] for _, r in ok if r["first_token"] is not None)
    client = sorted((s.first_chunk - s.sent) * speed for s, _ in ok if s.first_chunk is not None)
    e2es = sorted(r["finished"] - r["arrival"] for _, r in ok)
    # A request's answer on the workload's simulated timeline: its send (wall x speed) plus the
    # time it spent in its server (exact). The routing path's own time is not in it (it is in
    # `outside`), so wall-clock noise x speed never inflates throughput figures.
    ends = [s.sent * speed + (r["finished"] - r["arrival"]) for s, r in ok]
    first_send = min((s.sent * speed for s in sent), default=0.0)
    makespan = max(ends, default=0.0) - first_send
    output_tokens = sum(int(r["output_tokens"]) for _, r in ok)
    outside = sorted(
        1000 * ((s.answered - s.sent) - (r["finished"] - r["arrival"]) / speed) for s, r in ok
    )
    skews: dict[int, list[float]] = {}
    for s, r in ok:
        skews.setdefault(int(r["server"]), []).append(r["arrival"] - s.sent * speed)
    skew = max((max(v) - min(v) for v in skews.values()), default=0.0)
    per_pod = [0] * pods
    for _, r in ok:
        per_pod[int(r["server"])] += 1
    queries = sum(int(s["prefix_cache_queries"]) for s in stats)
    hits = sum(int(s["prefix_cache_hits"]) for s in stats)
    errors = [s for s in sent if s.status != 200]
    missing = sum(1 for s, r in zip(sent, records, strict=True) if s.status == 200 and r is None)
    first_error = errors[0].error or f"HTTP {errors[0].status}" if errors else ""
    if missing and not first_error:
        first_error = f"{missing} answers had no simulator record"
    return RunResult(
        workload=workload.name,
        profile=profile,
        rate=rate,
        competitor=competitor,
        sent=len(sent),
        ok=len(ok),
        errors=len(sent) - len(ok),
        first_error=first_error,
        ttft_p50_ms=1000 * quantile(ttfts, 0.5),
        ttft_p90_ms=1000 * quantile(ttfts, 0.9),
        ttft_p99_ms=1000 * quantile(ttfts, 0.99),
        client_ttft_p50_ms=1000 * quantile(client, 0.5) if client else 0.0,
        client_ttft_p90_ms=1000 * quantile(client, 0.9) if client else 0.0,
        client_ttft_p99_ms=1000 * quantile(client, 0.99) if client else 0.0,
        e2e_p90_ms=1000 * quantile(e2es, 0.9),
        output_tokens=output_tokens,
        makespan_s=makespan,
        output_tokens_per_s=output_tokens / makespan if makespan > 0 else 0.0,
        hit_rate=hits / queries if queries else 0.0,
        oracle_hit_rate=oracle,
        preemptions=sum(int(s["preemptions"]) for s in stats),
        per_pod=tuple(per_pod),
        outside_p90_ms=quantile(outside, 0.9),
        arrival_skew_ms=1000 * skew,
        wall_seconds=wall_seconds,
        cpu=cpu,
        pick_mean_ms=pick_mean_ms,
    )
