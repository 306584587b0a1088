"""MetricsCollector against the simulated vLLM fleet and small loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from extproc.sim import SimConfig, SimFleet
from extproc.state.collector import (
    CollectedState,
    CollectorMetrics,
    Freshness,
    MetricsCollector,
    freshness,
)
from extproc.state.stats import EndpointStats, ScrapeHealth

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _address(url: str) -> str:
    return url.removeprefix("http://")


async def until(predicate: Callable[[], bool], *, attempts: int = 1000) -> None:
    """Poll a condition a bounded number of times (no assertion on wall-clock durations)."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@contextlib.asynccontextmanager
async def running(
    collector: MetricsCollector, session: aiohttp.ClientSession
) -> AsyncIterator[None]:
    task = asyncio.create_task(collector.run(session))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def kind(collector: MetricsCollector, address: str) -> Freshness:
    """The endpoint's freshness as of the collector's last published round."""
    state = collector.state
    reading = state.endpoints.get(address)
    if reading is None:
        return "stale"  # not scraped yet
    return freshness(
        reading.stats,
        reading.health,
        now=state.published_at,
        staleness_seconds=collector.staleness_seconds,
        unready_after_failures=collector.unready_after_failures,
    )


# -- freshness: a pure function --------------------------------------------------------------

READ = EndpointStats(read_at=100.0)
FRESHNESS_CASES: list[tuple[str, EndpointStats | None, ScrapeHealth, float, Freshness]] = [
    ("just-read", READ, ScrapeHealth(last_ok_at=100.0), 100.5, "fresh"),
    ("at-threshold", READ, ScrapeHealth(last_ok_at=100.0), 102.0, "fresh"),
    ("past-threshold", READ, ScrapeHealth(100.0, 2, "timeout"), 102.1, "stale"),
    ("never-read", None, ScrapeHealth(), 0.0, "stale"),
    ("never-read-failing", None, ScrapeHealth(None, 3, "refused"), 0.0, "failing"),
    ("two-failures-recent", READ, ScrapeHealth(100.0, 2, "refused"), 100.2, "fresh"),
    ("three-failures-recent", READ, ScrapeHealth(100.0, 3, "refused"), 100.2, "failing"),
    ("failing-beats-stale", READ, ScrapeHealth(100.0, 9, "refused"), 200.0, "failing"),
]


@pytest.mark.parametrize(
    ("stats", "health", "now", "expected"),
    [c[1:] for c in FRESHNESS_CASES],
    ids=[c[0] for c in FRESHNESS_CASES],
)
def test_freshness(
    stats: EndpointStats | None, health: ScrapeHealth, now: float, expected: Freshness
) -> None:
    got = freshness(stats, health, now=now, staleness_seconds=2.0, unready_after_failures=3)
    assert got == expected


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="interval"):
        MetricsCollector(interval=0)
    with pytest.raises(ValueError, match="timeout"):
        MetricsCollector(interval=1, timeout=0)
    assert MetricsCollector(interval=0.05).timeout < 0.05


# -- against the simulator -------------------------------------------------------------------


async def test_values_follow_the_simulators_state() -> None:
    config = SimConfig(tokenizer="bytes", max_num_seqs=2)
    async with SimFleet(config) as fleet, aiohttp.ClientSession() as http:
        server = fleet.servers[0]
        address = _address(server.url)

        async def long_request(i: int) -> None:
            body = {"model": MODEL, "prompt": f"{i} " + "x" * 300, "max_tokens": 100_000}
            async with http.post(f"{server.url}/v1/completions", json=body) as response:
                await response.read()

        requests = [asyncio.create_task(long_request(i)) for i in range(5)]
        try:
            collector = MetricsCollector(interval=0.05, timeout=1.0)
            collector.set_endpoints([address])
            await until(lambda: server.stats().running == 2 and server.stats().waiting == 3)
            for _ in range(3):
                before = server.stats()
                state = await collector.refresh_once(http)
                after = server.stats()
                got = state.endpoints[address].stats
                assert got is not None
                assert (got.running, got.waiting) == (2, 3)
                assert before.generation_tokens <= got.generation_tokens <= after.generation_tokens
                assert before.prompt_tokens <= got.prompt_tokens <= after.prompt_tokens
                assert before.prefix_cache_queries <= got.prefix_cache_queries
                assert got.prefix_cache_queries <= after.prefix_cache_queries
                assert before.kv_usage <= got.kv_usage <= after.kv_usage
                assert got.block_size == 16
                assert got.num_gpu_blocks == before.num_gpu_blocks
                assert got.lora is None
                assert state.endpoints[address].health == ScrapeHealth(last_ok_at=got.read_at)
            assert got is not None
            first_tokens = got.generation_tokens
            await until(lambda: server.stats().generation_tokens > first_tokens)
            state = await collector.refresh_once(http)
            later = state.endpoints[address].stats
            assert later is not None
            assert later.generation_tokens > first_tokens
            assert later.read_at > got.read_at
        finally:
            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)


