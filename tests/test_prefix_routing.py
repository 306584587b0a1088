"""Prefix-aware routing against the simulator: the picker computes vLLM's block hashes, finds
which pod holds the prompt's prefix (learned from its own routing, or precisely from KV events),
and the precise index wins when the learned one is wrong."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest

from extproc.config import (
    CollectorConfig,
    Config,
    DiscoveryConfig,
    EndpointConfig,
    KvEventsConfig,
    PrefixConfig,
    SchedulingConfig,
    ServerConfig,
)
from extproc.prefix.hashing import LoraKey
from extproc.server.app import PickerServer
from extproc.sim import SimConfig, SimFleet
from tests import extproc_client as ep

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    # A small cache per pod, so other traffic can evict a prefix.
    async with SimFleet(SimConfig(pods=3, speed=50, kv_events=True, num_gpu_blocks=96)) as f:
        yield f


def _config(fleet: SimFleet, *, precise: bool, explain: bool = False) -> Config:
    return Config(
        server=ServerConfig(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0),
        discovery=DiscoveryConfig(models_refresh_seconds=300),
        collector=CollectorConfig(interval_seconds=0.05),
        kv_events=KvEventsConfig(enabled=precise),
        prefix=PrefixConfig(index="precise" if precise else "approximate"),
        scheduling=SchedulingConfig(explain=explain),
        endpoints=tuple(EndpointConfig(url.removeprefix("http://")) for url in fleet.urls),
    )


@pytest.fixture
async def picker_for() -> AsyncIterator[Callable[..., Any]]:
    started: list[PickerServer] = []

    async def start(config: Config) -> PickerServer:
        picker = PickerServer(config)
        await picker.start()
        started.append(picker)
        return picker

    yield start
    for picker in started:
        await picker.stop()


def _prompt(topic: str) -> dict[str, Any]:
    system = f"You answer questions about {topic}. " * 60  # ~600 tokens: many full blocks
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Tell me one thing about {topic}."},
        ],
        "max_tokens": 2,
    }


async def _pick(picker: PickerServer, body: dict[str, Any], strategy: str) -> tuple[str, str]:
    """The picker's choice for `body`, and its x-extproc-scores header if any."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.grpc_port}") as channel:
        stream = ep.Stream(channel)
        await stream.send(
            ep.request_headers("/v1/chat/completions", headers={"x-routing-strategy": strategy})
        )
        await stream.send(ep.request_body(ep.json_body(body), end_of_stream=True))
        reply = await stream.receive()
        headers = {
            h.header.key: h.header.raw_value.decode()
            for h in reply.request_headers.response.header_mutation.set_headers
        }
        await stream.close()
    return ep.destination(reply).split(",")[0], headers.get("x-extproc-scores", "")


async def _serve(http: aiohttp.ClientSession, address: str, body: dict[str, Any]) -> None:
    async with http.post(f"http://{address}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_prefix_cache_keeps_a_prefix_on_the_pod_that_has_it(
    fleet: SimFleet, picker_for: Any
) -> None:
    picker = await picker_for(_config(fleet, precise=False))
    async with aiohttp.ClientSession() as http:
        for topic in ("tides", "volcanoes"):
            first, _ = await _pick(picker, _prompt(topic), "prefix-cache")
            await _serve(http, first, _prompt(topic))
            for _ in range(4):
                again, _ = await _pick(picker, _prompt(topic), "prefix-cache")
                assert again == first


async def test_with_kv_events_a_pick_counts_before_its_events_arrive(
    fleet: SimFleet, picker_for: Any
) -> None:
    """vLLM publishes a prompt's blocks after the step that computes them: a burst of one
    group's requests, routed before any of them ran, stays on the first one's pod
    (extproc.prefix.speculative), where the in-flight counts alone would spread it."""
    picker = await picker_for(_config(fleet, precise=True))
    body = _prompt("comets")
    first, _ = await _pick(picker, body, "prefix-cache")
    index = picker.index
    assert index is not None and index.lookup(await _hashes(picker, body)) == {}
    for _ in range(3):
        assert (await _pick(picker, body, "prefix-cache"))[0] == first


