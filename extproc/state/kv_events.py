"""vLLM KV-cache events: decoding, and one ZMQ subscriber per endpoint feeding the prefix index.

Wire format (vLLM `distributed/kv_events.py`; docs/kv_events.md has the details): every engine
step that changed the cache publishes `[topic, seq (8 bytes big-endian), msgpack([ts, events,
dp_rank])]` on a PUB socket. The batch is a positional array (vLLM 0.33's `array_like` struct) or,
should a later revision drop `array_like`, a map with the same field names; both decode. Events are
tagged maps (`{"type": "BlockStored", ...}`, vLLM since June 2026, msgspec `tag=True`, fields
with defaults omitted when default) or positional arrays (`["BlockStored", hashes, parent, ...]`,
before); block hashes are 64-bit ints or raw digests, which `block_hash_int` turns into the same
int. tests/conformance checks all of this against vLLM's own structs. A ROUTER socket
replays buffered batches: `[b"", start_seq]` from a DEALER, answered batch by batch and closed
by seq -1 with an empty payload.

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

Data-parallel servers publish one stream per rank (port + rank); this module follows rank 0
only (the first source `/kv_event_sources` lists).

Hybrid models (sliding-window + full attention, Mamba) keep one block table per KV-cache group,
and vLLM publishes every group's stores and removals with the same block hashes, told apart only
by `group_idx`. Mixing them would be wrong both ways: a sliding-window group drops blocks that
the full-attention group still holds, and skips (null) blocks outside its window. So the index
follows exactly one group per endpoint (`GroupSelector`): the lowest group announced as full
attention (`kv_cache_spec_kind`), else the lowest group not seen to be windowed (a
`kv_cache_spec_sliding_window`, or a store with fewer hashes than token blocks: null blocks
skipped), else group 0. Events of other groups are skipped. vLLM 0.33 sends no kind on its GPU
path and orders groups by layer, so a model whose first layer is windowed (Gemma 3) starts on
group 0 and moves to the full-attention group as soon as a long prompt shows group 0's holes;
the move drops the endpoint's entries (a reset, reason `group`), as nothing learned from the
other group can be trusted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import aiohttp
import msgpack
import zmq.asyncio
import zmq.constants
import zmq.error
import zmq.utils.monitor
from prometheus_client import CollectorRegistry, Counter, Gauge

from extproc.state.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

_U64: Final = (1 << 64) - 1
END_SEQ: Final = -1
GPU: Final = "GPU"


class DecodeError(ValueError):
    """A batch or event that does not have one of vLLM's shapes."""


# -- event records ---------------------------------------------------------------------------


# KV-cache spec kinds (vLLM's `KVCacheSpecKind`) whose group holds every block of a prefix.
FULL_ATTENTION_KINDS: Final = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None
    medium: str | None  # None (an older vLLM) means GPU
    # One entry per block (untagged: LoRA name, cache salt, (mm id, offset), ...), or None.
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None = None
    group_idx: int | None = None  # None (an older vLLM) means the only group, 0
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    lora_id: int | None = None

    @property
    def on_gpu(self) -> bool:
        return _is_gpu(self.medium)

    @property
    def group(self) -> int:
        return self.group_idx or 0

    @property
    def skips_blocks(self) -> bool:
        """Fewer hashes than token blocks: the group skipped null (out-of-window) blocks."""
        size = self.block_size
        return size > 0 and len(self.block_hashes) < len(self.token_ids) // size


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None
    group_idx: int | None = None

    @property
    def on_gpu(self) -> bool:
        return _is_gpu(self.medium)

    @property
    def group(self) -> int:
        return self.group_idx or 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None  # vLLM sends none; a tiered cache may name the tier it cleared

    @property
    def on_gpu(self) -> bool:
        return _is_gpu(self.medium)


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None
    unknown: int = 0  # events of a type this module does not know (skipped, counted)


def _is_gpu(medium: str | None) -> bool:
    return medium is None or medium.upper() == GPU


# -- decoding --------------------------------------------------------------------------------


