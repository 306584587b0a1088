"""Scrape every endpoint's vLLM `/metrics` on an interval and publish what was read.

API (everything else here is private):

    metrics = CollectorMetrics(registry)                  # optional, the collector's own metrics
    collector = MetricsCollector(on_round=publish, interval=0.05, timeout=0.04, metrics=metrics)
    collector.set_endpoints(["10.0.0.1:8000", ...])       # any time; discovery changes them
    await collector.refresh_once(session)                 # one round (tests, start-up)
    task = asyncio.create_task(collector.run(session))    # rounds until cancelled
    collector.state                                       # the last published CollectedState
    freshness(stats, health, now=..., staleness_seconds=2.0, unready_after_failures=3)

After each round `on_round` receives a `CollectedState`: an immutable mapping
`address -> EndpointReading(stats: EndpointStats | None, health: ScrapeHealth)` holding, per
endpoint, the last good stats (kept through failures) and how its scrapes have gone. The
callback runs on the collector's event loop and should only swap references (build the
snapshot, store it); a callback that raises is logged by `run` and the rounds go on.

Timing. A round starts a scrape of every endpoint whose previous scrape has finished (never two
at once to one endpoint), waits until they end (each is bounded by `timeout`, 0.8 x `interval`
by default) or `interval` has passed, then publishes; a scrape still running then lands in a
later round. So a slow endpoint delays nothing but itself. Rounds start every `interval`
seconds; a round that overruns skips ticks rather than bursting. `read_at` is the monotonic
time the request was sent, so a value's age includes its scrape's latency.

Freshness is judged by the age of the last good scrape only. A server whose metrics stop
changing while it still answers 200 (the simulator's `freeze_metrics` fault, a wedged vLLM
frontend) is indistinguishable from an idle one and stays "fresh".

The session's connector should allow one connection per endpoint
(`aiohttp.TCPConnector(limit=0)` or `limit >= endpoints`): with aiohttp's default of 100, a
larger fleet reconnects on every scrape and the wait for a pooled connection counts against the
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from extproc.state.metrics_text import MetricsFormatError, parse_vllm_metrics
from extproc.state.stats import EndpointStats, ScrapeHealth

log = logging.getLogger(__name__)

Freshness = Literal["fresh", "stale", "failing"]
FRESHNESS_VALUES: Final[tuple[Freshness, ...]] = ("fresh", "stale", "failing")
DEFAULT_INTERVAL: Final = 0.05
DEFAULT_STALENESS_SECONDS: Final = 2.0  # the reference endpoint picker's metrics staleness
DEFAULT_UNREADY_AFTER_FAILURES: Final = 3

# Scrapes take about a millisecond on loopback and up to the timeout when a server struggles.
_SCRAPE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class EndpointReading:
    stats: EndpointStats | None  # the last good scrape's values; None until one succeeds
    health: ScrapeHealth


@dataclass(frozen=True, slots=True)
class CollectedState:
    """What the collector knew at the end of round `round` (monotonic `published_at`)."""

    round: int
    published_at: float
    endpoints: Mapping[str, EndpointReading]  # read-only (MappingProxyType)

    def oldest_read_at(self) -> float | None:
        """The oldest last-good read among endpoints read at least once (None: none was)."""
        reads = [r.stats.read_at for r in self.endpoints.values() if r.stats is not None]
        return min(reads) if reads else None


EMPTY_STATE: Final = CollectedState(round=0, published_at=0.0, endpoints=MappingProxyType({}))


def freshness(
    stats: EndpointStats | None,
    health: ScrapeHealth,
    *,
    now: float,
    staleness_seconds: float = DEFAULT_STALENESS_SECONDS,
    unready_after_failures: int = DEFAULT_UNREADY_AFTER_FAILURES,
) -> Freshness:
    """failing: treat as unready until a scrape succeeds; stale: ready, but don't trust load."""
    if health.consecutive_failures >= unready_after_failures:
        return "failing"
    if stats is None or now - stats.read_at > staleness_seconds:
        return "stale"
    return "fresh"


class CollectorMetrics:
    """The collector's own Prometheus metrics, in a registry made at start-up."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.scrape_seconds = Histogram(
            "extproc_scrape_duration_seconds",
            "Time to fetch and parse one endpoint's /metrics (successful scrapes).",
            ["endpoint"],
            buckets=_SCRAPE_BUCKETS,
            registry=registry,
        )
        self.scrape_errors = Counter(
            "extproc_scrape_errors",
            "Failed /metrics scrapes, by endpoint and reason.",
            ["endpoint", "reason"],
            registry=registry,
        )
        self.snapshot_age = Gauge(
            "extproc_snapshot_age_seconds",
            "Now minus the oldest last-good read among endpoints, at the end of a round.",
            registry=registry,
        )
        self.endpoints = Gauge(
            "extproc_scraped_endpoints",
            "Endpoints by freshness of their metrics (fresh, stale, failing).",
            ["freshness"],
            registry=registry,
        )

    def forget(self, address: str, reasons: Iterable[str]) -> None:
        """Drop a departed endpoint's series, so discovery churn does not grow the registry."""
        with contextlib.suppress(KeyError):
            self.scrape_seconds.remove(address)
        for reason in reasons:
            with contextlib.suppress(KeyError):
                self.scrape_errors.remove(address, reason)


class _Endpoint:
    """Mutable per-endpoint bookkeeping, owned by the collector's event loop (no locks)."""

    __slots__ = ("address", "error_reasons", "health", "scrape", "stats", "url")

    def __init__(self, address: str) -> None:
        self.address = address
        self.url = f"http://{address}/metrics"
        self.stats: EndpointStats | None = None
        self.health = ScrapeHealth()
        self.scrape: asyncio.Task[None] | None = None
        self.error_reasons: set[str] = set()


