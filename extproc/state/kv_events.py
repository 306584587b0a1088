"""vLLM KV-cache events: one ZMQ subscriber per endpoint feeding the prefix index.

The messages' shapes and their decoding are `extproc.state.kv_decoding` (pure); where an
endpoint publishes, `extproc.state.kv_sources`; which KV-cache group of a hybrid model is
followed, `extproc.state.kv_groups`. This module is the I/O: the sockets, the replay requests
and the state machine that keeps the index in step with each publisher. A ROUTER socket replays
buffered batches: `[b"", start_seq]` from a DEALER, answered batch by batch and closed by seq -1
with an empty payload.

The API the picker uses:

    index = PrefixIndex()
    subscribers = KVEventSubscribers(index, metrics=KVEventMetrics(registry))
    await subscribers.set_endpoints([KVEventEndpoint("10.0.0.7:8000"),       # ask /kv_event_sources
                                     KVEventEndpoint("10.0.0.8:8000", publisher="tcp://10.0.0.8:5557",
                                                     replay="tcp://10.0.0.8:5558",
                                                     num_gpu_blocks=29_001)])
    index.lookup(block_hashes)          # the scheduler's query (extproc.state.prefix_index)
    subscribers.status("10.0.0.7:8000") # exact? last seq, replays, resets
    await subscribers.close()

Guarantees, per endpoint (the subscriber's state machine, `_Subscriber`):
- Every batch is applied once, in seq order. A gap (seq > expected) asks the replay socket for
  the missing batches; if they are not all there (no replay socket, buffer rolled over, no
  answer in time), the endpoint's entries are dropped (a "reset", counted in
  `extproc_kv_resets_total`) and the batches that do arrive are applied from there on.
- `exact` means every batch this publisher process sent since seq 0 has been applied, so the
  endpoint's entries equal its GPU cache's hashed blocks once the stream is caught up. After a
  reset the entries are a subset of the truth (no block is credited that the server lacks) and
  become exact again at the next AllBlocksCleared, restart, or once every block cached before
  the reset has been evicted (cache hits publish nothing, so older blocks are not re-learned).
- A restart (seq going backwards, or the publisher's TCP connection dropping and coming back)
  triggers a resync: replay from seq 0; if the new process's buffer starts at 0 the entries are
  rebuilt exactly, otherwise they are reset.
Decoding and index writes happen in each subscriber's task, never on the request path; a task
yields to the event loop every few batches so a burst of events cannot stall requests.

Over 500 lines on purpose: `_Subscriber` is one state machine (follow, recover, resync, apply)
whose steps read and write the same few fields (`next_seq`, `exact`, the live seq); split, each
part would need all of them handed back and forth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import zmq.asyncio
import zmq.constants
import zmq.error
import zmq.utils.monitor
from prometheus_client import CollectorRegistry, Counter, Gauge
from zmq.sugar.socket import Socket

from extproc.state.kv_decoding import (
    END_SEQ,
    BlockRemoved,
    BlockStored,
    DecodeError,
    decode_batch,
    decode_seq,
)
from extproc.state.kv_groups import GroupSelector
from extproc.state.kv_sources import (
    KVEventEndpoint,
    KVEventSource,
    SourceDiscovery,
    parse_event_sources,
)
from extproc.state.prefix_index import PrefixIndex

log = logging.getLogger(__name__)


class HTTPSourceDiscovery:
    """`GET http://<address>/kv_event_sources`, as vLLM and the simulator answer it."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout_s: float = 2.0) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __call__(self, address: str) -> KVEventSource | None:
        url = f"http://{address}/kv_event_sources"
        try:
            async with self._session.get(url, timeout=self._timeout) as response:
                if response.status != 200:
                    return None
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("kv_event_sources of %s failed: %s", address, exc)
            return None
        return parse_event_sources(document, address)


# -- metrics ---------------------------------------------------------------------------------


