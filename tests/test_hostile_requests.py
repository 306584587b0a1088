"""Requests written to get past the picker's policy or to hurt it, over real gRPC with Envoy's
message sequences: a path or body spelled another way, strategy names that would grow /metrics
for good, model names that would forge log lines or flood the answer."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from extproc.config import Config, load_config
from extproc.tenancy.policy import key_digest
from tests import extproc_client as ep
from tests.conftest import StartPicker

KEYS = {"limited": "sk-limited-0123456789abcdef", "open": "sk-open-0123456789abcdef"}


def _config(address: str) -> Config:
    tenants = {
        "limited": {"api_keys": [key_digest(KEYS["limited"])], "models": ["model-b"]},
        "open": {"api_keys": [key_digest(KEYS["open"])]},
    }
    return load_config(
        None,
        {
            "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
            "collector": {"enabled": False},
            "routing": {"strategy": "least-request", "fallbacks": 0},
            "endpoints": [{"address": address}],
            "tenancy": {"enabled": True, "tenants": tenants, "default_tenant": "open"},
        },
    )


async def _send(
    channel: grpc.aio.Channel, path: str, body: bytes, headers: dict[str, str]
) -> tuple[ep.Stream, Any]:
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers(path, headers=headers))
    await stream.send(ep.request_body(body, end_of_stream=True))
    return stream, await stream.receive()


def _bearer(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/%63ompletions", b' {"model": "model-a", "prompt": "hi", "max_tokens": 2}'),
        ("/v1//completions/", b'{"model": "model-a", "prompt": "hi", "max_tokens": 2}'),
        ("/v1/responses", b'\n{"model": "model-a", "input": "hi"}'),
        ("/v1/responses", b'["model-a"]'),  # no model the picker can read
        ("/v1/anything", b"model=model-a"),
    ],
    ids=["percent-escape", "slashes", "leading-white-space", "not-an-object", "not-json"],
)
async def test_a_limited_tenant_cannot_spell_its_way_past_its_models(
    model_servers: Any, start_picker: StartPicker, path: str, body: bytes
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    stream, reply = await _send(channel, path, body, _bearer("limited"))
    status, _, error = ep.immediate(reply)
    assert (status, error["error"]["code"]) == (403, "model_not_allowed"), error
    assert await stream.ended()
    assert picker.inflight.total() == 0


async def test_a_path_spelled_another_way_is_still_counted_as_what_it_is(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    body = b' {"model": "model-a", "prompt": "Hello there, how are you today?", "max_tokens": 2}'
    stream, reply = await _send(channel, "/v1/%63ompletions", body, _bearer("open"))
    assert ep.destination(reply) == server.address
    await stream.close()
    prompt_tokens = picker.metrics.registry.get_sample_value(
        "extproc_tenant_tokens_total", {"tenant": "open", "kind": "prompt"}
    )
    assert prompt_tokens is not None and prompt_tokens > 0  # charged as a completion


async def test_strategy_names_from_headers_do_not_grow_the_metrics(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    body = ep.json_body({"model": "model-a", "prompt": "hi", "max_tokens": 2})
    names = [f"least-request:{i + 1},least-queue:1" for i in range(40)] + ["least-queue"]
    for name in names:
        stream, reply = await _send(channel, "/v1/completions", body, {"x-routing-strategy": name})
        assert ep.destination(reply) == server.address
        await stream.close()
    labels = {
        sample.labels["strategy"]
        for metric in picker.metrics.registry.collect()
        if metric.name in ("extproc_pick_duration_seconds", "extproc_requests")
        for sample in metric.samples
    }
    assert labels == {"custom", "least-queue"}


@pytest.mark.parametrize(
    "model",
    ["evil\nINFO extproc: refused request: 200 forged line", "m" * 1_000_000],
    ids=["newline", "a-megabyte"],
)
async def test_a_hostile_model_name_neither_forges_a_log_line_nor_floods_the_answer(
    model_servers: Any,
    start_picker: StartPicker,
    caplog: pytest.LogCaptureFixture,
    model: str,
) -> None:
    server = await model_servers("model-a")
    _, channel = await start_picker(_config(server.address))
    body = ep.json_body({"model": model, "prompt": "hi"})
    with caplog.at_level(logging.INFO, logger="extproc"):
        _, reply = await _send(channel, "/v1/completions", body, {})
    status, _, error = ep.immediate(reply)
    assert (status, error["error"]["code"]) == (404, "model_not_found")
    assert len(error["error"]["message"]) < 400
    refusals = [r.getMessage() for r in caplog.records if "refused request" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert "\n" not in refusals[0] and len(refusals[0]) < 500
