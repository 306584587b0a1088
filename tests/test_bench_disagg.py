"""`extproc bench routing --workload pd | --fleet mixed`: what a run's figures are made of, and
one tiny disaggregated run through Envoy, the picker and the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.bench import workloads as wl
from extproc.bench.disagg import Options, Setup, measure, render_markdown, run_disagg
from extproc.bench.runs import CpuUse
from extproc.prefix.tokenizers import load_tokenizer

CPU = CpuUse(0.0, 0.0, 0.0, 0.0, 0.0)


class _Sent:
    def __init__(self, index: int) -> None:
        self.index, self.status, self.sent, self.answered = index, 200, 0.1 * index, 1.0
        self.response_id, self.output_tokens, self.error = f"cmpl-{index}-0", 100, ""
        self.first_chunk = None  # not streamed


def _record(server: int, arrival: float, first: float, prefill_arrival: float | None) -> Any:
    return {
        "arrival": arrival,
        "first_token": first,
        "finished": first + 1.0,
        "output_tokens": 100,
        "prompt_tokens": 1000,
        "prefill_arrival": prefill_arrival,
        "transferred_tokens": 1000 if prefill_arrival is not None else 0,
        "itl_mean": 0.01,
        "server": server,
    }


def test_a_disaggregated_requests_ttft_includes_its_prefill_and_the_bill_is_busy_time() -> None:
    workload = wl.random_prompts(load_tokenizer("cl100k_base"), shape=wl.RandomShape(requests=2))
    options = Options(kind="mixed", prices={"a100": 2.0, "h100": 4.0})
    setup = Setup("x", ("a100-8b", "h100-8b"), ("both", "both"))
    records = [_record(0, 5.0, 5.1, None), _record(1, 7.0, 7.05, 6.75)]
    stats = [
        {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "preemptions": 0, "busy_seconds": 1800},
        {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "preemptions": 0, "busy_seconds": 900},
    ]
    result = measure(
        options,
        setup,
        mix="random",
        rate=1.0,
        workload=workload,
        sent=[_Sent(0), _Sent(1)],
        records=records,
        stats=stats,
        wall_seconds=1.0,
        cpu=CPU,
    )
    # TTFTs 100 ms (aggregated) and 300 ms (from the prefill's start, not the decode's 50 ms).
    assert result.base.ttft_p50_ms == pytest.approx(100, abs=1)
    assert result.base.ttft_p99_ms == pytest.approx(300, abs=1)
    # Half an hour of A100 at 2/h and a quarter of H100 at 4/h: 2.0 for 200 output tokens.
    assert result.cost_per_million == pytest.approx(2.0 / 200 * 1e6)
    assert result.busy_seconds == {"a100-8b": 1800, "h100-8b": 900}
    assert result.per_profile_requests == {"a100-8b": 1, "h100-8b": 1}
    assert result.transferred_share == pytest.approx(0.5)
    assert result.itl_p50_ms == pytest.approx(10)


@pytest.mark.slow
def test_tiny_pd_run_end_to_end(tmp_path: Path) -> None:
    options = Options(
        kind="pd",
        speed=10.0,
        pd_split=(1, 1),
        mixes=("long-prompt",),
        requests=6,
        drain_seconds=60.0,
        output=tmp_path,
    )
    report = run_disagg(options, progress=False)
    assert [r.setup for r in report.results] == ["aggregated", "p2p 1P+1D", "centralized 1P+1D"]
    for r in report.results:
        assert (r.base.sent, r.base.ok, r.base.errors) == (6, 6, 0), r.base.first_error
        assert r.base.ttft_p50_ms > 0 and r.itl_p50_ms > 0
    aggregated, p2p, centralized = report.results
    assert aggregated.transferred_share == 0
    # Every prompt (3000-6000 tokens) is over the threshold: all of it moved.
    assert p2p.transferred_share > 0.9 and centralized.transferred_share > 0.9
    # Decoded where they were not prefilled: every answer came from the decode server.
    assert p2p.base.per_pod == (0, 6) and centralized.base.per_pod == (0, 6)
    assert "| long-prompt |" in render_markdown(report)
