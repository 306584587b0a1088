"""Prefill/decode disaggregation over HTTP: vLLM NixlConnector's `kv_transfer_params` and the
llm-d routing sidecar's prefiller header, through a running fleet. Assertions read simulated
quantities only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.prefix.tokenizers import Tokenizer
from extproc.scheduling.disaggregation import PREFILL_PARAMS
from extproc.sim import ServerHandle, SimConfig, SimFleet
from extproc.sim.profiles import get_profile
from extproc.sim.request import FinishedRequest
from tests.sim.conftest import post, until, words

BANDWIDTH = 25e9
LATENCY = 0.001
KV_BYTES_PER_BLOCK = 16 * get_profile("h100-8b").kv_bytes_per_token


@pytest.fixture
async def fleet(tokenizer: Tokenizer) -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(pods=3, speed=100), tokenizer=tokenizer) as f:
        yield f


def _prompt(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[int]:
    """Exactly n token ids (a token-id prompt, so prefixes are exact)."""
    ids = tokenizer.encode(words(n, seed))
    assert len(ids) >= n
    return ids[:n]


def _blocks(tokens: int) -> int:
    return -(-tokens // 16)


def _samples(server: ServerHandle) -> dict[str, float]:
    families = text_string_to_metric_families(server.metrics_text())
    return {s.name: s.value for f in families for s in f.samples}


def _record(server: ServerHandle, request_id: str) -> FinishedRequest:
    record = server.finished(request_id)
    assert record is not None
    return record


async def _prefill(
    http: aiohttp.ClientSession, server: ServerHandle, prompt: list[int]
) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 1, "stream": False}
    status, answer = await post(
        http, f"{server.url}/v1/completions", {**body, "kv_transfer_params": PREFILL_PARAMS}
    )
    assert status == 200, answer
    assert isinstance(answer, dict)
    return answer


async def _decode(
    http: aiohttp.ClientSession,
    server: ServerHandle,
    prompt: list[int],
    params: dict[str, Any],
    max_tokens: int = 5,
) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "kv_transfer_params": params}
    status, answer = await post(http, f"{server.url}/v1/completions", body)
    assert status == 200, answer
    assert isinstance(answer, dict)
    assert answer["usage"]["completion_tokens"] == max_tokens
    return answer


async def test_prefill_holds_its_blocks_until_a_decode_pulls_them(
    http: aiohttp.ClientSession, fleet: SimFleet, tokenizer: Tokenizer
) -> None:
    prefiller, decoder, _ = fleet.servers
    prompt = _prompt(tokenizer, 600)
    answer = await _prefill(http, prefiller, prompt)
    params = answer["kv_transfer_params"]
    record = _record(prefiller, answer["id"])
    assert (record.max_tokens, record.output_tokens) == (1, 1)
    # vLLM NixlConnector's request_finished fields, and the simulator's own `sim_` one.
    assert params == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": params["remote_block_ids"],
        "remote_engine_id": prefiller.engine_id,
        "remote_request_id": answer["id"],
        "remote_host": "127.0.0.1",
        "remote_port": int(prefiller.url.rsplit(":", 1)[1]),
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": 600,  # computed: the prompt (the sampled token is not yet)
        "remote_blocks_expiry_time": None,
        "remote_registration_generation": 0,
        "transfer_mode": "pull",
        "sim_prefill_seconds": pytest.approx(record.finished - record.arrival),
    }
    # The prompt and its one output token, in one KV-cache group (vLLM 0.33's shape).
    (group,) = params["remote_block_ids"]
    assert len(group) == _blocks(601)
    assert all(isinstance(b, int) for b in group)
    held = prefiller.stats()
    assert held.kv_held_blocks == _blocks(601)
    assert held.kv_usage > 0
    assert _samples(prefiller)["sim:kv_held_blocks"] == _blocks(601)

    decoded = await _decode(http, decoder, prompt, params)
    assert "kv_transfer_params" not in decoded
    freed = prefiller.stats()
    assert freed.kv_held_blocks == 0
    assert freed.kv_usage == 0.0
    stats = decoder.stats()
    assert stats.kv_transfer_blocks == _blocks(600)
    assert stats.kv_transfer_tokens == 600
    assert stats.kv_transfer_failures == 0
    assert _samples(decoder)["sim:kv_transfer_blocks_total"] == _blocks(600)
    # The decoder's own request frees its blocks as usual; a plain request holds nothing.
    assert stats.kv_usage == 0.0
    _, plain = await post(http, f"{decoder.url}/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert "kv_transfer_params" not in plain
    assert decoder.stats().kv_held_blocks == 0


async def test_held_blocks_expire_after_the_timeout(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(pods=2, speed=100, kv_transfer_timeout_seconds=10.0)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        prefiller, decoder = fleet.servers
        prompt = _prompt(tokenizer, 300)
        answer = await _prefill(http, prefiller, prompt)
        assert prefiller.stats().kv_held_blocks > 0
        await until(lambda: prefiller.stats().kv_held_blocks == 0)
        assert prefiller.stats().kv_usage == 0.0
        record = _record(prefiller, answer["id"])
        assert prefiller.sim_time() >= record.finished + 10.0

        # The decode arrives too late: it prefills locally ("recompute"), still answering.
        decoded = await _decode(http, decoder, prompt, answer["kv_transfer_params"], 4)
        late = _record(decoder, decoded["id"])
        assert late.transferred_blocks == 0
        assert late.transfer_seconds == 0.0
        assert late.cached_tokens == 0
        assert late.prefill_arrival == pytest.approx(
            late.arrival - (record.finished - record.arrival), abs=1e-6
        )
        stats = decoder.stats()
        assert stats.kv_transfer_failures == 1
        assert stats.kv_transfer_blocks == 0
        assert stats.prompt_tokens == 300


async def test_decode_pulls_only_the_blocks_it_lacks(
    http: aiohttp.ClientSession, fleet: SimFleet, tokenizer: Tokenizer
) -> None:
    prefiller, warm, cold = fleet.servers
    prompt = _prompt(tokenizer, 1000)
    # The warm decoder already holds the first 320 tokens (20 blocks) in its prefix cache.
    await post(http, f"{warm.url}/v1/completions", {"prompt": prompt[:320], "max_tokens": 1})
    before = warm.stats()

    results: list[FinishedRequest] = []
    for server in (warm, cold):
        params = (await _prefill(http, prefiller, prompt))["kv_transfer_params"]
        decoded = await _decode(http, server, prompt, params)
        # vLLM reports local + pulled tokens as cached: all of the prompt but its last token.
        assert decoded["usage"]["prompt_tokens_details"]["cached_tokens"] == 999
        results.append(_record(server, decoded["id"]))
    warm_record, cold_record = results

    assert warm_record.transferred_blocks == _blocks(1000) - 20
    assert warm_record.transferred_tokens == 1000 - 320
    assert cold_record.transferred_blocks == _blocks(1000)
    for record in results:
        assert record.cached_tokens == 999
        assert record.prompt_tokens == 1000
        # Bytes over the link plus the fixed latency: proportional to the uncached blocks.
        expected = LATENCY + record.transferred_blocks * KV_BYTES_PER_BLOCK / BANDWIDTH
        assert record.transfer_seconds == pytest.approx(expected)
    # Prefix-cache counters stay vLLM's: the local cache only.
    after = warm.stats()
    assert after.prefix_cache_queries - before.prefix_cache_queries == 1000
    assert after.prefix_cache_hits - before.prefix_cache_hits == 320
    assert cold.stats().prefix_cache_hits == 0
    # Both servers count the prompt's tokens.
    assert cold.stats().prompt_tokens == 1000
    assert prefiller.stats().prompt_tokens == 2000
    # The pulled blocks are now in the decoder's own prefix cache.
    again = await post(http, f"{cold.url}/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert again[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 999 // 16 * 16


async def test_decode_ttft_is_far_below_a_local_prefill(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(pods=3, speed=100, profile="a100-8b")
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        prefiller, decoder, local = fleet.servers
        prompt = _prompt(tokenizer, 6000)
        answer = await _prefill(http, prefiller, prompt)
        prefill = _record(prefiller, answer["id"])
        decoded = await _decode(http, decoder, prompt, answer["kv_transfer_params"], 8)
        record = _record(decoder, decoded["id"])
        _, whole = await post(
            http, f"{local.url}/v1/completions", {"prompt": prompt, "max_tokens": 8}
        )
        baseline = _record(local, whole["id"])

        assert record.output_tokens == 8
        assert record.ttft is not None
        assert baseline.ttft is not None
        # 6000 tokens of A100 prefill take about 0.4 s; 375 blocks cross the link in 32 ms.
        assert record.ttft < baseline.ttft / 4
        # An idle decoder starts the pull on arrival and schedules the request when it lands.
        assert record.scheduled is not None
        assert record.scheduled - record.arrival == pytest.approx(record.transfer_seconds)
        # The decode half starts after the prefill half ended, and the client's TTFT runs from
        # the prefill's start: the prefill's duration back from this server's arrival (engine
        # clocks drift apart under load; the hand-off between the halves is left out).
        took = prefill.finished - prefill.arrival
        assert record.prefill_arrival == pytest.approx(record.arrival - took, abs=1e-6)
        assert record.first_arrival == record.prefill_arrival
        assert prefill.first_token is not None
        assert record.arrival >= prefill.first_token - 1e-6
        assert record.first_token is not None
        assert record.first_token - record.first_arrival > record.ttft
        assert record.itl_mean is not None
        assert record.itl_mean > 0


@pytest.mark.parametrize(
    ("path", "stream"),
    [("/v1/completions", True), ("/v1/chat/completions", False)],
    ids=["completions-stream", "chat"],
)
async def test_prefiller_header_runs_the_sidecar_protocol(
    http: aiohttp.ClientSession,
    fleet: SimFleet,
    tokenizer: Tokenizer,
    path: str,
    stream: bool,
) -> None:
    prefiller, decoder, _ = fleet.servers
    text = words(500)
    body: dict[str, Any] = {"max_tokens": 6, "stream": stream}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": text}]
        body["max_completion_tokens"] = 6
        prompt_tokens = len(tokenizer.apply_chat_template(body["messages"]))
    else:
        body["prompt"] = text
        body["stream_options"] = {"include_usage": True}
        prompt_tokens = len(tokenizer.encode(text))
    headers = {"x-prefiller-host-port": prefiller.url.removeprefix("http://")}
    async with http.post(f"{decoder.url}{path}", json=body, headers=headers) as resp:
        assert resp.status == 200
        if stream:
            chunks = [
                json.loads(line[len(b"data: ") :])
                async for line in resp.content
                if line.startswith(b"data: {")
            ]
            usage = chunks[-1]["usage"]
            response_id = chunks[0]["id"]
        else:
            answer = await resp.json()
            usage = answer["usage"]
            response_id = answer["id"]
    assert usage["completion_tokens"] == 6

    # The prefiller served a one-token copy, and gave its blocks back after the pull.
    (prefill,) = prefiller.finished_requests()
    assert (prefill.max_tokens, prefill.output_tokens) == (1, 1)
    assert prefill.prompt_tokens == prompt_tokens
    assert prefiller.stats().kv_held_blocks == 0
    assert prefiller.stats().kv_usage == 0.0
    record = _record(decoder, response_id)
    assert record.output_tokens == 6
    took = prefill.finished - prefill.arrival
    assert record.prefill_arrival == pytest.approx(record.arrival - took, abs=1e-6)
    assert record.transferred_blocks == _blocks(prompt_tokens)
    assert decoder.stats().kv_transfer_failures == 0


async def test_prefiller_failure_serves_the_request_in_full(
    http: aiohttp.ClientSession, fleet: SimFleet, tokenizer: Tokenizer
) -> None:
    failing, dead, decoder = fleet.servers
    failing.set_faults(error_rate=1.0)
    await dead.kill()
    body = {"prompt": words(300), "max_tokens": 3}
    for prefiller in (failing, dead):
        headers = {"x-prefiller-host-port": prefiller.url.removeprefix("http://")}
        async with http.post(f"{decoder.url}/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["usage"]["completion_tokens"] == 3
        record = _record(decoder, answer["id"])
        assert record.prefill_arrival is None
        assert record.transferred_blocks == 0
    # Served locally from the start: no pull was attempted.
    assert decoder.stats().kv_transfer_failures == 0
    assert decoder.stats().prompt_tokens == 2 * len(tokenizer.encode(words(300)))


@pytest.mark.parametrize("case", ["unknown-engine", "restarted", "unknown-server"])
async def test_pull_from_missing_blocks_prefills_locally(
    http: aiohttp.ClientSession, fleet: SimFleet, tokenizer: Tokenizer, case: str
) -> None:
    prefiller, decoder, _ = fleet.servers
    prompt = _prompt(tokenizer, 400)
    params = (await _prefill(http, prefiller, prompt))["kv_transfer_params"]
    if case == "unknown-engine":
        params = {**params, "remote_engine_id": "no-such-engine"}
    elif case == "restarted":
        await prefiller.kill()
        await prefiller.revive()
        assert prefiller.engine_id != params["remote_engine_id"]
    else:
        params = {**params, "remote_port": 1}
    decoded = await _decode(http, decoder, prompt, params, 7)
    assert decoded["choices"][0]["finish_reason"] == "length"
    record = _record(decoder, decoded["id"])
    assert record.transferred_blocks == 0
    assert record.cached_tokens == 0
    stats = decoder.stats()
    assert stats.kv_transfer_failures == 1
    assert stats.prompt_tokens == 400
    assert stats.kv_usage == 0.0


async def test_blocks_freed_during_the_pull_are_recomputed(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    # A slow link (100 kB/s, 84 s for 4 blocks): the prefill's 20-second hold (ample for the
    # HTTP round trip before the pull starts) expires while its blocks cross it.
    config = SimConfig(
        pods=2, speed=200, kv_transfer_bandwidth=1e5, kv_transfer_timeout_seconds=20.0
    )
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        prefiller, decoder = fleet.servers
        prompt = _prompt(tokenizer, 64)
        params = (await _prefill(http, prefiller, prompt))["kv_transfer_params"]
        decoded = await _decode(http, decoder, prompt, params, 2)
        record = _record(decoder, decoded["id"])
        assert record.transfer_seconds > 20.0
        assert record.transferred_blocks == 0
        assert decoder.stats().kv_transfer_failures == 1
        assert decoder.stats().kv_usage == 0.0


async def test_a_pull_waits_off_the_batch_as_a_deferred_request(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(pods=2, speed=50, kv_transfer_bandwidth=1e7)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        prefiller, decoder = fleet.servers
        prompt = _prompt(tokenizer, 800)
        params = (await _prefill(http, prefiller, prompt))["kv_transfer_params"]
        pending = asyncio.create_task(_decode(http, decoder, prompt, params, 2))
        # 50 blocks at 10 MB/s: about 10 simulated seconds in WAITING_FOR_REMOTE_KVS.
        await until(lambda: decoder.stats().waiting == 1)
        stats = decoder.stats()
        assert (stats.running, stats.waiting_deferred) == (0, 1)
        assert stats.kv_usage > 0  # its blocks are allocated before the pull
        assert stats.busy_seconds == 0.0  # waiting for KV is not GPU work
        assert 'reason="deferred"} 1.0' in decoder.metrics_text()
        assert prefiller.stats().kv_held_blocks > 0
        record = _record(decoder, (await pending)["id"])
        assert record.transfer_seconds > 10.0
        assert decoder.stats().waiting == 0
        assert prefiller.stats().kv_held_blocks == 0
