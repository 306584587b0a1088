"""Shared helpers: a fleet per test, fast simulated time, a plain aiohttp client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from extproc.prefix.tokenizers import TiktokenTokenizer, Tokenizer


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
