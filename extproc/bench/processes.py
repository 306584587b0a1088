"""Child processes for the demo and the benchmarks: free loopback ports, start and stop by PID,
readiness, CPU accounting, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Final, TypeVar

from prometheus_client.parser import text_string_to_metric_families

# Ports are taken below the kernel's ephemeral range. A port the kernel handed out (bind to 0)
# is one it may hand out again as the local end of an outgoing connection: a benchmark that
# restarts its fleet on the same ports run after run then finds one held by Envoy's or the
# picker's connection from the run before ("Address already in use": it ended two sweeps).
_LOWEST_PORT = 10_000
# The simulated fleet's vocabulary (its `--tokenizer auto` finds no model files here and falls
# back to it), given to every benchmark's picker as a deployment gives it the model's own
# tokenizer files. Left at `auto`, the picker would ask an endpoint's /tokenize for every prompt:
# exact, but a round trip a real picker with the model's files does not pay.
PICKER_PREFIX: Final = {"default_tokenizer": "cl100k_base"}


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port_range(count: int, avoid: Collection[int] = ()) -> int:
    """A first port P with P..P+count-1 free now (the simulator takes consecutive ports), all
    below the ephemeral range."""
    pick = random.SystemRandom()
    high = _ephemeral_low() - count
    for _ in range(200):
        base = pick.randrange(_LOWEST_PORT, high)
        if any(base <= p < base + count for p in avoid):
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise OSError(f"found no {count} consecutive free ports on 127.0.0.1")


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports, below the ephemeral range."""
    ports: list[int] = []
    while len(ports) < count:
        ports.append(free_port_range(1, avoid=ports))
    return ports


class ChildDidNotStart(RuntimeError):
    """A child exited, or said something else, before its ready line."""


@contextlib.contextmanager
def process(
    argv: Sequence[str],
    *,
    ready_line: str | None = None,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """Start a child process, optionally wait for a line on stdout, stop it by PID at the end.

    Its output goes to `log` (else nowhere); `env` is added to this process's environment.
    After the ready line the rest of the child's stdout is read by a thread (into `log`, or
    dropped): a pipe nobody reads fills up (64 KiB) and then blocks the child's next write."""
    with contextlib.ExitStack() as stack:
        # Line-buffered: the drain thread's lines reach the log as they come, beside what the
        # child writes to the same file directly (its stderr).
        out: IO[str] | int = (
            stack.enter_context(log.open("w", buffering=1))
            if log is not None
            else subprocess.DEVNULL
        )
        child = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if ready_line else out,
            stderr=out,
            text=True,
            env={**os.environ, **env} if env else None,
        )
        try:
            if ready_line is not None:
                assert child.stdout is not None
                line = child.stdout.readline()
                if ready_line not in line:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=5)
                    where = f"; see {log}" if log is not None else f": {line!r}"
                    raise ChildDidNotStart(
                        f"{Path(argv[0]).name} {' '.join(argv[1:3])} did not start "
                        f"(exit {child.returncode}){where}"
                    )
                sink = out if not isinstance(out, int) else None
                threading.Thread(target=_drain, args=(child.stdout, sink), daemon=True).start()
            yield child
        finally:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()  # the child is gone: the drain has met, or will meet, the end


def _drain(stream: IO[str], sink: IO[str] | None) -> None:
    """Reads a child's output until it closes (the child exited), into `sink` if given."""
    with stream, contextlib.suppress(OSError, ValueError):
        for line in stream:
            if sink is not None:
                sink.write(line)


def wait_for_port(port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {within:.0f}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children so far, from /proc (a picker
    with `--workers` is a parent whose children do the work)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return own + sum(_cpu_or_gone(int(child)) for child in children)


def _cpu_or_gone(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError):  # exited between the listing and the read
        return 0.0


def picker_ready_endpoints(metrics_port: int) -> float:
    """The picker's `extproc_endpoints{state="ready"}`, or -1 while it cannot be read."""
    for name, labels, value in _picker_samples(metrics_port):
        if name == "extproc_endpoints" and labels.get("state") == "ready":
            return value
    return -1.0


def picker_pick_mean_ms(metrics_port: int) -> float:
    """The picker's mean `extproc_pick_duration_seconds` so far (every strategy), in wall ms;
    0 when it cannot be read or has picked nothing."""
    totals = {"_sum": 0.0, "_count": 0.0}
    for name, _, value in _picker_samples(metrics_port):
        for suffix in totals:
            if name == f"extproc_pick_duration_seconds{suffix}":
                totals[suffix] += value
    return 1000 * totals["_sum"] / totals["_count"] if totals["_count"] else 0.0


def _picker_samples(metrics_port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the picker's /metrics; none while it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return []
    return [
        (sample.name, sample.labels, float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def picker_argv(
    config: Path,
    endpoints: Sequence[str],
    *,
    grpc: int,
    health: int,
    metrics: int,
    log_level: str = "WARNING",
) -> list[str]:
    """`extproc serve` on loopback with `config`, the endpoints and the three ports. Without
    `endpoints`, those of the config file (which may give roles, GPU types and prices).
    `log_level` INFO keeps the decision lines that `scheduling.explain` writes."""
    return [
        sys.executable,
        *("-m", "extproc.cli", "serve", "--config", str(config), "--host", "127.0.0.1"),
        *(("--endpoints", ",".join(endpoints)) if endpoints else ()),
        *("--grpc-port", str(grpc), "--health-port", str(health)),
        *("--metrics-port", str(metrics), "--log-level", log_level),
    ]


def wait_picker(
    child: subprocess.Popen[str],
    *,
    grpc: int,
    metrics: int,
    endpoints: int,
    within: float = 30.0,
) -> str | None:
    """Until the picker listens and sees `endpoints` ready (it reads /v1/models at start-up).
    None when it does; else why not, for the caller's error."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return f"the picker exited with code {child.returncode}"
        if picker_ready_endpoints(metrics) == endpoints:
            wait_for_port(grpc, within=5)
            return None
        time.sleep(0.1)
    return f"the picker did not see {endpoints} endpoints ready within {within:g} s"


class Stopped(Exception):
    """SIGTERM or SIGINT arrived; unwinding stops every child process."""


def stop_on_signal(signum: int, frame: FrameType | None) -> None:
    # Ignore further signals so a second Ctrl-C cannot cut the clean-up short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


T = TypeVar("T")


def run_stoppable(
    command: str, work: Callable[[], T], errors: tuple[type[BaseException], ...]
) -> T | int:
    """Run `work` with SIGINT/SIGTERM unwinding it cleanly (every child stopped). Returns its
    result, or the exit code to leave with: 128 + signal when stopped, 1 on one of `errors`."""
    previous = {sig: signal.signal(sig, stop_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return work()
    except Stopped as exc:
        signum = int(exc.args[0])
        print(
            f"\n{command}: stopped by {signal.Signals(signum).name}; "
            "every process it started is stopped",
            file=sys.stderr,
        )
        return 128 + signum
    except errors as exc:
        print(f"\n{command}: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
