"""PromptBlocks.probe: the decision path computes a prompt's tokens and block hashes only as far as
some candidate holds it. The prefix matches must be exactly those of the whole prompt, whatever
the index (precise or approximate) holds; the rest is computed afterwards, and the approximate
index learns all of it."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from extproc.config import Config, load_config
from extproc.decision import RequestHead, Routed
from extproc.metrics import PickerMetrics
from extproc.pipeline import Pipeline
from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.prefix.cache import DEFAULT_CHUNK_CHARS, SpliceEncoder, cut_points
from extproc.prefix.hashing import LoraKey
from extproc.prefix.tokenizers import render_chat
from extproc.request.openai import ParsedRequest, parse_request
from extproc.scheduling.candidates import prefix_holds, with_prefix_matches
from extproc.scheduling.types import Candidate
from extproc.server.app import strategies_for, tenancy_for, tenancy_gate
from extproc.state.inflight import InFlight, Load
from extproc.state.prefix_index import PrefixIndex
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore
from extproc.tenancy.policy import key_digest
from tests.prefix.helpers import random_text, train_hf_bpe

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ADDRESSES = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
Index = PrefixIndex | ApproxPrefixIndex


def _parsed(path: str, body: dict[str, Any]) -> ParsedRequest:
    request = parse_request(path, json.dumps(body).encode())
    assert isinstance(request, ParsedRequest)
    return request


def _chat(seed: int, turns: int = 8) -> dict[str, Any]:
    """A conversation of ~10k characters: some ten chunks of the token cache."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": random_text(rng, 400)}]
    for i in range(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant",
                         "content": random_text(rng, 150)})  # fmt: skip
    return {"model": MODEL, "messages": messages}


REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", _chat(1)),
    "completion-text": ("/v1/completions",
                        {"model": MODEL, "prompt": random_text(random.Random(2), 2500)}),
    "completion-ids": ("/v1/completions",
                       {"model": MODEL, "prompt": [list(range(500, 3500))]}),
}  # fmt: skip


def _candidates() -> list[Candidate]:
    return [Candidate(Endpoint(a, frozenset({MODEL}), ready=True), Load()) for a in ADDRESSES]


def _index(kind: str, held: dict[str, tuple[int, ...]]) -> Index:
    index: Index
    if kind == "precise":
        index = PrefixIndex()
        for address, hashes in held.items():
            index.store(address, hashes)
    else:
        index = ApproxPrefixIndex()
        for address, hashes in held.items():
            index.record(address, hashes)
    return index


@pytest.fixture
async def blocks_for() -> AsyncIterator[Callable[..., PromptBlocks]]:
    made: list[PromptBlocks] = []

    def make(**settings: Any) -> PromptBlocks:
        made.append(PromptBlocks(BlocksSettings(**settings)))
        return made[-1]

    yield make
    for pb in made:
        await pb.aclose()


