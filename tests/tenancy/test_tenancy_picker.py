"""Tenancy in the picker, over real gRPC with Envoy's message sequences: refusals in the OpenAI
envelope, the cache salt written into the body, limits shared by two replicas through a real
Redis, the fair queue under saturation, and per-tenant metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc
import pytest

from extproc.config import Config, load_config
from extproc.server.app import PickerServer
from extproc.server.logs import JsonFormatter
from extproc.tenancy.policy import key_digest
from extproc.tenancy.salt import tenant_salt
from tests import extproc_client as ep
from tests.conftest import StartPicker
from tests.redis_server import RedisServer

KEYS = {"acme": "sk-acme-1111111111111111", "globex": "sk-globex-2222222222222222"}
SALT_KEY = "salt-key-for-the-tenancy-tests"
PROMPT = {"model": "model-a", "prompt": "Hello there, how are you today?", "max_tokens": 5}


def _config(addresses: list[str], tenancy: dict[str, Any], **more: Any) -> Config:
    tenants = {
        "acme": {"api_keys": [key_digest(KEYS["acme"])], "cache_isolation": True},
        "globex": {
            "api_keys": [key_digest(KEYS["globex"])],
            "models": ["model-b"],
            "requests_per_minute": 2,
        },
    }
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
        "discovery": {"models_refresh_seconds": 0.2},
        "collector": {"enabled": False},
        "routing": {"strategy": "least-request", "fallbacks": 0},
        "endpoints": [{"address": a} for a in addresses],
        # The header source is opt-in; these tests exercise it as a trusted front would set it.
        "tenancy": {
            "enabled": True,
            "identity": ["api-key", "header", "default"],
            "cache_salt_key": SALT_KEY,
            "tenants": tenants,
            **tenancy,
        },
        **more,
    }
    return load_config(None, {k: v for k, v in raw.items()})


async def _send(
    channel: grpc.aio.Channel,
    payload: dict[str, Any],
    headers: dict[str, str],
    *,
    mode: int = ep.STREAMED,
) -> tuple[ep.Stream, Any]:
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions", headers=headers, mode=mode))
    if mode == ep.BUFFERED:
        await stream.receive()  # the headers are answered first in BUFFERED mode
    await stream.send(ep.request_body(ep.json_body(payload), end_of_stream=True))
    return stream, await stream.receive()


def _bearer(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


async def _finish(stream: ep.Stream, completion_tokens: int = 3) -> None:
    """Play the model server's answer through the stream, usage included."""
    await stream.send(ep.response_headers())
    await stream.receive()
    usage = {"prompt_tokens": 8, "completion_tokens": completion_tokens, "total_tokens": 11}
    await stream.send(ep.response_body(ep.json_body({"usage": usage}), end_of_stream=True))
    await stream.receive()
    await stream.close()


def _sample(picker: PickerServer, name: str, **labels: str) -> float:
    value = picker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.parametrize(
    ("headers", "payload", "status", "code"),
    [
        ({}, PROMPT, 401, "missing_api_key"),
        ({"authorization": "Bearer sk-not-a-key"}, PROMPT, 401, "invalid_api_key"),
        ({"x-tenant-id": "initech"}, PROMPT, 401, "unknown_tenant"),
        (_bearer("globex"), PROMPT, 403, "model_not_allowed"),
    ],
)
async def test_identity_and_model_refusals(
    model_servers: Any,
    start_picker: StartPicker,
    headers: dict[str, str],
    payload: dict[str, Any],
    status: int,
    code: str,
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config([server.address], {}))
    stream, reply = await _send(channel, payload, headers)
    got, reply_headers, body = ep.immediate(reply)
    assert (got, body["error"]["code"]) == (status, code)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 401:
        assert reply_headers["www-authenticate"].startswith("Bearer")
    assert await stream.ended()
    # The picker goes on serving: a good request right after is routed.
    stream, reply = await _send(channel, PROMPT, _bearer("acme"))
    assert ep.destination(reply) == server.address
    await _finish(stream)
    assert (
        _sample(
            picker,
            "extproc_tenant_rejections_total",
            tenant="-" if status == 401 else "globex",
            reason=code,
        )
        == 1
    )