async def test_a_killed_server_fails_and_comes_back_by_itself_after_revive() -> None:
    async with (
        SimFleet(SimConfig(pods=2, tokenizer="bytes")) as fleet,
        aiohttp.ClientSession() as http,
    ):
        registry = CollectorRegistry()
        states: list[CollectedState] = []
        collector = MetricsCollector(
            states.append,
            interval=0.02,
            timeout=0.5,
            unready_after_failures=3,
            metrics=CollectorMetrics(registry),
        )
        victim, other = (_address(u) for u in fleet.urls)
        collector.set_endpoints([victim, other])
        async with running(collector, http):
            await until(lambda: all(kind(collector, a) == "fresh" for a in (victim, other)))
            await fleet.servers[0].kill()
            await until(lambda: kind(collector, victim) == "failing")
            reading = collector.state.endpoints[victim]
            assert reading.stats is not None  # the last good value is kept
            assert reading.health.last_error
            assert collector.state.endpoints[other].health.consecutive_failures == 0
            errors = registry.get_sample_value(
                "extproc_scrape_errors_total", {"endpoint": victim, "reason": "connection"}
            )
            assert errors is not None
            assert errors >= 3
            await fleet.servers[0].revive()
            await until(lambda: collector.state.endpoints[victim].health.last_error == "")
            reading = collector.state.endpoints[victim]
            assert reading.health.consecutive_failures == 0
            assert reading.stats is not None
            assert reading.stats.generation_tokens == 0  # a restarted server's counters
        rounds = [s.round for s in states]
        assert rounds == list(range(1, len(rounds) + 1))
        assert registry.get_sample_value("extproc_scraped_endpoints", {"freshness": "fresh"}) in (
            1.0,
            2.0,
        )
        count = registry.get_sample_value(
            "extproc_scrape_duration_seconds_count", {"endpoint": other}
        )
        assert count is not None
        assert count >= 1
        age = registry.get_sample_value("extproc_snapshot_age_seconds")
        assert age is not None
        assert age >= 0


async def test_failed_scrapes_longer_than_the_threshold_make_the_endpoint_stale() -> None:
    async with SimFleet(SimConfig(tokenizer="bytes")) as fleet, aiohttp.ClientSession() as http:
        address = _address(fleet.urls[0])
        collector = MetricsCollector(
            interval=0.02, staleness_seconds=0.2, unready_after_failures=10_000
        )
        collector.set_endpoints([address])
        seen: list[Freshness] = []

        def observe() -> Freshness:
            current = kind(collector, address)
            if not seen or seen[-1] != current:
                seen.append(current)
            return current

        async with running(collector, http):
            await until(lambda: observe() == "fresh")
            await fleet.servers[0].kill()
            await until(lambda: observe() == "stale")
            await fleet.servers[0].revive()
            await until(lambda: observe() == "fresh")
        assert seen[-3:] == ["fresh", "stale", "fresh"]


async def test_frozen_metrics_still_read_as_fresh() -> None:
    """Documented limitation: a server answering 200 with old values looks healthy."""
    async with SimFleet(SimConfig(tokenizer="bytes")) as fleet, aiohttp.ClientSession() as http:
        address = _address(fleet.urls[0])
        fleet.servers[0].set_faults(freeze_metrics=True)
        collector = MetricsCollector(interval=0.02, staleness_seconds=0.1)
        collector.set_endpoints([address])
        first = await collector.refresh_once(http)
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
        async with http.post(f"{fleet.urls[0]}/v1/completions", json=body) as response:
            assert response.status == 200
        second = await collector.refresh_once(http)
        a, b = first.endpoints[address].stats, second.endpoints[address].stats
        assert a is not None
        assert b is not None
        assert b.generation_tokens == a.generation_tokens  # frozen...
        assert fleet.servers[0].stats().generation_tokens > a.generation_tokens
        assert kind(collector, address) == "fresh"  # ...yet fresh


# -- timing, churn and robustness, on small loopback servers ---------------------------------

PAGE = b'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_waiting{engine="0"} 0\n'


