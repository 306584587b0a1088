"""KV-cache events over ZMQ, as vLLM's `ZmqEventPublisher` sends them (`distributed/kv_events.py`).

Each engine step that changed the cache publishes one batch as three frames
`[topic, seq (8 bytes big-endian, from 0), msgpack([ts, events, data_parallel_rank])]` on a PUB
socket. Events are tagged maps (vLLM since June 2026) or, with `legacy_arrays`, the older
positional arrays. Block hashes are the 64-bit event ints, or raw digests with `int_hashes=False`
(vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`).

The last `buffer_steps` batches are kept for replay: a ROUTER socket answers
`[identity, b"", start_seq]` with every buffered batch whose seq >= start_seq, then an end marker
with seq -1 and an empty payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import zmq.asyncio
import zmq.constants
import zmq.error

from extproc.prefix.hashing import BlockHash
from extproc.sim.cache import AllBlocksCleared, BlockRemoved, BlockStored, CacheEvent

logger = logging.getLogger(__name__)

END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True, slots=True)
class EventFormat:
    legacy_arrays: bool = False
    int_hashes: bool = True
    block_size: int = 16
    medium: str = "GPU"


@dataclass(frozen=True, slots=True)
class KVEventsSettings:
    endpoint: str  # e.g. tcp://127.0.0.1:5557 or tcp://127.0.0.1:0
    replay_endpoint: str | None
    topic: str = "kv-events"
    fmt: EventFormat = field(default_factory=EventFormat)
    buffer_steps: int = 10_000


def event_sources(settings: KVEventsSettings) -> dict[str, Any]:
    """`/kv_event_sources`: vLLM's `KVEventsConfig` per data-parallel rank (one here)."""
    return {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": settings.endpoint,
            "replay_endpoint": settings.replay_endpoint,
            "buffer_steps": settings.buffer_steps,
            "hwm": 100_000,
            "max_queue_size": 100_000,
            "topic": settings.topic,
        }
    }


def encode_event(event: CacheEvent, fmt: EventFormat) -> Any:
    """One event as msgspec would serialise vLLM's struct (defaults omitted)."""

    def h(block_hash: BlockHash) -> int | bytes:
        return block_hash.event_id if fmt.int_hashes else block_hash.digest

    if isinstance(event, BlockStored):
        # vLLM's `to_event_extra_keys` sends one entry per block, None for a block without
        # keys; the list itself is None only when there are no blocks.
        keys = event.extra_keys or (None,) * len(event.block_hashes)
        extra = [list(k) if k is not None else None for k in keys] or None
        fields: list[tuple[str, Any]] = [
            ("block_hashes", [h(b) for b in event.block_hashes]),
            ("parent_block_hash", h(event.parent) if event.parent else None),
            ("token_ids", list(event.token_ids)),
            ("block_size", fmt.block_size),
            ("lora_id", event.lora_id),
            ("medium", fmt.medium),
            ("lora_name", event.lora_name),
        ]
        optional: list[tuple[str, Any]] = [("extra_keys", extra), ("group_idx", 0)]
        return _shape("BlockStored", fields, optional, fmt)
    if isinstance(event, BlockRemoved):
        fields = [("block_hashes", [h(b) for b in event.block_hashes]), ("medium", fmt.medium)]
        return _shape("BlockRemoved", fields, [("group_idx", 0)], fmt)
    if isinstance(event, AllBlocksCleared):
        return _shape("AllBlocksCleared", [], [], fmt)
    raise TypeError(f"not a cache event: {event!r}")


def _shape(
    tag: str, fields: list[tuple[str, Any]], optional: list[tuple[str, Any]], fmt: EventFormat
) -> Any:
    if fmt.legacy_arrays:
        # Array-like structs omit only trailing defaults; keep the optional ones up to the last set.
        tail = [v for _, v in optional]
        while tail and tail[-1] is None:
            tail.pop()
        return [tag, *(v for _, v in fields), *tail]
    out: dict[str, Any] = {"type": tag}
    out.update(fields)
    out.update((k, v) for k, v in optional if v is not None)
    return out


def encode_batch(events: list[CacheEvent], fmt: EventFormat, *, ts: float, rank: int) -> bytes:
    payload = [ts, [encode_event(e, fmt) for e in events], rank]
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return packed


class KVEventPublisher:
    """PUB + replay ROUTER for one server. `publish` never blocks (PUB drops at the HWM)."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str = "kv-events",
        fmt: EventFormat | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        rank: int = 0,
    ) -> None:
        self.fmt = fmt or EventFormat()
        self._topic = topic.encode()
        self._rank = rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._drop = 0  # fault: batches still to lose on the wire
        self._drop_replayable = True
        self._pub = ctx.socket(zmq.constants.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.constants.LINGER, 0)
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self._task: asyncio.Task[None] | None = None
        try:
            self.endpoint = _bind(self._pub, endpoint)
            if replay_endpoint is not None:
                self._replay = ctx.socket(zmq.constants.ROUTER)
                self._replay.setsockopt(zmq.constants.LINGER, 0)
                self._replay.setsockopt(zmq.constants.SNDHWM, 2 * (buffer_steps + 1))
                self.replay_endpoint = _bind(self._replay, replay_endpoint)
        except zmq.error.ZMQError:
            # A port still held by the previous process (ZMQ closes asynchronously): close what
            # was opened, or the context can never terminate.
            self._pub.close()
            if self._replay is not None:
                self._replay.close()
            raise
        if self._replay is not None:
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    @property
    def next_seq(self) -> int:
        return self._seq

    def drop_next(self, count: int = 1, *, replayable: bool = True) -> None:
        """Fault for subscriber tests: lose the next `count` batches on the wire, so
        subscribers see a sequence gap. With `replayable=False` they are missing from the replay
        buffer too, as if it had rolled over before the subscriber asked."""
        if count < 0:
            raise ValueError("count must be >= 0")
        self._drop = count
        self._drop_replayable = replayable

    def publish(self, events: list[CacheEvent]) -> None:
        if not events:
            return
        payload = encode_batch(events, self.fmt, ts=time.time(), rank=self._rank)
        seq = self._seq
        self._seq += 1
        if self._drop > 0:
            self._drop -= 1
            if self._drop_replayable:
                self._buffer.append((seq, payload))
            return
        with contextlib.suppress(zmq.error.Again):
            self._pub.send_multipart(
                (self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.constants.NOBLOCK
            )
        self._buffer.append((seq, payload))

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                logger.warning("invalid replay request with %d frames", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await sock.send_multipart(
                        (client, b"", self._topic, seq.to_bytes(8, "big"), payload)
                    )
            await sock.send_multipart((client, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)


def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> str:
    """Bind and return the endpoint actually bound (port 0 picks a free one)."""
    if endpoint.endswith(":0"):
        port = sock.bind_to_random_port(endpoint[: -len(":0")])
        return f"{endpoint[: -len(':0')]}:{port}"
    sock.bind(endpoint)
    return endpoint
