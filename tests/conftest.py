"""Shared fixtures: small real HTTP model servers and a picker on loopback, on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from tests.fakes import ModelServer


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


__all__ = ["web"]
