"""`benchmarks/kv_event_transport.py` end to end, briefly: a publisher process, the picker's
subscribers, every batch applied and the figures written (run as a script, as documented)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kv_event_transport.py"


@pytest.mark.parametrize("bare", [False, True], ids=["subscribers", "bare"])
def test_every_published_batch_is_applied_and_reported(tmp_path: Path, bare: bool) -> None:
    output = tmp_path / "transport.json"
    args = ["--endpoints", "2", "--rate", "50", "--seconds", "0.5", "--output", str(output)]
    args += ["--bare"] if bare else []
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(output.read_text())
    assert report["batches"] == 2 * 26  # 0.5 s at 50 a second, plus the one at t=0, per endpoint
    assert report["resets"] == 0
    assert report["busy_s"] > report["idle_s"] >= 0 and report["settings"]["bare"] is bare
    assert "| 2 | 50 | 52 of 52 | 0 |" in run.stdout