# What the candidates hold of the prompt's N blocks (its full hashes, `h`): leading runs of
# several lengths, and blocks that are not a prefix (the leading ones evicted).
HOLDINGS: dict[str, Callable[[tuple[int, ...]], dict[str, tuple[int, ...]]]] = {
    "cold": lambda h: {},
    "cold-other-prompts": lambda h: {ADDRESSES[0]: tuple(range(1, 200))},
    "first-block": lambda h: {ADDRESSES[0]: h[:1]},
    "a-third-and-a-half": lambda h: {
        ADDRESSES[0]: h[: len(h) // 3],
        ADDRESSES[1]: h[: len(h) // 2],
    },
    "all-but-last": lambda h: {ADDRESSES[2]: h[:-1]},
    "all": lambda h: {ADDRESSES[1]: h},
    "all-and-some": lambda h: {ADDRESSES[0]: h, ADDRESSES[1]: h[:5]},
    "leading-evicted": lambda h: {ADDRESSES[0]: h[3:], ADDRESSES[1]: h[:2]},
    "not-a-candidate": lambda h: {"10.0.0.9:8000": h},
}


@pytest.mark.parametrize("kind", ["precise", "approximate"])
@pytest.mark.parametrize("holding", list(HOLDINGS))
@pytest.mark.parametrize("request_kind", list(REQUESTS))
async def test_probed_match_counts_equal_the_whole_prompts(
    blocks_for: Callable[..., PromptBlocks], kind: str, holding: str, request_kind: str
) -> None:
    path, body = REQUESTS[request_kind]
    lora, salt = LoraKey("sql-lora", "/adapters/sql"), "tenant-salt"
    request = _parsed(path, body)
    full = await blocks_for().blocks(request, lora=lora, cache_salt=salt, endpoint_for_remote=None)
    assert len(full.block_hashes) > 100
    index = _index(kind, HOLDINGS[holding](full.block_hashes))
    candidates = _candidates()

    probe = await blocks_for().probe(
        request, lora=lora, cache_salt=salt, endpoint_for_remote=None,
        holds=prefix_holds(candidates, index),
    )  # fmt: skip
    probed = probe.tokens.block_hashes

    assert with_prefix_matches(candidates, probed, index) == with_prefix_matches(
        candidates, full.block_hashes, index
    )
    assert probed == full.block_hashes[: len(probed)]
    if holding in ("all", "all-and-some"):  # held to the end: everything is computed now
        assert probe.tokens == full
    elif holding == "all-but-last":  # the last block is hashed to see that nobody holds it
        assert probed == full.block_hashes
    else:
        assert not probe.tokens.complete
        assert len(probed) < len(full.block_hashes)
    assert await probe.finish() == full


async def test_a_cold_prompt_tokenizes_its_first_chunk_only(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    request = _parsed(*REQUESTS["chat"])
    exact = await blocks_for().blocks(request, lora=None, cache_salt=None, endpoint_for_remote=None)
    pb = blocks_for()
    nobody = prefix_holds(_candidates(), ApproxPrefixIndex())
    probe = await pb.probe(request, lora=None, cache_salt=None, endpoint_for_remote=None,
                           holds=nobody)  # fmt: skip
    stats = pb.stats()
    assert (stats.prompts, stats.chunks_missed, stats.chunks_hit, stats.offloaded) == (1, 1, 0, 0)
    assert stats.hash_misses == len(probe.tokens.block_hashes) == 8  # one run of blocks
    # The token count is the first chunk's, plus an estimate for the rest: marked as such.
    tokens = probe.tokens
    assert (tokens.complete, tokens.exact, tokens.source) == (False, True, "cl100k_base")
    assert abs(tokens.token_count - exact.token_count) < 0.1 * exact.token_count

    finished = await probe.finish()
    assert finished == exact
    after = pb.stats()
    text = render_chat(REQUESTS["chat"][1]["messages"], add_generation_prompt=True)
    assert after.chunks_missed == len(cut_points(text, DEFAULT_CHUNK_CHARS)) + 1 > 5  # the rest
    assert after.prompts == 1
    # Finishing filled the caches: the same prompt again is all hits.
    again = await pb.blocks(request, lora=None, cache_salt=None, endpoint_for_remote=None)
    assert again == exact
    assert pb.stats().chunks_missed == after.chunks_missed


async def test_a_prompt_held_in_part_is_tokenized_a_little_past_that_part(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    request = _parsed(*REQUESTS["chat"])
    full = await blocks_for().blocks(request, lora=None, cache_salt=None, endpoint_for_remote=None)
    held = full.block_hashes[: len(full.block_hashes) // 4]
    pb = blocks_for()
    probe = await pb.probe(
        request, lora=None, cache_salt=None, endpoint_for_remote=None,
        holds=prefix_holds(_candidates(), _index("precise", {ADDRESSES[1]: held})),
    )  # fmt: skip
    probed = len(probe.tokens.block_hashes)
    assert len(held) < probed < len(full.block_hashes) / 2
    tokenized = pb.stats().chunks_missed
    assert await probe.finish() == full
    assert 0 < tokenized < pb.stats().chunks_missed / 2


async def test_token_ids_are_counted_exactly_even_when_the_probe_stops(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    request = _parsed(*REQUESTS["completion-ids"])
    probe = await blocks_for().probe(
        request, lora=None, cache_salt=None, endpoint_for_remote=None, holds=lambda h: False
    )
    assert not probe.tokens.complete
    assert probe.tokens.token_count == 3000
    assert len(probe.tokens.block_hashes) == 8


async def test_a_remote_tokenizers_prompt_is_computed_in_full(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    request = _parsed(*REQUESTS["chat"])
    pb = blocks_for(tokenizers={MODEL: "remote:cl100k_base"})
    # No endpoint to ask: the local fallback, still computed in full (remote mode is exact-first).
    probe = await pb.probe(
        request, lora=None, cache_salt=None, endpoint_for_remote=None, holds=lambda h: False
    )
    assert probe.tokens.complete
    assert probe.tokens.token_count == (await blocks_for().blocks(
        request, lora=None, cache_salt=None, endpoint_for_remote=None)).token_count  # fmt: skip


# -- in the pipeline ------------------------------------------------------------------------------


ACME_KEY = "sk-acme-1111111111111111"


def _config(**more: Any) -> Config:
    raw: dict[str, Any] = {
        "collector": {"enabled": False},
        "routing": {"strategy": "prefix-cache", "fallbacks": 0},
        "endpoints": [{"address": a} for a in ADDRESSES],
        **more,
    }
    return load_config(None, raw)


def _pipeline(config: Config, blocks: PromptBlocks, learned: ApproxPrefixIndex) -> Pipeline:
    metrics = PickerMetrics()
    endpoints = [Endpoint(a, frozenset({MODEL}), ready=True) for a in ADDRESSES]
    store, inflight = SnapshotStore(Snapshot.of(endpoints)), InFlight()
    gate = tenancy_gate(config, tenancy_for(config, metrics), store, inflight, metrics)
    return Pipeline(
        config,
        store,
        inflight,
        strategies_for(config),
        metrics,
        blocks=blocks,
        matcher=learned,
        learned=learned,
        gate=gate,
    )


async def _route(pipeline: Pipeline, body: dict[str, Any], **headers: str) -> Routed:
    head = RequestHead("POST", "/v1/chat/completions", headers)
    routed = await pipeline.route(head, json.dumps(body).encode())
    assert isinstance(routed, Routed)
    return routed


async def _settled(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def test_the_approximate_index_learns_the_whole_prompt_after_the_decision(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    body = _chat(3)
    full = await blocks_for().blocks(
        _parsed("/v1/chat/completions", body), lora=None, cache_salt=None, endpoint_for_remote=None
    )
    pb = blocks_for()
    learned = ApproxPrefixIndex()
    pipeline = _pipeline(_config(), pb, learned)
    try:
        routed = await _route(pipeline, body)
        target = routed.primary
        # The decision: one chunk tokenized, the probed blocks learned, an estimated count.
        assert pb.stats().chunks_missed == 1
        probed = learned.blocks_of(target)
        assert 0 < len(probed) < len(full.block_hashes)
        assert probed == full.block_hashes[: len(probed)]
        assert abs(routed.tokens - full.token_count) < 0.1 * full.token_count
        # After it: the whole prompt, in order (least recently used first, as one record).
        await _settled(lambda: len(learned.blocks_of(target)) == len(full.block_hashes))
        assert learned.blocks_of(target) == full.block_hashes
        # The same prompt again is held in full where it went: computed in full, sent there.
        again = await _route(pipeline, body)
        assert again.primary == target
        assert again.tokens == full.token_count
        sample = pipeline._metrics.registry.get_sample_value
        count = sample("extproc_pick_duration_seconds_count", {"strategy": "prefix-cache"})
        assert count == 2
    finally:
        await pipeline.aclose()


async def test_a_probed_prompt_is_scored_as_a_share_of_the_whole_prompt(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    # The prefix scorer divides matched blocks by the prompt's: a probe that stopped early must
    # not make a prompt held in part look held in full.
    body = _chat(6)
    full = await blocks_for().blocks(
        _parsed("/v1/chat/completions", body), lora=None, cache_salt=None, endpoint_for_remote=None
    )
    learned = ApproxPrefixIndex()
    third = full.block_hashes[: len(full.block_hashes) // 3]
    learned.record(ADDRESSES[1], third)
    pipeline = _pipeline(_config(scheduling={"explain": True}), blocks_for(), learned)
    try:
        routed = await _route(pipeline, body)
        assert routed.primary == ADDRESSES[1]
        assert routed.explanation is not None
        (entry,) = [e for e in json.loads(routed.explanation)["endpoints"]
                    if e["address"] == ADDRESSES[1]]  # fmt: skip
        (share,) = [v for k, v in entry["scores"].items() if k.startswith("prefix")]
        assert share == pytest.approx(len(third) / len(full.block_hashes), abs=0.05)
        assert len(learned.blocks_of(ADDRESSES[1])) < len(full.block_hashes)  # it was probed
    finally:
        await pipeline.aclose()


async def test_a_bursts_picks_count_the_ones_made_while_its_prompt_was_tokenized(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    # Twelve prompts at once: each finds its candidates, then awaits its tokens, and the first
    # are placed while the last still await. Counted when they found their candidates, the
    # in-flight requests missed the burst's own picks: all twelve saw idle endpoints, and the
    # chat template's first block, learned where the first went, sent the rest after it (12-0-0
    # before the fix). Counted at the pick, every round of three fills each endpoint once.
    strategy = {"strategy": "least-request:1,prefix-cache:0.001", "fallbacks": 0}
    offloaded = blocks_for(inline_max_chars=0)  # every chunk on a worker thread: awaited
    pipeline = _pipeline(_config(routing=strategy), offloaded, ApproxPrefixIndex())
    try:
        routed = await asyncio.gather(*(_route(pipeline, _chat(100 + i)) for i in range(12)))
        counts = [sum(r.primary == a for r in routed) for a in ADDRESSES]
        assert counts == [4, 4, 4]
        assert [pipeline._inflight.load(a).requests for a in ADDRESSES] == [4, 4, 4]
    finally:
        await pipeline.aclose()


async def test_a_tenants_prompt_is_computed_before_the_decision(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    body = _chat(4)
    full = await blocks_for().blocks(
        _parsed("/v1/chat/completions", body), lora=None, cache_salt=None, endpoint_for_remote=None
    )
    pb = blocks_for()
    learned = ApproxPrefixIndex()
    tenancy = {"enabled": True, "tenants": {"acme": {"api_keys": [key_digest(ACME_KEY)],
                                                     "tokens_per_minute": 1_000_000}}}  # fmt: skip
    pipeline = _pipeline(_config(tenancy=tenancy), pb, learned)
    try:
        routed = await _route(pipeline, body, authorization=f"Bearer {ACME_KEY}")
        # The limit charged the exact count, and the index already holds the whole prompt.
        assert routed.tokens == full.token_count
        assert learned.blocks_of(routed.primary) == full.block_hashes
        assert not pipeline._learning.pending
    finally:
        await pipeline.aclose()


async def test_the_whole_prompt_is_learned_after_the_reply_but_before_the_next_decision(
    blocks_for: Callable[..., PromptBlocks],
) -> None:
    # The finish waits for the decision's reply to go out (Learning.delay_seconds), not for the
    # next decision: a burst's second request must see the first's prompt whole, or it is not
    # sent where that prompt is (agent fan-out's hit rate fell 71 -> 62-69 % when it was not).
    body = _chat(3)
    full = await blocks_for().blocks(
        _parsed("/v1/chat/completions", body), lora=None, cache_salt=None, endpoint_for_remote=None
    )
    learned = ApproxPrefixIndex()
    pipeline = _pipeline(_config(), blocks_for(), learned)
    try:
        first = await _route(pipeline, body)
        # Right after the decision only the probed blocks are known: the rest waits.
        assert len(learned.blocks_of(first.primary)) < len(full.block_hashes)
        assert not pipeline._learning.pending
        follower = _chat(3)
        follower["messages"] = [*body["messages"], {"role": "user", "content": "And then?"}]
        second = await _route(pipeline, follower)
        # Decided at once after the first, yet with the first's whole prompt known (its last
        # block, the generation prompt's, is in no probe of the second's).
        assert set(full.block_hashes) <= set(learned.blocks_of(first.primary))
        assert second.primary == first.primary
    finally:
        await pipeline.aclose()


# -- a bad seam past the first chunk, and an HF tokenizer's BOS -----------------------------------


class _NewlineZ:
    """One id per character, except that a newline before "Z" is one token with it: a cut there
    is not neutral, and no probe text of the splicer's self-test has one."""

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(text):
            if text.startswith("\nZ", i):
                out.append(0x110000)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out


def _with_newline_z(pb: PromptBlocks) -> PromptBlocks:
    local = pb._default.local
    local.splicer = SpliceEncoder(_NewlineZ(), chunk_chars=256)
    assert local.splicer.splicing
    return pb


@pytest.mark.parametrize("held", [0.0, 0.3, 0.6, 1.0])
async def test_a_bad_seam_met_by_a_probe_gives_the_whole_prompts_tokens(
    blocks_for: Callable[..., PromptBlocks], held: float
) -> None:
    rng = random.Random(11)
    lines = [f"{rng.choice('abc')}{random_text(rng, 8).strip()}" for _ in range(120)]
    lines += [f"Z{random_text(rng, 8).strip()}" for _ in range(120)]  # bad cuts from here on
    request = _parsed("/v1/completions", {"model": MODEL, "prompt": "\n".join(lines)})
    full = await _with_newline_z(blocks_for()).blocks(
        request, lora=None, cache_salt=None, endpoint_for_remote=None
    )
    hashes = full.block_hashes
    index = _index("approximate", {ADDRESSES[0]: hashes[: int(len(hashes) * held)]})
    pb = _with_newline_z(blocks_for())
    probe = await pb.probe(
        request, lora=None, cache_salt=None, endpoint_for_remote=None,
        holds=prefix_holds(_candidates(), index),
    )  # fmt: skip
    candidates = _candidates()
    assert with_prefix_matches(candidates, probe.tokens.block_hashes, index) == (
        with_prefix_matches(candidates, hashes, index)
    )
    assert await probe.finish() == full
    assert pb.stats().bad_seams == 1


@pytest.mark.parametrize("held", [0.0, 0.5, 1.0])
async def test_an_hf_completion_keeps_its_bos_when_probed(
    blocks_for: Callable[..., PromptBlocks], tmp_path: Path, held: float
) -> None:
    directory = train_hf_bpe(tmp_path, bos=True)
    settings = {"tokenizers": {"m": f"hf:{directory}"}, "block_size": 4}
    request = _parsed(
        "/v1/completions", {"model": "m", "prompt": random_text(random.Random(12), 900)}
    )
    full = await blocks_for(**settings).blocks(
        request, lora=None, cache_salt=None, endpoint_for_remote=None
    )
    hashes = full.block_hashes
    index = _index("precise", {ADDRESSES[2]: hashes[: int(len(hashes) * held)]})
    probe = await blocks_for(**settings).probe(
        request, lora=None, cache_salt=None, endpoint_for_remote=None,
        holds=prefix_holds(_candidates(), index),
    )  # fmt: skip
    candidates = _candidates()
    assert with_prefix_matches(candidates, probe.tokens.block_hashes, index) == (
        with_prefix_matches(candidates, hashes, index)
    )
    assert probe.tokens.complete == (held == 1.0)
    assert await probe.finish() == full
