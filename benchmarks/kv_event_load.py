"""CPU cost of following vLLM KV-cache events: decode + apply to the precise index.

Builds batches shaped like vLLM's (one engine step: a BlockStored per scheduled request with its
new full blocks and their token ids, and BlockRemoved for evictions), in the current map format,
then decodes and applies them as the subscriber does, single-threaded, and reports events and
blocks per CPU second. ZMQ transport is not included (it is C and off the GIL).

    .venv/bin/python benchmarks/kv_event_load.py
"""

from __future__ import annotations

import random
import time

import msgpack

from extproc.state.kv_decoding import BlockRemoved, BlockStored, decode_batch
from extproc.state.prefix_index import PrefixIndex

BLOCK = 16


def batches(
    count: int, *, stored_per_batch: int, blocks_per_event: int, seed: int = 0
) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    live: list[int] = []
    for _ in range(count):
        events = []
        for _ in range(stored_per_batch):
            hashes = [rng.getrandbits(64) for _ in range(blocks_per_event)]
            live.extend(hashes)
            events.append({
                "type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
                "token_ids": [rng.randrange(100_000) for _ in range(BLOCK * blocks_per_event)],
                "block_size": BLOCK, "lora_id": None, "medium": "GPU",
            })  # fmt: skip
        if len(live) > 50_000:
            gone, live = (
                live[: blocks_per_event * stored_per_batch],
                live[blocks_per_event * stored_per_batch :],
            )
            events.append({"type": "BlockRemoved", "block_hashes": gone, "medium": "GPU"})
        out.append(msgpack.packb([time.time(), events, 0]))
    return out


def main() -> None:
    print("| step shape | events/s per core | blocks/s per core | µs per batch |")
    print("|---|---:|---:|---:|")
    for stored, blocks in ((4, 1), (16, 2), (8, 32)):
        payloads = batches(2000, stored_per_batch=stored, blocks_per_event=blocks)
        index = PrefixIndex()
        events = blocks_seen = 0
        started = time.process_time()
        for payload in payloads:
            batch = decode_batch(payload)
            for event in batch.events:
                events += 1
                if isinstance(event, BlockStored):
                    index.store("10.0.0.1:8000", event.block_hashes)
                    blocks_seen += len(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    index.remove("10.0.0.1:8000", event.block_hashes)
                    blocks_seen += len(event.block_hashes)
        cpu = time.process_time() - started
        print(
            f"| {stored} requests x {blocks} new blocks | {events / cpu:,.0f} | "
            f"{blocks_seen / cpu:,.0f} | {1e6 * cpu / len(payloads):,.0f} |"
        )


if __name__ == "__main__":
    main()
