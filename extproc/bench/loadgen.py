"""Load generation over real HTTP: open loop at a fixed rate, or closed loop at a concurrency.

Open loop sends on a fixed schedule whether or not earlier requests have returned, so a slow path
shows up as latency instead of silently lowering the offered load (coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True, slots=True)
class Sample:
    latency: float  # seconds
    status: int  # HTTP status, or 0 when the connection failed


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    rate: float  # completed requests per second
    error_statuses: tuple[tuple[int, int], ...] = ()  # (HTTP status or 0, count)

    @classmethod
    def of(cls, samples: Sequence[Sample], duration: float) -> Summary:
        ok = sorted(s.latency for s in samples if s.status == 200)
        return cls(
            count=len(samples),
            errors=sum(s.status != 200 for s in samples),
            p50_ms=1000 * quantile(ok, 0.50),
            p90_ms=1000 * quantile(ok, 0.90),
            p99_ms=1000 * quantile(ok, 0.99),
            rate=len(ok) / duration if duration > 0 else 0.0,
            error_statuses=tuple(
                sorted(Counter(s.status for s in samples if s.status != 200).items())
            ),
        )


def quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values (nan when empty)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _send(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str]
) -> Sample:
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
    except aiohttp.ClientError:
        status = 0
    return Sample(time.perf_counter() - started, status)


def new_session(connections: int = 512) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))


async def open_loop(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    body: bytes,
    *,
    rate: float,
    duration: float,
    headers: Mapping[str, str],
) -> dict[str, list[Sample]]:
    """Send to every URL in `urls` at `rate` requests/s each, interleaved, for `duration` s."""
    tasks: dict[str, list[asyncio.Task[Sample]]] = {name: [] for name in urls}
    interval = 1.0 / rate
    start = time.perf_counter()
    n = 0
    while (due := start + n * interval) < start + duration:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for name, url in urls.items():
            tasks[name].append(asyncio.create_task(_send(session, url, body, headers)))
        n += 1
    return {name: list(await asyncio.gather(*ts)) for name, ts in tasks.items()}


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration: float,
    headers: Mapping[str, str],
) -> tuple[list[Sample], float]:
    """`concurrency` workers each send back to back for `duration` s; returns samples, seconds."""
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            samples.append(await _send(session, url, body, headers))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - start
