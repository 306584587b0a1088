"""`extproc collector` feeding a picker: stats and the KV-event index arrive over the stream;
when the collector goes away the picker scrapes and subscribes by itself, and goes back to the
stream when the collector returns. Real simulator (with KV events), real gRPC, real ZMQ."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from extproc._generated import state_pb2 as pb
from extproc._generated import state_pb2_grpc as pb_grpc
from extproc.collector.app import CollectorServer
from extproc.config import (
    CollectorConfig,
    Config,
    DiscoveryConfig,
    EndpointConfig,
    KvEventsConfig,
    ServerConfig,
)
from extproc.server.app import PickerServer
from extproc.sim import SimConfig, SimFleet
from extproc.state.discovery.static import FixedDiscovery
from extproc.state.prefix_index import PrefixIndex
from extproc.state.shared import KEEPALIVE, RecordingIndex, SharedStateClient, StateService
from tests.certs import authority, write_server_pair

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(pods=2, speed=50, kv_events=True)) as fleet:
        yield fleet


def _config(fleet: SimFleet, source: str = "") -> Config:
    return Config(
        server=ServerConfig(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0),
        discovery=DiscoveryConfig(models_refresh_seconds=300),
        collector=CollectorConfig(interval_seconds=0.05, source=source),
        kv_events=KvEventsConfig(enabled=True),
        endpoints=tuple(EndpointConfig(url.removeprefix("http://")) for url in fleet.urls),
    )


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def _collector(fleet: SimFleet, port: int = 0) -> CollectorServer:
    config = _config(fleet)
    server = CollectorServer(config, FixedDiscovery(config.endpoints), port=port, metrics_port=0)
    await server.start()
    return server


async def _send_prompts(fleet: SimFleet, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(count):
            body = {
                "model": MODEL,
                "prompt": f"shared system prompt {i % 2} " * 40,
                "max_tokens": 2,
            }
            async with http.post(f"{fleet.urls[i % 2]}/v1/completions", json=body) as response:
                assert response.status == 200


def _blocks(fleet: SimFleet) -> dict[str, set[int]]:
    return {
        url.removeprefix("http://"): set(server.cached_block_ids())
        for url, server in zip(fleet.urls, fleet.servers, strict=True)
    }


async def test_a_picker_follows_the_collector_and_falls_back(fleet: SimFleet) -> None:
    collector = await _collector(fleet)
    port = collector.port
    picker = PickerServer(_config(fleet, source=f"127.0.0.1:{port}"))
    await picker.start()
    index = picker.index
    assert index is not None
    try:
        await _until(lambda: collector.service.watchers == 1, "the picker watching")
        await _until(lambda: not picker.state.local, "the picker following the stream")
        # The picker's own subscribers stand down while the stream feeds it.
        await _until(
            lambda: (
                picker.state.subscribers is not None and not picker.state.subscribers.statuses()
            ),
            "local subscribers stopped",
        )
        await _send_prompts(fleet, 6)
        truth = _blocks(fleet)
        assert any(truth.values())
        await _until(
            lambda: {a: set(index.blocks_of(a)) for a in truth} == truth,
            "the picker's index equal to the simulated caches, via the collector",
        )
        assert all(e.stats is not None for e in picker.store.current.endpoints)

        await collector.stop()
        await _until(lambda: picker.state.local, "the picker scraping by itself")
        await _send_prompts(fleet, 4)
        truth = _blocks(fleet)
        # Its own subscribers start clean and learn from the new events; what they guarantee
        # is no block credited that a server lacks.
        await _until(
            lambda: all(set(index.blocks_of(a)) <= truth[a] for a in truth),
            "no block credited that a server lacks",
        )

        collector = await _collector(fleet, port=port)
        await _until(lambda: not picker.state.local, "the picker back on the stream")
        truth = _blocks(fleet)
        await _until(
            lambda: all(set(index.blocks_of(a)) <= truth[a] for a in truth),
            "the full state replaced the picker's index",
        )
    finally:
        await picker.stop()
        await collector.stop()


class _HungService(StateService):
    """Sends the full state, then never another update, on a connection that stays open: a
    collector that is stopped or deadlocked looks like this from the picker's side."""

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StateUpdate]:
        yield pb.StateUpdate(version=1, full=True)
        await asyncio.Event().wait()


