"""The benchmarks' child-process helper: ports, readiness, a flowing stdout, stop by PID."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from extproc.bench.processes import free_port_range, free_ports, process

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
