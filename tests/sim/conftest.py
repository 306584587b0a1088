"""Shared helpers: a fleet per test, fast simulated time, a plain aiohttp client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from extproc.prefix.tokenizers import TiktokenTokenizer, Tokenizer
from extproc.sim.engine import EngineStats
from extproc.sim.metrics import ServerMetrics

IDLE_STATS = EngineStats(
    running=0,
    waiting=0,
    waiting_deferred=0,
    kv_usage=0.0,
    num_gpu_blocks=100,
    prefix_cache_queries=0,
    prefix_cache_hits=0,
    preemptions=0,
    prompt_tokens=0,
    prompt_tokens_cached=0,
    generation_tokens=0,
    finished_by_reason={"stop": 0},
    steps=0,
    running_loras=(),
    waiting_loras=(),
)


def server_metrics(
    stats: Callable[[], EngineStats] = lambda: IDLE_STATS, **options: Any
) -> ServerMetrics:
    """One simulated server's metrics on `stats`, without an engine (100 blocks of 16)."""
    return ServerMetrics(
        model_name="m",
        stats=stats,
        cache_info={"block_size": "16", "num_gpu_blocks": "100"},
        max_model_len=4096,
        **options,
    )


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return TiktokenTokenizer.cl100k()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


def words(n: int, seed: int = 0) -> str:
    """A prompt of about n tokens that shares no prefix with another seed's."""
    return " ".join(f"w{seed}x{i}" for i in range(n // 3 + 1))


async def until(predicate: Callable[[], bool], *, attempts: int = 2000) -> None:
    """Poll a condition on simulator state, a bounded number of times (no wall-clock asserts)."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition never became true")