async def test_a_hung_collector_is_noticed_and_the_picker_scrapes_by_itself() -> None:
    server = grpc.aio.server(options=KEEPALIVE)
    pb_grpc.add_StateServiceServicer_to_server(_HungService(RecordingIndex()), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    states: list[bool] = []
    client = SharedStateClient(
        f"127.0.0.1:{port}",
        PrefixIndex(),
        on_update=lambda _: None,
        on_connected=states.append,
        retry_seconds=5.0,
        silent_after=0.3,
    )
    task = asyncio.create_task(client.run())
    try:
        await _until(lambda: states == [True], "the picker following the stream")
        await _until(lambda: states == [True, False], "the silence noticed")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(None)


@pytest.mark.parametrize("with_ca", [False, True], ids=["self-signed", "own-ca"])
async def test_a_picker_follows_a_collector_over_tls(
    fleet: SimFleet, tmp_path: Path, with_ca: bool
) -> None:
    base = _config(fleet)
    server = dataclasses.replace(base.server, secure_serving=True)
    if with_ca:
        ca = authority()
        write_server_pair(ca, tmp_path / "certs")
        (tmp_path / "ca.pem").write_bytes(ca.pem)
        server = dataclasses.replace(server, cert_path=str(tmp_path / "certs"))
    config = dataclasses.replace(base, server=server)
    collector = CollectorServer(config, FixedDiscovery(config.endpoints), port=0, metrics_port=0)
    await collector.start()
    source = dataclasses.replace(
        _config(fleet, source=f"127.0.0.1:{collector.port}").collector,
        source_tls=True,
        source_ca_file=str(tmp_path / "ca.pem") if with_ca else "",
    )
    picker = PickerServer(dataclasses.replace(_config(fleet), collector=source))
    await picker.start()
    try:
        await _until(lambda: collector.service.watchers == 1, "the picker watching over TLS")
        await _until(lambda: not picker.state.local, "the picker following the stream")
    finally:
        await picker.stop()
        await collector.stop()


def test_every_stats_field_crosses_the_wire() -> None:
    """The collector's message carries every field of EndpointStats (the cost model's
    histogram sums included): a field the encoder forgets arrives as 0 and fails this."""
    from extproc.state.shared import _decode_stats, _encode_stats
    from extproc.state.stats import EndpointStats, LoraState

    numbers = {
        f.name: float(i + 1)
        for i, f in enumerate(dataclasses.fields(EndpointStats))
        if f.type == "float" and f.name != "read_at"
    }
    assert len(numbers) >= 17
    sent = EndpointStats(
        read_at=100.0,
        lora=LoraState(max_loras=2, running=frozenset({"a"}), waiting=frozenset()),
        block_size=16,
        num_gpu_blocks=1000,
        **numbers,
    )
    wire = pb.EndpointStats.FromString(_encode_stats(sent, now=101.0).SerializeToString())
    assert _decode_stats(wire, now=201.0) == dataclasses.replace(sent, read_at=200.0)


_REQUEST_PATH = (
    "extproc.server",
    "extproc.pipeline",
    "extproc.request",
    "extproc.scheduling",
    "extproc.prefix",
    "extproc.tenancy",
)


@pytest.mark.parametrize(
    ("module", "never"),
    [
        ("extproc.collector.app", _REQUEST_PATH),
        ("extproc.server.cli", ("extproc.collector",)),
    ],
    ids=["collector-loads-no-request-path", "picker-loads-no-collector"],
)
def test_each_server_process_loads_only_its_own_room(module: str, never: tuple[str, ...]) -> None:
    """What a fresh process really loads for the command: lint-imports checks the static
    imports, this also catches one made at run time (`importlib`, a function's own import)."""
    listing = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(*sys.modules, sep=chr(10))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    loaded = [m for m in listing if any(m == p or m.startswith(p + ".") for p in never)]
    assert module in listing
    assert loaded == []
