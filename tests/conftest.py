"""Shared fixtures: small real HTTP model servers, a picker and a real Redis on loopback, on
free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.fakes import ModelServer
from tests.redis_server import RedisServer, running_redis


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


__all__ = ["web"]
