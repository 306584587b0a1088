"""`extproc envoy` runs the real Envoy, and stops it (and itself, with code 0) on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .harness import EXTPROC, free_port

pytestmark = pytest.mark.e2e


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5) as r:
            return int(r.status) == 200
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_envoy_command_runs_envoy_and_stops_on_signal(logs: Path, signum: int) -> None:
    port, admin_port = free_port(), free_port()
    argv = [
        str(EXTPROC), "envoy",
        "--port", str(port),
        "--admin-port", str(admin_port),
        "--listen-host", "127.0.0.1",
        "--extproc", f"127.0.0.1:{free_port()}",
        "--endpoints", f"127.0.0.1:{free_port()}",
        "--concurrency", "1",
    ]  # fmt: skip
    log = logs / f"envoy-command-{port}.log"
    with log.open("wb") as out:
        command = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not _ready(admin_port):
            assert command.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        command.send_signal(signum)
        assert command.wait(15) == 0, log.read_text()
        assert not _ready(admin_port), "Envoy must be gone with the command"
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