async def test_precise_index_beats_the_learned_one_when_a_pod_evicted_behind_our_back(
    fleet: SimFleet, picker_for: Any
) -> None:
    learned = await picker_for(_config(fleet, precise=False))
    precise = await picker_for(_config(fleet, precise=True))
    body = _prompt("glaciers")
    async with aiohttp.ClientSession() as http:
        # Both pickers send the prompt to the same pod and remember it there.
        chosen, _ = await _pick(learned, body, "prefix-cache")
        await _serve(http, chosen, body)
        (server,) = [s for s, u in zip(fleet.servers, fleet.urls, strict=True) if chosen in u]
        other = next(u.removeprefix("http://") for u in fleet.urls if chosen not in u)
        # Behind the pickers' backs: other prompts evict it from that pod, and it is served
        # on another pod directly.
        hashes = await _hashes(precise, body)
        assert set(hashes) <= set(server.cached_block_ids())
        for i in range(6):
            await _serve(http, chosen, _prompt(f"filler topic number {i}"))
        # Only a few leading blocks (the chat template's header) can still be shared.
        assert len(set(hashes) & set(server.cached_block_ids())) <= 2, "prefix not evicted"
        await _serve(http, other, body)
        index = precise.index
        assert index is not None
        await _until(lambda: index.lookup(hashes).get(other, 0) > 0, "events seen")
    assert (await _pick(learned, body, "prefix-cache"))[0] == chosen  # stale belief
    assert (await _pick(precise, body, "prefix-cache"))[0] == other  # what the pods hold


async def test_explanations_come_with_the_decision(fleet: SimFleet, picker_for: Any) -> None:
    picker = await picker_for(_config(fleet, precise=False, explain=True))
    _, scores = await _pick(picker, _prompt("comets"), "prefix-cache:3,least-request:1")
    decision = json.loads(scores)
    assert decision  # per-endpoint scores of this decision
    assert "prefix" in scores


async def _hashes(picker: PickerServer, body: dict[str, Any]) -> tuple[int, ...]:
    from extproc.request.openai import ParsedRequest, parse_request

    parsed = parse_request("/v1/chat/completions", json.dumps(body).encode())
    assert isinstance(parsed, ParsedRequest)
    adapter = picker.store.current.adapter(parsed.model or "")
    tokens = await picker.blocks.blocks(
        parsed,
        lora=LoraKey(parsed.model or "", adapter[1]) if adapter else None,
        cache_salt=None,
        # The default tokenizer (`auto`) finds no files for the model here: /tokenize answers.
        endpoint_for_remote=picker.store.current.endpoints[0].address,
    )
    return tokens.block_hashes


async def test_an_adapters_prompt_is_found_where_that_adapter_cached_it(
    picker_for: Any,
) -> None:
    # The adapter's blocks carry vLLM's LoRA extra key (name and path from /v1/models): hashed
    # without it, the picker would find no pod holding them.
    adapter = ("sql-lora", "/adapters/sql-lora")
    config = SimConfig(
        pods=3, speed=50, kv_events=True, enable_lora=True, max_cpu_loras=2,
        lora_modules=(adapter,),
    )  # fmt: skip
    async with SimFleet(config) as fleet:
        picker = await picker_for(_config(fleet, precise=True))
        index = picker.index
        assert index is not None
        async with aiohttp.ClientSession() as http:
            for i, url in enumerate(fleet.urls):
                body = {**_prompt(f"schema number {i}"), "model": adapter[0]}
                address = url.removeprefix("http://")
                await _serve(http, address, body)
                hashes = await _hashes(picker, body)
                await _until(
                    lambda h=hashes, a=address: index.lookup(h).get(a, 0) > 0, "events seen"
                )
                assert (await _pick(picker, body, "prefix-cache"))[0] == address