class KVEventMetrics:
    """The subscribers' Prometheus series, in the registry the caller owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events = Counter(
            "extproc_kv_events",
            "KV-cache events decoded, by endpoint and type (rate() gives events per second).",
            ["endpoint", "type"],
            registry=r,
        )
        self.batches = Counter(
            "extproc_kv_event_batches", "KV-event batches applied.", ["endpoint"], registry=r
        )
        self.replays = Counter(
            "extproc_kv_replays",
            "Replay requests (after a sequence gap or a reconnect), by outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.resets = Counter(
            "extproc_kv_resets",
            "Times an endpoint's index entries were dropped, by reason.",
            ["endpoint", "reason"],
            registry=r,
        )
        self.decode_errors = Counter(
            "extproc_kv_decode_errors", "Undecodable KV-event batches.", ["endpoint"], registry=r
        )
        self.evictions = Counter(
            "extproc_kv_index_evictions",
            "Index entries forgotten at a memory cap.",
            registry=r,
        )
        self.blocks = Gauge(
            "extproc_kv_index_blocks", "Distinct block hashes in the GPU-tier index.", registry=r
        )
        self.entries = Gauge(
            "extproc_kv_index_entries", "(block, endpoint) pairs in the index.", registry=r
        )
        self.endpoints = Gauge(
            "extproc_kv_index_endpoints", "Endpoints the index follows.", registry=r
        )

    def watch(self, index: PrefixIndex) -> None:
        """Read the index size at scrape time (it is O(1)), rather than after every event."""
        self.blocks.set_function(lambda: index.size().blocks)
        self.entries.set_function(lambda: index.size().entries)
        self.endpoints.set_function(lambda: index.size().endpoints)


# -- subscribers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriberSettings:
    replay_timeout_s: float = 2.0  # silence from the replay socket after which replay failed
    discovery_retry_s: float = 5.0  # between /kv_event_sources attempts
    error_retry_s: float = 1.0  # after an unexpected error, before starting over
    reconnect_ivl_ms: int = 100  # ZMQ's reconnect interval (and max, x10)
    rcvhwm: int = 100_000  # batches ZMQ queues for us while we replay
    yield_every: int = 32  # batches applied before yielding to the event loop


@dataclass(frozen=True, slots=True)
class SubscriberStatus:
    address: str
    source: KVEventSource | None
    exact: bool  # every batch since this publisher's seq 0 applied (see the module docstring)
    next_seq: int | None  # the seq expected next; None before the first batch
    batches: int
    replays: int
    resets: int


class StoredObserver(Protocol):
    """Shown every GPU BlockStored event applied (`extproc.prefix.mismatch` checks them)."""

    def stored(self, endpoint: str, event: BlockStored) -> None: ...


class _Subscriber:
    """Follows one endpoint's publisher. Its state is touched only by its own task."""

    def __init__(
        self,
        spec: KVEventEndpoint,
        *,
        index: PrefixIndex,
        ctx: zmq.asyncio.Context,
        discover: SourceDiscovery,
        metrics: KVEventMetrics | None,
        settings: SubscriberSettings,
    ) -> None:
        self.spec = spec
        self._index = index
        self._ctx = ctx
        self._discover = discover
        self._metrics = metrics
        self._settings = settings
        self.source: KVEventSource | None = None
        self.exact = False
        self.next_seq: int | None = None
        self._live_last = -1  # last seq seen on the live stream (monotonic within a process)
        self.batches = 0
        self.replays = 0
        self.resets = 0
        self._event_counters: dict[str, Any] = {}
        # Survives resets and restarts: a restarted server runs the same model.
        self._groups = GroupSelector()
        self.observer: StoredObserver | None = None

    def status(self) -> SubscriberStatus:
        return SubscriberStatus(
            self.spec.address,
            self.source,
            self.exact,
            self.next_seq,
            self.batches,
            self.replays,
            self.resets,
        )

    async def run(self) -> None:
        address = self.spec.address
        while True:
            try:
                source = self.spec.explicit_source()
                while source is None:
                    source = await self._discover(address)
                    if source is None:
                        await asyncio.sleep(self._settings.discovery_retry_s)
                self.source = source
                await self._follow(source)
            except (zmq.error.ZMQError, DecodeError, OSError) as exc:
                log.warning("kv events of %s: %s; starting over", address, exc)
                self._reset("error")
                await asyncio.sleep(self._settings.error_retry_s)

    # -- the stream ----------------------------------------------------------------------------

    async def _follow(self, source: KVEventSource) -> None:
        s = self._settings
        sub = self._ctx.socket(zmq.constants.SUB)
        monitor: zmq.asyncio.Socket | None = None
        loop = asyncio.get_running_loop()
        watched: list[int] = []
        try:
            sub.setsockopt(zmq.constants.LINGER, 0)
            sub.setsockopt(zmq.constants.RCVHWM, s.rcvhwm)
            sub.setsockopt(zmq.constants.RECONNECT_IVL, s.reconnect_ivl_ms)
            sub.setsockopt(zmq.constants.RECONNECT_IVL_MAX, s.reconnect_ivl_ms * 10)
            sub.setsockopt(zmq.constants.SUBSCRIBE, source.topic.encode())
            # The monitor tells a dropped connection apart from silence: a publisher that comes
            # back may be a new process whose seq restarted, even past the last seq we saw.
            monitor = sub.get_monitor_socket(
                zmq.constants.EVENT_CONNECTED | zmq.constants.EVENT_DISCONNECTED
            )
            sub.connect(source.publisher)
            # Received through synchronous views of the two sockets, woken by the event loop's
            # reader on ZMQ's descriptor: with pyzmq's asyncio receives and poller (their futures
            # and re-registrations) a batch cost 360-390 µs of CPU, now 220-230 µs, where a bare
            # synchronous loop takes 135 (docs/benchmarks.md, benchmarks/kv_event_transport.py).
            live, events = Socket.shadow(sub), Socket.shadow(monitor)
            wake = asyncio.Event()
            for sock in (live, events):
                watched.append(sock.getsockopt(zmq.constants.FD))
                loop.add_reader(watched[-1], wake.set)
            # Whatever the server cached before we connected is only in its replay buffer.
            await self._resync(source, "start")
            dropped = False
            while True:
                # ZMQ's descriptor only says that something changed; ZMQ_EVENTS says what, and
                # reading it re-arms the descriptor. So sleep only once both show nothing.
                if _readable(events):
                    dropped = await self._on_monitor(source, events, live, dropped)
                elif _readable(live):
                    if await self._drain(source, live, s.yield_every):
                        await asyncio.sleep(0)  # more to come: let requests run between bursts
                else:
                    wake.clear()
                    await wake.wait()
        finally:
            for fd in watched:
                loop.remove_reader(fd)
            if monitor is not None:
                sub.disable_monitor()
                monitor.close(linger=0)
            sub.close(linger=0)

    async def _on_monitor(
        self,
        source: KVEventSource,
        events: Socket,
        live: Socket,
        dropped: bool,
    ) -> bool:
        while True:
            try:
                frames = events.recv_multipart(flags=_NOBLOCK)
            except zmq.error.Again:
                return dropped
            event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
            if event == zmq.constants.EVENT_DISCONNECTED:
                # Apply what the old connection delivered before anything the new one brings.
                await self._drain(source, live, None)
                dropped = True
            elif event == zmq.constants.EVENT_CONNECTED and dropped:
                dropped = False
                await self._resync(source, "reconnect")

    async def _drain(self, source: KVEventSource, live: Socket, limit: int | None) -> bool:
        """Applies what has arrived, at most `limit` batches: True if it stopped at the limit."""
        count = 0
        while limit is None or count < limit:
            try:
                frames = live.recv_multipart(flags=_NOBLOCK)
            except zmq.error.Again:
                return False
            count += 1
            try:
                if len(frames) != 3:
                    raise DecodeError(f"message of {len(frames)} frames")
                seq = decode_seq(frames[1])
            except DecodeError as exc:
                self._decode_failed(str(exc))
                continue
            await self._on_live(source, seq, frames[2])
        return True

    async def _on_live(self, source: KVEventSource, seq: int, payload: bytes) -> None:
        if seq <= self._live_last:
            # One publisher's live stream only goes up; going back means a new process.
            log.info("kv events of %s: seq %d after %d, restarted", self.spec.address, seq,
                     self._live_last)  # fmt: skip
            await self._resync(source, "restart")
        self._live_last = seq
        expected = self.next_seq
        if expected is None or seq == expected:
            self._apply(seq, payload)
        elif seq > expected:
            await self._recover(source, expected, seq, payload)
        # seq < expected: already applied from a replay.

    # -- replay, resync, reset -----------------------------------------------------------------

    async def _recover(
        self, source: KVEventSource, expected: int, seq: int, payload: bytes
    ) -> None:
        """A gap: batches expected..seq-1 were lost on the way."""
        batches = await self._replay(source, expected) if source.replay else None
        if batches and batches[0][0] == expected:
            for replayed_seq, replayed in batches:
                if replayed_seq >= expected:
                    self._apply(replayed_seq, replayed)
                    expected = replayed_seq + 1
            if seq < expected:
                return
        log.warning("kv events of %s: batches %d..%d lost and not replayable; resetting",
                    self.spec.address, expected, seq - 1)  # fmt: skip
        self._reset("gap")
        self._apply(seq, payload)

    async def _resync(self, source: KVEventSource, reason: str) -> None:
        """Rebuild from the replay buffer: exact if it reaches back to seq 0 of this process."""
        self._live_last = -1
        batches = await self._replay(source, 0) if source.replay else None
        if batches is None:
            self._reset(reason, count=reason != "start")  # at start there is nothing to drop
            return
        if not batches or batches[0][0] == 0:
            # The process's whole history (an empty buffer: it has published nothing yet).
            self._reset(reason, count=reason != "start")
            self.exact = True
        elif reason == "reconnect" and self.next_seq is not None and batches[0][0] <= self.next_seq:
            # Same process most likely (a new one would have published 10,000 batches while we
            # were away): carry on from where we were.
            for seq, payload in batches:
                if seq >= self.next_seq:
                    self._apply(seq, payload)
            return
        else:
            self._reset(reason)
        for seq, payload in batches:
            self._apply(seq, payload)

    async def _replay(self, source: KVEventSource, start: int) -> list[tuple[int, bytes]] | None:
        """Every buffered batch with seq >= start, in order; None if the socket stays silent."""
        assert source.replay is not None
        self.replays += 1
        dealer = self._ctx.socket(zmq.constants.DEALER)
        outcome = "timeout"
        try:
            dealer.setsockopt(zmq.constants.LINGER, 0)
            dealer.connect(source.replay)
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            out: list[tuple[int, bytes]] = []
            timeout_ms = int(self._settings.replay_timeout_s * 1000)
            while await dealer.poll(timeout_ms):
                frames = await dealer.recv_multipart()
                if len(frames) != 4:
                    outcome = "malformed"
                    return None
                seq = decode_seq(frames[2])
                if seq == END_SEQ:
                    complete = out[0][0] == start if out else start == 0
                    outcome = "ok" if complete else "incomplete"
                    return out
                out.append((seq, frames[3]))
            return None
        finally:
            # A fresh DEALER per request: a late answer to a timed-out one cannot be misread.
            dealer.close(linger=0)
            if self._metrics is not None:
                self._metrics.replays.labels(self.spec.address, outcome).inc()

    def _reset(self, reason: str, *, count: bool = True) -> None:
        self._index.clear(self.spec.address)
        self.next_seq = None
        self.exact = False
        if count:
            self.resets += 1
            if self._metrics is not None:
                self._metrics.resets.labels(self.spec.address, reason).inc()

    # -- applying ------------------------------------------------------------------------------

    def _decode_failed(self, problem: str) -> None:
        log.warning("kv events of %s: undecodable batch (%s)", self.spec.address, problem)
        if self._metrics is not None:
            self._metrics.decode_errors.labels(self.spec.address).inc()
        # Its changes are lost for good (a replay would resend the same bytes).
        self._reset("decode_error")

    def _apply(self, seq: int, payload: bytes) -> None:
        if self.next_seq is None and seq == 0:
            self.exact = True  # the process's first batch onto empty entries
        self.next_seq = seq + 1
        try:
            batch = decode_batch(payload)
        except DecodeError as exc:
            self._decode_failed(str(exc))
            self.next_seq = seq + 1
            return
        self.batches += 1
        index, address = self._index, self.spec.address
        evicted = 0
        counts: dict[str, int] = {}
        for event in batch.events:
            kind = type(event).__name__
            counts[kind] = counts.get(kind, 0) + 1
            if not event.on_gpu:
                continue
            if isinstance(event, BlockStored):
                if self._groups.learn(event):
                    log.warning("kv events of %s: following KV-cache group %d (full attention)",
                                address, self._groups.group)  # fmt: skip
                    # Entries of the group left behind are not this group's: drop them. Not
                    # `_reset`: the stream itself is in order, only the index restarts.
                    index.clear(address)
                    self.exact = False
                    self.resets += 1
                    if self._metrics is not None:
                        self._metrics.resets.labels(address, "group").inc()
                if event.group == self._groups.group:
                    evicted += index.store(address, event.block_hashes)
                    if self.observer is not None:
                        self.observer.stored(address, event)
            elif isinstance(event, BlockRemoved):
                if event.group == self._groups.group:
                    index.remove(address, event.block_hashes)
            else:
                index.clear(address)
        if batch.unknown:
            counts["unknown"] = batch.unknown
        metrics = self._metrics
        if metrics is not None:
            metrics.batches.labels(address).inc()
            for kind, n in counts.items():
                counter = self._event_counters.get(kind)
                if counter is None:
                    counter = self._event_counters[kind] = metrics.events.labels(address, kind)
                counter.inc(n)
            if evicted:
                metrics.evictions.inc(evicted)


