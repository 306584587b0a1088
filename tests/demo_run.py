"""`extproc demo --quick` started as soon as the suite knows it will need it.

The demo spends most of a minute waiting on its simulated fleet (about half a core). Started when
collection finishes, it runs beside the rest of the suite, and tests/test_demo.py's fixture only
waits for what is left of it; started from the fixture, it ran alone. Its stdout and stderr go
to files (a pipe nobody reads would stall it once full); the process is stopped by its PID when
the session ends, whether or not a test waited for it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

DEMO_TESTS = "tests/test_demo.py::"


@dataclass(frozen=True, slots=True)
class StartedDemo:
    process: subprocess.Popen[bytes]
    output: Path

    @property
    def stdout(self) -> Path:
        return self.output / "stdout.txt"

    @property
    def stderr(self) -> Path:
        return self.output / "stderr.txt"

    def wait(self, timeout: float) -> int:
        """The demo's exit code; stopped by its PID and failed if it runs out `timeout`."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"extproc demo --quick ran over {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM first: the demo then stops its fleet, picker and Envoy by their PIDs
        (`run_stoppable`); SIGKILL would leave them running."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


_STARTED = pytest.StashKey[StartedDemo]()


def start(output: Path) -> StartedDemo:
    """The demo as `make demo` runs it, quick form, writing its report into `output`."""
    report = output / "report"
    with (output / "stdout.txt").open("wb") as out, (output / "stderr.txt").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "extproc.cli", "demo", "--quick", "--output", str(report)],
            stdout=out,
            stderr=err,
        )
    return StartedDemo(process, output)


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(
        item.nodeid.startswith(DEMO_TESTS) and "demo" in getattr(item, "fixturenames", ())
        for item in session.items
    ):
        session.config.stash[_STARTED] = start(Path(tempfile.mkdtemp(prefix="extproc-demo-")))


def pytest_sessionfinish(session: pytest.Session) -> None:
    started = session.config.stash.get(_STARTED, None)
    if started is not None:
        started.stop()
        shutil.rmtree(started.output, ignore_errors=True)


def started_demo(config: pytest.Config) -> StartedDemo | None:
    """The demo this session started, if it started one."""
    return config.stash.get(_STARTED, None)