def block_hash_int(value: object) -> int:
    """The 64-bit int vLLM uses for a block hash: ints as they are (two's complement folded into
    uint64), digests by their last 8 bytes read big-endian, as vLLM's int conversion does."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value & _U64
    if isinstance(value, bytes | bytearray) and value:
        return int.from_bytes(value[-8:], "big")
    raise DecodeError(f"not a block hash: {value!r}")


def _hashes(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise DecodeError(f"block_hashes must be a list, got {type(value).__name__}")
    return tuple(block_hash_int(v) for v in value)


def _opt_str(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(f"{name} must be a string or nil")


def _int(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DecodeError(f"{name} must be an int")


def _opt_int(value: object, name: str) -> int | None:
    return None if value is None else _int(value, name)


def _extra_keys(value: object) -> tuple[tuple[Any, ...] | None, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise DecodeError("extra_keys must be a list or nil")
    out: list[tuple[Any, ...] | None] = []
    for keys in value:
        if keys is not None and not isinstance(keys, list | tuple):
            raise DecodeError("each extra_keys entry must be a list or nil")
        out.append(None if keys is None else tuple(keys))
    return tuple(out)


# Positions of the fields in the array form, after the tag: the declaration order of vLLM 0.33's
# structs (`distributed/kv_events.py`), which an `array_like` struct would encode in.
_STORED_FIELDS: Final = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
)
_REMOVED_FIELDS: Final = ("block_hashes", "medium", "group_idx", "locality", "ownership")
_KNOWN: Final = {"BlockStored", "BlockRemoved", "AllBlocksCleared"}


def decode_event(raw: object) -> KVEvent | None:
    """One event in either form; None for an event type this module does not know."""
    fields: Mapping[str, Any]
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, list | tuple) and raw:
        tag = raw[0]
        names = (
            _STORED_FIELDS
            if tag == "BlockStored"
            else _REMOVED_FIELDS
            if tag == "BlockRemoved"
            else ("medium",)
        )
        # Trailing fields equal to their default may be omitted: zip stops at the shorter.
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise DecodeError(f"an event must be a map or an array, got {type(raw).__name__}")
    if not isinstance(tag, str):
        raise DecodeError("event without a type tag")
    if tag not in _KNOWN:
        return None
    medium = _opt_str(fields.get("medium"), "medium")
    if tag == "BlockStored":
        parent = fields.get("parent_block_hash")
        tokens = fields.get("token_ids") or ()
        if not isinstance(tokens, list | tuple):
            raise DecodeError("token_ids must be a list")
        return BlockStored(
            block_hashes=_hashes(fields.get("block_hashes")),
            parent=None if parent is None else block_hash_int(parent),
            token_ids=tuple(tokens),
            block_size=_int(fields.get("block_size", 0), "block_size"),
            lora_name=_opt_str(fields.get("lora_name"), "lora_name"),
            medium=medium,
            extra_keys=_extra_keys(fields.get("extra_keys")),
            group_idx=_opt_int(fields.get("group_idx"), "group_idx"),
            kv_cache_spec_kind=_opt_str(fields.get("kv_cache_spec_kind"), "kv_cache_spec_kind"),
            kv_cache_spec_sliding_window=_opt_int(
                fields.get("kv_cache_spec_sliding_window"), "kv_cache_spec_sliding_window"
            ),
            lora_id=_opt_int(fields.get("lora_id"), "lora_id"),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(
            _hashes(fields.get("block_hashes")),
            medium,
            _opt_int(fields.get("group_idx"), "group_idx"),
        )
    return AllBlocksCleared(medium)


_BATCH_SHAPE: Final = "a batch must be [ts, events, dp_rank] or a map of those fields"


def decode_batch(payload: bytes) -> EventBatch:
    """The third frame of a message: `msgpack([ts, events, dp_rank])`, or the same as a map
    (`{"ts", "events", "data_parallel_rank"}`), the form vLLM's struct takes without array_like."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list | tuple) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise DecodeError(_BATCH_SHAPE)
    if (
        not isinstance(ts, int | float)
        or isinstance(ts, bool)
        or not isinstance(events, list | tuple)
    ):
        raise DecodeError(_BATCH_SHAPE)
    decoded: list[KVEvent] = []
    unknown = 0
    for item in events:
        event = decode_event(item)
        if event is None:
            unknown += 1
        else:
            decoded.append(event)
    return EventBatch(float(ts), tuple(decoded), rank if isinstance(rank, int) else None, unknown)


def decode_seq(frame: bytes) -> int:
    """The 8-byte big-endian sequence number; the replay end marker is -1 (signed)."""
    if len(frame) != 8:
        raise DecodeError(f"seq frame of {len(frame)} bytes")
    return int.from_bytes(frame, "big", signed=True)


# -- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KVEventSource:
    publisher: str  # tcp://host:port of the PUB socket
    replay: str | None = None  # tcp://host:port of the replay ROUTER socket
    topic: str = ""  # subscription prefix; "" takes every topic


@dataclass(frozen=True, slots=True)
class KVEventEndpoint:
    """One model server to follow. `address` (ip:port of its HTTP API) names it in the index."""

    address: str
    publisher: str = ""  # explicit (config, pod annotation); empty: ask /kv_event_sources
    replay: str = ""  # explicit replay socket; only used with an explicit publisher
    topic: str = ""
    num_gpu_blocks: int | None = None  # sizes the endpoint's cap in the index

    def explicit_source(self) -> KVEventSource | None:
        if not self.publisher:
            return None
        return KVEventSource(self.publisher, self.replay or None, self.topic)


class SourceDiscovery(Protocol):
    """Finds an endpoint's event sockets; None when it publishes none (yet)."""

    async def __call__(self, address: str) -> KVEventSource | None: ...


def _rank_key(rank: object) -> int:
    return int(str(rank)) if str(rank).isdigit() else 1 << 30


