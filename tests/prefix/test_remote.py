"""Remote tokenization against the simulator's /tokenize, and its fallback when the endpoint is
down. Loopback only."""

from __future__ import annotations

import json
import random
import socket
from typing import Any

from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.prefix.remote import HttpRemoteTokenizer, tokenize_body
from extproc.request.openai import ParsedRequest, parse_request
from extproc.sim import SimConfig, SimFleet
from tests.prefix.helpers import random_conversation, random_text

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def parsed(path: str, body: dict[str, Any]) -> ParsedRequest:
    request = parse_request(path, json.dumps(body).encode())
    assert isinstance(request, ParsedRequest)
    return request


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_remote_is_exact_and_equals_local_cl100k() -> None:
    remote = PromptBlocks(BlocksSettings(tokenizers={MODEL: "remote:bytes:4"}))
    local = PromptBlocks(BlocksSettings())
    try:
        async with SimFleet(SimConfig(speed=100)) as fleet:
            endpoint = fleet.urls[0].removeprefix("http://")
            cases: list[tuple[str, dict[str, Any]]] = [
                ("/v1/completions", {"prompt": random_text(random.Random(1), 200)}),
                (
                    "/v1/chat/completions",
                    {"messages": random_conversation(random.Random(2), 3, 40)},
                ),
            ]
            for path, body in cases:
                request = parsed(path, {"model": MODEL, **body})
                got = await remote.blocks(
                    request, lora=None, cache_salt="s", endpoint_for_remote=endpoint
                )
                want = await local.blocks(
                    request, lora=None, cache_salt="s", endpoint_for_remote=None
                )
                assert (got.exact, got.source) == (True, "remote")
                assert (got.token_count, got.block_hashes) == (want.token_count, want.block_hashes)
        assert remote.stats().remote_ok == 2
    finally:
        await remote.aclose()
        await local.aclose()


async def test_remote_falls_back_when_the_endpoint_is_down() -> None:
    pb = PromptBlocks(BlocksSettings(tokenizers={MODEL: "remote:cl100k_base"}))
    try:
        request = parsed("/v1/completions", {"model": MODEL, "prompt": "hello " * 50})
        down = _closed_port()
        for _ in range(2):
            tokens = await pb.blocks(request, lora=None, cache_salt=None, endpoint_for_remote=down)
            # The fallback vocabulary is right here, but not known to be the server's: inexact.
            assert (tokens.exact, tokens.source) == (False, "cl100k_base")
            assert tokens.token_count == 51
        # No endpoint to ask: the fallback directly.
        tokens = await pb.blocks(request, lora=None, cache_salt=None, endpoint_for_remote=None)
        assert tokens.exact is False
        assert pb.stats().remote_failed == 2
    finally:
        await pb.aclose()


async def test_client_backs_off_a_failed_endpoint() -> None:
    client = HttpRemoteTokenizer(timeout_seconds=0.5, backoff_seconds=60)
    try:
        down = _closed_port()
        assert await client.tokenize(down, tokenize_body(model=None, prompt="x")) is None
        assert await client.tokenize(down, tokenize_body(model=None, prompt="x")) is None
        assert client.failures == 1  # the second call did not try
    finally:
        await client.aclose()


async def test_client_rejects_errors_and_bad_answers() -> None:
    client = HttpRemoteTokenizer(timeout_seconds=1.0, backoff_seconds=0)
    try:
        async with SimFleet(SimConfig(speed=100)) as fleet:
            endpoint = fleet.urls[0].removeprefix("http://")
            assert await client.tokenize(endpoint, tokenize_body(model="nope", prompt="x")) is None
            ids = await client.tokenize(endpoint, tokenize_body(model=MODEL, prompt="hello world"))
            assert ids == [15339, 1917]
    finally:
        await client.aclose()


def test_tokenize_bodies() -> None:
    assert tokenize_body(model="m", prompt="p") == {"model": "m", "prompt": "p"}
    msgs = [{"role": "user", "content": "hi"}]
    assert tokenize_body(model=None, messages=msgs) == {
        "messages": msgs,
        "add_generation_prompt": True,
    }
