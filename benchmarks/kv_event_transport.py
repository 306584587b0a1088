"""CPU the picker pays to follow KV-cache events, the ZMQ and asyncio path included.

`kv_event_load.py` times decoding and applying batches alone. This one runs the real thing: a
child process publishes with the simulator's `KVEventPublisher` (vLLM's wire format) on
`--endpoints` PUB sockets, each at `--rate` batches per second, and this process follows them
with the picker's `KVEventSubscribers` into a `PrefixIndex`. It reports the CPU this process used
(every thread, ZMQ's I/O thread included) while the batches flowed, less what it used idle for
as long, per batch.

    .venv/bin/python benchmarks/kv_event_transport.py [--endpoints 4] [--rate 200] [--seconds 10]
        [--bare] [--output reports/kv-event-transport.json]

`--bare` follows the same stream with a plain synchronous pyzmq loop that only decodes: the
floor of one wake-up per batch, for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from extproc.prefix.hashing import BlockHash
from extproc.sim.cache import BlockRemoved, BlockStored, CacheEvent
from extproc.state.kv_decoding import decode_batch
from extproc.state.kv_events import KVEventSubscribers
from extproc.state.kv_sources import KVEventEndpoint
from extproc.state.prefix_index import PrefixIndex

BLOCK = 16


def _random_hash(rng: random.Random) -> BlockHash:
    value = rng.getrandbits(63)
    return BlockHash(value.to_bytes(32, "big"), value)


def _steps(rng: random.Random, count: int, blocks: int) -> list[list[CacheEvent]]:
    """Engine steps: one request's new full blocks stored, and once the cache is full the
    oldest as many evicted (a steady state: the index neither grows nor empties)."""
    held: list[BlockHash] = []
    steps: list[list[CacheEvent]] = []
    for _ in range(count):
        hashes = tuple(_random_hash(rng) for _ in range(blocks))
        tokens = tuple(rng.randrange(100_000) for _ in range(BLOCK * blocks))
        events: list[CacheEvent] = [BlockStored(hashes, None, tokens, None, None, None)]
        held.extend(hashes)
        if len(held) > 20_000:
            events.append(BlockRemoved(tuple(held[:blocks])))
            del held[:blocks]
        steps.append(events)
    return steps


async def _publish(endpoints: int, rate: float, seconds: float, blocks: int) -> None:
    import zmq.asyncio

    from extproc.sim.events import KVEventPublisher

    ctx = zmq.asyncio.Context()
    pubs = [
        KVEventPublisher(ctx, endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
        for _ in range(endpoints)
    ]
    print(json.dumps([[p.endpoint, p.replay_endpoint] for p in pubs]), flush=True)
    steps = _steps(random.Random(0), int(rate * seconds) + 1, blocks)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
    start = time.monotonic()
    for i, events in enumerate(steps):
        # The endpoints take turns within each period: real servers step out of phase, and
        # batches sent together would share wake-ups and flatter the figure.
        for k, pub in enumerate(pubs):
            due = start + (i + k / endpoints) / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            pub.publish(events)
    await asyncio.sleep(0.5)
    for pub in pubs:
        await pub.close()
    ctx.term()


async def _follow(
    args: argparse.Namespace, child: subprocess.Popen[str], sockets: list[list[str]], expected: int
) -> dict[str, float]:
    """CPU while following until `expected` batches are applied, less idle CPU for as long."""
    assert child.stdin is not None
    index = PrefixIndex()
    subs = KVEventSubscribers(index)
    await subs.set_endpoints(
        KVEventEndpoint(f"127.0.0.1:{9000 + i}", publisher=pub, replay=replay)
        for i, (pub, replay) in enumerate(sockets)
    )
    # Connected and the start-up replay done (the publishers' buffers are empty: exact).
    await _until(lambda: all(s.exact for s in subs.statuses()), within=10)
    await asyncio.sleep(0.2)
    idle_from, idle_main_from, idle_wall = time.process_time(), time.thread_time(), time.monotonic()
    await asyncio.sleep(args.seconds)
    idle_rate = (time.process_time() - idle_from) / (time.monotonic() - idle_wall)
    idle_main_rate = (time.thread_time() - idle_main_from) / (time.monotonic() - idle_wall)
    child.stdin.write("go\n")
    child.stdin.flush()
    busy_from, busy_main_from, busy_wall = time.process_time(), time.thread_time(), time.monotonic()
    # Until every batch is in: a loaded machine may deliver the last ones late.
    await _until(
        lambda: sum(s.batches for s in subs.statuses()) >= expected, within=args.seconds + 30
    )
    took = time.monotonic() - busy_wall
    busy = time.process_time() - busy_from
    busy_main = time.thread_time() - busy_main_from
    batches = sum(s.batches for s in subs.statuses())
    resets = sum(s.resets for s in subs.statuses())
    await subs.close()
    return {
        "batches": batches,
        "resets": resets,
        "seconds": took,
        "busy_s": busy,
        "idle_s": idle_rate * took,  # what this process uses idle, over as long
        "loop_s": busy_main - idle_main_rate * took,  # the event loop's thread alone
    }


def _follow_bare(
    child: subprocess.Popen[str], sockets: list[list[str]], expected: int
) -> dict[str, float]:
    """The floor: a synchronous pyzmq loop that receives and decodes each batch, no asyncio,
    no index, no replay. Its whole CPU while the batches flow (idle, it blocks in poll)."""
    import zmq.constants
    import zmq.error
    from zmq.sugar.context import Context
    from zmq.sugar.poll import Poller

    assert child.stdin is not None
    ctx = Context()
    poller = Poller()
    subs = []
    for publisher, _ in sockets:
        sub = ctx.socket(zmq.constants.SUB)
        sub.setsockopt(zmq.constants.SUBSCRIBE, b"kv-events")
        sub.connect(publisher)
        poller.register(sub, zmq.constants.POLLIN)
        subs.append(sub)
    time.sleep(1.0)  # connected (ZMQ connects in the background)
    child.stdin.write("go\n")
    child.stdin.flush()
    busy_from, busy_main_from, busy_wall = time.process_time(), time.thread_time(), time.monotonic()
    batches = 0
    while batches < expected and time.monotonic() - busy_wall < 60:
        for sock, _ in poller.poll(100):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.constants.NOBLOCK)
                except zmq.error.Again:
                    break
                decode_batch(frames[2])
                batches += 1
    took = time.monotonic() - busy_wall
    result = {
        "batches": batches,
        "resets": 0,
        "seconds": took,
        "busy_s": time.process_time() - busy_from,
        "idle_s": 0.0,
        "loop_s": time.thread_time() - busy_main_from,
    }
    for sub in subs:
        sub.close(linger=0)
    ctx.term()
    return result


async def _until(condition: Callable[[], bool], *, within: float) -> None:
    """Polls: the subscribers' statuses change inside their own tasks and signal nothing."""
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=4)
    parser.add_argument("--rate", type=float, default=200.0, help="batches per second per endpoint")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--blocks", type=int, default=2, help="blocks stored per batch")
    parser.add_argument(
        "--bare", action="store_true", help="the floor: a plain pyzmq loop that only decodes"
    )
    parser.add_argument("--output", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publisher:
        asyncio.run(_publish(args.endpoints, args.rate, args.seconds, args.blocks))
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--publisher", "--endpoints", str(args.endpoints),
         "--rate", str(args.rate), "--seconds", str(args.seconds), "--blocks", str(args.blocks)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    expected = int(args.rate * args.seconds + 1) * args.endpoints
    try:
        sockets = json.loads(child.stdout.readline())
        if args.bare:
            r = _follow_bare(child, sockets, expected)
        else:
            r = asyncio.run(_follow(args, child, sockets, expected))
    except BaseException:
        child.kill()  # it may still be waiting for "go"
        raise
    finally:
        child.wait(30)
    extra = r["busy_s"] - r["idle_s"]
    print("| endpoints | batches/s each | batches applied | resets | CPU busy / idle (s) "
          "| CPU per batch | of it, the event loop's thread | cores |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.endpoints} | {args.rate:.0f} | {r['batches']:.0f} of {expected} "
        f"| {r['resets']:.0f} | {r['busy_s']:.2f} / {r['idle_s']:.2f} "
        f"| {1e6 * extra / max(1.0, r['batches']):.0f} µs "
        f"| {1e6 * r['loop_s'] / max(1.0, r['batches']):.0f} µs | {extra / r['seconds']:.3f} |"
    )
    if args.output is not None:
        settings = {k: v for k, v in vars(args).items() if k not in {"output", "publisher"}}
        args.output.write_text(json.dumps({"settings": settings, **r}, indent=2) + "\n")


if __name__ == "__main__":
    main()
