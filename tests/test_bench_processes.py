"""The benchmarks' child-process helper: ports, readiness, a flowing stdout, stop by PID."""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

import pytest

from extproc.bench.processes import ChildDidNotStart, free_port_range, free_ports, process

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


def test_a_child_that_does_not_print_its_ready_line_is_an_error(tmp_path: Path) -> None:
    with (
        pytest.raises(ChildDidNotStart, match=re.escape("did not start (exit 0): 'oops")),
        process([sys.executable, "-c", "print('oops')"], ready_line="ready"),
    ):
        pass
    # With a log, the error names it, and the child's output is there.
    log = tmp_path / "child.log"
    failing = "import sys; print('no', file=sys.stderr); sys.exit(3)"
    with (
        pytest.raises(ChildDidNotStart, match=re.escape(f"(exit 3); see {log}")),
        process([sys.executable, "-c", failing], ready_line="ready", log=log),
    ):
        pass
    assert log.read_text() == "no\n"


def test_a_child_logs_after_its_ready_line_with_the_environment_given(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    script = (
        "import os, sys, time; print('ready', flush=True); "
        "print(os.environ['EXTPROC_TEST_WORD'], flush=True); "
        "print(os.environ['HOME'] != '', file=sys.stderr, flush=True); time.sleep(60)"
    )
    with process(
        [sys.executable, "-c", script], ready_line="ready", log=log, env={"EXTPROC_TEST_WORD": "hi"}
    ):
        deadline = time.monotonic() + 20
        while log.read_text().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    # The ready line was read by the parent; what followed (stdout and stderr) is in the log,
    # and the child saw both the given variable and the parent's environment.
    assert sorted(log.read_text().split()) == ["True", "hi"]


def test_benchmark_ports_stay_below_the_ephemeral_range() -> None:
    # The kernel hands ports of its ephemeral range to outgoing connections; a fleet restarted
    # on such a port can find it taken by a connection from the previous run.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    singles = free_ports(6)
    assert len(set(singles)) == 6 and all(p < low for p in singles)
    base = free_port_range(8, avoid=singles)
    assert base + 8 <= low and not set(range(base, base + 8)) & set(singles)
    for port in range(base, base + 8):  # free now: each can be bound
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
