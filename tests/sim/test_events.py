"""KV-cache events: frames, sequence numbers, vLLM's map and legacy shapes, and replay."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from extproc.prefix.hashing import BlockHasher
from extproc.prefix.tokenizers import Tokenizer
from extproc.sim import SimConfig, SimFleet
from tests.sim.conftest import post, until, words


async def _recv(sub: zmq.asyncio.Socket) -> tuple[bytes, int, Any]:
    topic, seq, payload = await sub.recv_multipart()
    return topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False)


def _subscriber(ctx: zmq.asyncio.Context, endpoint: str) -> zmq.asyncio.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


async def _connected(http: aiohttp.ClientSession, url: str, sub: zmq.asyncio.Socket) -> int:
    """Send throwaway requests until the late-joining SUB sees a batch; return its seq."""
    for attempt in range(200):
        await post(http, f"{url}/v1/completions", {"prompt": words(40, 1000 + attempt)})
        if await sub.poll(20):
            _, seq, _ = await _recv(sub)
            while await sub.poll(50):
                _, seq, _ = await _recv(sub)
            return seq
    raise AssertionError("no KV events arrived")


@pytest.mark.parametrize("legacy", [False, True], ids=["maps", "legacy-arrays"])
async def test_block_stored_events_match_vllm_shapes(
    http: aiohttp.ClientSession, tokenizer: Tokenizer, legacy: bool
) -> None:
    config = SimConfig(
        speed=200, kv_events=True, kv_events_legacy_arrays=legacy, num_gpu_blocks=512
    )
    ctx = zmq.asyncio.Context()
    try:
        async with SimFleet(config, tokenizer=tokenizer) as fleet:
            server = fleet.servers[0]
            assert server.kv_events_endpoint is not None
            async with http.get(f"{server.url}/kv_event_sources") as resp:
                sources = await resp.json()
            assert sources["0"]["endpoint"] == server.kv_events_endpoint
            sub = _subscriber(ctx, server.kv_events_endpoint)
            last = await _connected(http, server.url, sub)

            prompt = words(100)
            ids = tokenizer.encode(prompt)
            await post(
                http,
                f"{server.url}/v1/completions",
                {"prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-a"},
            )
            topic, seq, batch = await _recv(sub)
            sub.close()
    finally:
        ctx.term()
    assert topic == b"kv-events"
    assert seq == last + 1
    ts, events, rank = batch
    assert isinstance(ts, float)
    assert rank == 0
    expected = BlockHasher().hash_blocks(ids, cache_salt="tenant-a")
    stored = events[0]
    if legacy:
        assert stored[0] == "BlockStored"
        hashes, parent, token_ids, block_size, lora_id, medium, lora_name = stored[1:8]
        extra_keys = stored[8]
    else:
        assert stored["type"] == "BlockStored"
        hashes, parent, token_ids = (
            stored["block_hashes"], stored["parent_block_hash"], stored["token_ids"]
        )  # fmt: skip
        block_size, lora_id, medium = stored["block_size"], stored["lora_id"], stored["medium"]
        lora_name, extra_keys = stored["lora_name"], stored["extra_keys"]
    assert hashes == [h.event_id for h in expected]
    assert parent is None
    assert token_ids == ids[: len(expected) * 16]
    assert (block_size, lora_id, medium, lora_name) == (16, None, "GPU", None)
    # Untagged extra keys per block: the salt on block 0 only.
    assert extra_keys[0] == ["tenant-a"]
    assert all(k is None for k in extra_keys[1:])


async def test_eviction_publishes_block_removed_and_replay_resends(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(speed=200, kv_events=True, num_gpu_blocks=40)
    ctx = zmq.asyncio.Context()
    try:
        async with SimFleet(config, tokenizer=tokenizer) as fleet:
            server = fleet.servers[0]
            assert server.kv_replay_endpoint is not None
            for seed in range(6):
                await post(
                    http,
                    f"{server.url}/v1/completions",
                    {"prompt": words(200, seed), "max_tokens": 1},
                )
            await until(lambda: server.stats().running == 0)
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(server.kv_replay_endpoint)
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            replayed: list[tuple[int, Any]] = []
            while True:
                _, topic, seq, payload = await dealer.recv_multipart()
                if seq == (-1).to_bytes(8, "big", signed=True):
                    assert payload == b""
                    break
                assert topic == b"kv-events"
                replayed.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)))
            dealer.close()
    finally:
        ctx.term()
    assert [seq for seq, _ in replayed] == list(range(len(replayed)))
    types = [event["type"] for _, batch in replayed for event in batch[1]]
    assert "BlockStored" in types
    assert "BlockRemoved" in types
    removed = next(e for _, b in replayed for e in b[1] if e["type"] == "BlockRemoved")
    assert removed["medium"] == "GPU"
    assert len(removed["block_hashes"]) == 1


async def test_bytes_hashes_option(http: aiohttp.ClientSession, tokenizer: Tokenizer) -> None:
    config = SimConfig(speed=200, kv_events=True, kv_events_int_hashes=False)
    ctx = zmq.asyncio.Context()
    try:
        async with SimFleet(config, tokenizer=tokenizer) as fleet:
            server = fleet.servers[0]
            assert server.kv_replay_endpoint is not None
            prompt = words(40)
            await post(http, f"{server.url}/v1/completions", {"prompt": prompt, "max_tokens": 1})
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(server.kv_replay_endpoint)
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            _, _, _, payload = await dealer.recv_multipart()
            dealer.close()
    finally:
        ctx.term()
    stored = msgpack.unpackb(payload)[1][0]
    expected = BlockHasher().hash_blocks(tokenizer.encode(prompt))
    assert stored["block_hashes"] == [h.digest for h in expected]
