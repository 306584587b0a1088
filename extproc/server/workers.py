"""`extproc serve --workers N`: N picker processes on one port, and the parent that runs them.

The kernel spreads Envoy's HTTP/2 connections over the processes (`SO_REUSEPORT`); Envoy opens
one per worker thread, so give it at least as many threads as pickers (docs/envoy.md, "Several
picker processes"). The workers share their in-flight counts through a `LoadBoard` the parent
creates in shared memory; each keeps its own state side (scrapes, KV events) and fair queue.
Tenants' limits must be counted in Redis (`tenancy.limits_backend: redis`, checked at start), as
across replicas.

The parent only supervises: SIGTERM and SIGINT go on to every worker (each drains as a single
picker does), and when a worker dies the others are stopped and the parent exits 1, so that the
pod restarts whole: a worker started again would find the dead one's counts on the board.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import msgpack

from extproc.request.usage import Usage
from extproc.server.access_log import LogEntry
from extproc.state.load_board import LoadBoard, board_path, create_board

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
        for relay in path.parent.glob(f"{path.name}.*.sock"):  # a killed worker's
            relay.unlink(missing_ok=True)
    return code


class LogRelay:
    """Access log entries to the worker that routed their request.

    Envoy's access log streams reach whichever worker the kernel hands their connection, so
    most entries of a request arrive at a worker that did not route it. That worker could only
    count them as another replica's (`StreamHandler.logged`): the routing worker would wait in
    vain for the usage and the endpoint that served, and count the entry as never logged. The
    relay sends each such entry on, over a Unix datagram socket per worker beside the board,
    and hands the entries it receives to its own handler."""

    def __init__(self, board: LoadBoard, deliver: Callable[[LogEntry], None]) -> None:
        self._board = board
        self._deliver = deliver
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._path = _relay_path(board, board.index)
        self._path.unlink(missing_ok=True)
        self._socket.bind(str(self._path))
        self._dropped_logged = False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._socket.fileno(), self._receive)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop left (closed at exit)
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
        self._socket.close()
        self._path.unlink(missing_ok=True)

    def entry(self, entry: LogEntry) -> None:
        """An entry from Envoy: this worker's own, another pod's, or sent on to its worker."""
        owner = self._board.owner(entry.request_id)
        if owner is None or owner == self._board.index:
            self._deliver(entry)
            return
        usage = entry.usage
        counts = (
            None
            if usage is None
            else (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        )
        payload = msgpack.packb((entry.request_id, counts, entry.tenant, entry.upstream))
        try:
            self._socket.sendto(payload, str(_relay_path(self._board, owner)))
        except OSError as exc:  # the owner is gone (the pod is stopping) or its queue is full
            if not self._dropped_logged:
                log.warning("access log entry not relayed to worker %d: %s", owner, exc)
                self._dropped_logged = True
            self._deliver(entry)

    def _receive(self) -> None:
        while True:
            try:
                payload = self._socket.recv(_DATAGRAM_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            try:
                request_id, counts, tenant, upstream = msgpack.unpackb(payload)
                usage = None if counts is None else Usage(*counts)
            except (ValueError, TypeError) as exc:  # not from a worker of ours
                log.warning("unreadable relayed access log entry: %s", exc)
                continue
            self._deliver(LogEntry(request_id, usage, tenant, upstream))


_DATAGRAM_BYTES = 64 * 1024


def _relay_path(board: LoadBoard, index: int) -> Path:
    return board.path.with_name(f"{board.path.name}.{index}.sock")
