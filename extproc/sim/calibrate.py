"""Replay published vLLM benchmark runs on the simulated engine and compare the metrics.

Each case (a JSON file in `extproc/sim/calibration/`) is one published run: the request
lengths (per request where the source lists them, else the fixed lengths it states), the load
(all at once, or a closed loop at a fixed concurrency), the server settings, the simulator
profile of the engine's generation, and the published metrics with their source.

The replay runs one `Engine` on a virtual-time asyncio loop: the loop's clock advances to the
next timer instead of sleeping, so a replay is deterministic and takes milliseconds of CPU per
simulated second, whatever the machine's load. Metrics are computed as vLLM's
`benchmark_serving` computes them: TTFT per request (0.0 for a request whose answer had no
text, as the client records it), TPOT = (latency - TTFT) / (output tokens - 1) for requests
with more than one output token, output throughput = output tokens / duration (from the first
send to the last answer), p99 by linear interpolation (numpy's default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Final

from extproc.prefix.hashing import BlockHasher
from extproc.sim.engine import Engine, EngineConfig
from extproc.sim.profiles import GIB, StepProfile, get_profile
from extproc.sim.request import FinishedRequest

METRICS: Final = ("ttft_mean_ms", "ttft_p99_ms", "tpot_median_ms", "output_tok_s")
DEFAULT_BAND: Final = (0.85, 1.15)  # the target: within 15% of every published figure
_TOKEN_BASE: Final = 1_000_000  # request i's prompt ids start at i * this: no shared prefixes


@dataclass(frozen=True, slots=True)
class Case:
    """One published run, as stored in a calibration JSON file."""

    case_id: str
    title: str
    source: dict[str, str]
    engine: str
    generation: str
    hardware: str
    model: str
    profile: str
    profile_overrides: dict[str, Any]
    server: dict[str, Any]
    load: dict[str, Any]
    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    published: dict[str, float]
    bands: dict[str, tuple[float, float]]
    notes: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        req = data["requests"]
        if "input_lens" in req:
            inputs = tuple(int(x) for x in req["input_lens"])
            outputs = tuple(int(x) for x in req["output_lens"])
            if len(inputs) != len(outputs):
                raise ValueError(f"{data['id']}: input_lens and output_lens differ in length")
        else:
            inputs = (int(req["input_len"]),) * int(req["count"])
            outputs = (int(req["output_len"]),) * int(req["count"])
        published = {k: float(v) for k, v in data["published"].items() if v is not None}
        unknown = set(published) - set(METRICS)
        if unknown:
            raise ValueError(f"{data['id']}: unknown published metrics {sorted(unknown)}")
        bands = {k: (float(v[0]), float(v[1])) for k, v in data.get("bands", {}).items()}
        return cls(
            case_id=data["id"],
            title=data["title"],
            source=dict(data["source"]),
            engine=data["engine"],
            generation=data["generation"],
            hardware=data["hardware"],
            model=data["model"],
            profile=data["profile"],
            profile_overrides=dict(data.get("profile_overrides", {})),
            server=dict(data.get("server", {})),
            load=dict(data.get("load", {"kind": "burst"})),
            input_lens=inputs,
            output_lens=outputs,
            published=published,
            bands=bands,
            notes=data.get("notes", ""),
        )

    def band(self, metric: str) -> tuple[float, float]:
        return self.bands.get(metric, DEFAULT_BAND)

    def step_profile(self) -> StepProfile:
        profile = get_profile(self.profile)
        known = {f.name for f in fields(StepProfile)}
        overrides: dict[str, Any] = {}
        for key, value in self.profile_overrides.items():
            if key.startswith("_"):
                continue  # a comment
            if key not in known:
                raise ValueError(f"{self.case_id}: unknown profile field {key!r}")
            if key == "linear_ms":
                overrides[key] = tuple((int(t), float(ms)) for t, ms in value)
            else:
                overrides[key] = value
        if "gpu_memory_utilization" in self.server:
            overrides["gpu_memory_utilization"] = float(self.server["gpu_memory_utilization"])
        if "gpu_memory_gib" in self.server:
            overrides["gpu_memory_bytes"] = int(self.server["gpu_memory_gib"] * GIB)
        return replace(profile, **overrides) if overrides else profile

    def engine_config(self) -> EngineConfig:
        profile = self.step_profile()
        return EngineConfig(
            profile=profile,
            num_gpu_blocks=profile.num_gpu_blocks(16),
            max_num_seqs=int(self.server.get("max_num_seqs", profile.max_num_seqs)),
            max_num_batched_tokens=int(
                self.server.get("max_num_batched_tokens", profile.max_num_batched_tokens)
            ),
            max_model_len=int(self.server.get("max_model_len", profile.max_model_len)),
            hasher=BlockHasher(),
            enable_prefix_caching=bool(self.server.get("enable_prefix_caching", True)),
        )


@dataclass(frozen=True, slots=True)
class Metrics:
    ttft_mean_ms: float
    ttft_p99_ms: float
    tpot_median_ms: float
    output_tok_s: float
    duration_s: float

    def get(self, name: str) -> float:
        value: float = getattr(self, name)
        return value


@dataclass(frozen=True, slots=True)
class Comparison:
    case: Case
    simulated: Metrics

    def ratio(self, metric: str) -> float | None:
        published = self.case.published.get(metric)
        if published is None or published == 0:
            return None
        return self.simulated.get(metric) / published

    def failures(self) -> list[str]:
        out: list[str] = []
        for metric in METRICS:
            ratio = self.ratio(metric)
            if ratio is None:
                continue
            lo, hi = self.case.band(metric)
            if not lo <= ratio <= hi:
                out.append(f"{self.case.case_id} {metric}: ratio {ratio:.2f} outside {lo}-{hi}")
        return out


# -- the virtual-time loop ----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0


class _VirtualSelector(selectors.DefaultSelector):
    """Polls without blocking; a wait for the next timer moves the virtual clock instead."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            # Nothing ready and no timer: a real loop would block forever.
            raise RuntimeError("the replay deadlocked: nothing to run and no timer")
        self._clock.now += max(timeout, 0.0)
        return []


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._clock = _Clock()
        super().__init__(_VirtualSelector(self._clock))

    def time(self) -> float:
        return self._clock.now


