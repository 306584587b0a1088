"""Autoscaling benchmark: a bursty diurnal trace on a simulated fleet that the autoscaler resizes.

    .venv/bin/python -m extproc.bench.autoscaling            # KPA vs APA vs HPA, table + report
    .venv/bin/python -m extproc.bench.autoscaling --hours 0.2 --out /tmp/as

Simulated time, not wall time: a discrete-event loop runs the trace's arrivals, every pod's engine
steps, pod start-ups and the autoscaler's samples and decisions in time order, so two simulated
hours take seconds. The decisions come from `extproc.controllers.autoscaler.algorithms`, the same
objects the controller runs in a cluster.

The pods: `_Pod` is a request-level copy of the simulator's scheduler (`extproc/sim/engine.py`,
vLLM V1 FCFS): each step decodes one token for every decoding request, gives the rest of the
token budget (`max_num_batched_tokens`) to prompts in chunks, admits waiting requests within
`max_num_seqs` and KV capacity, and lasts `StepProfile.step_seconds` of the simulator's GPU
profile. What it leaves out to be cheap: block-level prefix caching (the trace's prompts are
unique, so nothing would hit) and preemption (a request is admitted only if its prompt plus its
output fit in the KV blocks left, so nothing ever has to be preempted). Per step it does O(1)
work plus the requests that start or finish, against O(batch) in the full engine.

The fleet: a new pod serves after `--start-delay` seconds (vLLM loading an 8B model, image
cached); a removed pod takes no new request and counts until its last request has finished (a
graceful drain). Requests go to the ready pod with the fewest requests (running + waiting); with
no ready pod they wait at the gateway, which is also the activation signal for scale-from-zero.
Pod-seconds count every pod from creation (a starting pod holds its GPU) to the end of its drain.

Long (about 580 lines): the trace, the pod model and the event loop are one simulation whose
parts share its clock and records; split, each would need the others to be read.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from extproc.controllers.autoscaler.algorithms import (
    Algorithm,
    Apa,
    ApaParams,
    Bounds,
    Hpa,
    HpaParams,
    Kpa,
    KpaParams,
    Memory,
    MetricWindow,
    Observation,
    Sample,
)
from extproc.sim.profiles import StepProfile, get_profile

# -- the trace ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceConfig:
    hours: float = 2.0  # one compressed day
    low_rate: float = 3.0  # requests/s at night
    high_rate: float = 30.0  # requests/s at the daily peak
    burst_every_seconds: float = 600.0  # mean gap between bursts (Poisson)
    burst_seconds: tuple[float, float] = (60.0, 180.0)
    burst_factor: float = 2.5
    prompt_tokens: tuple[int, int] = (200, 1500)  # log-uniform
    output_tokens: tuple[int, int] = (32, 256)  # log-uniform
    seed: int = 1


@dataclass(frozen=True, slots=True)
class Trace:
    arrivals: tuple[float, ...]
    prompts: tuple[int, ...]
    outputs: tuple[int, ...]
    duration: float
    bursts: tuple[tuple[float, float], ...]


def make_trace(config: TraceConfig) -> Trace:
    """A non-homogeneous Poisson process (thinning): a raised-cosine day plus random bursts."""
    rnd = random.Random(config.seed)
    duration = config.hours * 3600.0
    bursts: list[tuple[float, float]] = []
    t = rnd.expovariate(1 / config.burst_every_seconds)
    while t < duration:
        length = rnd.uniform(*config.burst_seconds)
        bursts.append((t, min(duration, t + length)))
        t += length + rnd.expovariate(1 / config.burst_every_seconds)

    def rate(at: float) -> float:
        day = (1 - math.cos(2 * math.pi * at / duration)) / 2
        base = config.low_rate + (config.high_rate - config.low_rate) * day
        return base * (config.burst_factor if any(a <= at < b for a, b in bursts) else 1.0)

    peak = config.high_rate * config.burst_factor
    arrivals: list[float] = []
    t = 0.0
    while True:
        t += rnd.expovariate(peak)
        if t >= duration:
            break
        if rnd.random() * peak < rate(t):
            arrivals.append(t)

    def log_uniform(bounds: tuple[int, int]) -> int:
        low, high = bounds
        return round(math.exp(rnd.uniform(math.log(low), math.log(high))))

    prompts = tuple(log_uniform(config.prompt_tokens) for _ in arrivals)
    outputs = tuple(log_uniform(config.output_tokens) for _ in arrivals)
    return Trace(tuple(arrivals), prompts, outputs, duration, tuple(bursts))


# -- one pod --------------------------------------------------------------------------------------


class _Request:
    __slots__ = ("arrival", "computed", "first_token", "index", "output", "prompt")

    def __init__(self, index: int, arrival: float, prompt: int, output: int) -> None:
        self.index = index
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.computed = 0
        self.first_token: float | None = None


class _Pod:
    """One vLLM server, stepped by the fleet's event loop (see the module docstring)."""

    def __init__(self, index: int, profile: StepProfile, *, created: float, ready: float) -> None:
        self.index = index
        self.profile = profile
        self.created = created
        self.ready_at = ready
        self.ready = False
        self.terminating = False
        self.ended: float | None = None
        self.capacity_tokens = profile.num_gpu_blocks() * 16
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []
        self.decoding = 0
        self.decode_context = 0
        self.reserved = 0  # KV tokens promised to admitted requests (prompt + output)
        self.finishes: list[tuple[int, int, _Request]] = []  # (step that ends it, index, request)
        self.step = 0
        self.stepping = False
        self._plan: list[tuple[_Request, int]] = []
        self._plan_decodes = 0

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.prefilling) + self.decoding

    @property
    def running(self) -> int:
        return len(self.prefilling) + self.decoding

    @property
    def kv_usage(self) -> float:
        prefill = sum(r.computed for r in self.prefilling)
        return (self.decode_context + prefill) / self.capacity_tokens

    def start_step(self) -> float:
        """Plan the next step (vLLM's order: running requests first, then admissions)."""
        p = self.profile
        decodes = self.decoding
        budget = p.max_num_batched_tokens - decodes
        plan: list[tuple[_Request, int]] = []
        units = 0.0
        for req in self.prefilling:
            if budget <= 0:
                break
            chunk = min(req.prompt - req.computed, budget)
            plan.append((req, chunk))
            units += chunk * (req.computed + chunk / 2)
            budget -= chunk
        while self.waiting and budget > 0 and self.running < p.max_num_seqs:
            req = self.waiting[0]
            need = req.prompt + req.output
            if self.reserved + need > self.capacity_tokens:
                break  # KV-bound: the queue head waits, as in vLLM's FCFS
            self.waiting.popleft()
            self.reserved += need
            self.prefilling.append(req)
            chunk = min(req.prompt, budget)
            plan.append((req, chunk))
            units += chunk * chunk / 2
            budget -= chunk
        self._plan = plan
        self._plan_decodes = decodes
        tokens = decodes + sum(chunk for _, chunk in plan)
        self.stepping = True
        return p.step_seconds(
            tokens=tokens,
            decode_context_tokens=self.decode_context + decodes,
            prefill_attention_units=units,
        )

    def end_step(self, now: float, on_finish: Callable[[_Request, float], None]) -> None:
        self.stepping = False
        self.step += 1
        self.decode_context += self._plan_decodes
        while self.finishes and self.finishes[0][0] <= self.step:
            _, _, req = heapq.heappop(self.finishes)
            self.decoding -= 1
            self.decode_context -= req.prompt + req.output
            self.reserved -= req.prompt + req.output
            on_finish(req, now)
        for req, chunk in self._plan:
            req.computed += chunk
            if req.computed < req.prompt:
                continue
            self.prefilling.remove(req)
            req.first_token = now
            if req.output <= 1:
                self.reserved -= req.prompt + req.output
                on_finish(req, now)
                continue
            self.decoding += 1
            self.decode_context += req.prompt + 1
            heapq.heappush(self.finishes, (self.step + req.output - 1, req.index, req))
        self._plan = []

    @property
    def idle(self) -> bool:
        return not self.load and not self.stepping


