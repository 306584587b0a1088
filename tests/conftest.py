"""Shared fixtures: small real HTTP model servers, a picker and a real Redis on loopback, on
free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from extproc.config import Config
from extproc.server.app import PickerServer
from tests.fakes import ModelServer
from tests.redis_server import RedisServer, running_redis

# Starts `extproc demo --quick` when collection finishes, if tests/test_demo.py is selected.
pytest_plugins = ("tests.demo_run",)


@pytest.fixture
async def model_servers() -> AsyncIterator[Callable[..., Awaitable[ModelServer]]]:
    """Start fake model servers on demand: `await model_servers("model-a", adapters=[...])`."""
    started: list[ModelServer] = []

    async def start(model: str = "model-a", *, adapters: tuple[str, ...] = ()) -> ModelServer:
        server = ModelServer(model, adapters)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's redis-server on a free loopback port, stopped by its PID after the test."""
    with running_redis(tmp_path) as server:
        yield server


StartPicker = Callable[[Config], Awaitable[tuple[PickerServer, grpc.aio.Channel]]]


@pytest.fixture
async def start_picker() -> AsyncIterator[StartPicker]:
    """Start in-process pickers on demand (`await start_picker(config)`), each with a gRPC
    channel to it; all are stopped after the test."""
    running: list[tuple[PickerServer, grpc.aio.Channel]] = []

    async def start(config: Config) -> tuple[PickerServer, grpc.aio.Channel]:
        picker = PickerServer(config)
        await picker.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}")
        running.append((picker, channel))
        return picker, channel

    yield start
    for picker, channel in running:
        await channel.close()
        await picker.stop()


__all__ = ["web"]
