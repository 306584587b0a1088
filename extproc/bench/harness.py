"""What every benchmark that runs the picker does around its runs: start the picker and wait
until it sees the fleet, measure a child's CPU, and step through the runs with a progress bar.

`extproc.bench.processes` starts and stops the children; this module knows what a picker is
ready to route looks like. The benchmarks (`routing`, `disagg`, `tenants`) and the demo use it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from tqdm import tqdm

from extproc.bench.processes import cpu_seconds, process, wait_picker

C = TypeVar("C")
R = TypeVar("R")


def loopback_endpoints(first_port: int, count: int) -> tuple[str, ...]:
    """`count` servers on consecutive ports. Envoy's pool and the picker's --endpoints must
    name the same ip:port strings: Envoy's override_host skips an address it does not know."""
    return tuple(f"127.0.0.1:{first_port + i}" for i in range(count))


def start_picker(
    stack: contextlib.ExitStack,
    argv: Sequence[str],
    *,
    grpc: int,
    metrics: int,
    endpoints: int,
    error: Callable[[str], Exception],
    log: Path | None = None,
    within: float = 30.0,
) -> subprocess.Popen[str]:
    """Start `extproc serve` (`argv`) on `stack` and wait until it listens and sees `endpoints`
    ready. Raises `error(why)` if it exits or is not ready `within` seconds; the caller's error
    type decides whether that ends the benchmark or only its run."""
    picker = stack.enter_context(process(argv, log=log))
    try:
        problem = wait_picker(
            picker, grpc=grpc, metrics=metrics, endpoints=endpoints, within=within
        )
    except RuntimeError as exc:  # it saw the fleet but its gRPC port never opened
        problem = str(exc)
    if problem is not None:
        raise error(problem)
    return picker


def cpu_of(pid: int | None) -> float:
    """CPU seconds of `pid` so far; 0 for none or one that is gone (its last figure is lost)."""
    if pid is None:
        return 0.0
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return 0.0


class Progress:
    """Runs done out of a total, and the answers of the run under way, on stderr.

    On a terminal two tqdm bars redraw in place; elsewhere (a log file, CI) the bars stay off
    and each run writes a line when it starts and one when it ends, so the log reads as a list.
    """

    def __init__(self, total: int, *, enabled: bool = True, file: IO[str] | None = None) -> None:
        self._file = file if file is not None else sys.stderr
        self._enabled = enabled
        # disable=None: tqdm turns the bar off when the stream is not a terminal.
        self._runs = tqdm(
            total=total,
            unit="run",
            file=self._file,
            disable=None if enabled else True,
            dynamic_ncols=True,
        )
        self._answers: tqdm[Any] | None = None
        self._label = ""
        self._total = total
        self._done = 0  # a disabled tqdm counts nothing

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, label: str) -> None:
        self._label = label
        self._runs.set_description_str(label)
        if self._runs.disable:
            self._say(f"{self._done}/{self._total} {label}")

    def tick(self, answered: int, of: int) -> None:
        if self._runs.disable:
            return
        if self._answers is None:
            self._answers = tqdm(
                total=of, unit="answer", file=self._file, leave=False, dynamic_ncols=True
            )
        # tqdm redraws at most every 0.1 s, so a tick per answer stays cheap.
        self._answers.update(answered - self._answers.n)

    def finish_run(self, summary: str) -> None:
        if self._answers is not None:
            self._answers.close()
            self._answers = None
        self._done += 1
        self._runs.update(1)
        self._say(f"{self._done}/{self._total} {self._label}: {summary}")

    def close(self) -> None:
        if self._answers is not None:
            self._answers.close()
        self._runs.close()

    def _say(self, line: str) -> None:
        if self._enabled:
            # Printed above the bars, which are redrawn below it.
            tqdm.write(line, file=self._file)
            self._file.flush()


def run_each(
    cells: Sequence[C],
    *,
    run: Callable[[C, Progress], R],
    label: Callable[[C], str],
    summary: Callable[[R], str],
    skip: tuple[type[Exception], ...] = (),
    progress: bool = True,
) -> list[R]:
    """`run` on every cell in turn, under one progress bar. A cell whose run raises one of
    `skip` (a run that could not start: a port taken by another process on the machine) costs
    its own result, not the hours of runs around it; any other error ends the loop."""
    results: list[R] = []
    with Progress(len(cells), enabled=progress) as bar:
        for cell in cells:
            bar.start(label(cell))
            try:
                result = run(cell, bar)
            except skip as exc:
                bar.finish_run(f"FAILED, left out of the report: {exc}")
                continue
            results.append(result)
            bar.finish_run(summary(result))
    return results
