"""`extproc serve --workers N`: picker processes on one port that see each other's in-flight
requests. Real processes, real shared memory, real gRPC over loopback to a simulated fleet."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from extproc.bench.processes import free_port_range, free_ports
from extproc.config import Config, ConfigError, ServerConfig
from extproc.request.usage import Usage
from extproc.server.access_log import LogEntry
from extproc.server.cli import add_arguments, config_from_args, worker_config
from extproc.server.workers import LogRelay
from extproc.sim import SimConfig, SimFleet
from extproc.state.inflight import InFlight, Load
from extproc.state.load_board import LoadBoard, create_board
from tests import extproc_client as ep

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
POD = "10.0.0.1:8000"


def test_a_worker_sees_what_another_process_has_in_flight(tmp_path: Path) -> None:
    board = tmp_path / "board"
    create_board(board, 2)
    other = textwrap.dedent(
        f"""
        from pathlib import Path
        from extproc.state.inflight import InFlight
        from extproc.state.load_board import LoadBoard
        inflight = InFlight(LoadBoard(Path({str(board)!r}), 2, 1))
        inflight.start({POD!r}, 100, prefill_seconds=30.0)
        inflight.start({POD!r}, 50, prefill_seconds=30.0, waits_seconds=30.0)
        inflight.start("10.0.0.2:8000", 7)
        inflight.finish({POD!r}, 100)
        """
    )
    before = time.monotonic()
    subprocess.run([sys.executable, "-c", other], check=True, timeout=60)
    mine = InFlight(LoadBoard(board, 2, 0))
    assert mine.load(POD) == Load(1, 50)
    assert mine.started_since(POD, before) == 2
    assert mine.started_since(POD, time.monotonic()) == 0
    # Two predicted prefills of 30 s, queued one after the other on the other worker.
    assert 50 < mine.backlog(POD, time.monotonic()) <= 60
    # The second of them is predicted to wait in vLLM's queue: a scrape now would count it.
    assert mine.waiting_at(POD, time.monotonic()) == 1
    assert mine.waiting_at(POD, before - 1.0) == 0
    mine.start(POD, 10)
    assert mine.load(POD) == Load(2, 60)
    assert mine.load("10.0.0.2:8000") == Load(1, 7)
    assert mine.load("10.0.0.3:8000") == Load()
    # Only this process's own requests are its to drain.
    assert mine.total() == 1


async def test_access_log_entries_reach_the_worker_that_routed_them(tmp_path: Path) -> None:
    board = tmp_path / "board"
    create_board(board, 2)
    first, second = LoadBoard(board, 2, 0), LoadBoard(board, 2, 1)
    got: tuple[list[LogEntry], list[LogEntry]] = ([], [])
    relays = (LogRelay(first, got[0].append), LogRelay(second, got[1].append))
    for relay in relays:
        relay.start()
    try:
        usage = Usage(prompt_tokens=12, completion_tokens=3, cached_tokens=8)
        theirs = LogEntry(f"{second.prefix()}-7", usage, "acme", "10.0.0.1:8000")
        mine = LogEntry(f"{first.prefix()}-8", None)
        other_pod = LogEntry("0123456789abw1-9", usage)
        for entry in (theirs, mine, other_pod):
            relays[0].entry(entry)
        for _ in range(100):
            if got[1]:
                break
            await asyncio.sleep(0.01)
        # The second worker routed `theirs`; the first keeps its own and another pod's.
        assert got == ([mine, other_pod], [theirs])
        assert first.owner(theirs.request_id) == 1
        assert first.owner(other_pod.request_id) is None
    finally:
        for relay in relays:
            relay.close()
    assert _sockets(tmp_path) == []


def _config(tmp_path: Path, text: str, *argv: str) -> Config:
    path = tmp_path / "picker.yaml"
    path.write_text(text)
    parser = argparse.ArgumentParser(prog="extproc serve", exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--endpoints", POD, *argv])
    return config_from_args(args)[0]


def test_several_workers_need_fixed_ports_and_shared_limits(tmp_path: Path) -> None:
    assert _config(tmp_path, "{}", "--workers", "3").server.workers == 3
    with pytest.raises(ConfigError, match="fixed grpc_port"):
        _config(tmp_path, "{}", "--workers", "2", "--grpc-port", "0")
    tenants = "tenancy: {enabled: true, default_tenant: a, tenants: {a: {}}}\n"
    with pytest.raises(ConfigError, match="limits_backend: redis"):
        _config(tmp_path, tenants, "--workers", "2")
    assert _config(tmp_path, tenants).tenancy.enabled
    shared = "tenancy: {enabled: true, default_tenant: a, limits_backend: redis, tenants: {a: {}}}"
    assert _config(tmp_path, shared, "--workers", "2").server.workers == 2


def test_each_worker_serves_its_own_metrics_port() -> None:
    config = Config(server=ServerConfig(metrics_port=9090, workers=2))
    assert worker_config(config, 1).server.metrics_port == 9091
    assert worker_config(config, 0).server.metrics_port == 9090
    free = Config(server=ServerConfig(metrics_port=0, workers=2))
    assert worker_config(free, 1).server.metrics_port == 0


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(pods=2, speed=20)) as fleet:
        yield fleet


async def _metrics_up(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as reply,
        ):
            return reply.status == 200
    except aiohttp.ClientError:
        return False


async def _route(channel: grpc.aio.Channel) -> tuple[ep.Stream, str, str]:
    """A request routed on `channel` and held in flight: its stream, endpoint and worker."""
    stream = ep.Stream(channel)
    body = ep.json_body({"model": MODEL, "prompt": "hello", "max_tokens": 4})
    await stream.send(ep.request_headers("/v1/completions", mode=ep.BUFFERED))
    await stream.receive()
    await stream.send(ep.request_body(body, end_of_stream=True))
    reply = await stream.receive()
    return stream, ep.destination(reply).split(",")[0], ep.request_id(reply).split("-")[0]


async def test_workers_on_one_port_balance_the_pods_between_them(
    fleet: SimFleet, tmp_path: Path
) -> None:
    grpc_port, health_port = free_ports(2)
    metrics = free_port_range(2, avoid=(grpc_port, health_port))
    pods = _pods(fleet)
    picker = _serve(fleet, tmp_path, grpc_port=grpc_port, health_port=health_port, metrics=metrics)
    streams: list[ep.Stream] = []
    channels: list[grpc.aio.Channel] = []
    try:
        await _workers_up(picker, metrics)
        held: Counter[str] = Counter()
        workers: Counter[str] = Counter()
        # The kernel spreads connections over the workers; a channel of its own is a
        # connection of its own. Hold requests until both workers have routed several: a worker
        # that saw only its own would send some to the busier pod (a tie broken its own way).
        for _ in range(60):
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(channel)
            stream, pod, worker = await _route(channel)
            streams.append(stream)
            # Least-request over the pod's whole traffic: never the busier pod.
            assert held[pod] == min(held[p] for p in pods), (held, pod)
            held[pod] += 1
            workers[worker] += 1
            if len(workers) == 2 and min(workers.values()) >= 4:
                break
        assert len(workers) == 2, "every connection reached the same worker"
        assert abs(held[pods[0]] - held[pods[1]]) <= 1
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            await channel.close()
        picker.send_signal(signal.SIGTERM)
        code = picker.wait(timeout=30)
    assert code == 0
    assert _gone(f"/dev/shm/extproc-board-{picker.pid}")


async def _workers_up(picker: subprocess.Popen[bytes], metrics: int) -> None:
    """Until both workers serve their metrics (each does just before it takes streams)."""
    deadline = time.monotonic() + 60
    while not (await _metrics_up(metrics) and await _metrics_up(metrics + 1)):
        assert picker.poll() is None, "the picker exited"
        assert time.monotonic() < deadline, "the workers did not start"
        await asyncio.sleep(0.2)


def _serve(
    fleet: SimFleet, tmp_path: Path, *, grpc_port: int, health_port: int, metrics: int
) -> subprocess.Popen[bytes]:
    # A scrape that is late or times out on a loaded machine must not mark a pod stale
    # (saturated) or unready: in one CI run least-request sent a request to the busier pod,
    # which a pod left out of the choice would explain (not reproduced here, 10 runs beside two
    # busy loops); what is tested here is the workers' board, not the scrapes.
    config = tmp_path / "workers.yaml"
    config.write_text(
        "collector: {timeout_seconds: 5.0, staleness_seconds: 60.0, unready_after_failures: 1000}\n"
    )
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "extproc", "serve", "--workers", "2", "--host", "127.0.0.1"),
            *("--config", str(config)),
            *("--grpc-port", str(grpc_port), "--health-port", str(health_port)),
            *("--metrics-port", str(metrics), "--endpoints", ",".join(_pods(fleet))),
            *("--strategy", "least-request", "--fallbacks", "0"),
        ]
    )


def _pods(fleet: SimFleet) -> list[str]:
    return [url.removeprefix("http://") for url in fleet.urls]


@pytest.mark.slow
async def test_a_worker_that_dies_stops_the_pod_whole(fleet: SimFleet, tmp_path: Path) -> None:
    grpc_port, health_port = free_ports(2)
    metrics = free_port_range(2, avoid=(grpc_port, health_port))
    picker = _serve(fleet, tmp_path, grpc_port=grpc_port, health_port=health_port, metrics=metrics)
    try:
        await _workers_up(picker, metrics)
        children = _children(picker.pid)
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        # The other worker is stopped too, so the pod restarts with a clean board.
        code = picker.wait(timeout=30)
    finally:
        if picker.poll() is None:
            picker.kill()
            picker.wait()
    assert code == 1
    assert _gone(f"/proc/{children[1]}")
    assert _gone(f"/dev/shm/extproc-board-{picker.pid}")


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _gone(path: str) -> bool:
    return not Path(path).exists()


def _sockets(directory: Path) -> list[Path]:
    return list(directory.glob("*.sock"))
