"""Prefill/decode disaggregation in the picker: roles, the threshold, the p2p header, the
centralized prefill (its bodies, its failure), and the HTTP prefiller against a real server."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from extproc.config import Config, load_config
from extproc.decision import RequestHead, Routed
from extproc.metrics import PickerMetrics
from extproc.pipeline import Pipeline
from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.request.openai import ParsedRequest, parse_request
from extproc.scheduling.cost_learner import CostLearner
from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.disaggregation import (
    PREFILL_PARAMS,
    count_work,
    decode_body,
    prefill_body,
    returned_params,
    roles,
    worth_splitting,
)
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.server.app import strategies_for
from extproc.server.prefill import HttpPrefiller
from extproc.state.inflight import InFlight, Load
from extproc.state.prefix_index import PrefixIndex
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore
from tests.prefix.helpers import random_text
from tests.scheduling.build import cand

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PREFILL = ("10.0.1.1:8000", "10.0.1.2:8000")
DECODE = ("10.0.2.1:8000", "10.0.2.2:8000")
PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [1, 2, 3],
    "remote_engine_id": "engine-a",
    "remote_host": "10.0.1.1",
    "remote_port": 5600,
    "tp_size": 1,
}


def _with_role(i: int, role: str) -> Candidate:
    return Candidate(Endpoint(f"10.0.0.{i}:8000", frozenset({MODEL}), True, role=role), Load())


@pytest.mark.parametrize(
    ("pool", "decode", "prefill"),
    [
        (["both", "both"], [1, 2], []),
        (["prefill", "decode", "decode"], [2, 3], [1]),
        (["prefill", "both", "decode"], [2, 3], [1, 2]),
        (["decode", "both"], [1, 2], []),  # no dedicated prefill endpoint: not split
        (["prefill", "prefill"], [1, 2], []),  # nothing generates: served whole anywhere
    ],
    ids=["aggregated", "split", "both-in-a-split", "no-prefill", "no-decode"],
)
def test_roles(pool: list[str], decode: list[int], prefill: list[int]) -> None:
    candidates = [_with_role(i + 1, r) for i, r in enumerate(pool)]
    split = roles(candidates)
    assert [c.address for c in split.decode] == [f"10.0.0.{i}:8000" for i in decode]
    assert [c.address for c in split.prefill] == [f"10.0.0.{i}:8000" for i in prefill]


@pytest.mark.parametrize(
    ("prompt", "cached_blocks", "threshold", "split"),
    [(2000, 0, 256, True), (200, 0, 256, False), (2000, 120, 256, False), (2000, 100, 256, True)],
)
def test_the_threshold_counts_what_the_decode_endpoint_does_not_hold(
    prompt: int, cached_blocks: int, threshold: int, split: bool
) -> None:
    request = SchedulingRequest(MODEL, prompt_tokens=prompt, block_size=16)
    assert worth_splitting(request, cand(1, prefix=cached_blocks), threshold) is split


def test_the_prefill_and_decode_bodies_are_vllms() -> None:
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 300,
    }
    prefill = json.loads(prefill_body(payload))
    assert prefill["kv_transfer_params"] == dict(PREFILL_PARAMS)
    assert (prefill["max_tokens"], prefill["max_completion_tokens"]) == (1, 1)
    assert prefill["stream"] is False and "stream_options" not in prefill
    decode = json.loads(decode_body(payload, PARAMS))
    assert decode == {**payload, "kv_transfer_params": PARAMS}
    assert returned_params(json.dumps({"kv_transfer_params": PARAMS}).encode()) == PARAMS
    assert returned_params(b'{"choices": []}') is None
    assert returned_params(b"not json") is None


# --- the pipeline ----------------------------------------------------------------------------


@dataclass
class FakePrefiller:
    """Answers as a prefill endpoint would, or fails; records what it was sent."""

    answer: Mapping[str, Any] | str = field(default_factory=lambda: dict(PARAMS))
    sent: list[tuple[str, str, dict[str, Any], str]] = field(default_factory=list)

    async def prefill(
        self, address: str, path: str, body: bytes, *, request_id: str
    ) -> Mapping[str, Any] | str:
        self.sent.append((address, path, json.loads(body), request_id))
        return self.answer


def _config(mode: str, **more: Any) -> Config:
    return load_config(
        None,
        {
            "collector": {"enabled": False},
            "routing": {"fallbacks": 0},
            "disaggregation": {"mode": mode, **more},
            "endpoints": [{"address": a} for a in (*PREFILL, *DECODE)],
        },
    )


@pytest.fixture
async def blocks() -> AsyncIterator[PromptBlocks]:
    pb = PromptBlocks(BlocksSettings())
    yield pb
    await pb.aclose()


def _pipeline(
    config: Config, blocks: PromptBlocks, index: PrefixIndex, prefiller: FakePrefiller | None = None
) -> tuple[Pipeline, InFlight, PickerMetrics]:
    endpoints = [Endpoint(a, frozenset({MODEL}), True, role="prefill") for a in PREFILL]
    endpoints += [Endpoint(a, frozenset({MODEL}), True, role="decode") for a in DECODE]
    inflight, metrics, cost = InFlight(), PickerMetrics(), CostLearner()
    pipeline = Pipeline(
        config,
        SnapshotStore(Snapshot.of(endpoints)),
        inflight,
        strategies_for(config, cost),
        metrics,
        blocks=blocks,
        matcher=index,
        cost=cost,
        prefiller=prefiller,
    )
    return pipeline, inflight, metrics


def _chat(words: int, seed: int = 0) -> dict[str, Any]:
    text = random_text(random.Random(seed), words)
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 50}


async def _route(pipeline: Pipeline, body: dict[str, Any]) -> Routed:
    head = RequestHead("POST", "/v1/chat/completions", {"x-request-id": "req-1"})
    routed = await pipeline.route(head, json.dumps(body).encode())
    assert isinstance(routed, Routed), routed
    return routed


def _decisions(metrics: PickerMetrics, mode: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "extproc_disaggregation_decisions_total", {"mode": mode, "outcome": outcome}
    )
    return value or 0.0


def test_the_prompts_wait_is_predicted_where_it_is_computed() -> None:
    """Half a second of our work is ahead at the endpoint computing the prompt: the prompt is
    predicted to wait there (a scrape now would count it as ours), and only there."""
    request = SchedulingRequest(model="m", prompt_tokens=5000)
    whole = InFlight()
    count_work(whole, request, cand(0, backlog=0.5), None, CostModel())
    assert whole.load(cand(0).address) == Load(1, 5000)
    assert whole.waiting_at(cand(0).address, time.monotonic()) == 1

    split = InFlight()
    count_work(split, request, cand(0), cand(1, backlog=0.5), CostModel())
    now = time.monotonic()
    assert split.load(cand(0).address) == Load(1, 5000)
    assert split.waiting_at(cand(0).address, now) == 0
    assert split.load(cand(1).address) == Load()
    assert split.waiting_at(cand(1).address, now) == 1


async def test_p2p_names_the_prefill_endpoint_in_a_header(blocks: PromptBlocks) -> None:
    pipeline, inflight, metrics = _pipeline(_config("p2p"), blocks, PrefixIndex())
    try:
        routed = await _route(pipeline, _chat(1500))
        assert routed.primary in DECODE
        assert routed.prefill in PREFILL
        assert routed.headers == (("x-prefiller-host-port", routed.prefill),)
        assert routed.body is None  # the sidecar at the decode endpoint does the rest
        # In flight where it is decoded; only predicted prompt work where it is prefilled.
        assert inflight.load(routed.primary).requests == 1
        assert inflight.load(routed.prefill).requests == 0
        assert inflight.backlog(routed.prefill, now=0.0) > 0
        assert _decisions(metrics, "p2p", "disaggregated") == 1
    finally:
        await pipeline.aclose()


async def test_a_prompt_mostly_cached_at_the_decode_endpoint_is_prefilled_there(
    blocks: PromptBlocks,
) -> None:
    body = _chat(1500, seed=3)
    parsed = parse_request("/v1/chat/completions", json.dumps(body).encode())
    assert isinstance(parsed, ParsedRequest)
    prompt = await blocks.blocks(parsed, lora=None, cache_salt=None, endpoint_for_remote=None)
    index = PrefixIndex()
    index.store(DECODE[1], prompt.block_hashes)  # the conversation's earlier turn went there
    pipeline, _, metrics = _pipeline(_config("p2p"), blocks, index)
    try:
        routed = await _route(pipeline, body)
        assert routed.primary == DECODE[1]
        assert routed.prefill is None and routed.headers == ()
        assert _decisions(metrics, "p2p", "local") == 1
        short = await _route(pipeline, _chat(20, seed=4))  # under the threshold anywhere
        assert short.prefill is None and short.primary in DECODE
        assert _decisions(metrics, "p2p", "local") == 2
    finally:
        await pipeline.aclose()


async def test_centralized_prefills_first_and_tells_the_decode_endpoint_where_the_kv_is(
    blocks: PromptBlocks,
) -> None:
    prefiller = FakePrefiller()
    pipeline, _, metrics = _pipeline(_config("centralized"), blocks, PrefixIndex(), prefiller)
    try:
        body = {**_chat(1500), "stream": True}
        routed = await _route(pipeline, body)
        ((address, path, sent, request_id),) = prefiller.sent
        assert address == routed.prefill and address in PREFILL
        assert (path, request_id) == ("/v1/chat/completions", "req-1")
        assert sent["kv_transfer_params"]["do_remote_decode"] is True
        assert (sent["max_tokens"], sent["stream"]) == (1, False)
        assert routed.primary in DECODE and routed.headers == ()
        assert routed.body is not None
        assert json.loads(routed.body) == {**body, "kv_transfer_params": PARAMS}
        assert _decisions(metrics, "centralized", "disaggregated") == 1
    finally:
        await pipeline.aclose()


async def test_a_failed_centralized_prefill_leaves_the_prompt_to_the_decode_endpoint(
    blocks: PromptBlocks,
) -> None:
    prefiller = FakePrefiller(answer="HTTP 503: overloaded")
    pipeline, _, metrics = _pipeline(_config("centralized"), blocks, PrefixIndex(), prefiller)
    try:
        routed = await _route(pipeline, _chat(1500))
        assert len(prefiller.sent) == 1
        assert routed.primary in DECODE
        assert routed.prefill is None and routed.body is None
        assert _decisions(metrics, "centralized", "prefill_failed") == 1
    finally:
        await pipeline.aclose()


async def test_with_disaggregation_off_roles_are_ignored(blocks: PromptBlocks) -> None:
    pipeline, _, metrics = _pipeline(_config("off"), blocks, PrefixIndex())
    try:
        seen = {(await _route(pipeline, _chat(1500, seed=s))).primary for s in range(12)}
        assert seen & set(PREFILL), "a prefill-role endpoint serves whole requests when off"
        assert _decisions(metrics, "off", "local") == 0
    finally:
        await pipeline.aclose()


def test_centralized_needs_a_prefiller() -> None:
    config = _config("centralized")
    with pytest.raises(ValueError, match="Prefiller"):
        Pipeline(config, SnapshotStore(), InFlight(), strategies_for(config), PickerMetrics())


# --- the HTTP prefiller, against a real server on loopback --------------------------------


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("status", "answer", "expected"),
    [
        (200, {"choices": [], "kv_transfer_params": PARAMS}, PARAMS),
        (200, {"choices": []}, "the answer has no kv_transfer_params"),
        (503, {"error": {"message": "busy"}}, "HTTP 503"),
    ],
    ids=["params", "no-params", "error"],
)
async def test_the_http_prefiller(status: int, answer: Any, expected: Any) -> None:
    seen: list[tuple[dict[str, Any], str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((await request.json(), request.headers.get("x-request-id", "")))
        return web.json_response(answer, status=status)

    runner, address = await _serve(handler)
    prefiller = HttpPrefiller(timeout_seconds=5)
    try:
        body = prefill_body({"model": MODEL, "prompt": "hello"})
        outcome = await prefiller.prefill(address, "/v1/completions", body, request_id="r-7")
        if isinstance(expected, str):
            assert isinstance(outcome, str) and outcome.startswith(expected)
        else:
            assert outcome == expected
        assert seen == [(json.loads(body), "r-7")]
    finally:
        await prefiller.aclose()
        await runner.cleanup()


async def test_the_http_prefiller_gives_up_after_its_timeout() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    runner, address = await _serve(handler)
    prefiller = HttpPrefiller(timeout_seconds=0.2)
    try:
        outcome = await prefiller.prefill(address, "/v1/completions", b"{}", request_id="")
        assert isinstance(outcome, str) and "Timeout" in outcome
        refused = await prefiller.prefill("127.0.0.1:1", "/v1/completions", b"{}", request_id="")
        assert isinstance(refused, str)
    finally:
        release.set()
        await prefiller.aclose()
        await runner.cleanup()
