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

Process helpers come from `extproc.bench.overhead`, quantiles from `extproc.bench.loadgen`,
Envoy from `extproc.envoy_runner`; this module only wires them together and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from extproc.bench import loadgen
from extproc.bench.processes import (
    free_port_range,
    free_ports,
    picker_ready_endpoints,
    process,
    run_stoppable,
    wait_for_port,
)
from extproc.envoy_runner import EnvoyError, render_bootstrap, running_envoy
from extproc.sim.fleet import DEFAULT_MODEL, READY_LINE
from extproc.sim.profiles import get_profile

# The strategies compared, in order. The first is the baseline the others are compared with.
STRATEGIES: Final = ("round-robin", "least-request", "prefix-cache", "cost")
# What each strategy does, in the words the report uses for a newcomer.
STRATEGY_SUMMARIES: Final = {
    "round-robin": "each pod in turn, blind to the prompt and to the load",
    "least-request": "the pod with the fewest requests in flight from the picker",
    "prefix-cache": "the pod that already caches the longest part of the prompt, weighed "
    "against its queue and KV-cache use",
    "cost": "the pod with the lowest predicted time to first token (cache, queue and batch)",
}
# Why a strategy may send most requests to one pod, said when it does (busiest pod > half).
CONCENTRATION_REASONS: Final = {
    "prefix-cache": "no pod queued or filled its KV cache at this load, so the load terms "
    "never outweighed the prefix the pod shared with every new prompt (the chat template); "
    "cost spreads from the start because it predicts each pod's time",
}
STRATEGY_HEADER: Final = "x-routing-strategy"
PROFILE: Final = "h100-8b"
DEFAULT_OUTPUT: Final = Path("reports/demo")

# request_success_total has a series per finished_reason, abort and error included (as in vLLM);
# those requests did not succeed.
_NOT_SUCCESS: Final = frozenset({"abort", "error"})


class DemoError(RuntimeError):
    """A part of the demo did not start or did not answer; the message says which and why."""


# --- options and workload ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoOptions:
    pods: int = 4
    # Simulated time runs `speed` times faster than the wall clock. At 1 the client's TTFT is
    # directly comparable to a real fleet's (Envoy's and the picker's own time included at face
    # value), the two strategies take about 70 s in all, and the whole stack uses well under
    # one core. A higher speed shortens the run but multiplies the routing path's real
    # milliseconds when TTFT is scaled back to simulated time.
    speed: float = 1.0
    seed: int = 0
    groups: int = 8  # distinct long system prompts (think: 8 apps or documents)
    questions: int = 12  # user questions per system prompt
    system_words: tuple[int, int] = (1100, 1500)  # about 1.4k-1.9k tokens with the template
    max_tokens: tuple[int, int] = (50, 100)
    rate: float = 3.0  # Poisson arrivals, requests per simulated second
    model: str = DEFAULT_MODEL
    output: Path = DEFAULT_OUTPUT
    quick: bool = False

    def __post_init__(self) -> None:
        if self.pods < 1:
            raise ValueError("--pods must be at least 1")
        if self.speed <= 0:
            raise ValueError("--speed must be positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        options = cls(pods=args.pods, speed=args.speed, seed=args.seed, output=args.output)
        if args.quick:
            # 48 requests at 6 per second, about 8 s per strategy: under a minute in all,
            # start-up included. Twelve questions per prompt keep the cold first request of each
            # group under a tenth of the run, so the p90 shows what reuse buys, not the misses.
            options = replace(options, quick=True, groups=4, questions=12, rate=6.0)
        return options

    @property
    def requests(self) -> int:
        return self.groups * self.questions

    @property
    def wall_rate(self) -> float:
        """Arrivals per wall-clock second: simulated seconds pass `speed` times faster."""
        return self.rate * self.speed


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    at: float  # wall-clock seconds after the run's start
    body: bytes


_WORD_TEXT: Final = (
    "account admin alert api archive audit backup balance batch billing branch browser budget "
    "cache calendar capacity catalog certificate channel checkout client cluster compliance "
    "config contract coupon credential customer dashboard database deadline delivery deploy "
    "device discount domain draft driver email endpoint engine error estimate event export "
    "feature feedback field file filter firmware forecast gateway grant group handbook holiday "
    "identity import incident index inventory invoice issue journal key label latency ledger "
    "license limit local log manager manual merchant message metric migration mobile model "
    "module network node notice order owner package partner password payment permission "
    "pipeline plan platform policy portal price printer priority product profile project "
    "promotion protocol quota receipt record refund region release report request reservation "
    "resource review role route schedule schema secret sensor server service session setting "
    "shipment signal source staff standard status storage subscription supplier support "
    "survey system task team template tenant ticket timeout token tracking transfer update "
    "upgrade usage user vendor version volume voucher warehouse webhook window workflow zone"
)
_WORDS: Final = tuple(_WORD_TEXT.split())
_VERBS: Final = (
    "must be approved by",
    "is renewed with",
    "is stored next to",
    "should never be shared with",
    "is escalated to",
    "is checked against",
    "expires together with",
    "is billed to",
    "is restored from",
    "is assigned to",
)
_QUESTIONS: Final = (
    "How do I reset the {0} for a new {1}?",
    "What happens to a {0} when the {1} expires?",
    "Who approves a {0} for the {1} team?",
    "Can a {0} be moved to another {1}, and how long does it take?",
    "Why was my {0} rejected by the {1}?",
    "Where do I find the {0} of last month's {1}?",
)


def _system_prompt(rng: random.Random, group: int, words: int) -> str:
    """A long, app-specific system prompt: a persona, then a made-up policy handbook."""
    company = f"{rng.choice(_WORDS).title()}{rng.choice(_WORDS).title()} #{group}"
    lines = [
        f"You are the support assistant of {company}. Answer in at most three sentences, "
        "quote the handbook section you used, and never invent a policy. Handbook:"
    ]
    count = 0
    section = 0
    while count < words:
        section += 1
        subject, other = rng.choice(_WORDS), rng.choice(_WORDS)
        detail = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14)))
        sentence = f"{section}. Every {subject} {rng.choice(_VERBS)} the {other} ({detail})."
        lines.append(sentence)
        count += len(sentence.split())
    return "\n".join(lines)