class MetricsCollector:
    def __init__(
        self,
        on_round: Callable[[CollectedState], None] | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float | None = None,
        staleness_seconds: float = DEFAULT_STALENESS_SECONDS,
        unready_after_failures: int = DEFAULT_UNREADY_AFTER_FAILURES,
        metrics: CollectorMetrics | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        # Below the interval by default, so a round's scrapes end before the next round.
        timeout = 0.8 * interval if timeout is None else timeout
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._on_round = on_round
        self.interval = interval
        self.timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self.staleness_seconds = staleness_seconds
        self.unready_after_failures = unready_after_failures
        self._metrics = metrics
        self._endpoints: dict[str, _Endpoint] = {}
        self._round = 0
        self._state = EMPTY_STATE

    @property
    def state(self) -> CollectedState:
        return self._state

    def set_endpoints(self, addresses: Iterable[str]) -> None:
        """Scrape these from the next round on; departed endpoints' state is dropped."""
        wanted = dict.fromkeys(addresses)  # ordered, deduplicated
        for address in list(self._endpoints):
            if address not in wanted:
                gone = self._endpoints.pop(address)
                if gone.scrape is not None:
                    gone.scrape.cancel()
                if self._metrics is not None:
                    self._metrics.forget(address, gone.error_reasons)
        for address in wanted:
            if address not in self._endpoints:
                self._endpoints[address] = _Endpoint(address)

    async def refresh_once(self, session: aiohttp.ClientSession) -> CollectedState:
        """One round: scrape every idle endpoint, wait for them up to `interval`, publish."""
        started: list[asyncio.Task[None]] = []
        for endpoint in self._endpoints.values():
            if endpoint.scrape is None:
                endpoint.scrape = asyncio.create_task(self._scrape(session, endpoint))
                started.append(endpoint.scrape)
        if started:
            # aiohttp's timeout ends each scrape, normally before this bound: a round never
            # outlasts its interval, so a scrape allowed longer (timeout >= interval) or a
            # late event loop makes the round publish what it has, not wait.
            await asyncio.wait(started, timeout=self.interval)
        return self._publish()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Rounds every `interval` until cancelled; an exception is logged, never fatal."""
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        try:
            while True:
                try:
                    await self.refresh_once(session)
                except Exception:
                    log.exception("metrics collection round failed")
                next_round += self.interval
                now = loop.time()
                if next_round < now:
                    # Overran: skip the missed ticks instead of running rounds back to back.
                    next_round = now + self.interval - (now - next_round) % self.interval
                await asyncio.sleep(next_round - now)
        finally:
            for endpoint in self._endpoints.values():
                if endpoint.scrape is not None:
                    endpoint.scrape.cancel()

    async def _scrape(self, session: aiohttp.ClientSession, endpoint: _Endpoint) -> None:
        sent_at = time.monotonic()
        try:
            try:
                async with session.get(endpoint.url, timeout=self._client_timeout) as response:
                    body = await response.read()
                    status = response.status
            except TimeoutError:
                self._failed(endpoint, "timeout", f"no answer within {self.timeout:g}s")
                return
            except aiohttp.ClientError as exc:
                self._failed(endpoint, "connection", f"{type(exc).__name__}: {exc}")
                return
            except Exception as exc:  # a bug or an odd address must not end the collector
                log.debug("scrape of %s failed", endpoint.address, exc_info=True)
                self._failed(endpoint, "other", f"{type(exc).__name__}: {exc}")
                return
            if status != 200:
                self._failed(endpoint, "http_status", f"/metrics answered {status}")
                return
            try:
                stats = parse_vllm_metrics(body, read_at=sent_at)
            except MetricsFormatError as exc:
                self._failed(endpoint, "parse", str(exc))
                return
            endpoint.stats = stats
            endpoint.health = ScrapeHealth(last_ok_at=sent_at)
            if self._metrics is not None:
                self._metrics.scrape_seconds.labels(endpoint.address).observe(
                    time.monotonic() - sent_at
                )
        finally:
            endpoint.scrape = None

    def _failed(self, endpoint: _Endpoint, reason: str, error: str) -> None:
        before = endpoint.health
        endpoint.health = ScrapeHealth(
            last_ok_at=before.last_ok_at,
            consecutive_failures=before.consecutive_failures + 1,
            last_error=error,
        )
        if before.consecutive_failures + 1 == self.unready_after_failures:
            log.warning("metrics of %s failing: %s", endpoint.address, error)
        if self._metrics is not None:
            endpoint.error_reasons.add(reason)
            self._metrics.scrape_errors.labels(endpoint.address, reason).inc()

    def _publish(self) -> CollectedState:
        self._round += 1
        now = time.monotonic()
        state = CollectedState(
            round=self._round,
            published_at=now,
            endpoints=MappingProxyType(
                {a: EndpointReading(e.stats, e.health) for a, e in self._endpoints.items()}
            ),
        )
        self._state = state
        if self._metrics is not None:
            self._export(state, now)
        if self._on_round is not None:
            self._on_round(state)
        return state

    def _export(self, state: CollectedState, now: float) -> None:
        assert self._metrics is not None
        counts = dict.fromkeys(FRESHNESS_VALUES, 0)
        for reading in state.endpoints.values():
            kind = freshness(
                reading.stats,
                reading.health,
                now=now,
                staleness_seconds=self.staleness_seconds,
                unready_after_failures=self.unready_after_failures,
            )
            counts[kind] += 1
        for kind, count in counts.items():
            self._metrics.endpoints.labels(kind).set(count)
        # Endpoints never read have no age; they show in the freshness gauge as stale.
        oldest = state.oldest_read_at()
        self._metrics.snapshot_age.set(now - oldest if oldest is not None else float("nan"))
