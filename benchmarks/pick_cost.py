"""What tokens and block hashes cost for an 8k-token chat prompt: cold, warm, growing conversation.

    .venv/bin/python benchmarks/pick_cost.py [--tokenizer cl100k_base] [--tokens 8192]

Prints p50/p99 (microseconds) on a running event loop of one `await blocks(...)` (the whole
prompt), of one `await probe(...)` (what the picker's decision path does: only as far as some
candidate holds the prompt, against an approximate index over three endpoints), and of the
`finish()` that completes a probed prompt after the decision; then the parts alone: tokenizing
the whole prompt, hashing its blocks uncached (the shared BlockHasher and the cached
ChainHasher's uncached loop), a worker-thread hop (for the inline threshold), and the precise and
speculative prefix lookups over 8 endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.prefix.blocks import BlocksSettings, PromptBlocks, PromptProbe
from extproc.prefix.cache import ChainHasher
from extproc.prefix.hashing import BlockHasher
from extproc.prefix.speculative import SpeculativeIndex
from extproc.prefix.tokenizers import load_tokenizer, render_chat
from extproc.request.openai import ParsedRequest, parse_request
from extproc.scheduling.candidates import prefix_holds, with_prefix_matches
from extproc.scheduling.types import Candidate
from extproc.state.inflight import Load
from extproc.state.prefix_index import PrefixIndex
from extproc.state.snapshot import Endpoint

MODEL = "bench-model"
_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were their one all we can her has there been if more when will would "
    "who so no cache block token prefix router latency throughput request model server GPU"
)
_WORDS = _VOCABULARY.split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
    return " ".join(words).capitalize() + rng.choice([". ", ".\n", ", ", "? ", ".\n\n"])


def text_of(rng: random.Random, tokens: int) -> str:
    return "".join(sentence(rng) for _ in range(tokens // 12 + 1))


def conversation(rng: random.Random, tokens: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": text_of(rng, 1000)}]
    while len(render_chat(messages)) < tokens * 4.1:  # about 4.1 characters a token here
        role = "user" if messages[-1]["role"] != "user" else "assistant"
        messages.append({"role": role, "content": text_of(rng, 300)})
    return messages


def request_of(messages: list[dict[str, Any]]) -> ParsedRequest:
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    request = parse_request("/v1/chat/completions", body)
    assert isinstance(request, ParsedRequest)
    return request


def pct(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e6, p99 * 1e6


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def learn_one(probes: list[PromptProbe], index: ApproxPrefixIndex) -> Callable[[], Awaitable[Any]]:
    """One probed prompt's `finish()` and the index's `record`, per call, in probing order."""
    pending = iter(list(probes))
    probes.clear()

    async def step() -> None:
        index.record("10.0.0.1:8000", (await next(pending).finish()).block_hashes)

    return step


def timed_sync(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default="cl100k_base")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    n = args.iterations
    pb = PromptBlocks(BlocksSettings(tokenizers={MODEL: args.tokenizer}))
    rng = random.Random(0)
    rows: list[tuple[str, list[float]]] = []

    async def blocks(request: ParsedRequest) -> Any:
        return await pb.blocks(request, lora=None, cache_salt=None, endpoint_for_remote=None)

    # The decision path's probe, against an approximate index over three endpoints that learns
    # every probed prompt on the first (as the pipeline's `_learn` does, finishing included).
    # The probed cases run after the others, so those measure what they did before probing.
    index = ApproxPrefixIndex()
    candidates = [Candidate(Endpoint(f"10.0.0.{i}:8000", ready=True), Load()) for i in (1, 2, 3)]
    finishing: list[PromptProbe] = []

    async def probe(request: ParsedRequest) -> PromptProbe:
        found = await pb.probe(
            request, lora=None, cache_salt=None, endpoint_for_remote=None,
            holds=prefix_holds(candidates, index),
        )  # fmt: skip
        with_prefix_matches(candidates, found.tokens.block_hashes, index)
        if not found.tokens.complete:
            finishing.append(found)  # finished (and learned) by `learn`, off the clock
        return found

    async def learn() -> None:  # off the decision path: not timed with the probe
        for found in finishing:
            index.record(candidates[0].address, (await found.finish()).block_hashes)
        finishing.clear()

    async def probe_and_learn(request: ParsedRequest) -> PromptProbe:
        found = await probe(request)
        await learn()
        return found

    # Cold: a conversation never seen (nothing shared, not even the system prompt).
    colds = [request_of(conversation(random.Random(1000 + i), args.tokens)) for i in range(n // 4)]
    it = iter(colds)
    rows.append(("cold (new conversation)", await timed(lambda: blocks(next(it)), len(colds))))
    base = conversation(rng, args.tokens)
    request = request_of(base)
    first = await blocks(request)
    rows.append(("warm (same prompt again)", await timed(lambda: blocks(request), n)))

    # Growing: each request is the previous one plus an answer and a new question (about 160
    # tokens). Conversations start near 7k tokens and grow for 10 turns, so prompts stay ~8k.
    growing: list[float] = []
    for round_ in range(max(1, n // 10)):
        grown = conversation(random.Random(5000 + round_), args.tokens - 800)
        await blocks(request_of(grown))  # the previous turn: cached
        for _ in range(10):
            grown = [*grown, {"role": "assistant", "content": text_of(rng, 100)},
                     {"role": "user", "content": text_of(rng, 60)}]  # fmt: skip
            nxt = request_of(grown)
            growing += await timed(lambda: blocks(nxt), 1)  # noqa: B023
    rows.append(("growing (+1 turn, ~160 tokens)", growing))

    # The same cases probed, as the picker's decision path does; `with_prefix_matches` included.
    colds = [request_of(conversation(random.Random(2000 + i), args.tokens)) for i in range(n)]
    it = iter(colds)
    rows.append(("cold, probed (decision path)", await timed(lambda: probe(next(it)), n)))
    probed_cold = [p.tokens for p in finishing]
    rows.append(("cold, probed: finish() after", await timed(learn_one(finishing, index), n)))
    await probe_and_learn(request)
    rows.append(("warm, probed (all held)", await timed(lambda: probe(request), n)))
    # Growing, probed: the previous turn is held (learned), the new turn is not.
    growing = []
    for round_ in range(max(1, n // 10)):
        grown = conversation(random.Random(7000 + round_), args.tokens - 800)
        await probe_and_learn(request_of(grown))
        for _ in range(10):
            grown = [*grown, {"role": "assistant", "content": text_of(rng, 100)},
                     {"role": "user", "content": text_of(rng, 60)}]  # fmt: skip
            nxt = request_of(grown)
            growing += await timed(lambda: probe(nxt), 1)  # noqa: B023
            await learn()
    rows.append(("growing, probed (previous turn held)", growing))
    # A new conversation whose system prompt (~1000 tokens) is held: probed up to its end.
    shared = conversation(random.Random(9000), args.tokens)
    await probe_and_learn(request_of(shared[:1]))
    news = [request_of([shared[0], *conversation(random.Random(9001 + i), args.tokens)[1:]])
            for i in range(n)]  # fmt: skip
    it = iter(news)
    rows.append(("new, system prompt held, probed", await timed(lambda: probe(next(it)), n)))
    await learn()
    exact_counts = [(await blocks(r)).token_count for r in colds]

    # The parts alone, on the same prompt.
    tokenizer = load_tokenizer(args.tokenizer)
    text = render_chat(base)
    ids = tokenizer.encode(text)
    rows.append(("  tokenize whole prompt", timed_sync(lambda: tokenizer.encode(text), 30)))
    reference = BlockHasher()
    rows.append(("  hash blocks, BlockHasher", timed_sync(lambda: reference.hash_blocks(ids), 30)))
    uncached = ChainHasher(reference, cache_blocks=2)  # evicts at once: every block misses
    rows.append(
        ("  hash blocks, ChainHasher uncached", timed_sync(lambda: uncached.event_ids(ids), 30))
    )
    rows.append(("  render_chat", timed_sync(lambda: render_chat(base), 100)))
    rows.append(("  thread hop (empty)", await timed(lambda: asyncio.to_thread(int), n)))
    # The prefix lookups alone on the prompt's blocks, over 8 endpoints whose events confirm the
    # first 64 (a system prompt): the precise index, then the speculative entries over it with
    # all 8 picked for the whole prompt and none confirmed yet (their worst case: each
    # endpoint's run goes on through every block).
    hashes, endpoints = first.block_hashes, [f"10.0.1.{i}:8000" for i in range(8)]
    precise = PrefixIndex()
    for endpoint in endpoints:
        precise.store(endpoint, hashes[:64])
    rows.append(
        ("  precise lookup, 8 endpoints", timed_sync(lambda: precise.lookup(hashes, endpoints), n))
    )
    speculative = SpeculativeIndex(precise)
    for endpoint in endpoints:
        speculative.record(endpoint, hashes)
    rows.append(
        (
            "  speculative lookup, 8 endpoints",
            timed_sync(lambda: speculative.lookup(hashes, endpoints), n),
        )
    )
    for chars in (512, 2048, 8192):
        piece = text[:chars]
        encode_piece = functools.partial(tokenizer.encode, piece)
        rows.append((f"  tokenize {chars} chars inline", timed_sync(encode_piece, n)))
    await pb.aclose()

    print(f"tokenizer {args.tokenizer}: {first.token_count} tokens, {len(text)} characters, "
          f"{len(first.block_hashes)} blocks")  # fmt: skip
    errors = [
        est.token_count / exact - 1 for est, exact in zip(probed_cold, exact_counts, strict=True)
    ]
    print(f"probed cold prompts: {len(errors)}, blocks hashed on the decision path "
          f"{statistics.median(len(t.block_hashes) for t in probed_cold):.0f} (median); token "
          f"count estimate error median {statistics.median(abs(e) for e in errors):.2%}, max "
          f"{max(abs(e) for e in errors):.2%}; stopped early: "
          f"{sum(not t.complete for t in probed_cold)}")  # fmt: skip
    print(f"{'case':40} {'p50 us':>9} {'p99 us':>9} {'n':>5}")
    for name, samples in rows:
        p50, p99 = pct(samples)
        print(f"{name:40} {p50:9.0f} {p99:9.0f} {len(samples):5d}")
    print(pb.stats())


if __name__ == "__main__":
    asyncio.run(main())