def build_workload(options: DemoOptions) -> tuple[PlannedRequest, ...]:
    """The requests of one run, with their send times; the same for every strategy (seeded)."""
    rng = random.Random(options.seed)
    prompts = [
        _system_prompt(rng, group, rng.randint(*options.system_words))
        for group in range(options.groups)
    ]
    pairs = [(g, q) for g in range(options.groups) for q in range(options.questions)]
    rng.shuffle(pairs)
    planned: list[PlannedRequest] = []
    at = 0.0
    for group, number in pairs:
        question = rng.choice(_QUESTIONS).format(rng.choice(_WORDS), rng.choice(_WORDS))
        body = {
            "model": options.model,
            "messages": [
                {"role": "system", "content": prompts[group]},
                {"role": "user", "content": f"(question {number + 1}) {question}"},
            ],
            "max_tokens": rng.randint(*options.max_tokens),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        planned.append(PlannedRequest(at=at, body=json.dumps(body).encode()))
        at += rng.expovariate(options.wall_rate)
    return tuple(planned)


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
        data["endpoints"] = list(_endpoints(self.ports, self.options.pods))
        data["routing"] = _routing(self.results)
        data["in_short"] = _in_short(self.results)
        data["where_to_look_next"] = [
            f"{what.replace('`', '')}: {why}" for what, why in _next_steps(self.ports)
        ]
        return data


# --- running the processes --------------------------------------------------------------------


def _endpoints(ports: Ports, pods: int) -> tuple[str, ...]:
    # Envoy's pool and the picker's --endpoints must name the same ip:port strings: Envoy's
    # override_host skips an address it does not know.
    return tuple(f"127.0.0.1:{ports.sim + i}" for i in range(pods))


def _python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc.cli", *args]


def _sim_argv(options: DemoOptions, ports: Ports) -> list[str]:
    return _python_cli(
        "sim",
        *("--pods", str(options.pods), "--port", str(ports.sim), "--profile", PROFILE),
        *("--speed", f"{options.speed:g}", "--model", options.model, "--seed", str(options.seed)),
        *("--log-level", "WARNING"),
    )


def _picker_argv(options: DemoOptions, ports: Ports, *, config: Path) -> list[str]:
    return _python_cli(
        "serve",
        *("--config", str(config)),
        *("--host", "127.0.0.1", "--endpoints", ",".join(_endpoints(ports, options.pods))),
        *("--grpc-port", str(ports.grpc), "--health-port", str(ports.health)),
        *("--metrics-port", str(ports.metrics), "--log-level", "WARNING"),
    )


def _shown(argv: Sequence[str]) -> str:
    """The command as a person would type it."""
    return " ".join(["extproc", *argv[3:]])


def _wait_for_picker(
    child: subprocess.Popen[str], argv: Sequence[str], *, ports: Ports, pods: int
) -> None:
    """Wait until the picker listens and has seen every pod ready (it learns them at start-up)."""
    deadline = time.monotonic() + 30
    while True:
        code = child.poll()
        if code is not None:
            raise DemoError(
                f"the picker exited with code {code} before listening on :{ports.grpc}; "
                f"run `{_shown(argv)}` to see why"
            )
        try:
            wait_for_port(ports.grpc, within=0.5)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise DemoError(f"the picker did not listen on :{ports.grpc} within 30 s") from None
    ready = -1.0
    while time.monotonic() < deadline:
        ready = picker_ready_endpoints(ports.metrics)
        if ready == pods:
            return
        time.sleep(0.2)
    raise DemoError(f"the picker sees {ready:g} of {pods} pods ready after 30 s")


@contextlib.contextmanager
def _fleet_and_picker(options: DemoOptions, ports: Ports, *, picker_config: Path) -> Iterator[None]:
    """A fresh fleet and a fresh picker on the given ports; both stopped by PID on exit."""
    sim_argv = _sim_argv(options, ports)
    picker_argv = _picker_argv(options, ports, config=picker_config)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(process(sim_argv, ready_line=READY_LINE))
        except RuntimeError as exc:
            last = ports.sim + options.pods - 1
            raise DemoError(
                f"the simulated fleet did not start on ports {ports.sim}-{last}; "
                f"run `{_shown(sim_argv)}` to see why"
            ) from exc
        picker = stack.enter_context(process(picker_argv))
        _wait_for_picker(picker, picker_argv, ports=ports, pods=options.pods)
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
    for address in _endpoints(ports, pods):
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
    endpoints = _endpoints(ports, options.pods)
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
    results = []
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
        picker_config.write_text("server:\n  shutdown_grace_seconds: 0\n  drain_delay_seconds: 0\n")
        for strategy in STRATEGIES:
            say(
                f"extproc demo: {strategy}: starting a fresh fleet ({options.pods} pods from "
                f":{ports.sim}) and picker (:{ports.grpc}); {len(workload)} requests over "
                f"~{workload[-1].at:.0f} s"
            )
            with _fleet_and_picker(options, ports, picker_config=picker_config):
                result = asyncio.run(
                    _run_workload(options, ports, workload=workload, strategy=strategy)
                )
            results.append(result)
    return DemoReport(
        options=options,
        ports=ports,
        results=tuple(results),
        seconds=time.monotonic() - started,
    )


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
