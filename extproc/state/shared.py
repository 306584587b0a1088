"""One collector's view, shared with many picker replicas over gRPC (`extproc collector`).

The collector process runs the same state side as a picker (discovery, metrics collector, KV-event
subscribers) and streams it on `StateService.Watch` (protos/extproc/_generated/state.proto):
first the whole state, then, after every scrape round, every endpoint's stats and the prefix
index's changes in the order they happened. A picker follows the stream with `SharedStateClient`;
when the stream breaks it says so, and the picker scrapes and subscribes by itself until the
stream is back (then its own index is replaced by the collector's full state).

Times cross the wire as ages (seconds before the send), because monotonic clocks of two
processes do not compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import grpc

from extproc._generated import state_pb2 as pb
from extproc._generated import state_pb2_grpc as pb_grpc
from extproc.state.collector import CollectedState, EndpointReading
from extproc.state.prefix_index import PrefixIndex
from extproc.state.stats import EndpointStats, LoraState, ScrapeHealth

log = logging.getLogger(__name__)

# A watcher this far behind is cut off; it reconnects and starts again from a full state.
_QUEUE_LIMIT = 256
# gRPC keepalive on the shared-state stream, for both ends (a server refuses pings more often
# than it allows): a peer that stops answering pings is found within about 15 s.
KEEPALIVE: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


class RecordingIndex(PrefixIndex):
    """A prefix index that also remembers its changes, in order, until they are drained."""

    __slots__ = ("_log",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._log: list[pb.IndexDelta] = []

    def store(self, endpoint: str, hashes: Iterable[int]) -> int:
        hashes = list(hashes)
        self._log.append(pb.IndexDelta(address=endpoint, stored=hashes))
        return super().store(endpoint, hashes)

    def remove(self, endpoint: str, hashes: Iterable[int]) -> None:
        hashes = list(hashes)
        self._log.append(pb.IndexDelta(address=endpoint, removed=hashes))
        super().remove(endpoint, hashes)

    def clear(self, endpoint: str) -> int:
        self._log.append(pb.IndexDelta(address=endpoint, reset=True))
        return super().clear(endpoint)

    def drop_endpoint(self, endpoint: str) -> None:
        self._log.append(pb.IndexDelta(address=endpoint, reset=True))
        super().drop_endpoint(endpoint)

    def drain(self) -> list[pb.IndexDelta]:
        changes, self._log = self._log, []
        return changes

    def full(self) -> list[pb.IndexDelta]:
        """The whole index as changes that rebuild it from nothing."""
        return [
            pb.IndexDelta(address=e, reset=True, stored=sorted(self.blocks_of(e)))
            for e in self.endpoints()
        ]


def apply_changes(index: PrefixIndex, changes: Iterable[pb.IndexDelta]) -> None:
    """Replay a collector's index changes on a picker's own index, in order."""
    for change in changes:
        if change.reset:
            index.clear(change.address)
        if change.stored:
            index.store(change.address, change.stored)
        if change.removed:
            index.remove(change.address, change.removed)


def encode_endpoints(collected: CollectedState, now: float) -> list[pb.EndpointState]:
    encoded = []
    for address, reading in collected.endpoints.items():
        state = pb.EndpointState(address=address, has_stats=reading.stats is not None)
        if reading.stats is not None:
            state.stats.CopyFrom(_encode_stats(reading.stats, now))
        health = reading.health
        state.health.CopyFrom(
            pb.ScrapeHealth(
                last_ok_age_seconds=now - health.last_ok_at if health.last_ok_at else -1.0,
                consecutive_failures=health.consecutive_failures,
                last_error=health.last_error,
            )
        )
        encoded.append(state)
    return encoded


def decode_endpoints(states: Iterable[pb.EndpointState], now: float) -> CollectedState:
    endpoints = {}
    for state in states:
        stats = _decode_stats(state.stats, now) if state.has_stats else None
        health = state.health
        endpoints[state.address] = EndpointReading(
            stats=stats,
            health=ScrapeHealth(
                last_ok_at=now - health.last_ok_age_seconds
                if health.last_ok_age_seconds >= 0
                else None,
                consecutive_failures=health.consecutive_failures,
                last_error=health.last_error,
            ),
        )
    return CollectedState(round=0, published_at=now, endpoints=MappingProxyType(endpoints))


# The EndpointStats fields the message carries under the same name, as they are.
_NUMBERS: Final = (
    "waiting",
    "running",
    "kv_usage",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "prompt_tokens",
    "generation_tokens",
    "prefill_seconds",
    "prefill_requests",
    "prefill_computed_tokens",
    "prefill_computed_requests",
    "inter_token_seconds",
    "inter_tokens",
    "first_token_seconds",
    "first_tokens",
    "step_tokens",
    "steps",
)


def _encode_stats(stats: EndpointStats, now: float) -> pb.EndpointStats:
    encoded = pb.EndpointStats(
        age_seconds=now - stats.read_at,
        **{name: getattr(stats, name) for name in _NUMBERS},
        has_lora=stats.lora is not None,
        block_size=stats.block_size or 0,
        num_gpu_blocks=stats.num_gpu_blocks or 0,
    )
    if stats.lora is not None:
        encoded.lora.CopyFrom(
            pb.LoraState(
                max_loras=stats.lora.max_loras,
                running=sorted(stats.lora.running),
                waiting=sorted(stats.lora.waiting),
            )
        )
    return encoded


def _decode_stats(stats: pb.EndpointStats, now: float) -> EndpointStats:
    lora = (
        LoraState(
            max_loras=stats.lora.max_loras,
            running=frozenset(stats.lora.running),
            waiting=frozenset(stats.lora.waiting),
        )
        if stats.has_lora
        else None
    )
    return EndpointStats(
        read_at=now - stats.age_seconds,
        **{name: getattr(stats, name) for name in _NUMBERS},
        lora=lora,
        block_size=stats.block_size or None,
        num_gpu_blocks=stats.num_gpu_blocks or None,
    )


class StateService(pb_grpc.StateServiceServicer):
    """The collector side: fans every round out to the pickers watching."""

    def __init__(self, index: RecordingIndex) -> None:
        self._index = index
        self._collected: CollectedState | None = None
        self._watchers: set[asyncio.Queue[pb.StateUpdate | None]] = set()
        self._version = 0

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def publish(self, collected: CollectedState) -> None:
        """After every collector round: stats of every endpoint plus the index's changes."""
        self._collected = collected
        self._version += 1
        update = pb.StateUpdate(
            version=self._version,
            endpoints=encode_endpoints(collected, time.monotonic()),
            index=self._index.drain(),
        )
        for queue in list(self._watchers):
            try:
                queue.put_nowait(update)
            except asyncio.QueueFull:
                # Too slow to follow: end its stream; it comes back for a full state.
                self._watchers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StateUpdate]:
        queue: asyncio.Queue[pb.StateUpdate | None] = asyncio.Queue(_QUEUE_LIMIT)
        # Full state first; changes drained from now on reach this watcher through the queue.
        self._watchers.add(queue)
        log.info("picker %r watches the shared state", request.picker or context.peer())
        try:
            collected = self._collected
            yield pb.StateUpdate(
                version=self._version,
                full=True,
                endpoints=encode_endpoints(collected, time.monotonic()) if collected else [],
                index=self._index.full(),
            )
            while (update := await queue.get()) is not None:
                yield update
        finally:
            self._watchers.discard(queue)


