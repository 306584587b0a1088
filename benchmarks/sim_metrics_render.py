"""What one simulated server's `/metrics` render costs, the simulator's way and the library's.

    .venv/bin/python benchmarks/sim_metrics_render.py

A server's histograms fill in their own counts into text prometheus_client wrote once
(`extproc.sim.metrics._Histogram`); before 2026-12-07 each moved histogram was rendered by
`generate_latest`. Both run here on the same observations: a server built with each kind of
histogram, then, per round, one engine step (step and inter-token histograms move) and one
first token, or a step and a finished request (every histogram moves), then a render, as a
scrape sees it. Prints milliseconds per render (median of the rounds) for each.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from extproc.sim import metrics
from extproc.sim.engine import EngineStats
from extproc.sim.request import FinishedRequest

STATS = EngineStats(3, 1, 0, 0.5, 1069, 100, 50, 0, 1000, 500, 2000, {"stop": 3}, 100, (), ())
ROUNDS = 300


class LibraryHistogram:
    """The earlier histogram: a registry of its own, rendered by `generate_latest`."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float], labels: list[str]) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        histogram = Histogram(
            name, doc, ["model_name", "engine"], buckets=buckets, registry=self._registry
        )
        self._child = histogram.labels(*labels)
        self._text: bytes | None = None

    def observe(self, value: float) -> None:
        self._child.observe(value)
        self._text = None

    def text(self) -> bytes:
        if self._text is None:
            self._text = generate_latest(self._registry)
        return self._text


def server(histogram: type) -> metrics.ServerMetrics:
    """A server whose histograms are of `histogram`'s kind (`ServerMetrics` makes them through
    the module's name, so the earlier kind is swapped in for the construction only)."""
    ours = metrics._Histogram
    metrics._Histogram = histogram  # type: ignore[misc]
    try:
        return metrics.ServerMetrics(
            model_name="meta-llama/Llama-3.1-8B-Instruct",
            stats=lambda: STATS,
            cache_info={"block_size": "16"},
            max_model_len=8192,
            max_lora=None,
        )
    finally:
        metrics._Histogram = ours  # type: ignore[misc]


def move(m: metrics.ServerMetrics, i: int, *, finish: bool) -> None:
    """One engine step, then a first token or a finished request."""
    m.on_step(40, [0.01] * 8)
    if finish:
        m.on_finished(FinishedRequest(f"r{i}", 100, 10, 0, "stop", 0.0, 0.0, 0.05, 0.5, 0, 10))
    else:
        m.on_first_token(0.05)


def per_render(m: metrics.ServerMetrics, *, finish: bool) -> float:
    times = []
    for i in range(ROUNDS):
        move(m, i, finish=finish)
        start = time.perf_counter()
        m.render()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    print(f"{'render after':<28}{'filled in (ms)':>16}{'generate_latest (ms)':>22}")
    for label, finish in (("a step and a first token", False), ("a step and a finish", True)):
        row = [
            per_render(server(kind), finish=finish)
            for kind in (metrics._Histogram, LibraryHistogram)
        ]
        print(f"{label:<28}{row[0]:>16.2f}{row[1]:>22.2f}")


if __name__ == "__main__":
    main()