# -- the fleet and its autoscaler -----------------------------------------------------------------

_ARRIVAL, _STEP_END, _POD_READY, _SAMPLE, _DECIDE = range(5)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    profile: str = "a100-8b"
    start_delay_seconds: float = 60.0
    initial_pods: int = 1
    bounds: Bounds = field(default_factory=lambda: Bounds(1, 16))
    target_concurrency: float = 16.0  # per pod: requests running + waiting
    sample_seconds: float = 1.0  # how often pod metrics are read
    window_seconds: float = 360.0  # samples kept (longest window any algorithm reads)


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    algorithm: Algorithm
    interval_seconds: float  # time between decisions


@dataclass(frozen=True, slots=True)
class RunResult:
    name: str
    requests: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    slo_attainment: float  # share of one-minute windows whose p90 TTFT met the target
    requests_within_slo: float  # share of requests whose TTFT met the target
    pod_seconds: float
    mean_pods: float
    peak_pods: int
    scale_events: int
    oscillations: int  # reversals of the scaling direction
    replicas: tuple[tuple[float, int], ...] = ()  # (time, desired) after every change


def simulate(
    trace: Trace,
    contender: Contender,
    fleet: FleetConfig,
    *,
    slo_seconds: float,
) -> RunResult:
    profile = get_profile(fleet.profile)
    pods: list[_Pod] = []
    gateway: deque[_Request] = deque()
    events: list[tuple[float, int, int, int]] = []  # (time, order, kind, pod index)
    order = itertools.count()
    ttft = [math.nan] * len(trace.arrivals)

    def push(at: float, kind: int, pod: int = -1) -> None:
        heapq.heappush(events, (at, next(order), kind, pod))

    def new_pod(now: float) -> None:
        pod = _Pod(len(pods), profile, created=now, ready=now + fleet.start_delay_seconds)
        pods.append(pod)
        push(pod.ready_at, _POD_READY, pod.index)

    def serving() -> list[_Pod]:
        return [p for p in pods if p.ready and not p.terminating]

    def kick(pod: _Pod, now: float) -> None:
        if not pod.stepping and (pod.waiting or pod.prefilling or pod.decoding):
            push(now + pod.start_step(), _STEP_END, pod.index)

    def route(req: _Request, now: float) -> None:
        candidates = serving()
        if not candidates:
            gateway.append(req)
            return
        pod = min(candidates, key=lambda p: (p.load, p.index))
        pod.waiting.append(req)
        kick(pod, now)

    def finished(req: _Request, now: float) -> None:
        if req.first_token is not None:
            ttft[req.index] = req.first_token - req.arrival

    def retire(pod: _Pod, now: float) -> None:
        if pod.terminating and pod.ended is None and (pod.idle or not pod.ready):
            pod.ended = now

    for _ in range(fleet.initial_pods):
        new_pod(-fleet.start_delay_seconds)  # warm at t=0
    window = MetricWindow("concurrency", fleet.target_concurrency)
    memory = Memory()
    replicas = fleet.initial_pods
    history: list[tuple[float, int]] = [(0.0, replicas)]
    push(0.0, _SAMPLE)
    push(contender.interval_seconds, _DECIDE)
    next_arrival = 0
    arrivals = trace.arrivals
    now = 0.0
    while events or next_arrival < len(arrivals):
        if next_arrival < len(arrivals) and (not events or arrivals[next_arrival] <= events[0][0]):
            now = arrivals[next_arrival]
            i = next_arrival
            next_arrival += 1
            route(_Request(i, now, trace.prompts[i], trace.outputs[i]), now)
            continue
        now, _, kind, index = heapq.heappop(events)
        if kind == _STEP_END:
            pod = pods[index]
            pod.end_step(now, finished)
            kick(pod, now)
            retire(pod, now)
        elif kind == _POD_READY:
            pod = pods[index]
            if pod.terminating:
                continue
            pod.ready = True
            while gateway:
                route(gateway.popleft(), now)
        elif kind == _SAMPLE:
            if now > trace.duration:
                continue
            live = serving()
            if live:
                total = float(sum(p.load for p in live))
                window = window.trimmed(now, fleet.window_seconds)
                window = MetricWindow(
                    window.name, window.target, (*window.samples, Sample(now, total, len(live)))
                )
            push(now + fleet.sample_seconds, _SAMPLE)
        elif kind == _DECIDE:
            if now > trace.duration:
                continue
            live = [p for p in pods if not p.terminating]
            observation = Observation(
                now=now,
                replicas=replicas,
                ready=sum(p.ready for p in live),
                metrics=(window,),
                activation_demand=float(len(gateway)),
            )
            decision = contender.algorithm.decide(observation, memory, fleet.bounds)
            memory = decision.memory
            if decision.desired != replicas:
                _resize(live, decision.desired, now, new_pod, retire)
                replicas = decision.desired
                history.append((now, replicas))
            push(now + contender.interval_seconds, _DECIDE)

    end = trace.duration
    pod_seconds = sum(min(p.ended if p.ended is not None else end, end) - max(p.created, 0.0)
                      for p in pods if max(p.created, 0.0) < end)  # fmt: skip
    return _result(
        contender.name,
        trace,
        ttft=ttft,
        pod_seconds=pod_seconds,
        history=history,
        slo_seconds=slo_seconds,
    )