@dataclass(frozen=True, slots=True)
class ChannelTls:
    """How the picker checks the collector's certificate: against `ca` (PEM), or, without
    one, by trusting what the collector presents (its self-signed certificate, made for the
    name `target_name`) at each connect."""

    ca: bytes | None = None
    target_name: str = "extproc"


class SharedStateClient:
    """The picker side: follows `address`'s stream; tells `on_connected` when it is up or down."""

    def __init__(
        self,
        address: str,
        index: PrefixIndex,
        *,
        on_update: Callable[[CollectedState], None],
        on_connected: Callable[[bool], None],
        name: str = "",
        retry_seconds: float = 1.0,
        silent_after: float = 2.0,
        tls: ChannelTls | None = None,
    ) -> None:
        self._address = address
        self._index = index
        self._on_update = on_update
        self._on_connected = on_connected
        self._name = name
        self._retry = retry_seconds
        self._silent_after = silent_after
        self._tls = tls

    async def run(self) -> None:
        """Follow the stream until cancelled, reconnecting after `retry_seconds` when it breaks
        or falls silent."""
        while True:
            try:
                await self._follow()
            except grpc.aio.AioRpcError as exc:
                log.warning("shared collector %s: %s", self._address, exc.code().name)
            except TimeoutError:  # before OSError, whose subclass it is
                log.warning(
                    "shared collector %s: no update for %.1fs, scraping by ourselves",
                    self._address,
                    self._silent_after,
                )
            except OSError as exc:  # its certificate could not be fetched (TLS, no CA given)
                log.warning("shared collector %s: %s", self._address, exc)
            self._on_connected(False)
            await asyncio.sleep(self._retry)

    async def _channel(self) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(self._address, options=KEEPALIVE)
        ca = self._tls.ca
        options = KEEPALIVE
        if ca is None:
            host, _, port = self._address.rpartition(":")
            ca = (await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))).encode()
            options = (*KEEPALIVE, ("grpc.ssl_target_name_override", self._tls.target_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.aio.secure_channel(self._address, credentials, options=options)

    async def _follow(self) -> None:
        # The collector sends an update every round, so silence means it is hung (stopped,
        # deadlocked, its host gone without a reset): TCP alone would wait for good. Keepalive
        # pings catch a dead peer below gRPC; the timeout on each update catches a live
        # connection to a process that no longer works.
        async with await self._channel() as channel:
            stub = pb_grpc.StateServiceStub(channel)  # type: ignore[no-untyped-call]
            connected = False
            call = stub.Watch(pb.WatchRequest(picker=self._name))
            updates = aiter(call)
            while True:
                try:
                    async with asyncio.timeout(self._silent_after):
                        update = await anext(updates)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    call.cancel()
                    raise
                if update.full:
                    for endpoint in self._index.endpoints():
                        self._index.clear(endpoint)
                apply_changes(self._index, update.index)
                self._on_update(decode_endpoints(update.endpoints, time.monotonic()))
                if not connected:
                    connected = True
                    log.info("following the shared collector at %s", self._address)
                    self._on_connected(True)
