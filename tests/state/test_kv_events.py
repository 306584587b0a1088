"""KV-event decoding and subscribers: hand-built payloads, a hand-driven publisher, and the
simulated fleet, whose caches the index must equal exactly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq.asyncio
import zmq.constants
from prometheus_client import CollectorRegistry

from extproc.prefix.hashing import BlockHasher, event_id
from extproc.prefix.tokenizers import TiktokenTokenizer, Tokenizer
from extproc.sim import ServerHandle, SimConfig, SimFleet
from extproc.state.kv_decoding import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    block_hash_int,
    decode_batch,
    decode_event,
)
from extproc.state.kv_events import KVEventMetrics, KVEventSubscribers, SubscriberSettings
from extproc.state.kv_groups import GroupSelector
from extproc.state.kv_sources import KVEventEndpoint, KVEventSource, parse_event_sources
from extproc.state.prefix_index import PrefixIndex
from tests.sim.conftest import post, words

DIGEST = bytes(range(32))
DIGEST_INT = int.from_bytes(DIGEST[-8:], "big")


def _pack(events: list[Any], *, ts: float = 1.5, rank: int | None = 0) -> bytes:
    packed: bytes = msgpack.packb([ts, events, rank], use_bin_type=True)
    return packed


# -- decoding ----------------------------------------------------------------------------------

STORED_MAP = {
    "type": "BlockStored",
    "block_hashes": [11, 12],
    "parent_block_hash": 10,
    "token_ids": list(range(32)),
    "block_size": 16,
    "lora_id": None,
    "medium": "GPU",
    "lora_name": "sql-lora",
    "extra_keys": [["tenant"], None],
    "group_idx": 0,
}
STORED = BlockStored(
    (11, 12),
    10,
    tuple(range(32)),
    16,
    "sql-lora",
    "GPU",
    extra_keys=(("tenant",), None),
    group_idx=0,
)
# vLLM 0.33's BlockStored with every field it can send (a hybrid model's sliding-window group).
STORED_033 = {
    **STORED_MAP,
    "lora_id": 3,
    "group_idx": 1,
    "kv_cache_spec_kind": "sliding_window",
    "kv_cache_spec_sliding_window": 4096,
    "locality": "LOCAL",
    "ownership": None,
    "session_id": "s-1",
    "lookahead_token_ids": None,
}
STORED_033_DECODED = BlockStored(
    (11, 12),
    10,
    tuple(range(32)),
    16,
    "sql-lora",
    "GPU",
    extra_keys=(("tenant",), None),
    group_idx=1,
    kv_cache_spec_kind="sliding_window",
    kv_cache_spec_sliding_window=4096,
    lora_id=3,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (STORED_MAP, STORED),
        (STORED_033, STORED_033_DECODED),
        (["BlockStored", *list(STORED_033.values())[1:]], STORED_033_DECODED),
        (
            ["BlockStored", [11, 12], 10, list(range(32)), 16, None, "GPU", "sql-lora",
             [["tenant"], None], 0],
            STORED,
        ),
        # Older vLLM: no medium, no lora_name; defaults may be left out at the end.
        (
            ["BlockStored", [11], None, list(range(16)), 16, None],
            BlockStored((11,), None, tuple(range(16)), 16, None, None),
        ),
        (
            {"type": "BlockStored", "block_hashes": [DIGEST], "parent_block_hash": DIGEST,
             "token_ids": [1], "block_size": 16},
            BlockStored((DIGEST_INT,), DIGEST_INT, (1,), 16, None, None),
        ),
        ({"type": "BlockRemoved", "block_hashes": [11], "medium": "CPU"},
         BlockRemoved((11,), "CPU")),
        ({"type": "BlockRemoved", "block_hashes": [11], "medium": "GPU", "group_idx": 2},
         BlockRemoved((11,), "GPU", 2)),
        (["BlockRemoved", [11], "GPU", 2, "LOCAL"], BlockRemoved((11,), "GPU", 2)),
        (["BlockRemoved", [DIGEST, 12]], BlockRemoved((DIGEST_INT, 12), None)),
        ({"type": "AllBlocksCleared"}, AllBlocksCleared()),
        (["AllBlocksCleared"], AllBlocksCleared()),
        ({"type": "SomethingNew", "x": 1}, None),
        (["SomethingNew", 1], None),
    ],
    ids=[
        "stored-map",
        "stored-033-map",
        "stored-033-array",
        "stored-array",
        "stored-array-short",
        "stored-bytes-hashes",
        "removed-map-cpu",
        "removed-group-map",
        "removed-group-array",
        "removed-array-bytes",
        "cleared-map",
        "cleared-array",
        "unknown-map",
        "unknown-array",
    ],
)  # fmt: skip
def test_decode_event_both_forms(raw: Any, expected: Any) -> None:
    assert decode_event(raw) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3262291359910021016, 3262291359910021016),
        (-1, (1 << 64) - 1),  # a signed int64 on the wire folds into the same uint64
        (DIGEST, DIGEST_INT),
        (b"\x01", 1),
    ],
    ids=["int", "negative-int", "digest", "short-bytes"],
)
def test_block_hash_int(value: object, expected: int) -> None:
    assert block_hash_int(value) == expected


def test_bytes_hashes_map_to_the_ids_the_picker_computes() -> None:
    block = BlockHasher().hash_blocks(list(range(16)))[0]
    assert block_hash_int(block.digest) == block.event_id == 3262291359910021016
    assert event_id(block.digest) == block_hash_int(block.digest)


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "BlockStored", "block_hashes": "nope"},
        {"type": "BlockStored", "block_hashes": [1.5]},
        {"type": "BlockRemoved", "block_hashes": [True]},
        {"type": "BlockStored", "block_hashes": [1], "medium": 3},
        {"type": "BlockStored", "block_hashes": [1], "group_idx": "0"},
        {"type": "BlockStored", "block_hashes": [1], "extra_keys": "salt"},
        {"no": "type"},
        [],
        "BlockStored",
    ],
    ids=[
        "hashes-not-list",
        "float-hash",
        "bool-hash",
        "medium-not-str",
        "group-not-int",
        "extra-keys-not-list",
        "no-tag",
        "empty",
        "str",
    ],
)
def test_decode_event_rejects_bad_shapes(raw: Any) -> None:
    with pytest.raises(DecodeError):
        decode_event(raw)


def test_decode_batch() -> None:
    batch = decode_batch(_pack([STORED_MAP, ["BlockRemoved", [11]], {"type": "Other"}]))
    assert batch.ts == 1.5
    assert batch.dp_rank == 0
    assert batch.events == (STORED, BlockRemoved((11,), None))
    assert batch.unknown == 1
    assert decode_batch(msgpack.packb([2, []])).dp_rank is None


def test_decode_batch_as_a_map() -> None:
    """The batch as a struct without array_like would encode it: field names as keys."""
    payload = msgpack.packb({"ts": 2.5, "events": [STORED_MAP], "data_parallel_rank": 1})
    batch = decode_batch(payload)
    assert (batch.ts, batch.events, batch.dp_rank) == (2.5, (STORED,), 1)
    assert decode_batch(msgpack.packb({"ts": 1.0, "events": []})).dp_rank is None


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb({"ts": 1}),
        msgpack.packb(["x", []]),
        msgpack.packb([1.0, 5, 0]),
        msgpack.packb([True, []]),
    ],
    ids=["not-msgpack", "map-without-events", "bad-ts", "events-not-list", "bool-ts"],
)
def test_decode_batch_rejects_bad_shapes(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_batch(payload)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"0": {"enable_kv_cache_events": True, "publisher": "zmq",
                   "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
                   "topic": "kv-events"},
             "1": {"endpoint": "tcp://*:5559"}},
            KVEventSource("tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558", "kv-events"),
        ),
        (
            {"0": {"endpoint": "tcp://127.0.0.1:41000", "replay_endpoint": None}},
            KVEventSource("tcp://127.0.0.1:41000", None, ""),
        ),
        ({"0": {"enable_kv_cache_events": False, "endpoint": "tcp://*:1"}}, None),
        ({"0": {"enable_kv_cache_events": True, "publisher": "null"}}, None),
        # Later revisions: a bare list of sources, one per data-parallel rank.
        (
            [{"data_parallel_rank": 1, "endpoint": "tcp://*:5558", "replay_endpoint": None,
              "topic": ""},
             {"data_parallel_rank": 0, "endpoint": "tcp://*:5557",
              "replay_endpoint": "tcp://*:5600", "topic": "kv"}],
            KVEventSource("tcp://10.1.2.3:5557", "tcp://10.1.2.3:5600", "kv"),
        ),
        (
            [{"transport": "zmq", "encoding": "msgpack", "data_parallel_rank": 0,
              "endpoint_addr": {"host": "10.1.2.4", "port": 5557, "protocol": "tcp"}}],
            KVEventSource("tcp://10.1.2.4:5557", None, ""),
        ),
        ({}, None),
        ([], None),
        (["tcp://*:5557"], None),
        ("tcp://*:5557", None),
    ],
    ids=["wildcards", "no-replay", "disabled", "null-publisher", "list", "list-endpoint-addr",
         "empty", "empty-list", "list-of-strings", "a-string"],
)  # fmt: skip
def test_parse_event_sources(document: object, expected: KVEventSource | None) -> None:
    assert parse_event_sources(document, "10.1.2.3:8000") == expected


# -- a hand-driven publisher -------------------------------------------------------------------


class HandPublisher:
    """An XPUB (so the test knows when the subscriber listens) and a replay ROUTER."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.pub = ctx.socket(zmq.constants.XPUB)
        self.pub.setsockopt(zmq.constants.LINGER, 0)
        self.router = ctx.socket(zmq.constants.ROUTER)
        self.router.setsockopt(zmq.constants.LINGER, 0)
        host = "tcp://127.0.0.1"
        self.source = KVEventSource(
            f"{host}:{self.pub.bind_to_random_port(host)}",
            f"{host}:{self.router.bind_to_random_port(host)}",
        )
        self.buffer: list[tuple[int, bytes]] = []
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def subscribed(self) -> None:
        assert await self.pub.poll(5000), "the subscriber never subscribed"
        await self.pub.recv()

    def send(self, seq: int, events: list[Any], *, wire: bool = True) -> None:
        payload = _pack(events)
        self.buffer.append((seq, payload))
        if wire:
            self.pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload])

    async def _serve(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= first:
                    await self.router.send_multipart(
                        [client, b"", b"kv-events", seq.to_bytes(8, "big"), payload]
                    )
            await self.router.send_multipart(
                [client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
            )

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.pub.close()
        self.router.close()


def _stored(*hashes: int, medium: str | None = "GPU") -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": None,
            "token_ids": [0] * 16 * len(hashes), "block_size": 16, "medium": medium}  # fmt: skip


def _removed(*hashes: int) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": "GPU"}


async def eventually(predicate: Callable[[], bool], *, seconds: float = 15.0) -> None:
    """Poll until true; fail after a bounded wall time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.01)


@dataclass
class Hand:
    pub: HandPublisher
    subs: KVEventSubscribers
    index: PrefixIndex
    registry: CollectorRegistry
    address: str = "10.9.9.9:8000"

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"endpoint": self.address, **labels}) or 0.0

    async def applied(self, next_seq: int) -> None:
        await eventually(lambda: (self.subs.status(self.address) or _NONE).next_seq == next_seq)


class _NoStatus:
    next_seq = None
    exact = False


_NONE: Any = _NoStatus()


@pytest.fixture
async def hand() -> AsyncIterator[Hand]:
    ctx = zmq.asyncio.Context()
    pub = HandPublisher(ctx)
    index = PrefixIndex()
    registry = CollectorRegistry()
    subs = KVEventSubscribers(
        index,
        metrics=KVEventMetrics(registry),
        settings=SubscriberSettings(replay_timeout_s=0.5),
        ctx=ctx,
    )
    h = Hand(pub, subs, index, registry)
    try:
        await subs.set_endpoints(
            [KVEventEndpoint(h.address, publisher=pub.source.publisher,
                             replay=pub.source.replay or "")]
        )  # fmt: skip
        await pub.subscribed()
        # The start-up resync (a replay of the empty buffer) is done once the state is exact.
        await eventually(lambda: (subs.status(h.address) or _NONE).exact)
        yield h
    finally:
        await subs.close()
        await pub.close()
        ctx.term()


async def test_hand_stream_applies_gpu_events_only(hand: Hand) -> None:
    hand.pub.send(0, [_stored(1, 2, 3), _stored(50, medium="CPU"), {"type": "Future"}])
    hand.pub.send(1, [_removed(3), ["BlockStored", [4], 2, [0] * 16, 16, None]])
    await hand.applied(2)
    assert hand.index.blocks_of(hand.address) == {1, 2, 4}
    status = hand.subs.status(hand.address)
    assert status is not None
    assert status.exact
    assert hand.value("extproc_kv_events_total", type="BlockStored") == 3
    assert hand.value("extproc_kv_events_total", type="unknown") == 1
    hand.pub.send(2, [{"type": "AllBlocksCleared"}, _stored(9)])
    await hand.applied(3)
    assert hand.index.blocks_of(hand.address) == {9}
    assert hand.registry.get_sample_value("extproc_kv_index_blocks") == 1


def _group_stored(*hashes: int, group: int, kind: str | None = None) -> dict[str, Any]:
    return {**_stored(*hashes), "group_idx": group, "kv_cache_spec_kind": kind}


async def test_hand_hybrid_model_indexes_one_group(hand: Hand) -> None:
    """A sliding-window group stores the same hashes as the full-attention group and drops them
    sooner: its removals must not remove what the full-attention group still holds."""
    hand.pub.send(0, [_group_stored(1, 2, 3, group=0), _group_stored(1, 2, 3, group=1)])
    hand.pub.send(1, [{**_removed(1), "group_idx": 1}])
    await hand.applied(2)
    assert hand.index.blocks_of(hand.address) == {1, 2, 3}
    # Group 0 turns out to be windowed: its store skipped the null blocks outside its window.
    windowed = {**_group_stored(7, group=0), "token_ids": [0] * 48}
    hand.pub.send(2, [windowed, _group_stored(4, 5, 6, group=1)])
    await hand.applied(3)
    # Now following group 1; what group 0 taught is dropped (a reset), nothing mixed in.
    assert hand.index.blocks_of(hand.address) == {4, 5, 6}
    assert hand.value("extproc_kv_resets_total", reason="group") == 1
    hand.pub.send(3, [{**_removed(5), "group_idx": 0}, {**_removed(6), "group_idx": 1}])
    await hand.applied(4)
    assert hand.index.blocks_of(hand.address) == {4, 5}


@pytest.mark.parametrize(
    ("events", "group"),
    [
        ([_group_stored(1, group=0), _group_stored(1, group=1)], 0),
        ([_group_stored(1, group=0, kind="sliding_window"), _group_stored(1, group=1)], 1),
        ([_group_stored(1, group=2, kind="full_attention"), _group_stored(1, group=1)], 2),
        ([{**_group_stored(1, group=0), "kv_cache_spec_sliding_window": 512}], 0),
        ([{**_group_stored(1, group=0), "kv_cache_spec_sliding_window": 512},
          _group_stored(1, group=3)], 3),
        ([_group_stored(1, group=1, kind="mamba"), _group_stored(1, group=0, kind="mla_attention")],
         0),
        ([{**_stored(1), "group_idx": None}], 0),
    ],
    ids=["no-kinds", "kind-windowed", "kind-full", "only-windowed", "window-size", "mla",
         "older-vllm"],
)  # fmt: skip
def test_group_selector(events: list[dict[str, Any]], group: int) -> None:
    selector = GroupSelector()
    for raw in events:
        event = decode_event(raw)
        assert isinstance(event, BlockStored)
        selector.learn(event)
    assert selector.group == group


async def test_hand_gap_is_replayed_in_order(hand: Hand) -> None:
    hand.pub.send(0, [_stored(1)])
    hand.pub.send(1, [_stored(2)], wire=False)
    hand.pub.send(2, [_removed(2), _stored(3)], wire=False)
    hand.pub.send(3, [_stored(4)])
    await hand.applied(4)
    assert hand.index.blocks_of(hand.address) == {1, 3, 4}
    assert hand.value("extproc_kv_replays_total", outcome="ok") == 2  # start + the gap
    assert hand.value("extproc_kv_resets_total", reason="gap") == 0


async def test_hand_gap_missing_from_replay_resets(hand: Hand) -> None:
    hand.pub.send(0, [_stored(1, 2)])
    await hand.applied(1)
    hand.pub.buffer.clear()  # the buffer rolled over: batch 1 is gone for good
    hand.pub.send(1, [_removed(2)], wire=False)
    hand.pub.buffer.clear()
    hand.pub.send(2, [_stored(5)])
    await hand.applied(3)
    # Block 1 is still cached on the server but unknown now: a subset, never a false hit.
    assert hand.index.blocks_of(hand.address) == {5}
    assert hand.value("extproc_kv_resets_total", reason="gap") == 1
    assert hand.value("extproc_kv_replays_total", outcome="incomplete") == 1
    status = hand.subs.status(hand.address)
    assert status is not None
    assert not status.exact


async def test_hand_seq_going_back_is_a_restart(hand: Hand) -> None:
    hand.pub.send(0, [_stored(1)])
    hand.pub.send(1, [_stored(2)])
    await hand.applied(2)
    hand.pub.buffer.clear()  # a new process: fresh buffer, seq from 0
    hand.pub.send(0, [_stored(7)])
    await eventually(lambda: hand.index.blocks_of(hand.address) == {7})
    assert hand.value("extproc_kv_resets_total", reason="restart") == 1
    status = hand.subs.status(hand.address)
    assert status is not None
    assert status.exact
    assert status.next_seq == 1


async def test_hand_undecodable_batch_resets(hand: Hand) -> None:
    hand.pub.send(0, [_stored(1)])
    await hand.applied(1)
    hand.pub.pub.send_multipart([b"kv-events", (1).to_bytes(8, "big"), b"\xc1"])
    hand.pub.send(2, [_stored(2)])
    await hand.applied(3)
    assert hand.index.blocks_of(hand.address) == {2}
    assert hand.value("extproc_kv_decode_errors_total") == 1
    assert hand.value("extproc_kv_resets_total", reason="decode_error") == 1


# -- against the simulated fleet ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return TiktokenTokenizer.cl100k()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class Followed:
    fleet: SimFleet
    index: PrefixIndex
    subs: KVEventSubscribers
    registry: CollectorRegistry
    http: aiohttp.ClientSession
    tokenizer: Tokenizer

    @staticmethod
    def address(server: ServerHandle) -> str:
        return server.url.removeprefix("http://")

    def value(self, name: str, server: ServerHandle, **labels: str) -> float:
        sample = self.registry.get_sample_value(name, {"endpoint": self.address(server), **labels})
        return sample or 0.0

    def caught_up(self, server: ServerHandle) -> bool:
        status = self.subs.status(self.address(server))
        return status is not None and (status.next_seq or 0) == server.kv_events_published

    def matches(self, server: ServerHandle) -> bool:
        return self.index.blocks_of(self.address(server)) == server.cached_block_ids()

    async def converged(self) -> None:
        """Every server idle, every subscriber caught up, every index equal to its cache."""
        servers = self.fleet.servers
        await eventually(
            lambda: all(
                s.stats().running == 0
                and s.stats().waiting == 0
                and self.caught_up(s)
                and self.matches(s)
                for s in servers
            )
        )

    async def listening(self, server: ServerHandle) -> None:
        """Send throwaway requests until the subscriber has caught up with live batches (a SUB
        socket only hears what is published after it has joined)."""
        for attempt in range(100):
            await post(self.http, f"{server.url}/v1/completions",
                       {"prompt": words(20, 9000 + attempt), "max_tokens": 1})  # fmt: skip
            with contextlib.suppress(AssertionError):
                await eventually(lambda: self.caught_up(server), seconds=0.3)
                return
        raise AssertionError("the subscriber never caught up")

    async def workload(self, servers: list[ServerHandle], *, seed: int, requests: int = 24) -> None:
        """Requests with shared prefixes (three system prompts), several at once per server,
        more than the small caches hold: blocks are shared, evicted and re-stored."""

        async def one(i: int) -> None:
            server = servers[i % len(servers)]
            prompt = words(150, 100 + i % 3) + " " + words(60, seed * 1000 + i)
            status, _ = await post(self.http, f"{server.url}/v1/completions",
                                   {"prompt": prompt, "max_tokens": 8})  # fmt: skip
            assert status == 200

        for start in range(0, requests, 6):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 6, requests))))

    def check_lookups(self, prompts: list[str]) -> None:
        """The scheduler's query agrees with the caches for prompts hashed the picker's way."""
        hasher = BlockHasher()
        for prompt in prompts:
            hashes = [b.event_id for b in hasher.hash_blocks(self.tokenizer.encode(prompt))]
            expected = {}
            for server in self.fleet.servers:
                cached = server.cached_block_ids()
                depth = 0
                while depth < len(hashes) and hashes[depth] in cached:
                    depth += 1
                if depth:
                    expected[self.address(server)] = depth
            assert self.index.lookup(hashes) == expected


@contextlib.asynccontextmanager
async def following(
    config: SimConfig,
    tokenizer: Tokenizer,
    http: aiohttp.ClientSession,
    *,
    explicit: bool = False,
    subscribe: bool = True,
) -> AsyncIterator[Followed]:
    index = PrefixIndex()
    registry = CollectorRegistry()
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        subs = KVEventSubscribers(
            index, metrics=KVEventMetrics(registry), settings=SubscriberSettings(replay_timeout_s=1)
        )
        followed = Followed(fleet, index, subs, registry, http, tokenizer)
        try:
            if subscribe:
                await subs.set_endpoints(endpoints(fleet, explicit=explicit))
            yield followed
        finally:
            await subs.close()


def endpoints(fleet: SimFleet, *, explicit: bool = False) -> list[KVEventEndpoint]:
    out = []
    for server in fleet.servers:
        address = Followed.address(server)
        if explicit:
            out.append(KVEventEndpoint(address, publisher=server.kv_events_endpoint or "",
                                       replay=server.kv_replay_endpoint or "",
                                       num_gpu_blocks=server.stats().num_gpu_blocks))  # fmt: skip
        else:
            out.append(KVEventEndpoint(address))
    return out


def _config(**overrides: Any) -> SimConfig:
    base: dict[str, Any] = {"pods": 2, "speed": 200, "kv_events": True, "num_gpu_blocks": 48}
    return SimConfig(**(base | overrides))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"kv_events_legacy_arrays": True}, {"kv_events_int_hashes": False}],
    ids=["maps-int-hashes", "legacy-arrays", "bytes-hashes"],
)
async def test_index_equals_the_caches_after_a_workload(
    tokenizer: Tokenizer, http: aiohttp.ClientSession, overrides: dict[str, Any]
) -> None:
    async with following(_config(**overrides), tokenizer, http) as f:
        servers = f.fleet.servers
        for server in servers:
            await f.listening(server)
        await f.workload(servers, seed=1)
        await f.converged()
        for server in servers:
            status = f.subs.status(f.address(server))
            assert status is not None
            assert status.exact
            assert server.cached_block_ids()  # something to compare
            # The workload overflowed the 48-block caches: evictions were followed too.
            assert f.value("extproc_kv_events_total", server, type="BlockRemoved") > 0
            assert f.value("extproc_kv_resets_total", server, reason="gap") == 0
        prompts = [words(150, 100 + k) + " " + words(60, 1000 + k) for k in range(24)]
        f.check_lookups([*prompts, words(150, 100)])
        size = f.index.size()
        assert size.endpoints == 2
        assert f.registry.get_sample_value("extproc_kv_index_entries") == size.entries


async def test_late_subscriber_rebuilds_from_the_replay_buffer(
    tokenizer: Tokenizer, http: aiohttp.ClientSession
) -> None:
    async with following(_config(), tokenizer, http, subscribe=False) as f:
        servers = f.fleet.servers
        await f.workload(servers, seed=2, requests=12)
        await f.subs.set_endpoints(endpoints(f.fleet, explicit=True))
        # No new traffic: everything comes from replaying seq 0 onwards.
        await f.converged()
        for server in servers:
            status = f.subs.status(f.address(server))
            assert status is not None
            assert status.exact


async def test_lost_batch_is_replayed(tokenizer: Tokenizer, http: aiohttp.ClientSession) -> None:
    async with following(_config(), tokenizer, http) as f:
        servers = f.fleet.servers
        for server in servers:
            await f.listening(server)
        servers[0].drop_kv_event_batches(1)
        await f.workload(servers, seed=3, requests=12)
        await f.converged()
        assert f.value("extproc_kv_replays_total", servers[0], outcome="ok") >= 2
        assert f.value("extproc_kv_resets_total", servers[0], reason="gap") == 0
        status = f.subs.status(f.address(servers[0]))
        assert status is not None
        assert status.exact


@pytest.mark.parametrize(
    ("overrides", "replayable"),
    [({}, False), ({"kv_events_replay": False}, True)],
    ids=["buffer-rolled-over", "no-replay-socket"],
)
async def test_unrecoverable_gap_resets_then_converges(
    tokenizer: Tokenizer, http: aiohttp.ClientSession, overrides: dict[str, Any], replayable: bool
) -> None:
    async with following(_config(pods=1, **overrides), tokenizer, http) as f:
        server = f.fleet.servers[0]
        address = f.address(server)
        await f.listening(server)
        await f.workload([server], seed=4, requests=6)
        await f.converged()
        before = server.cached_block_ids()
        server.drop_kv_event_batches(1, replayable=replayable)
        # The lost batch stores a prefix; the next request's batch reveals the gap.
        await post(http, f"{server.url}/v1/completions", {"prompt": words(80, 77), "max_tokens": 1})
        await post(http, f"{server.url}/v1/completions", {"prompt": words(80, 78), "max_tokens": 1})
        await eventually(lambda: f.caught_up(server) and server.stats().running == 0)
        assert f.value("extproc_kv_resets_total", server, reason="gap") == 1
        status = f.subs.status(address)
        assert status is not None
        assert not status.exact
        # Guaranteed after a reset: a subset of the cache, never a block the server lacks...
        known = f.index.blocks_of(address)
        assert known <= server.cached_block_ids()
        assert known < server.cached_block_ids()  # ...and not all of it (old blocks unknown)
        assert before & server.cached_block_ids() - known
        # ...and equal again once every block cached before the reset has been evicted.
        for seed in range(6):
            await post(http, f"{server.url}/v1/completions",
                       {"prompt": words(250, 5000 + seed), "max_tokens": 1})  # fmt: skip
        await f.converged()
        assert not before & server.cached_block_ids()


def _bindable(endpoint: str | None) -> bool:
    """Whether the port of `tcp://host:port` can be bound again (ZMQ closes sockets in its I/O
    thread, so a killed publisher's port is released a moment after `kill` returns)."""
    assert endpoint is not None
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    return True


async def test_restart_resets_and_resyncs(
    tokenizer: Tokenizer, http: aiohttp.ClientSession
) -> None:
    async with following(_config(), tokenizer, http, explicit=True) as f:
        servers = f.fleet.servers
        for server in servers:
            await f.listening(server)
        await f.workload(servers, seed=5, requests=12)
        await f.converged()
        other = f.index.blocks_of(f.address(servers[1]))
        await servers[0].kill()
        await eventually(
            lambda: (
                _bindable(servers[0].kv_events_endpoint)
                and _bindable(servers[0].kv_replay_endpoint)
            )
        )
        await servers[0].revive()
        # The new process has an empty cache; its replay buffer is complete from seq 0.
        await eventually(
            lambda: f.value("extproc_kv_resets_total", servers[0], reason="reconnect") == 1
        )
        assert f.index.blocks_of(f.address(servers[0])) == frozenset()
        assert f.index.blocks_of(f.address(servers[1])) == other
        await f.workload(servers, seed=6, requests=12)
        await f.converged()
        status = f.subs.status(f.address(servers[0]))
        assert status is not None
        assert status.exact


async def test_all_blocks_cleared(tokenizer: Tokenizer, http: aiohttp.ClientSession) -> None:
    async with following(_config(), tokenizer, http) as f:
        servers = f.fleet.servers
        for server in servers:
            await f.listening(server)
        await f.workload(servers, seed=7, requests=6)
        await f.converged()
        servers[1].reset_prefix_cache()
        await f.converged()
        assert f.index.blocks_of(f.address(servers[1])) == frozenset()
        assert f.index.blocks_of(f.address(servers[0]))
        assert f.value("extproc_kv_events_total", servers[1], type="AllBlocksCleared") == 1


async def test_set_endpoints_adds_and_removes(
    tokenizer: Tokenizer, http: aiohttp.ClientSession
) -> None:
    async with following(_config(), tokenizer, http, subscribe=False) as f:
        servers = f.fleet.servers
        first, second = endpoints(f.fleet)
        await f.subs.set_endpoints([first])
        await f.listening(servers[0])
        assert f.index.endpoints() == (first.address,)
        await f.subs.set_endpoints([first, second])
        await f.workload(servers, seed=8, requests=6)
        await f.converged()
        await f.subs.set_endpoints([second])
        assert f.index.endpoints() == (second.address,)
        assert f.subs.status(first.address) is None
        assert [s.address for s in f.subs.statuses()] == [second.address]
        assert f.registry.get_sample_value("extproc_kv_index_endpoints") == 1