def _resize(
    live: list[_Pod],
    desired: int,
    now: float,
    new_pod: Callable[[float], None],
    retire: Callable[[_Pod, float], None],
) -> None:
    if desired > len(live):
        for _ in range(desired - len(live)):
            new_pod(now)
        return
    # Scale down as a ReplicaSet does: pods not yet ready first (newest first), then the ready
    # pod with the fewest requests, so the drain is short.
    victims = sorted(live, key=lambda p: (p.ready, p.load, -p.index))[: len(live) - desired]
    for pod in victims:
        pod.terminating = True
        retire(pod, now)


def _result(
    name: str,
    trace: Trace,
    *,
    ttft: Sequence[float],
    pod_seconds: float,
    history: Sequence[tuple[float, int]],
    slo_seconds: float,
) -> RunResult:
    served = sorted(v for v in ttft if not math.isnan(v))
    minutes: dict[int, list[float]] = {}
    for arrival, value in zip(trace.arrivals, ttft, strict=True):
        minutes.setdefault(int(arrival // 60), []).append(value)
    met = sum(1 for values in minutes.values() if _p90_with_unserved(values) <= slo_seconds)
    directions = [1 if b > a else -1 for (_, a), (_, b) in itertools.pairwise(history) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(directions) if a != b)
    return RunResult(
        name=name,
        requests=len(ttft),
        ttft_p50=_quantile(served, 0.5),
        ttft_p90=_quantile(served, 0.9),
        ttft_p99=_quantile(served, 0.99),
        slo_attainment=met / len(minutes) if minutes else 1.0,
        requests_within_slo=sum(1 for v in served if v <= slo_seconds) / max(1, len(ttft)),
        pod_seconds=pod_seconds,
        mean_pods=pod_seconds / trace.duration,
        peak_pods=max(r for _, r in history),
        scale_events=len(directions),
        oscillations=reversals,
        replicas=tuple(history),
    )


def _p90_with_unserved(values: list[float]) -> float:
    # A request never served counts as infinitely late.
    return _quantile(sorted(math.inf if math.isnan(v) else v for v in values), 0.9)


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# -- the contenders and the report ----------------------------------------------------------------


def contenders() -> list[Contender]:
    """The three algorithms with their usual settings; the HPA on its 15 s sync period."""
    return [
        Contender("hpa", Hpa(HpaParams()), interval_seconds=15.0),
        Contender("kpa", Kpa(KpaParams()), interval_seconds=2.0),
        Contender("apa", Apa(ApaParams()), interval_seconds=2.0),
    ]


def table(results: Sequence[tuple[float, RunResult]], *, slo_seconds: float) -> str:
    header = (
        "| algorithm | target (requests/pod) "
        f"| SLO attainment (minutes with p90 TTFT <= {slo_seconds:g} s) "
        "| requests within SLO | TTFT p50 / p90 / p99 (s) | pod-seconds | mean pods "
        "| scaling events | oscillations |"
    )
    rows = [header, "|" + "---|" * 9]
    for target, r in results:
        rows.append(
            f"| {r.name} | {target:g} | {r.slo_attainment:.1%} | {r.requests_within_slo:.1%} "
            f"| {r.ttft_p50:.3f} / {r.ttft_p90:.3f} / {r.ttft_p99:.3f} "
            f"| {r.pod_seconds:,.0f} | {r.mean_pods:.2f} | {r.scale_events} | {r.oscillations} |"
        )
    return "\n".join(rows)


def verdict(results: Sequence[tuple[float, RunResult]], *, target: float) -> str:
    """KPA and APA against the HPA at one target: SLO, pod-seconds and oscillations."""
    at = {r.name: r for t, r in results if t == target}
    hpa = at.get("hpa")
    if hpa is None:
        return ""
    lines = []
    for name in ("kpa", "apa"):
        r = at.get(name)
        if r is None:
            continue
        fewer = 1 - r.oscillations / hpa.oscillations if hpa.oscillations else 0.0
        lines.append(
            f"{name} vs hpa at target {target:g}: SLO attainment "
            f"{(r.slo_attainment - hpa.slo_attainment) * 100:+.1f} points, pod-seconds "
            f"{(r.pod_seconds / hpa.pod_seconds - 1) * 100:+.1f}%, oscillations "
            f"{r.oscillations} vs {hpa.oscillations} ({fewer:.0%} fewer)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, for `python -m extproc.bench.autoscaling` and `extproc bench autoscaling`."""
    trace_defaults, fleet_defaults = TraceConfig(), FleetConfig()
    parser.add_argument("--hours", type=float, default=trace_defaults.hours)
    parser.add_argument("--low-rate", type=float, default=trace_defaults.low_rate)
    parser.add_argument("--high-rate", type=float, default=trace_defaults.high_rate)
    parser.add_argument("--seed", type=int, default=trace_defaults.seed)
    parser.add_argument("--profile", default=fleet_defaults.profile)
    parser.add_argument("--start-delay", type=float, default=fleet_defaults.start_delay_seconds)
    parser.add_argument(
        "--target",
        type=float,
        default=fleet_defaults.target_concurrency,
        help="the headline target (requests running + waiting per pod)",
    )
    parser.add_argument(
        "--sweep", default="12,24,32", help="more targets to run every algorithm at ('' for none)"
    )
    parser.add_argument("--slo", type=float, default=1.0, help="p90 TTFT target, seconds")
    parser.add_argument("--out", type=Path, default=Path("reports/autoscaling"))


def run(args: argparse.Namespace) -> int:
    trace_config = TraceConfig(
        hours=args.hours, low_rate=args.low_rate, high_rate=args.high_rate, seed=args.seed
    )
    trace = make_trace(trace_config)
    targets = [args.target] + [float(t) for t in args.sweep.split(",") if t.strip()]
    print(
        f"trace: {len(trace.arrivals)} requests over {trace.duration / 3600:.2f} h "
        f"({len(trace.bursts)} bursts); profile {args.profile}, pod start {args.start_delay:g} s",
        flush=True,
    )
    results: list[tuple[float, RunResult]] = []
    fleets = []
    started = time.process_time()
    for target in sorted(set(targets)):
        fleet = FleetConfig(
            profile=args.profile, start_delay_seconds=args.start_delay, target_concurrency=target
        )
        fleets.append(fleet)
        for contender in contenders():
            results.append((target, simulate(trace, contender, fleet, slo_seconds=args.slo)))
    print(f"simulated in {time.process_time() - started:.1f} s CPU", flush=True)
    text = table(results, slo_seconds=args.slo)
    summary = verdict(results, target=args.target)
    print(text)
    print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoscaling.md").write_text(
        f"# Autoscaling benchmark\n\n{len(trace.arrivals)} requests over "
        f"{trace.duration / 3600:.2f} simulated hours, seed {args.seed}, profile {args.profile}, "
        f"pod start {args.start_delay:g} s\n\n{text}\n\n{summary}\n"
    )
    (args.out / "autoscaling.json").write_text(
        json.dumps(
            {
                "trace": asdict(trace_config),
                "fleets": [asdict(f) for f in fleets],
                "slo_seconds": args.slo,
                "results": [{"target": t, **asdict(r)} for t, r in results],
            },
            indent=1,
        )
    )
    print(f"report: {args.out / 'autoscaling.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
