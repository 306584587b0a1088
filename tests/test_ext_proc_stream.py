"""The picker's ext_proc service over real gRPC on loopback, fed the message sequences Envoy sends
in FULL_DUPLEX_STREAMED and BUFFERED modes, against real HTTP model servers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import (
    CollectorConfig,
    Config,
    DiscoveryConfig,
    EndpointConfig,
    RoutingConfig,
    ServerConfig,
)
from extproc.server.app import PickerServer
from tests import extproc_client as ep
from tests.conftest import StartPicker
from tests.fakes import ModelServer

COMPLETION = {"model": "model-a", "prompt": "Hello there", "max_tokens": 5}


def _config(addresses: list[str], **routing: Any) -> Config:
    return Config(
        server=ServerConfig(
            host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0, max_body_bytes=256 * 1024
        ),
        routing=RoutingConfig(**routing),
        discovery=DiscoveryConfig(models_refresh_seconds=0.2),
        # The stream protocol is under test here; the collector has its own tests, and a loaded
        # machine must not make slow scrapes of the test servers look like failing endpoints.
        collector=CollectorConfig(enabled=False),
        endpoints=tuple(EndpointConfig(a) for a in addresses),
    )


@pytest.fixture
def picker_for(
    start_picker: StartPicker,
) -> Callable[..., Awaitable[tuple[PickerServer, grpc.aio.Channel]]]:
    async def start(addresses: list[str], **routing: Any) -> tuple[PickerServer, grpc.aio.Channel]:
        return await start_picker(_config(addresses, **routing))

    return start


async def _two_servers(model_servers: Callable[..., Awaitable[ModelServer]]) -> list[ModelServer]:
    return [await model_servers("model-a"), await model_servers("model-a")]


async def test_streamed_mode_holds_headers_until_body_ends_and_returns_body_unchanged(
    model_servers: Any, picker_for: Any
) -> None:
    servers = await _two_servers(model_servers)
    picker, channel = await picker_for([s.address for s in servers])
    body = ep.json_body({**COMPLETION, "prompt": "x" * 150_000})
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions"))
    third = len(body) // 3
    await stream.send(ep.request_body(body[:third], end_of_stream=False))
    await stream.send(ep.request_body(body[third : 2 * third], end_of_stream=False))
    await stream.send(ep.request_body(body[2 * third :], end_of_stream=True))

    # The first reply answers the headers, after the whole body was seen.
    first = await stream.receive()
    assert first.WhichOneof("response") == "request_headers"
    targets = ep.destination(first).split(",")
    assert set(targets) == {s.address for s in servers}  # pick + 1 fallback (2 servers)

    # Then the held body comes back byte for byte, in chunks Envoy accepts.
    echoed, done = b"", False
    while not done:
        chunk = (await stream.receive()).request_body.response.body_mutation.streamed_response
        assert len(chunk.body) <= 62_000
        echoed += chunk.body
        done = chunk.end_of_stream
    assert echoed == body
    assert picker.inflight.load(targets[0]).requests == 1
    # The ~37k-token prompt's predicted prefill (~0.75 s at the prior rate) joined the pick's
    # prefill backlog, which the cost model reads as queue.
    assert picker.inflight.backlog(targets[0], time.monotonic()) > 0

    # Response path: SSE chunks pass straight through; usage is read; in-flight is released.
    await stream.send(ep.response_headers(content_type="text/event-stream", served=targets[0]))
    assert (await stream.receive()).WhichOneof("response") == "response_headers"
    events = [
        b'data: {"choices":[{"text":"a"}],"usage":null}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":4,'
        b'"prompt_tokens_details":{"cached_tokens":8}}}\n\n',
        b"data: [DONE]\n\n",
    ]
    for i, event in enumerate(events):
        last = i == len(events) - 1
        await stream.send(ep.response_body(event, end_of_stream=last))
        passed = (await stream.receive()).response_body.response.body_mutation.streamed_response
        assert (passed.body, passed.end_of_stream) == (event, last)
    await stream.close()
    assert picker.inflight.load(targets[0]).requests == 0
    metrics = _metrics(picker)
    assert metrics[("extproc_usage_tokens_total", (("kind", "prompt"),))] == 11
    assert metrics[("extproc_usage_tokens_total", (("kind", "cached"),))] == 8


async def test_buffered_mode_answers_headers_first_and_routes_on_the_body(
    model_servers: Any, picker_for: Any
) -> None:
    servers = await _two_servers(model_servers)
    _, channel = await picker_for([s.address for s in servers], fallbacks=0)
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/chat/completions", mode=ep.BUFFERED))
    headers_reply = await stream.receive()
    assert headers_reply.WhichOneof("response") == "request_headers"
    assert not headers_reply.request_headers.response.header_mutation.set_headers
    chat = {
        "model": "model-a",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    await stream.send(ep.request_body(ep.json_body(chat), end_of_stream=True))
    body_reply = await stream.receive()
    assert body_reply.WhichOneof("response") == "request_body"
    assert ep.destination(body_reply) in {s.address for s in servers}
    # The body is not mutated in buffered mode: Envoy forwards its own copy.
    assert not body_reply.request_body.response.HasField("body_mutation")
    await stream.close()


async def test_header_only_requests(model_servers: Any, picker_for: Any) -> None:
    a = await model_servers("model-a", adapters=("sql-lora",))
    b = await model_servers("model-b")
    _, channel = await picker_for([a.address, b.address])

    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/models", method="GET", end_of_stream=True))
    status, _, listing = ep.immediate(await stream.receive())
    assert status == 200
    assert [m["id"] for m in listing["data"]] == ["model-a", "model-b", "sql-lora"]
    assert await stream.ended()

    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/health", method="GET", end_of_stream=True))
    assert ep.destination(await stream.receive()).split(",")[0] in {a.address, b.address}
    await stream.close()


async def test_requests_go_only_to_endpoints_serving_their_model(
    model_servers: Any, picker_for: Any
) -> None:
    a = await model_servers("model-a", adapters=("sql-lora",))
    b = await model_servers("model-b")
    _, channel = await picker_for([a.address, b.address], strategy="random")
    for model, expected in [("model-a", a), ("sql-lora", a), ("model-b", b)] * 5:
        targets = await _route(channel, {**COMPLETION, "model": model})
        assert targets == [expected.address]


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, b"{not json", 400, "invalid_json"),
        ({}, b"[1, 2]", 400, "invalid_json"),
        ({}, ep.json_body({"prompt": "hi"}), 400, "missing_model"),
        ({}, ep.json_body({"model": 7, "prompt": "hi"}), 400, "invalid_value"),
        ({}, ep.json_body({"model": "model-a", "prompt": {"x": 1}}), 400, "invalid_value"),
        ({}, ep.json_body({"model": "nope", "prompt": "hi"}), 404, "model_not_found"),
        ({}, ep.json_body({**COMPLETION, "prompt": "x" * 300_000}), 413, "request_too_large"),
        ({"content-length": "999999999"}, b"{}", 413, "request_too_large"),
        ({"x-routing-strategy": "fastest"}, ep.json_body(COMPLETION), 400, "invalid_header"),
        ({"routing-strategy": "round-robin:2"}, ep.json_body(COMPLETION), 400, "invalid_header"),
    ],
    ids=[
        "malformed-json",
        "json-not-object",
        "missing-model",
        "model-not-string",
        "bad-prompt",
        "unknown-model",
        "body-too-large",
        "content-length-too-large",
        "unknown-strategy",
        "unblendable-strategy",
    ],
)
async def test_bad_requests_get_an_openai_error_and_the_picker_keeps_serving(
    model_servers: Any,
    picker_for: Any,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    servers = await _two_servers(model_servers)
    picker, channel = await picker_for([s.address for s in servers])
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions", headers=headers))
    if "content-length" not in headers:
        # Chunks as Envoy streams them; an oversized body is refused as soon as it crosses the
        # limit, so stop writing there (the picker has closed the stream).
        sent = 0
        for start in range(0, len(body), 64 * 1024):
            chunk = body[start : start + 64 * 1024]
            sent += len(chunk)
            await stream.send(ep.request_body(chunk, end_of_stream=sent >= len(body)))
            if sent > picker.config.server.max_body_bytes:
                break
    reply = await stream.receive()
    got_status, got_headers, error = ep.immediate(reply)
    assert got_status == status
    assert got_headers["content-type"] == "application/json"
    assert error["error"]["code"] == code
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert await stream.ended()
    # The same channel and picker serve the next request normally.
    assert len(await _route(channel, COMPLETION)) == 2
    assert picker.inflight.total() == 0


async def test_no_ready_endpoint_is_503_with_retry_after(
    model_servers: Any, picker_for: Any
) -> None:
    server = await model_servers("model-a")
    picker, channel = await picker_for([server.address])
    assert len(await _route(channel, COMPLETION)) == 1
    await server.stop()
    await picker.refresh_models()  # the next discovery round, now
    status, headers, error = await _refused(channel, COMPLETION)
    assert (status, error["error"]["code"]) == (503, "no_ready_endpoint")
    assert headers["retry-after"] == "1"


async def test_subset_hint_is_honoured(model_servers: Any, picker_for: Any) -> None:
    servers = [await model_servers("model-a") for _ in range(3)]
    _, channel = await picker_for([s.address for s in servers], strategy="random")
    only = servers[1].address
    for _ in range(6):
        assert await _route(channel, COMPLETION, subset=[only]) == [only]
    status, _, error = await _refused(channel, COMPLETION, subset=[])
    assert status == 503
    status, _, error = await _refused(channel, COMPLETION, subset=["10.9.9.9:8000"])
    assert status == 503
    # The other forms the reference picker takes: one comma-separated string, non-strings in
    # the list ignored, and a bare IP naming every port of a host (here: all three servers).
    pair = [servers[0].address, servers[2].address]
    for _ in range(6):
        assert (await _route(channel, COMPLETION, subset=",".join(pair)))[0] in pair
        assert await _route(channel, COMPLETION, subset=[12345, only]) == [only]
    seen = {(await _route(channel, COMPLETION, subset=["127.0.0.1"]))[0] for _ in range(30)}
    assert seen == {s.address for s in servers}


async def test_round_robin_takes_endpoints_in_turn(model_servers: Any, picker_for: Any) -> None:
    servers = [await model_servers("model-a") for _ in range(3)]
    _, channel = await picker_for([s.address for s in servers], strategy="round-robin")
    picks = [(await _route(channel, COMPLETION))[0] for _ in range(6)]
    assert picks[:3] == picks[3:]
    assert set(picks) == {s.address for s in servers}


async def test_least_request_counts_open_streams_and_header_overrides_strategy(
    model_servers: Any, picker_for: Any
) -> None:
    servers = [await model_servers("model-a") for _ in range(3)]
    picker, channel = await picker_for([s.address for s in servers], strategy="round-robin")
    open_streams, busy = [], []
    for _ in range(2):
        stream = ep.Stream(channel)
        await stream.send(
            ep.request_headers("/v1/completions", headers={"x-routing-strategy": "least-request"})
        )
        await stream.send(ep.request_body(ep.json_body(COMPLETION), end_of_stream=True))
        busy.append(ep.destination(await stream.receive()).split(",")[0])
        open_streams.append(stream)
    assert len(set(busy)) == 2  # the second avoided the first's endpoint
    idle = ({s.address for s in servers} - set(busy)).pop()
    for _ in range(3):
        # Ordered by load: the idle endpoint first, then the two busy ones as fallbacks.
        targets = await _route(channel, COMPLETION, headers={"routing-strategy": "least-request"})
        assert targets[0] == idle
    for stream in open_streams:
        await stream.close()
    await _until(lambda: picker.inflight.total() == 0)


@pytest.mark.parametrize("source", ["metadata", "attribute"])
async def test_served_endpoint_is_read_back(
    model_servers: Any, picker_for: Any, source: str
) -> None:
    servers = await _two_servers(model_servers)
    picker, channel = await picker_for([s.address for s in servers])
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions"))
    await stream.send(ep.request_body(ep.json_body(COMPLETION), end_of_stream=True))
    _, fallback = ep.destination(await stream.receive()).split(",")
    await stream.receive()  # the echoed body
    where = {"served": fallback} if source == "metadata" else {"upstream_address": fallback}
    await stream.send(ep.response_headers(**where, end_of_stream=True))
    await stream.receive()
    await stream.close()
    metrics = _metrics(picker)
    assert metrics[("extproc_fallback_served_requests_total", ())] == 1
    assert metrics[("extproc_served_requests_total", (("endpoint", fallback),))] == 1


async def test_health_reports_liveness_readiness_and_ext_proc(
    model_servers: Any, picker_for: Any
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = await model_servers("model-a")
    picker, _ = await picker_for([server.address])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ["liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"]:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await picker.health.draining()
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def _route(
    channel: grpc.aio.Channel,
    payload: Any,
    *,
    headers: dict[str, str] | None = None,
    subset: list[str | int] | str | None = None,
) -> list[str]:
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions", headers=headers, subset=subset))
    await stream.send(ep.request_body(ep.json_body(payload), end_of_stream=True))
    targets = ep.destination(await stream.receive()).split(",")
    await stream.receive()
    await stream.send(ep.response_headers(end_of_stream=True))
    await stream.receive()
    await stream.close()
    return targets


async def _refused(
    channel: grpc.aio.Channel, payload: Any, *, subset: list[str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions", subset=subset))
    await stream.send(ep.request_body(ep.json_body(payload), end_of_stream=True))
    result = ep.immediate(await stream.receive())
    await stream.close()
    return result


def _metrics(picker: PickerServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(picker.metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _until(condition: Callable[[], bool]) -> None:
    import asyncio

    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")