def _percentile(values: Sequence[float], q: float) -> float:
    """numpy.percentile's default (linear interpolation between closest ranks)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def _replay(case: Case) -> list[FinishedRequest]:
    loop = asyncio.get_running_loop()
    engine = Engine(case.engine_config(), wall=loop.time, sleep=asyncio.sleep)
    runner = asyncio.create_task(engine.run())
    records: list[FinishedRequest] = []

    async def one(i: int) -> None:
        n = max(case.input_lens[i], 1)
        prompt = range(i * _TOKEN_BASE, i * _TOKEN_BASE + n)
        req = engine.submit(f"r{i}", list(prompt), max_tokens=max(case.output_lens[i], 1))
        records.append(await req.done)

    count = len(case.input_lens)
    kind = case.load.get("kind", "burst")
    if kind == "burst":
        await asyncio.gather(*(one(i) for i in range(count)))
    elif kind == "concurrency":
        pending = iter(range(count))

        async def worker() -> None:
            for i in pending:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(int(case.load["concurrency"]))))
    else:
        raise ValueError(f"{case.case_id}: unknown load kind {kind!r}")
    engine.close()
    await runner
    return records


def replay(case: Case) -> Metrics:
    """Run the case on the simulated engine in virtual time and compute its metrics."""
    loop = _VirtualLoop()
    try:
        records = loop.run_until_complete(_replay(case))
    finally:
        loop.close()
    by_id = {r.request_id: r for r in records}
    ttfts: list[float] = []
    tpots: list[float] = []
    out_tokens = 0
    end = 0.0
    for i, out_len in enumerate(case.output_lens):
        rec = by_id[f"r{i}"]
        end = max(end, rec.finished)
        out_tokens += out_len
        ttft = rec.ttft or 0.0
        # benchmark_serving records TTFT 0.0 for an answer with no text (output_len 0).
        ttfts.append(ttft if out_len > 0 else 0.0)
        if out_len > 1:
            tpots.append((rec.finished - rec.arrival - ttft) / (out_len - 1))
    return Metrics(
        ttft_mean_ms=1000 * sum(ttfts) / len(ttfts),
        ttft_p99_ms=1000 * _percentile(ttfts, 99),
        tpot_median_ms=1000 * _percentile(tpots, 50),
        output_tok_s=out_tokens / end if end > 0 else 0.0,
        duration_s=end,
    )


# -- cases on disk ------------------------------------------------------------------------------


def load_cases(directory: Path | None = None) -> list[Case]:
    """Every case file, sorted by id (the package's calibration folder by default)."""
    if directory is not None:
        files = sorted(directory.glob("*.json"))
        return sorted(
            (Case.from_json(json.loads(f.read_text())) for f in files), key=lambda c: c.case_id
        )
    folder = resources.files("extproc.sim") / "calibration"
    texts = [f.read_text() for f in folder.iterdir() if f.name.endswith(".json")]
    return sorted((Case.from_json(json.loads(t)) for t in texts), key=lambda c: c.case_id)


def compare(cases: Sequence[Case]) -> list[Comparison]:
    return [Comparison(case, replay(case)) for case in cases]


_LABELS: Final = {
    "ttft_mean_ms": "TTFT mean ms",
    "ttft_p99_ms": "TTFT p99 ms",
    "tpot_median_ms": "TPOT p50 ms",
    "output_tok_s": "out tok/s",
}


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def render_table(comparisons: Sequence[Comparison]) -> str:
    """A Markdown table: per case and metric, simulated / published (ratio)."""
    head = "| case | profile | " + " | ".join(_LABELS[m] for m in METRICS) + " |"
    lines = [head, "|---|---|" + "---|" * len(METRICS)]
    for comp in comparisons:
        cells: list[str] = []
        for metric in METRICS:
            ratio = comp.ratio(metric)
            if ratio is None:
                cells.append(f"{_fmt(comp.simulated.get(metric))} / -")
                continue
            lo, hi = comp.case.band(metric)
            mark = "" if lo <= ratio <= hi else " !"
            cells.append(
                f"{_fmt(comp.simulated.get(metric))} / "
                f"{_fmt(comp.case.published[metric])} ({ratio:.2f}{mark})"
            )
        lines.append(f"| {comp.case.case_id} | {comp.case.profile} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", action="append", default=[], help="only these case ids")
    parser.add_argument("--cases-dir", type=Path, default=None, help="case JSON folder")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")


def run(args: argparse.Namespace) -> int:
    cases = load_cases(args.cases_dir)
    if args.case:
        wanted = set(args.case)
        cases = [c for c in cases if c.case_id in wanted]
        if not cases:
            print(f"extproc sim calibrate: no case named {sorted(wanted)}", file=sys.stderr)
            return 2
    comparisons = compare(cases)
    if args.json:
        rows = [
            {
                "case": c.case.case_id,
                "profile": c.case.profile,
                "simulated": {m: c.simulated.get(m) for m in METRICS},
                "published": c.case.published,
                "ratios": {m: c.ratio(m) for m in METRICS},
            }
            for c in comparisons
        ]
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(comparisons))
    failures = [f for c in comparisons for f in c.failures()]
    for failure in failures:
        print(f"outside band: {failure}", file=sys.stderr)
    return 1 if failures else 0
