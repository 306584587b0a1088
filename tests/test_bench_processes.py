"""The benchmarks' child-process helper: readiness, a stdout that keeps flowing, stop by PID."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from extproc.bench.processes import process

# Says it is ready, then writes far more than a pipe holds (64 KiB) before it records that it
# got past the writes: only a reader on the other end lets it get there.
_CHATTY = """
import sys, time
print("ready", flush=True)
sys.stdout.write("x" * 1_000_000)
sys.stdout.flush()
open(sys.argv[1], "w").write("wrote")
time.sleep(60)
"""


def test_a_child_keeps_writing_after_its_ready_line(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with process([sys.executable, "-c", _CHATTY, str(marker)], ready_line="ready") as child:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child blocked writing to its stdout"
        assert child.poll() is None
    assert child.returncode is not None  # stopped by PID when the block ended


def test_a_child_that_does_not_print_its_ready_line_is_an_error() -> None:
    with (
        pytest.raises(RuntimeError, match="did not start"),
        process([sys.executable, "-c", "print('oops')"], ready_line="ready"),
    ):
        pass
