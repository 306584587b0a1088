"""extproc.prefix.blocks: PromptBlocks computes the block ids a (simulated) vLLM server caches
for the same request: completions, chat, LoRA, cache_salt, HF tokenizers and templates."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.prefix.blocks import BlocksSettings, PromptBlocks, PromptTokens
from extproc.prefix.hashing import BlockHasher, LoraKey
from extproc.prefix.tokenizers import (
    HFTokenizer,
    TiktokenTokenizer,
    load_chat_template,
    render_chat,
)
from extproc.request.openai import ParsedRequest, parse_request
from extproc.sim import SimConfig, SimFleet
from tests.prefix.helpers import random_conversation, random_text, train_hf_bpe

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ADAPTER = LoraKey("sql-lora", "/adapters/sql")


def parsed(path: str, body: dict[str, Any]) -> ParsedRequest:
    request = parse_request(path, json.dumps(body).encode())
    assert isinstance(request, ParsedRequest)
    return request


@pytest.fixture
async def blocks() -> AsyncIterator[PromptBlocks]:
    pb = PromptBlocks(BlocksSettings())
    yield pb
    await pb.aclose()


async def _send(url: str, path: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


def _assert_cached(tokens: PromptTokens, cached: set[int], before: frozenset[int]) -> None:
    assert tokens.block_hashes, "the prompt should span full blocks"
    assert set(tokens.block_hashes) <= cached
    # Whatever else the request cached is the block its one output token completed, if any.
    assert len(cached - before - set(tokens.block_hashes)) <= 1


CASES = [
    ("/v1/completions", {"prompt": random_text(random.Random(1), 300)}, None, None),
    ("/v1/completions", {"prompt": [list(range(1000, 1100))]}, None, None),
    ("/v1/chat/completions", {"messages": random_conversation(random.Random(2), 4, 60)}, None,
     None),
    ("/v1/completions", {"prompt": random_text(random.Random(3), 300), "cache_salt": "t1"}, None,
     "t1"),
    ("/v1/chat/completions", {"messages": random_conversation(random.Random(4), 3, 50),
                              "model": ADAPTER.name, "cache_salt": "t2"}, ADAPTER, "t2"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "lora", "salt"),
    CASES,
    ids=["completion-text", "completion-ids", "chat", "salt", "chat-lora-salt"],
)
async def test_blocks_equal_the_simulators_cache(
    blocks: PromptBlocks,
    path: str,
    body: dict[str, Any],
    lora: LoraKey | None,
    salt: str | None,
) -> None:
    config = SimConfig(
        speed=100, enable_lora=True, max_cpu_loras=2, lora_modules=((ADAPTER.name, ADAPTER.path),)
    )
    async with SimFleet(config) as fleet:
        (server,) = fleet.servers
        full = {"model": MODEL, "max_tokens": 1, **body}
        await _send(fleet.urls[0], path, full)
        tokens = await blocks.blocks(
            parsed(path, full), lora=lora, cache_salt=salt, endpoint_for_remote=None,
            base_model=MODEL,
        )  # fmt: skip
        assert tokens.exact
        _assert_cached(tokens, server.cached_block_ids(), frozenset())
        # Without the LoRA key / salt the ids differ: they are part of the hash.
        if lora or salt:
            plain = await blocks.blocks(
                parsed(path, full), lora=None, cache_salt=None, endpoint_for_remote=None
            )
            assert not set(plain.block_hashes) & set(tokens.block_hashes)


async def test_hf_tokenizer_equals_the_simulator_with_the_same_file(tmp_path: Path) -> None:
    directory = train_hf_bpe(tmp_path / "bpe")
    spec = f"hf:{directory / 'tokenizer.json'}"
    # The simulator's HF tokenizer adds no special tokens to completions; match it.
    pb = PromptBlocks(BlocksSettings(default_tokenizer=spec, add_special_tokens=False))
    sim_tok = HFTokenizer.from_file(directory / "tokenizer.json")
    try:
        async with SimFleet(SimConfig(speed=100), tokenizer=sim_tok) as fleet:
            cases: list[tuple[str, dict[str, Any]]] = [
                ("/v1/completions", {"prompt": random_text(random.Random(5), 200)}),
                (
                    "/v1/chat/completions",
                    {"messages": random_conversation(random.Random(6), 3, 40)},
                ),
            ]
            for path, body in cases:
                full = {"model": MODEL, "max_tokens": 1, **body}
                before = frozenset(fleet.servers[0].cached_block_ids())
                await _send(fleet.urls[0], path, full)
                tokens = await pb.blocks(
                    parsed(path, full), lora=None, cache_salt=None, endpoint_for_remote=None
                )
                assert tokens.source == spec
                _assert_cached(tokens, fleet.servers[0].cached_block_ids(), before)
    finally:
        await pb.aclose()


def test_jinja_template_renders_like_render_chat(tmp_path: Path) -> None:
    template = load_chat_template(train_hf_bpe(tmp_path))
    assert template is not None
    rng = random.Random(8)
    for _ in range(20):
        messages = random_conversation(rng, 5, 30)
        assert template(messages) == render_chat(messages)


async def test_hf_directory_uses_its_template_and_bos_for_completions(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    directory = train_hf_bpe(tmp_path, bos=True)
    (directory / "tokenizer_config.json").write_text(
        json.dumps({
            "bos_token": {"content": "<|begin_of_text|>"},
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] "
            "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
        })
    )  # fmt: skip
    hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
    pb = PromptBlocks(BlocksSettings(tokenizers={"m": f"hf:{directory}"}, block_size=4))
    try:
        chat = {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "the fox"}, {"type": "text", "text": "jumps"}]}]}  # fmt: skip
        tokens = await pb.blocks(
            parsed("/v1/chat/completions", chat), lora=None, cache_salt=None,
            endpoint_for_remote=None,
        )  # fmt: skip
        text = "<|begin_of_text|>[user] the fox\njumps\n[assistant] "
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tokens.token_count == len(ids)
        assert tokens.block_hashes == tuple(
            b.event_id for b in BlockHasher(block_size=4).hash_blocks(ids)
        )
        completion = {"model": "m", "prompt": "the quick brown fox"}
        tokens = await pb.blocks(
            parsed("/v1/completions", completion), lora=None, cache_salt=None,
            endpoint_for_remote=None,
        )  # fmt: skip
        ids = hf.encode("the quick brown fox", add_special_tokens=True).ids
        assert ids[0] == hf.token_to_id("<|begin_of_text|>")
        assert tokens.token_count == len(ids)
        assert tokens.block_hashes == tuple(
            b.event_id for b in BlockHasher(block_size=4).hash_blocks(ids)
        )
    finally:
        await pb.aclose()


async def test_batches_use_the_first_prompt(blocks: PromptBlocks) -> None:
    body = {"model": MODEL, "prompt": ["alpha " * 40, "beta " * 40]}
    tokens = await blocks.blocks(
        parsed("/v1/completions", body), lora=None, cache_salt=None, endpoint_for_remote=None
    )
    assert tokens.batch == 2
    assert tokens.token_count == len(TiktokenTokenizer.cl100k().encode("alpha " * 40))


async def test_unknown_models_use_the_default_and_bytes_is_an_estimate() -> None:
    pb = PromptBlocks(BlocksSettings(tokenizers={"small": "bytes:2"}))
    try:
        body = {"model": "small", "prompt": "abcdefgh" * 8}
        tokens = await pb.blocks(
            parsed("/v1/completions", body), lora=None, cache_salt=None, endpoint_for_remote=None
        )
        assert (tokens.token_count, tokens.exact, tokens.source) == (32, False, "bytes:2")
        assert len(tokens.block_hashes) == 2
        body["model"] = "other"
        tokens = await pb.blocks(
            parsed("/v1/completions", body), lora=None, cache_salt=None, endpoint_for_remote=None
        )
        assert (tokens.exact, tokens.source) == (True, "cl100k_base")
    finally:
        await pb.aclose()


async def test_long_new_text_is_tokenized_off_the_loop(blocks: PromptBlocks) -> None:
    text = random_text(random.Random(9), 3000)
    body = {"model": MODEL, "prompt": text}
    request = parsed("/v1/completions", body)
    first = await blocks.blocks(request, lora=None, cache_salt=None, endpoint_for_remote=None)
    assert blocks.stats().offloaded == 1
    again = await blocks.blocks(request, lora=None, cache_salt=None, endpoint_for_remote=None)
    assert blocks.stats().offloaded == 1  # all cached: inline
    assert again == first
    assert first.token_count == len(TiktokenTokenizer.cl100k().encode(text))
    short = parsed("/v1/completions", {"model": MODEL, "prompt": "short"})
    await blocks.blocks(short, lora=None, cache_salt=None, endpoint_for_remote=None)
    assert blocks.stats().offloaded == 1


async def test_no_prompt_and_bad_template() -> None:
    pb = PromptBlocks(BlocksSettings())
    try:
        empty = ParsedRequest(api=parsed("/v1/completions", {"model": "m", "prompt": "x"}).api,
                              model=None)  # fmt: skip
        tokens = await pb.blocks(empty, lora=None, cache_salt=None, endpoint_for_remote=None)
        assert tokens == PromptTokens(0, (), exact=False, source="none")
        bad = parsed("/v1/chat/completions", {"model": "m", "messages": [{"role": ""}]})
        tokens = await pb.blocks(bad, lora=None, cache_salt=None, endpoint_for_remote=None)
        assert (tokens.block_hashes, tokens.exact) == ((), False)
    finally:
        await pb.aclose()


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="hash"):
        BlocksSettings(hash_algo="xxh64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        PromptBlocks(BlocksSettings(default_tokenizer="nonsense"))