class KVEventSubscribers:
    """One subscriber task per endpoint, added and removed with `set_endpoints`."""

    def __init__(
        self,
        index: PrefixIndex,
        *,
        metrics: KVEventMetrics | None = None,
        settings: SubscriberSettings | None = None,
        discover: SourceDiscovery | None = None,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.index = index
        self._metrics = metrics
        self._settings = settings or SubscriberSettings()
        self._discover = discover
        self._session: aiohttp.ClientSession | None = None
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.asyncio.Context()
        self._subs: dict[str, tuple[_Subscriber, asyncio.Task[None]]] = {}
        self._observer: StoredObserver | None = None
        if metrics is not None:
            metrics.watch(index)

    async def set_endpoints(self, endpoints: Iterable[KVEventEndpoint]) -> None:
        """Follow exactly these endpoints: start new ones, stop (and forget) gone or changed
        ones, and resize the index cap of ones whose num_gpu_blocks changed."""
        wanted = {e.address: e for e in endpoints}
        for address, (sub, _) in list(self._subs.items()):
            spec = wanted.get(address)
            if spec is None or _stream_changed(sub.spec, spec):
                await self._stop(address)
            elif spec.num_gpu_blocks != sub.spec.num_gpu_blocks:
                sub.spec = spec
                self.index.add_endpoint(address, capacity=spec.num_gpu_blocks)
        for address, spec in wanted.items():
            if address not in self._subs:
                self._start(spec)

    def observe(self, observer: StoredObserver | None) -> None:
        """Show `observer` every GPU BlockStored event the index applies, from now on."""
        self._observer = observer
        for sub, _ in self._subs.values():
            sub.observer = observer

    def status(self, address: str) -> SubscriberStatus | None:
        entry = self._subs.get(address)
        return entry[0].status() if entry else None

    def statuses(self) -> tuple[SubscriberStatus, ...]:
        return tuple(sub.status() for sub, _ in self._subs.values())

    async def close(self) -> None:
        for address in list(self._subs):
            await self._stop(address)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_ctx:
            self._ctx.term()

    def _start(self, spec: KVEventEndpoint) -> None:
        self.index.add_endpoint(spec.address, capacity=spec.num_gpu_blocks)
        self.index.clear(spec.address)  # entries left by an earlier subscriber are not trusted
        sub = _Subscriber(
            spec,
            index=self.index,
            ctx=self._ctx,
            discover=self._discovery(),
            metrics=self._metrics,
            settings=self._settings,
        )
        sub.observer = self._observer
        task = asyncio.get_running_loop().create_task(sub.run(), name=f"kv-events {spec.address}")
        self._subs[spec.address] = (sub, task)

    async def _stop(self, address: str) -> None:
        _, task = self._subs.pop(address)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            # A bug in a subscriber must not keep the others from stopping.
            log.exception("kv events subscriber of %s failed", address)
        self.index.drop_endpoint(address)

    def _discovery(self) -> SourceDiscovery:
        if self._discover is None:
            # Created lazily: an aiohttp session needs a running loop.
            self._session = aiohttp.ClientSession()
            self._discover = HTTPSourceDiscovery(self._session)
        return self._discover


# Plain ints: pyzmq's flags are enums, slow to combine, and these are used several times a batch.
_EVENTS: Final = int(zmq.constants.EVENTS)
_POLLIN: Final = int(zmq.constants.POLLIN)
_NOBLOCK: Final = int(zmq.constants.NOBLOCK)


def _readable(sock: Socket) -> bool:
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def _stream_changed(old: KVEventEndpoint, new: KVEventEndpoint) -> bool:
    return (old.publisher, old.replay, old.topic) != (new.publisher, new.replay, new.topic)
