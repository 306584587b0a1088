"""Memory and lookup time of the precise prefix index, compact form against a naive one.

    .venv/bin/python benchmarks/index_memory.py [--blocks 1000000] [--endpoints 8]

Memory is what tracemalloc sees allocated while the index is built, block hashes included
(random 64-bit ints, as KV events deliver them), divided per million blocks. Two layouts:
- naive: `dict[int, set[str]]` (hash -> endpoint names) plus a `set[int]` per endpoint for resets;
- compact: `extproc.state.prefix_index.PrefixIndex` (hash -> endpoint bitmask, a store-ordered
  `dict[int, int]` per endpoint).
Two fills: every block on one endpoint; and blocks spread over the endpoints, half of them on a
second endpoint too (1.5 entries per block). Lookup: an 8k-token prompt (512 blocks of 16) against
`--endpoints` endpoints holding prefixes of it of different lengths, one holding all of it (the
longest walk), timed over many repetitions.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Protocol

from extproc.state.prefix_index import PrefixIndex


class Layout(Protocol):
    def store(self, endpoint: str, hashes: Sequence[int]) -> object: ...

    def lookup(self, hashes: Sequence[int]) -> dict[str, int]: ...


class NaiveIndex:
    """The obvious structure, for comparison only."""

    def __init__(self) -> None:
        self.owners: dict[int, set[str]] = {}
        self.held: dict[str, set[int]] = {}

    def store(self, endpoint: str, hashes: Sequence[int]) -> None:
        held = self.held.setdefault(endpoint, set())
        for h in hashes:
            self.owners.setdefault(h, set()).add(endpoint)
            held.add(h)

    def lookup(self, hashes: Sequence[int]) -> dict[str, int]:
        found: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(hashes):
            here = self.owners.get(h, set())
            now = set(here) if alive is None else alive & here
            for gone in (alive or set()) - now:
                found[gone] = depth
            alive = now
            if not alive:
                return found
        for name in alive or ():
            found[name] = len(hashes)
        return found


def _names(count: int) -> list[str]:
    return [f"10.0.0.{i}:8000" for i in range(count)]


def _fill_one(index: Layout, blocks: int, endpoints: int, rng: random.Random) -> int:
    chunk = 512
    for _ in range(blocks // chunk):
        index.store(_names(1)[0], [rng.getrandbits(64) for _ in range(chunk)])
    return blocks


def _fill_spread(index: Layout, blocks: int, endpoints: int, rng: random.Random) -> int:
    names = _names(endpoints)
    chunk = 512
    entries = 0
    for i in range(blocks // chunk):
        hashes = [rng.getrandbits(64) for _ in range(chunk)]
        index.store(names[i % endpoints], hashes)
        index.store(names[(i + 1) % endpoints], hashes[: chunk // 2])
        entries += chunk + chunk // 2
    return entries


def measure(
    make: Callable[[], Layout],
    fill: Callable[[Layout, int, int, random.Random], int],
    blocks: int,
    endpoints: int,
) -> tuple[float, int, float]:
    """(bytes per million blocks, entries, seconds to build)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    index = make()
    entries = fill(index, blocks, endpoints, random.Random(1))
    seconds = time.perf_counter() - t0
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del index
    gc.collect()
    return used / blocks * 1_000_000, entries, seconds


def lookup_micros(make: Callable[[], Layout], endpoints: int, repeat: int) -> float:
    rng = random.Random(2)
    prompt = [rng.getrandbits(64) for _ in range(512)]
    index = make()
    names = _names(endpoints)
    for k, name in enumerate(names):
        # Endpoint k holds the first (k+1)/n of the prompt; the last holds all of it.
        index.store(name, prompt[: 512 * (k + 1) // endpoints])
        index.store(name, [rng.getrandbits(64) for _ in range(20_000)])  # unrelated blocks
    expected = {name: 512 * (k + 1) // endpoints for k, name in enumerate(names)}
    assert index.lookup(prompt) == expected
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            index.lookup(prompt)
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--endpoints", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    layouts: list[tuple[str, Callable[[], Layout]]] = [
        ("naive dict[int, set[str]] + per-endpoint sets", NaiveIndex),
        ("compact PrefixIndex (bitmask + per-endpoint dict)", PrefixIndex),
    ]
    fills = [("1 endpoint", _fill_one), (f"{args.endpoints} endpoints, 1.5x", _fill_spread)]
    print(f"{args.blocks:,} blocks (random 64-bit hashes); MB per million blocks, build time")
    for label, make in layouts:
        for fill_label, fill in fills:
            per_million, entries, seconds = measure(make, fill, args.blocks, args.endpoints)
            per_entry = per_million * args.blocks / 1_000_000 / entries
            print(
                f"  {label:52} {fill_label:20} {per_million / 1e6:7.1f} MB"
                f"  ({per_entry:5.1f} B/entry, {entries:,} entries)  built in {seconds:5.2f} s"
            )
    print(f"lookup, 512-block prompt, {args.endpoints} endpoints holding 1/8..8/8 of it")
    for label, make in layouts:
        print(f"  {label:52} {lookup_micros(make, args.endpoints, args.repeat):8.1f} us")


if __name__ == "__main__":
    main()