class _Servers:
    """A fast endpoint, a slow one (answers when released) and a non-vLLM one."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.slow_started = 0
        self.slow_concurrent = 0
        self.slow_max_concurrent = 0
        self.fast_served = 0
        self._runners: list[web.AppRunner] = []
        self.addresses: dict[str, str] = {}

    async def start(self) -> None:
        async def fast(request: web.Request) -> web.Response:
            self.fast_served += 1
            return web.Response(body=PAGE)

        async def slow(request: web.Request) -> web.Response:
            self.slow_started += 1
            self.slow_concurrent += 1
            self.slow_max_concurrent = max(self.slow_max_concurrent, self.slow_concurrent)
            try:
                await self.release.wait()
            finally:
                self.slow_concurrent -= 1
            return web.Response(body=PAGE)

        async def html(request: web.Request) -> web.Response:
            return web.Response(text="<html></html>")

        async def broken(request: web.Request) -> web.Response:
            return web.Response(status=503)

        for name, handler in (("fast", fast), ("slow", slow), ("html", html), ("503", broken)):
            app = web.Application()
            app.router.add_get("/metrics", handler)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            port = runner.addresses[0][1]
            self.addresses[name] = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release.set()
        for runner in self._runners:
            await runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[_Servers]:
    s = _Servers()
    await s.start()
    yield s
    await s.stop()


async def test_a_slow_endpoint_delays_neither_rounds_nor_gets_two_scrapes(
    servers: _Servers,
) -> None:
    async with aiohttp.ClientSession() as http:
        # The timeout is far above the interval: a hung scrape spans many rounds.
        collector = MetricsCollector(interval=0.01, timeout=30.0)
        collector.set_endpoints([servers.addresses["fast"], servers.addresses["slow"]])
        async with running(collector, http):
            await until(lambda: servers.slow_started == 1 and servers.fast_served >= 10)
            assert collector.state.endpoints[servers.addresses["slow"]].stats is None
            assert servers.slow_started == 1
            assert servers.slow_max_concurrent == 1
            servers.release.set()
            await until(
                lambda: collector.state.endpoints[servers.addresses["slow"]].stats is not None
            )


async def test_a_round_publishes_without_waiting_for_a_scrape_past_its_timeout(
    servers: _Servers,
) -> None:
    async with aiohttp.ClientSession() as http:
        collector = MetricsCollector(interval=1.0, timeout=0.05)
        slow = servers.addresses["slow"]
        collector.set_endpoints([slow])
        for expected in (1, 2, 3):
            state = await collector.refresh_once(http)
            assert state.endpoints[slow].health.consecutive_failures == expected
            assert "no answer" in state.endpoints[slow].health.last_error


@pytest.mark.parametrize(
    ("name", "reason"), [("html", "parse"), ("503", "http_status")], ids=["not-vllm", "http-503"]
)
async def test_bad_answers_are_failures(servers: _Servers, name: str, reason: str) -> None:
    registry = CollectorRegistry()
    async with aiohttp.ClientSession() as http:
        collector = MetricsCollector(interval=1.0, metrics=CollectorMetrics(registry))
        address = servers.addresses[name]
        collector.set_endpoints([address])
        state = await collector.refresh_once(http)
    reading = state.endpoints[address]
    assert reading.stats is None
    assert reading.health.consecutive_failures == 1
    labels = {"endpoint": address, "reason": reason}
    assert registry.get_sample_value("extproc_scrape_errors_total", labels) == 1.0


async def test_endpoints_come_and_go(servers: _Servers) -> None:
    registry = CollectorRegistry()
    fast, html = servers.addresses["fast"], servers.addresses["html"]
    async with aiohttp.ClientSession() as http:
        collector = MetricsCollector(interval=1.0, metrics=CollectorMetrics(registry))
        collector.set_endpoints([fast, html])
        state = await collector.refresh_once(http)
        assert set(state.endpoints) == {fast, html}
        collector.set_endpoints([fast, fast])
        state = await collector.refresh_once(http)
    assert list(state.endpoints) == [fast]
    with pytest.raises(TypeError):
        state.endpoints[html] = state.endpoints[fast]  # type: ignore[index]
    # A departed endpoint's series leave the registry.
    assert (
        registry.get_sample_value(
            "extproc_scrape_errors_total", {"endpoint": html, "reason": "parse"}
        )
        is None
    )


async def test_run_survives_a_failing_callback(servers: _Servers) -> None:
    calls: list[int] = []

    def publish(state: CollectedState) -> None:
        calls.append(state.round)
        if len(calls) == 1:
            raise RuntimeError("a bug in the subscriber")

    async with aiohttp.ClientSession() as http:
        collector = MetricsCollector(publish, interval=0.01)
        collector.set_endpoints([servers.addresses["fast"]])
        async with running(collector, http):
            await until(lambda: len(calls) >= 3)
