"""Whatever happens to a request after its tenant's limits were counted, the picker gives back
its concurrency slot, its fair-queue place and its in-flight count: a client that hangs up while
it waits, input that used to raise after the limit step, a centralized prefill cut short.

Each case uses a tenant allowed one request at a time, so a slot left behind shows as a 429 for
the tenant's next request: that is what a leak did to clients (until the picker restarted).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from extproc.config import Config, load_config
from extproc.decision import RequestHead
from extproc.metrics import PickerMetrics
from extproc.pipeline import Pipeline
from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.scheduling.cost_learner import CostLearner
from extproc.scheduling.framework import Profile, WeightedScorer
from extproc.scheduling.pickers import MaxScorePicker
from extproc.scheduling.strategies import Strategies
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.server.app import PickerServer, strategies_for, tenancy_for, tenancy_gate
from extproc.state.inflight import InFlight
from extproc.state.prefix_index import PrefixIndex
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore
from extproc.tenancy.limits import Granted, Limiter, LocalLimiter
from extproc.tenancy.policy import Tenant, key_digest
from extproc.tenancy.reload import load_directory
from extproc.tenancy.tenants import Tenancy
from tests import extproc_client as ep
from tests.conftest import StartPicker
from tests.redis_server import RedisServer

KEY = "sk-solo-0123456789abcdef"
PROMPT = {"model": "model-a", "prompt": "Hello there, how are you today?", "max_tokens": 5}
SALT_KEY = "a-test-salt-key-of-32-characters"


def _tenancy(**more: Any) -> dict[str, Any]:
    solo = {"api_keys": [key_digest(KEY)], "max_concurrency": 1, "cache_isolation": True}
    return {"enabled": True, "cache_salt_key": SALT_KEY, "tenants": {"solo": solo}, **more}


def _config(addresses: list[str], tenancy: dict[str, Any], **more: Any) -> Config:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
        "collector": {"enabled": False},
        "routing": {"strategy": "least-request", "fallbacks": 0},
        "endpoints": [{"address": a} for a in addresses],
        "tenancy": tenancy,
        **more,
    }
    return load_config(None, raw)


async def _send(channel: grpc.aio.Channel, body: bytes) -> tuple[ep.Stream, Any]:
    stream = ep.Stream(channel)
    headers = {"authorization": f"Bearer {KEY}"}
    await stream.send(ep.request_headers("/v1/completions", headers=headers))
    await stream.send(ep.request_body(body, end_of_stream=True))
    return stream, await stream.receive()


async def _finish(stream: ep.Stream) -> None:
    await stream.send(ep.response_headers())
    await stream.receive()
    await stream.send(ep.response_body(ep.json_body({"usage": {}}), end_of_stream=True))
    await stream.receive()
    await stream.close()


def _inflight(picker: PickerServer) -> float:
    samples = picker.metrics.registry.get_sample_value
    total = 0.0
    for address in [e.address for e in picker.store.current.endpoints]:
        total += samples("extproc_inflight_requests", {"endpoint": address}) or 0.0
    return total


async def _served_again(picker: PickerServer, channel: grpc.aio.Channel) -> None:
    """The tenant's one slot is free: its next request is routed, and nothing is in flight
    once it ends."""
    stream, reply = await _send(channel, ep.json_body(PROMPT))
    assert ep.destination(reply), reply
    await _finish(stream)
    for _ in range(100):  # the stream's end reaches the picker after the client's last read
        if _inflight(picker) == 0 and picker.inflight.total() == 0:
            break
        await asyncio.sleep(0.01)
    assert _inflight(picker) == 0 and picker.inflight.total() == 0


@pytest.mark.parametrize(
    "body",
    [
        # A lone surrogate (valid JSON escape, no valid text): the cache salt's body rewrite
        # could not encode it.
        b'{"model": "model-a", "prompt": "a\\ud800b", "max_tokens": 5}',
        # A max_tokens the cost model's float arithmetic overflows on.
        b'{"model": "model-a", "prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}",
    ],
    ids=["lone-surrogate", "huge-max-tokens"],
)
async def test_input_that_used_to_raise_is_a_400_and_holds_nothing(
    model_servers: Any, start_picker: StartPicker, body: bytes
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config([server.address], _tenancy()))
    stream, reply = await _send(channel, body)
    status, _, error = ep.immediate(reply)
    assert status == 400, error
    assert await stream.ended()
    await _served_again(picker, channel)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_client_that_hangs_up_in_the_fair_queue_leaves_nothing_held(
    model_servers: Any, start_picker: StartPicker, redis_server: RedisServer, backend: str
) -> None:
    server = await model_servers("model-a")
    tenancy = _tenancy(
        default_tenant="other",
        limits_backend=backend,
        redis_url=redis_server.url,
        queue_timeout_seconds=30,
    )
    tenancy["tenants"]["other"] = {}
    config = _config([server.address], tenancy, scheduling={"saturation_requests": 1})
    picker, channel = await start_picker(config)
    # Another tenant fills the only endpoint, so the pool is saturated...
    busy = ep.Stream(channel)
    await busy.send(ep.request_headers("/v1/completions"))
    await busy.send(ep.request_body(ep.json_body(PROMPT), end_of_stream=True))
    assert ep.destination(await busy.receive()) == server.address
    # ...and the solo tenant's request waits in the fair queue, holding its one slot.
    waiting = ep.Stream(channel)
    await waiting.send(
        ep.request_headers("/v1/completions", headers={"authorization": f"Bearer {KEY}"})
    )
    await waiting.send(ep.request_body(ep.json_body(PROMPT), end_of_stream=True))
    fair = picker.gate
    assert fair is not None
    for _ in range(200):
        if fair.waiting("model-a"):
            break
        await asyncio.sleep(0.01)
    assert fair.waiting("model-a") == 1
    await waiting.close()  # the client hangs up
    for _ in range(200):
        if not fair.waiting("model-a"):
            break
        await asyncio.sleep(0.01)
    assert fair.waiting("model-a") == 0
    await _finish(busy)
    await _served_again(picker, channel)


# --- the centralized prefill, on the pipeline itself --------------------------------------------

PREFILL, DECODE = "10.0.1.1:8000", "10.0.2.1:8000"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class HangingPrefiller:
    """A prefill endpoint that never answers: the client gives up first."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def prefill(self, address: str, path: str, body: bytes, *, request_id: str) -> str:
        self.started.set()
        await asyncio.Event().wait()
        return "unreachable"