async def test_a_rate_limit_answers_429_with_retry_after_and_the_limit(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-b")
    picker, channel = await start_picker(_config([server.address], {}))
    body = {**PROMPT, "model": "model-b"}
    for _ in range(2):
        stream, reply = await _send(channel, body, _bearer("globex"))
        assert ep.destination(reply) == server.address
        await _finish(stream)
    _, reply = await _send(channel, body, _bearer("globex"))
    status, headers, error = ep.immediate(reply)
    assert status == 429 and error["error"]["code"] == "rate_limit_exceeded"
    assert error["error"]["type"] == "requests"
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-extproc-limit"] == "requests_per_minute"
    assert 25 <= int(headers["retry-after"]) <= 30  # one request per 30 s refills
    assert _sample(picker, "extproc_tenant_requests_total", tenant="globex", outcome="routed") == 2
    assert _sample(picker, "extproc_tenant_tokens_total", tenant="globex", kind="completion") == 6


@pytest.mark.parametrize("mode", [ep.STREAMED, ep.BUFFERED], ids=["streamed", "buffered"])
async def test_an_isolated_tenant_gets_its_cache_salt_written_into_the_body(
    model_servers: Any, start_picker: StartPicker, mode: int
) -> None:
    server = await model_servers("model-a")
    _, channel = await start_picker(_config([server.address], {}))
    sent = {**PROMPT, "cache_salt": "per-user-7"}
    stream, reply = await _send(channel, sent, _bearer("acme"), mode=mode)
    expected_salt = tenant_salt("acme", "per-user-7", key=SALT_KEY)
    if mode == ep.STREAMED:
        set_headers = {
            h.header.key: h.header.raw_value.decode()
            for h in reply.request_headers.response.header_mutation.set_headers
        }
        body = b""
        while True:
            chunk = (await stream.receive()).request_body.response.body_mutation.streamed_response
            body += chunk.body
            if chunk.end_of_stream:
                break
        assert set_headers["content-length"] == str(len(body))
    else:
        body = reply.request_body.response.body_mutation.body
    rewritten = json.loads(body)
    assert rewritten == {**sent, "cache_salt": expected_salt}
    assert len(expected_salt) <= 128 and not set("@/\\") & set(expected_salt)
    await stream.close()


async def test_a_tenant_without_isolation_keeps_its_body_byte_for_byte(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    config = _config([server.address], {"tenants": {"plain": {}}, "default_tenant": "plain"})
    _, channel = await start_picker(config)
    sent = ep.json_body({**PROMPT, "cache_salt": "theirs"})
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions"))
    await stream.send(ep.request_body(sent, end_of_stream=True))
    reply = await stream.receive()
    set_headers = {h.header.key for h in reply.request_headers.response.header_mutation.set_headers}
    assert "content-length" not in set_headers
    echoed = (await stream.receive()).request_body.response.body_mutation.streamed_response
    assert echoed.body == sent
    await stream.close()


async def test_two_replicas_share_one_limit_through_redis(
    model_servers: Any, start_picker: StartPicker, redis_server: RedisServer
) -> None:
    server = await model_servers("model-b")
    tenancy = {"limits_backend": "redis", "redis_url": redis_server.url}
    replicas = [await start_picker(_config([server.address], tenancy)) for _ in range(2)]
    body = {**PROMPT, "model": "model-b"}
    statuses = []
    for i in range(6):
        stream, reply = await _send(replicas[i % 2][1], body, _bearer("globex"))
        if reply.WhichOneof("response") == "immediate_response":
            statuses.append(ep.immediate(reply)[0])
        else:
            statuses.append(200)
            await _finish(stream)
    assert statuses == [200, 200, 429, 429, 429, 429]

    redis_server.kill()  # mid-run: fail open to each replica's own limits
    stream, reply = await _send(replicas[0][1], body, _bearer("globex"))
    assert ep.destination(reply) == server.address
    await _finish(stream)
    picker = replicas[0][0]
    assert _sample(picker, "extproc_limiter_redis_up") == 0
    assert _sample(picker, "extproc_limiter_fallbacks_total", mode="open") >= 1


async def test_under_saturation_requests_wait_their_turn_and_time_out(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    config = _config(
        [server.address],
        {"default_tenant": "acme", "queue_timeout_seconds": 0.3, "max_queued_per_tenant": 1},
        scheduling={"saturation_requests": 1},
    )
    picker, channel = await start_picker(config)
    first, reply = await _send(channel, PROMPT, {})
    assert ep.destination(reply) == server.address  # the endpoint now holds its one request
    # The next one waits; when the first finishes, it is released and routed.
    waiting = asyncio.create_task(_send(channel, PROMPT, {}))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    # A third finds the tenant's queue full.
    _, reply = await _send(channel, PROMPT, {})
    assert ep.immediate(reply)[2]["error"]["code"] == "queue_full"
    await _finish(first)
    second, reply = await asyncio.wait_for(waiting, 5)
    assert ep.destination(reply) == server.address
    # Nothing finishes now: the next request waits out the timeout and is refused.
    _, reply = await _send(channel, PROMPT, {})
    status, headers, error = ep.immediate(reply)
    assert (status, error["error"]["code"]) == (429, "queue_timeout")
    assert int(headers["retry-after"]) >= 1
    await _finish(second)
    assert _sample(picker, "extproc_tenant_queue_seconds_count", tenant="acme") >= 2
    assert (
        _sample(picker, "extproc_tenant_rejections_total", tenant="acme", reason="queue_timeout")
        == 1
    )


@pytest.mark.parametrize("headroom", [0, 2])
async def test_headroom_keeps_slots_for_a_tenant_under_its_share(
    model_servers: Any, start_picker: StartPicker, headroom: int
) -> None:
    """One endpoint with 4 slots, two tenants of weight 1 (a share of 2 slots each). With
    headroom 2, a tenant holding its share finds the pool saturated at 2 requests, so the other
    tenant's request starts at once; without headroom, the first tenant takes all 4 slots and
    the other one waits."""
    server = await model_servers("model-a")
    config = _config(
        [server.address],
        {
            "identity": ["header"],
            "tenants": {"flood": {}, "calm": {}},
            "headroom_requests": headroom,
            "queue_timeout_seconds": 5,
        },
        scheduling={"saturation_requests": 4},
    )
    _, channel = await start_picker(config)
    flood, calm = {"x-tenant-id": "flood"}, {"x-tenant-id": "calm"}
    stream, _ = await _send(channel, PROMPT, calm)  # calm has been active recently
    await _finish(stream)
    held = [(await _send(channel, PROMPT, flood))[0] for _ in range(2)]
    more = [asyncio.create_task(_send(channel, PROMPT, flood)) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert all(task.done() for task in more) is (headroom == 0)
    calm_request = asyncio.create_task(_send(channel, PROMPT, calm))
    await asyncio.sleep(0.1)
    assert calm_request.done() is (headroom > 0)
    # Everything is served in the end, as slots free.
    for stream in held:
        await _finish(stream)
    for task in [*more, calm_request]:
        stream, reply = await asyncio.wait_for(task, 5)
        assert ep.destination(reply) == server.address
        await _finish(stream)


async def test_a_sheddable_tenant_is_refused_under_saturation_not_queued(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    config = _config(
        [server.address],
        {
            "default_tenant": "batch",
            "tenants": {"batch": {"priority": -1}},
        },
        scheduling={"saturation_requests": 1},
    )
    _, channel = await start_picker(config)
    first, reply = await _send(channel, PROMPT, {})
    assert ep.destination(reply) == server.address
    _, reply = await _send(channel, PROMPT, {})
    status, headers, error = ep.immediate(reply)
    assert (status, error["error"]["code"]) == (429, "request_shed")
    await _finish(first)


async def test_refusals_are_logged_as_json_with_the_request_id_and_never_the_key(
    model_servers: Any, start_picker: StartPicker, caplog: pytest.LogCaptureFixture
) -> None:
    server = await model_servers("model-a")
    _, channel = await start_picker(_config([server.address], {}))
    headers = {"authorization": "Bearer sk-leaked-guess-123", "x-request-id": "req-42"}
    with caplog.at_level(logging.INFO, logger="extproc.request.record"):
        await _send(channel, PROMPT, headers)
        await _send(
            channel, {**PROMPT, "model": "model-a"}, {**_bearer("globex"), "x-request-id": "req-43"}
        )
    lines = [
        json.loads(JsonFormatter().format(r)) for r in caplog.records if "refused" in r.message
    ]
    assert [(line["request_id"], line["status"], line["tenant"]) for line in lines] == [
        ("req-42", 401, "-"),
        ("req-43", 403, "globex"),
    ]
    assert "sk-leaked-guess-123" not in caplog.text and KEYS["globex"] not in caplog.text
    assert "Hello there" not in caplog.text  # nor the prompt


async def test_with_redis_down_and_failing_closed_the_answer_is_503(
    model_servers: Any, start_picker: StartPicker, redis_server: RedisServer
) -> None:
    server = await model_servers("model-b")
    tenancy = {
        "limits_backend": "redis",
        "redis_url": redis_server.url,
        "redis_failure_mode": "closed",
    }
    picker, channel = await start_picker(_config([server.address], tenancy))
    body = {**PROMPT, "model": "model-b"}
    stream, reply = await _send(channel, body, _bearer("globex"))
    assert ep.destination(reply) == server.address
    await _finish(stream)
    redis_server.kill()
    _, reply = await _send(channel, body, _bearer("globex"))
    status, headers, error = ep.immediate(reply)
    assert (status, error["error"]["code"]) == (503, "limiter_unavailable")
    assert int(headers["retry-after"]) >= 0
    assert _sample(picker, "extproc_limiter_fallbacks_total", mode="closed") == 1
    # A tenant without limits does not need Redis and is still served.
    stream, reply = await _send(channel, body, _bearer("acme"))
    assert ep.destination(reply) == server.address
    await _finish(stream)
