"""`benchmarks/exchange_timing.py` end to end, briefly: real Envoy, the picker, the minimal
servicer, both body modes; every request answered and timed by Envoy (run as a script, as
documented)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "exchange_timing.py"

pytestmark = pytest.mark.e2e


def test_every_variant_is_answered_and_timed_by_envoy(tmp_path: Path) -> None:
    args = ["--requests", "6", "--rate", "30", "--kb", "4", "--rounds", "1"]
    args += ["--body-modes", "buffered,streamed"]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--output", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "exchange.json").read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert list(results) == [
        "envoy",
        *("minimal", "round-robin", "cost"),
        *("minimal-streamed", "round-robin-streamed", "cost-streamed"),
    ]
    for variant, result in results.items():
        assert (result["requests"], result["errors"]) == (6, 0), variant
        assert result["client_ttft_p50_ms"] > 0
        held_p50, held_p90 = result["envoy_ms"]["held"]
        assert 0 <= held_p50 <= held_p90
        # Only the ext_proc listeners have an exchange for Envoy to time.
        asked = variant != "envoy"
        assert ("headers" in result["envoy_ms"]) is asked
        assert ("body" in result["envoy_ms"]) is asked
        if asked:
            assert result["envoy_ms"]["headers"][0] > 0 and result["envoy_ms"]["body"][0] > 0
    assert "| cost-streamed | 6 | 0 |" in run.stdout


def test_an_unknown_body_mode_is_refused() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--body-modes", "chunked"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "--body-modes" in run.stderr