async def _slot_free(limiter: Limiter, tenant: Tenant) -> bool:
    """The tenant's one slot can be taken again (a shared limiter releases in the background,
    so it is given a moment); the slot taken to tell is given back."""
    for _ in range(100):
        verdict = await limiter.acquire(tenant, 1)
        if isinstance(verdict, Granted):
            limiter.release(verdict.lease, 0)
            return True
        await asyncio.sleep(0.02)
    return False


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_client_that_hangs_up_during_a_centralized_prefill_leaves_nothing_held(
    redis_server: RedisServer, backend: str
) -> None:
    config = load_config(
        None,
        {
            "collector": {"enabled": False},
            "routing": {"fallbacks": 0},
            "disaggregation": {"mode": "centralized", "threshold_tokens": 16},
            "endpoints": [{"address": PREFILL}, {"address": DECODE}],
            "tenancy": _tenancy(limits_backend=backend, redis_url=redis_server.url),
        },
    )
    endpoints = [
        Endpoint(PREFILL, frozenset({MODEL}), True, role="prefill"),
        Endpoint(DECODE, frozenset({MODEL}), True, role="decode"),
    ]
    inflight, metrics, cost = InFlight(), PickerMetrics(), CostLearner()
    tenancy = tenancy_for(config, metrics)
    assert tenancy is not None
    limiter = tenancy.limiter
    prefiller = HangingPrefiller()
    blocks = PromptBlocks(BlocksSettings())
    store = SnapshotStore(Snapshot.of(endpoints))
    gate = tenancy_gate(config, tenancy, store, inflight, metrics)
    pipeline = Pipeline(
        config,
        store,
        inflight,
        strategies_for(config, cost),
        metrics,
        blocks=blocks,
        matcher=PrefixIndex(),
        cost=cost,
        gate=gate,
        prefiller=prefiller,
    )
    head = RequestHead(
        "POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}", "x-request-id": "r1"}
    )
    words = " ".join(f"word{i}" for i in range(400))
    body = {"model": MODEL, "messages": [{"role": "user", "content": words}], "max_tokens": 8}
    try:
        task = asyncio.create_task(pipeline.route(head, json.dumps(body).encode()))
        await asyncio.wait_for(prefiller.started.wait(), 10)
        assert inflight.total() == 1  # counted at the decode endpoint while the prompt moves
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert inflight.total() == 0
        gauge = metrics.registry.get_sample_value("extproc_inflight_requests", {"endpoint": DECODE})
        assert gauge == 0
        assert await _slot_free(limiter, tenancy.directory.tenants["solo"])
    finally:
        await pipeline.aclose()
        await blocks.aclose()
        await tenancy.aclose()


class BrokenScorer:
    """A scorer with a bug: whatever raises after the limit step stands for every such bug."""

    name = "broken-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        raise ZeroDivisionError("a bug in a plugin")


async def test_a_step_that_raises_after_the_limits_gives_the_slot_back() -> None:
    config = load_config(
        None,
        {
            "collector": {"enabled": False},
            "routing": {"strategy": "broken", "fallbacks": 0},
            "endpoints": [{"address": DECODE}],
            "tenancy": _tenancy(),
        },
    )
    limiter = LocalLimiter()
    tenancy = Tenancy(config.tenancy, load_directory(config.tenancy), limiter)
    broken = Profile(
        "broken", (), (WeightedScorer(BrokenScorer(), 1.0),), MaxScorePicker(random.Random(0))
    )
    inflight, metrics = InFlight(), PickerMetrics()
    store = SnapshotStore(Snapshot.of([Endpoint(DECODE, frozenset({"model-a"}), True)]))
    pipeline = Pipeline(
        config,
        store,
        inflight,
        Strategies(profiles={"broken": broken}),
        metrics,
        gate=tenancy_gate(config, tenancy, store, inflight, metrics),
    )
    head = RequestHead("POST", "/v1/completions", {"authorization": f"Bearer {KEY}"})
    try:
        for _ in range(2):  # the second would be refused (429) if the first kept the slot
            with pytest.raises(ZeroDivisionError):
                await pipeline.route(head, ep.json_body(PROMPT))
        assert inflight.total() == 0
        granted = await limiter.acquire(tenancy.directory.tenants["solo"], 1)
        assert isinstance(granted, Granted), granted
    finally:
        await pipeline.aclose()
