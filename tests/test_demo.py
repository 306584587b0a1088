"""`extproc demo --quick` end to end: real processes, real Envoy; checks the report's content.

The demo is run once as a subprocess, exactly as `make demo` runs it (started when collection
finishes, so that it runs beside the rest of the suite: tests/demo_run.py), and the tests read
what it printed and the JSON and markdown it wrote. Nothing here depends on how fast
the machine is: only counts, ranges and the presence of numbers are checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.bench.demo_plan import CONCENTRATION_REASONS, STRATEGIES, STRATEGY_SUMMARIES
from extproc.bench.demo_report import StrategyResult, _in_short, _routing
from tests.demo_run import started_demo

pytestmark = pytest.mark.e2e


@dataclass(frozen=True, slots=True)
class DemoRun:
    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any]
    markdown: str


@pytest.fixture(scope="module")
def demo(request: pytest.FixtureRequest) -> DemoRun:
    """The demo this session started when collection finished (tests/demo_run.py)."""
    started = started_demo(request.config)
    assert started is not None, "tests/demo_run.py starts the demo when this module is selected"
    returncode = started.wait(timeout=300)
    stdout, stderr = started.stdout.read_text(), started.stderr.read_text()
    assert returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    report = started.output / "report"
    return DemoRun(
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        report=json.loads((report / "demo.json").read_text()),
        markdown=(report / "demo.md").read_text(),
    )


def _result(demo: DemoRun, strategy: str) -> dict[str, Any]:
    return next(r for r in demo.report["results"] if r["strategy"] == strategy)


def test_every_strategy_ran_in_order(demo: DemoRun) -> None:
    assert [r["strategy"] for r in demo.report["results"]] == list(STRATEGIES)
    assert STRATEGIES[0] == "round-robin"
    for strategy in STRATEGIES:
        assert strategy in demo.stdout
        assert f"| {strategy} |" in demo.markdown


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_requests_all_succeeded(demo: DemoRun, strategy: str) -> None:
    result = _result(demo, strategy)
    assert result["sent"] > 0
    assert result["sent"] == demo.report["options"]["groups"] * demo.report["options"]["questions"]
    assert result["errors"] == 0, result["first_error"]
    assert result["ok"] == result["sent"]
    assert result["output_tokens"] > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_pod_counts_add_up(demo: DemoRun, strategy: str) -> None:
    result = _result(demo, strategy)
    assert len(result["per_pod"]) == demo.report["options"]["pods"] == 4
    assert sum(result["per_pod"]) == result["sent"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hit_rate_and_ttft_are_numbers(demo: DemoRun, strategy: str) -> None:
    result = _result(demo, strategy)
    assert 0.0 <= result["hit_rate"] <= 1.0
    # Several questions share each system prompt, so some prompt tokens must have been cached.
    assert result["hit_rate"] > 0.0
    for key in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p50_sim_ms", "ttft_p90_sim_ms"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ttft_p50_ms"] <= result["ttft_p90_ms"]
    assert result["prompt_tokens_mean"] > 1000  # long shared system prompts


@pytest.mark.parametrize("strategy", ["prefix-cache", "cost"])
def test_prefix_aware_strategies_reuse_more_than_round_robin(demo: DemoRun, strategy: str) -> None:
    # Round-robin sends each system prompt to every pod, so each pod computes it once; the
    # prefix-aware strategies compute it once in the fleet. The quick form has 12 questions per
    # prompt, so the gap is some 20 points; 10 leaves room for the simulator's eviction.
    assert _result(demo, strategy)["hit_rate"] > _result(demo, "round-robin")["hit_rate"] + 0.10


def test_printed_report_explains_itself(demo: DemoRun) -> None:
    text = demo.stdout
    for heading in ("What ran", "Workload", "Results", "Compared with round-robin"):
        assert heading in text
    assert "TTFT" in text and "hit rate" in text
    for strategy in STRATEGIES[1:]:
        assert f"{strategy}: TTFT p90" in text


def test_report_says_how_requests_were_routed(demo: DemoRun) -> None:
    assert set(STRATEGY_SUMMARIES) >= set(STRATEGIES)
    routing = demo.report["routing"]
    assert len(routing) == len(STRATEGIES)
    for strategy, line in zip(STRATEGIES, routing, strict=True):
        per_pod = " / ".join(map(str, _result(demo, strategy)["per_pod"]))
        assert line.startswith(f"{strategy}: {STRATEGY_SUMMARIES[strategy]}")
        assert per_pod in line
    for text in (demo.stdout, demo.markdown):
        assert "How requests were routed" in text
        assert "busiest pod took" in text


def test_routing_explains_a_pile_up_only_when_there_is_one() -> None:
    even = _result_for("prefix-cache", p90=100.0, hit=0.8)
    piled = dataclasses.replace(even, per_pod=(8, 0, 0, 0))
    reason = CONCENTRATION_REASONS["prefix-cache"]
    assert reason not in _routing([even])[0]
    assert _routing([piled])[0].endswith(f"the busiest pod took 100%: {reason}")


def test_report_ends_with_a_verdict_against_round_robin(demo: DemoRun) -> None:
    verdict = demo.report["in_short"]
    assert verdict and "round-robin" in verdict[0]
    assert "reused the most" in verdict[1] and "round-robin" in verdict[1]
    text = demo.stdout
    # The verdict comes after the numbers and before the pointers, where a newcomer looks.
    assert text.index("Results") < text.index("In short") < text.index("Where to look next")
    assert "## In short" in demo.markdown


def _result_for(strategy: str, *, p90: float, hit: float) -> StrategyResult:
    return StrategyResult(
        strategy=strategy,
        sent=8,
        ok=8,
        errors=0,
        per_pod=(2, 2, 2, 2),
        ttft_p50_ms=p90 / 2,
        ttft_p90_ms=p90,
        ttft_p50_sim_ms=p90 / 2,
        ttft_p90_sim_ms=p90,
        output_tokens=800,
        seconds=1.0,
        output_tokens_per_s=800.0,
        hit_rate=hit,
        prompt_tokens_mean=1500.0,
        first_error="",
    )


@pytest.mark.parametrize(
    ("best_p90", "best_hit", "expected"),
    [
        (200.0, 0.8, ["gave the fastest first tokens", "5.0x sooner", "80%", "Why:"]),
        (1500.0, 0.8, ["No strategy beat round-robin", "came closest", "Why no faster"]),
        (1500.0, 0.1, ["No strategy beat round-robin", "reused the most: 10%"]),
    ],
    ids=["faster", "cache-not-faster", "nothing-better"],
)
def test_verdict_sentences(best_p90: float, best_hit: float, expected: list[str]) -> None:
    results = [
        _result_for("round-robin", p90=1000.0, hit=0.3),
        _result_for("prefix-cache", p90=best_p90, hit=best_hit),
    ]
    text = " ".join(_in_short(results))
    for phrase in expected:
        assert phrase in text
    assert ("Why" in text) == (best_hit > 0.3)


def test_where_to_look_next(demo: DemoRun) -> None:
    root = Path(__file__).resolve().parent.parent
    for text in (demo.stdout, demo.markdown):
        assert "Where to look next" in text
        for pointer in (
            "README.md",
            "docs/architecture.md",
            "docs/benchmarks.md",
            "docs/deploy.md",
            "docs/observability.md",
        ):
            assert pointer in text
            assert (root / pointer).is_file(), f"the report points at a missing {pointer}"
        assert "extproc bench overhead" in text
        assert "/metrics" in text
    assert len(demo.report["where_to_look_next"]) >= 7


def test_bad_option_fails_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "demo", "--pods", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "--pods" in done.stderr


def test_report_dir_is_created(demo: DemoRun) -> None:
    assert Path(demo.report["options"]["output"]).is_dir()
