"""Engine behaviour through the HTTP surface: cache hits, eviction, batching, TTFT, preemption,
LoRA deferral. Simulated time runs fast (`speed`); assertions read simulated quantities only."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from extproc.prefix.hashing import BlockHasher
from extproc.prefix.tokenizers import Tokenizer
from extproc.sim import SimConfig, SimFleet
from tests.sim.conftest import post, until, words


async def test_same_prefix_twice_hits_and_eviction_removes_it(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    async with SimFleet(SimConfig(speed=200, num_gpu_blocks=64), tokenizer=tokenizer) as fleet:
        (server,) = fleet.servers
        url = f"{fleet.urls[0]}/v1/completions"
        prompt = words(200)
        ids = tokenizer.encode(prompt)
        _, first = await post(http, url, {"prompt": prompt, "max_tokens": 2})
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        expected = BlockHasher().hash_blocks(ids)
        assert {h.event_id for h in expected} <= server.cached_block_ids()

        _, second = await post(http, url, {"prompt": prompt, "max_tokens": 2})
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (len(ids) - 1) // 16 * 16
        # Fill the 64-block cache with other prompts: the first prompt's blocks are evicted.
        for seed in range(1, 6):
            await post(http, url, {"prompt": words(200, seed), "max_tokens": 2})
        assert not {h.event_id for h in expected} & server.cached_block_ids()
        _, third = await post(http, url, {"prompt": prompt, "max_tokens": 2})
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        stats = server.stats()
        assert stats.prefix_cache_hits == cached
        assert stats.prefix_cache_queries == 8 * len(ids)


async def test_salt_and_lora_isolate_the_cache(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(speed=200, enable_lora=True, max_loras=2, lora_modules=(("sql", "/a"),))
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        url = f"{fleet.urls[0]}/v1/completions"
        prompt = words(100)
        await post(http, url, {"prompt": prompt, "max_tokens": 1, "cache_salt": "t1"})
        _, other_salt = await post(
            http, url, {"prompt": prompt, "max_tokens": 1, "cache_salt": "t2"}
        )
        _, lora = await post(http, url, {"prompt": prompt, "max_tokens": 1, "model": "sql"})
        _, same = await post(http, url, {"prompt": prompt, "max_tokens": 1, "cache_salt": "t1"})
        assert other_salt["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert lora["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert same["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert lora["model"] == "sql"


async def _ttft_of_one(http: aiohttp.ClientSession, fleet: SimFleet, prompt: str) -> float:
    server = fleet.servers[0]
    _, body = await post(http, f"{server.url}/v1/completions", {"prompt": prompt, "max_tokens": 1})
    record = server.finished(body["id"])
    assert record is not None
    assert record.ttft is not None
    return record.ttft


async def test_ttft_shrinks_with_cached_prefix(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    async with SimFleet(SimConfig(speed=100, profile="a100-8b"), tokenizer=tokenizer) as fleet:
        prompt = words(6000)
        cold = await _ttft_of_one(http, fleet, prompt)
        warm = await _ttft_of_one(http, fleet, prompt)
        # 6000 tokens at A100 prefill speed take about 0.4 s; a cached prefix leaves one block.
        assert cold > 0.3
        assert warm < cold / 5


async def test_ttft_grows_with_queue_length(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(speed=100, profile="a100-8b", max_num_seqs=4)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        url = f"{fleet.urls[0]}/v1/completions"
        alone = await _ttft_of_one(http, fleet, words(500, 99))
        # 12 long-running requests saturate the 4 batch slots; a newcomer queues behind them.
        busy = [
            asyncio.create_task(post(http, url, {"prompt": words(500, s), "max_tokens": 40}))
            for s in range(12)
        ]
        await until(lambda: fleet.servers[0].stats().waiting >= 8)
        queued = await _ttft_of_one(http, fleet, words(500, 100))
        await asyncio.gather(*busy)
        assert queued > 3 * alone


async def test_continuous_batching_and_chunked_prefill(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(speed=100, max_num_batched_tokens=512, max_num_seqs=8)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        url = f"{fleet.urls[0]}/v1/completions"
        results = await asyncio.gather(
            *(post(http, url, {"prompt": words(1500, s), "max_tokens": 8}) for s in range(6))
        )
        assert all(status == 200 for status, _ in results)
        text = fleet.servers[0].metrics_text()
        # No step ever exceeded the 512-token budget, so the 1500-token prompts were chunked.
        assert 'vllm:iteration_tokens_total_bucket{engine="0",le="512.0"' in text
        buckets = {
            line.split('le="')[1].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("vllm:iteration_tokens_total_bucket")
        }
        assert buckets["512.0"] == buckets["+Inf"]
        assert fleet.servers[0].stats().running == 0


async def test_preemption_when_blocks_run_out(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(speed=200, num_gpu_blocks=40, enable_prefix_caching=False)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        url = f"{fleet.urls[0]}/v1/completions"
        # Each request grows to about 200 + 300 tokens = 32 blocks; two cannot coexist.
        results = await asyncio.gather(
            *(post(http, url, {"prompt": words(200, s), "max_tokens": 300}) for s in range(3))
        )
        assert all(status == 200 for status, _ in results)
        assert all(body["usage"]["completion_tokens"] == 300 for _, body in results)
        assert fleet.servers[0].stats().preemptions > 0
        assert fleet.servers[0].stats().kv_usage == 0.0


async def test_lora_requests_beyond_max_loras_are_deferred(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(
        speed=50,
        enable_lora=True,
        max_loras=1,
        max_cpu_loras=2,
        lora_modules=(("a", "/a"), ("b", "/b")),
    )
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        server = fleet.servers[0]
        url = f"{fleet.urls[0]}/v1/completions"
        first = asyncio.create_task(
            post(http, url, {"prompt": "x", "model": "a", "max_tokens": 200})
        )
        await until(lambda: server.stats().running >= 1)
        second = asyncio.create_task(
            post(http, url, {"prompt": "y", "model": "b", "max_tokens": 2})
        )
        await until(lambda: server.stats().waiting >= 1)
        await asyncio.sleep(0.02)
        stats = server.stats()
        assert stats.running_loras == ("a",)
        assert stats.waiting_loras == ("b",)
        assert stats.waiting_deferred == 1
        text = server.metrics_text()
        assert 'reason="deferred"} 1.0' in text
        assert 'running_lora_adapters="a",waiting_lora_adapters="b"' in text.replace(
            'max_lora="1",', ""
        ) or ('waiting_lora_adapters="b"' in text and 'running_lora_adapters="a"' in text)
        results: list[Any] = await asyncio.gather(first, second)
        assert [status for status, _ in results] == [200, 200]