def parse_event_sources(document: object, address: str) -> KVEventSource | None:
    """The lowest rank's source in a `/kv_event_sources` answer, with wildcard hosts
    (`tcp://*:5557`, as vLLM binds) replaced by the endpoint's own host.

    Two shapes: vLLM 0.33/0.34 answer `{"<dp rank>": KVEventsConfig}`; later revisions a bare
    list of sources, `[{"data_parallel_rank": 0, "endpoint": ..., "replay_endpoint": ...,
    "topic": ...}]` (an `endpoint_addr` `{host, port}` is taken where `endpoint` is absent)."""
    config: object
    if isinstance(document, dict) and document:
        config = document[min(document, key=_rank_key)]
    elif isinstance(document, list) and document:
        sources = [d for d in document if isinstance(d, dict)]
        if not sources:
            return None
        config = min(sources, key=lambda d: _rank_key(d.get("data_parallel_rank", 0)))
    else:
        return None
    if not isinstance(config, dict) or config.get("enable_kv_cache_events") is False:
        return None
    if config.get("publisher") == "null":
        return None
    publisher = config.get("endpoint")
    addr = config.get("endpoint_addr")
    if not publisher and isinstance(addr, dict) and addr.get("host") and addr.get("port"):
        publisher = f"{addr.get('protocol') or 'tcp'}://{addr['host']}:{addr['port']}"
    if not isinstance(publisher, str) or not publisher:
        return None
    replay = config.get("replay_endpoint")
    topic = config.get("topic")
    host = address.rpartition(":")[0] or address
    return KVEventSource(
        _concrete(publisher, host),
        _concrete(replay, host) if isinstance(replay, str) and replay else None,
        topic if isinstance(topic, str) else "",
    )


def _concrete(endpoint: str, host: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.hostname not in {"*", "0.0.0.0", "::", "", None}:
        return endpoint
    port = endpoint.rpartition(":")[2]
    return f"tcp://{host}:{port}"


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


class GroupSelector:
    """Which KV-cache group of one endpoint the index follows (the module docstring says why
    one, and which). Learns from the BlockStored events it sees; `learn` says when it moved."""

    def __init__(self) -> None:
        self.group = 0
        self._seen: set[int] = set()
        self._full: set[int] = set()
        self._windowed: set[int] = set()

    def learn(self, event: BlockStored) -> bool:
        g = event.group
        self._seen.add(g)
        kind = event.kv_cache_spec_kind
        if kind is not None:
            (self._full if kind in FULL_ATTENTION_KINDS else self._windowed).add(g)
        elif event.kv_cache_spec_sliding_window is not None or event.skips_blocks:
            self._windowed.add(g)
        if self._full:
            chosen = min(self._full)
        else:
            # With only windowed groups in sight, the lowest of them is the best there is.
            candidates = (self._seen - self._windowed) or self._seen
            chosen = min(candidates)
        moved = chosen != self.group
        self.group = chosen
        return moved


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
            poller = zmq.asyncio.Poller()
            poller.register(sub, zmq.constants.POLLIN)
            poller.register(monitor, zmq.constants.POLLIN)
            # Whatever the server cached before we connected is only in its replay buffer.
            await self._resync(source, "start")
            dropped = False
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    dropped = await self._on_monitor(source, monitor, sub, dropped)
                if sub in ready:
                    await self._drain(source, sub, s.yield_every)
                    await asyncio.sleep(0)  # let requests run between bursts
        finally:
            if monitor is not None:
                sub.disable_monitor()
                monitor.close(linger=0)
            sub.close(linger=0)

    async def _on_monitor(
        self,
        source: KVEventSource,
        monitor: zmq.asyncio.Socket,
        sub: zmq.asyncio.Socket,
        dropped: bool,
    ) -> bool:
        while True:
            try:
                frames = await monitor.recv_multipart(flags=zmq.constants.NOBLOCK)
            except zmq.error.Again:
                return dropped
            event = zmq.utils.monitor.parse_monitor_message(frames)["event"]
            if event == zmq.constants.EVENT_DISCONNECTED:
                # Apply what the old connection delivered before anything the new one brings.
                await self._drain(source, sub, None)
                dropped = True
            elif event == zmq.constants.EVENT_CONNECTED and dropped:
                dropped = False
                await self._resync(source, "reconnect")

    async def _drain(
        self, source: KVEventSource, sub: zmq.asyncio.Socket, limit: int | None
    ) -> None:
        count = 0
        while limit is None or count < limit:
            try:
                frames = await sub.recv_multipart(flags=zmq.constants.NOBLOCK)
            except zmq.error.Again:
                return
            count += 1
            try:
                if len(frames) != 3:
                    raise DecodeError(f"message of {len(frames)} frames")
                seq = decode_seq(frames[1])
            except DecodeError as exc:
                self._decode_failed(str(exc))
                continue
            await self._on_live(source, seq, frames[2])

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


def _stream_changed(old: KVEventEndpoint, new: KVEventEndpoint) -> bool:
    return (old.publisher, old.replay, old.topic) != (new.publisher, new.replay, new.topic)
