"""The HTTP surface a router touches: shapes, status codes, error envelopes, metrics text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.prefix.tokenizers import Tokenizer
from extproc.sim import SimConfig, SimFleet
from tests.sim.conftest import post, words

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
async def fleet(tokenizer: Tokenizer) -> AsyncIterator[SimFleet]:
    config = SimConfig(
        pods=2, speed=200, enable_lora=True, max_loras=2, max_cpu_loras=3,
        lora_modules=(("sql-lora", "/adapters/sql"),), lora_load_seconds=0.1,
    )  # fmt: skip
    async with SimFleet(config, tokenizer=tokenizer) as f:
        yield f


async def _sse(resp: aiohttp.ClientResponse) -> list[dict[str, object] | str]:
    events: list[dict[str, object] | str] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_two_servers_on_their_own_ports(fleet: SimFleet) -> None:
    assert len(set(fleet.urls)) == 2


async def test_completion_usage_and_shape(http: aiohttp.ClientSession, fleet: SimFleet) -> None:
    status, body = await post(
        http, f"{fleet.urls[0]}/v1/completions", {"prompt": "Hello", "max_tokens": 3, "x": 1}
    )
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_streaming_with_usage(
    http: aiohttp.ClientSession, fleet: SimFleet, chat: bool
) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, object] = {"max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": words(40)}]
    else:
        body["prompt"] = words(40)
    async with http.post(f"{fleet.urls[0]}{path}", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await _sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    usage = chunks[-1]["usage"]
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] == 4
    assert chunks[-1]["choices"] == []
    content = [c for c in chunks[:-1] if c["choices"]]
    last_choice = content[-1]["choices"]
    assert isinstance(last_choice, list)
    assert last_choice[0]["finish_reason"] == "length"
    if chat:
        first = content[0]["choices"]
        assert isinstance(first, list)
        assert first[0]["delta"] == {"role": "assistant", "content": ""}


async def test_stream_without_usage_has_no_usage_chunk(
    http: aiohttp.ClientSession, fleet: SimFleet
) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "stream": True}
    async with http.post(f"{fleet.urls[0]}/v1/completions", json=body) as resp:
        events = await _sse(resp)
    assert all("usage" not in e for e in events if isinstance(e, dict))


@pytest.mark.parametrize(
    ("body", "status", "err_type"),
    [
        pytest.param({"model": "nope", "prompt": "x"}, 404, "NotFoundError", id="unknown-model"),
        pytest.param({"prompt": "x", "max_tokens": 0}, 400, "BadRequestError", id="max-tokens"),
        pytest.param({"max_tokens": 1}, 400, "BadRequestError", id="no-prompt"),
        pytest.param({"prompt": "x", "cache_salt": "a/b"}, 400, "BadRequestError", id="bad-salt"),
        pytest.param({"prompt": "x", "max_tokens": 200_000}, 400, "BadRequestError", id="too-long"),
    ],
)
async def test_bad_requests_get_vllm_errors(
    http: aiohttp.ClientSession,
    fleet: SimFleet,
    body: dict[str, object],
    status: int,
    err_type: str,
) -> None:
    got_status, got = await post(http, f"{fleet.urls[0]}/v1/completions", body)
    assert got_status == status
    assert got["error"]["type"] == err_type
    assert got["error"]["code"] == status
    assert isinstance(got["error"]["message"], str)


async def test_invalid_json(http: aiohttp.ClientSession, fleet: SimFleet) -> None:
    async with http.post(f"{fleet.urls[0]}/v1/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == 400


async def test_tokenize_detokenize_render(
    http: aiohttp.ClientSession, fleet: SimFleet, tokenizer: Tokenizer
) -> None:
    url = fleet.urls[0]
    _, tok = await post(http, f"{url}/tokenize", {"prompt": "hello world"})
    assert tok["tokens"] == tokenizer.encode("hello world")
    assert tok["count"] == 2
    assert tok["max_model_len"] > 0
    messages = [{"role": "user", "content": "hi"}]
    _, chat_tok = await post(http, f"{url}/tokenize", {"messages": messages})
    assert chat_tok["tokens"] == tokenizer.apply_chat_template(messages)
    _, detok = await post(http, f"{url}/detokenize", {"tokens": tok["tokens"]})
    assert detok == {"prompt": "hello world"}
    _, rendered = await post(
        http, f"{url}/v1/completions/render", {"prompt": "hello world", "cache_salt": "s"}
    )
    assert rendered[0]["token_ids"] == tok["tokens"]
    assert rendered[0]["cache_salt"] == "s"
    _, chat_rendered = await post(http, f"{url}/v1/chat/completions/render", {"messages": messages})
    assert chat_rendered["token_ids"] == chat_tok["tokens"]


async def test_models_and_lora_lifecycle(http: aiohttp.ClientSession, fleet: SimFleet) -> None:
    url = fleet.urls[0]

    async def model_ids() -> dict[str, str | None]:
        async with http.get(f"{url}/v1/models") as resp:
            data = (await resp.json())["data"]
        return {m["id"]: m["parent"] for m in data}

    assert await model_ids() == {MODEL: None, "sql-lora": MODEL}
    load = {"lora_name": "chat-lora", "lora_path": "/adapters/chat"}
    async with http.post(f"{url}/v1/load_lora_adapter", json=load) as resp:
        assert resp.status == 200
        assert "added successfully" in await resp.text()
    assert (await model_ids())["chat-lora"] == MODEL
    status, _ = await post(http, f"{url}/v1/load_lora_adapter", load)
    assert status == 400
    status, _ = await post(
        http, f"{url}/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": "/x"}
    )
    assert status == 400
    status, _ = await post(http, f"{url}/v1/completions", {"model": "chat-lora", "prompt": "x"})
    assert status == 200
    async with http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "chat-lora"}) as resp:
        assert resp.status == 200
    status, _ = await post(http, f"{url}/v1/unload_lora_adapter", {"lora_name": "chat-lora"})
    assert status == 404


async def test_probes(http: aiohttp.ClientSession, fleet: SimFleet) -> None:
    url = fleet.urls[0]
    for path in ("/health", "/server_info", "/model_info", "/get_model_info", "/version"):
        async with http.get(f"{url}{path}") as resp:
            assert resp.status == 200, path
    async with http.get(f"{url}/load") as resp:
        assert await resp.json() == {"server_load": 0}
    async with http.get(f"{url}/kv_event_sources") as resp:
        assert await resp.json() == {}


async def test_metrics_parse_with_vllm_names(http: aiohttp.ClientSession, fleet: SimFleet) -> None:
    url = fleet.urls[0]
    await post(http, f"{url}/v1/completions", {"prompt": words(50), "max_tokens": 2})
    await post(http, f"{url}/v1/completions", {"prompt": words(50), "max_tokens": 2})
    async with http.get(f"{url}/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_requests_waiting_by_reason",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:num_preemptions",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    ):
        assert name in families, name
    hits = families["vllm:prefix_cache_hits"].samples[0]
    assert hits.name == "vllm:prefix_cache_hits_total"
    assert hits.labels == {"model_name": MODEL, "engine": "0"}
    assert hits.value > 0
    ttft_buckets = [
        s.labels["le"]
        for s in families["vllm:time_to_first_token_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert ttft_buckets[:3] == ["0.001", "0.005", "0.01"]
    assert ttft_buckets[-2:] == ["2560.0", "+Inf"]
    assert len(ttft_buckets) == 23
    (info,) = families["vllm:cache_config_info"].samples
    assert info.labels["block_size"] == "16"
    assert int(info.labels["num_gpu_blocks"]) > 0
    lora = families["vllm:lora_requests_info"].samples
    assert set(lora[0].labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert lora[0].labels["max_lora"] == "2"
