"""`extproc serve --workers N`: N picker processes on one port, and the parent that runs them.

The kernel spreads Envoy's HTTP/2 connections over the processes (`SO_REUSEPORT`); Envoy opens
one per worker thread, so give it at least as many threads as pickers (docs/envoy.md, "Several
picker processes"). The workers share their in-flight counts through a `LoadBoard` the parent
creates in shared memory; each keeps its own state side (scrapes, KV events), fair queue and
tenants' counters (token limits hold across workers with `tenancy.redis_url`, as across
replicas).

The parent only supervises: SIGTERM and SIGINT go on to every worker (each drains as a single
picker does), and when a worker dies the others are stopped and the parent exits 1, so that the
pod restarts whole: a worker started again would find the dead one's counts on the board.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from extproc.state.load_board import board_path, create_board

log = logging.getLogger("extproc")

_POLL_SECONDS = 0.2


def supervise(argv: Sequence[str], workers: int, *, stop_seconds: float) -> int:
    """Run `extproc <argv>` as `workers` processes until a signal or a death; the exit code."""
    path = board_path()
    create_board(path, workers)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    command = [sys.executable, "-m", "extproc", *argv, "--load-board", str(path)]
    children = [subprocess.Popen([*command, "--worker-index", str(i)]) for i in range(workers)]
    code = 0
    try:
        while not stopping:
            dead = [c for c in children if c.poll() is not None]
            if dead:
                log.error(
                    "picker worker (pid %d) exited with %s: stopping the others",
                    dead[0].pid,
                    dead[0].returncode,
                )
                code = 1
                break
            time.sleep(_POLL_SECONDS)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + stop_seconds
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        path.unlink(missing_ok=True)
    return code
