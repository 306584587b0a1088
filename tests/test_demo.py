"""`extproc demo --quick` end to end: real processes, real Envoy; checks the report's content.

The demo is run once (module fixture) as a subprocess, exactly as `make demo` runs it, and the
tests read what it printed and the JSON and markdown it wrote. Nothing here depends on how fast
the machine is: only counts, ranges and the presence of numbers are checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.demo import STRATEGIES

pytestmark = pytest.mark.e2e


@dataclass(frozen=True, slots=True)
class DemoRun:
    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any]
    markdown: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    output = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "demo", "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return DemoRun(
        returncode=done.returncode,
        stdout=done.stdout,
        stderr=done.stderr,
        report=json.loads((output / "demo.json").read_text()),
        markdown=(output / "demo.md").read_text(),
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


def test_printed_report_explains_itself(demo: DemoRun) -> None:
    text = demo.stdout
    for heading in ("What ran", "Workload", "Results", "Compared with round-robin"):
        assert heading in text
    assert "TTFT" in text and "hit rate" in text
    for strategy in STRATEGIES[1:]:
        assert f"{strategy}: TTFT p90" in text


def test_where_to_look_next(demo: DemoRun) -> None:
    for text in (demo.stdout, demo.markdown):
        assert "Where to look next" in text
        for pointer in ("README.md", "docs/architecture.md", "docs/benchmarks.md"):
            assert pointer in text
        assert "extproc bench overhead" in text
        assert "/metrics" in text
    assert len(demo.report["where_to_look_next"]) >= 5


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
