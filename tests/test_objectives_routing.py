"""Objectives, fairness ids and model rewrites on the request path: the mapping itself, then the
picker over real gRPC with Envoy's message sequences (the objectives view set as the watch
would set it; the watch is tested in tests/state/test_objectives.py)."""

from __future__ import annotations

import json
import random
from collections import Counter
from types import MappingProxyType
from typing import Any

import pytest

from extproc.config import Config, load_config
from extproc.request.objectives import (
    ObjectiveResolver,
    Resolved,
    fairness_id,
    pick_target,
)
from extproc.request.openai import ParsedRequest, parse_request
from extproc.state.objectives import Objectives, RewriteRule, RewriteTarget
from tests import extproc_client as ep
from tests.conftest import StartPicker

PRIORITIES = MappingProxyType({"critical": 10, "batch": -1})
PROMPT = {"model": "model-a", "prompt": "Hello there, how are you today?", "max_tokens": 5}


def _request(model: str = "model-a") -> ParsedRequest:
    parsed = parse_request("/v1/completions", json.dumps({**PROMPT, "model": model}).encode())
    assert isinstance(parsed, ParsedRequest)
    return parsed


def _rewriting(rule: RewriteRule | None = None) -> Objectives:
    exact = MappingProxyType({"model-a": rule} if rule else {})
    return Objectives(PRIORITIES, exact)


@pytest.mark.parametrize(
    ("headers", "ceiling", "priority"),
    [
        ({}, None, 0),
        ({"x-llm-d-inference-objective": "critical"}, None, 10),
        ({"x-gateway-inference-objective": "batch"}, None, -1),
        # The current name wins over the older one, as upstream reads them.
        (
            {"x-llm-d-inference-objective": "batch", "x-gateway-inference-objective": "critical"},
            None,
            -1,
        ),
        ({"x-llm-d-inference-objective": "nobody-has-this"}, None, 0),
        ({"x-llm-d-inference-objective": "critical" * 40}, None, 0),
        # A tenant's priority is the ceiling: an objective lowers it, never raises it.
        ({"x-llm-d-inference-objective": "critical"}, 2, 2),
        ({"x-llm-d-inference-objective": "batch"}, 2, -1),
        ({}, 2, 2),
        ({"x-llm-d-inference-objective": "unknown"}, -3, -3),
    ],
    ids=[
        "none",
        "objective",
        "older-header",
        "newer-header-first",
        "unknown",
        "too-long",
        "ceiling-caps",
        "ceiling-lowered",
        "tenant-only",
        "unknown-with-tenant",
    ],
)
def test_priority_from_the_objective(
    headers: dict[str, str], ceiling: int | None, priority: int
) -> None:
    resolver = ObjectiveResolver(_rewriting, rng=random.Random(1))
    resolved = resolver.resolve(headers, _request(), ceiling=ceiling)
    assert resolved.priority == priority
    assert resolved.body is None and resolved.request.model == "model-a"


def test_fairness_id_headers() -> None:
    assert fairness_id({"x-gateway-inference-fairness-id": " team-a "}) == "team-a"
    assert (
        fairness_id({"x-llm-d-inference-fairness-id": "x", "x-gateway-inference-fairness-id": "y"})
        == "x"
    )
    assert fairness_id({"x-llm-d-inference-fairness-id": "f" * 129}) == ""
    assert fairness_id({}) == ""


def test_a_rewrite_replaces_the_model_in_the_body_and_the_request() -> None:
    rule = RewriteRule("canary", (RewriteTarget("model-b"),), frozenset({"model-a"}))
    resolver = ObjectiveResolver(lambda: _rewriting(rule), rng=random.Random(1))
    resolved = resolver.resolve({}, _request())
    assert resolved.request.model == "model-b" and resolved.rewritten_from == "model-a"
    assert resolved.body is not None
    assert json.loads(resolved.body) == {**PROMPT, "model": "model-b"}
    # Another model, or none (a body-less request), is left alone.
    assert resolver.resolve({}, _request("model-c")) == Resolved(_request("model-c"), 0)
    bodiless = ParsedRequest(api=_request().api, model=None)
    assert resolver.resolve({}, bodiless).request is bodiless


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ((RewriteTarget("a", 3), RewriteTarget("b", 1)), {"a": 0.75, "b": 0.25}),
        ((RewriteTarget("a"), RewriteTarget("b")), {"a": 0.5, "b": 0.5}),
        # As upstream: with some weighted, the unweighted ones are never drawn.
        ((RewriteTarget("a", 1), RewriteTarget("b")), {"a": 1.0}),
    ],
    ids=["weighted", "unweighted", "mixed"],
)
def test_targets_are_drawn_by_weight(
    targets: tuple[RewriteTarget, ...], expected: dict[str, float]
) -> None:
    rng = random.Random(7)
    draws = Counter(pick_target(targets, rng) for _ in range(4000))
    assert set(draws) == set(expected)
    for model, share in expected.items():
        assert abs(draws[model] / 4000 - share) < 0.03, draws


# --- through the picker ------------------------------------------------------------------------


def _config(addresses: list[str], **more: Any) -> Config:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
        "discovery": {"models_refresh_seconds": 0.2},
        "collector": {"enabled": False},
        "routing": {"strategy": "least-request", "fallbacks": 0},
        "endpoints": [{"address": a} for a in addresses],
        **more,
    }
    return load_config(None, raw)


async def _send(channel: Any, payload: dict[str, Any], headers: dict[str, str]) -> Any:
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions", headers=headers))
    await stream.send(ep.request_body(ep.json_body(payload), end_of_stream=True))
    return stream, await stream.receive()


async def test_a_rewrite_routes_by_the_new_model_and_sends_it_upstream(
    model_servers: Any, start_picker: StartPicker
) -> None:
    a, b = await model_servers("model-a"), await model_servers("model-b")
    picker, channel = await start_picker(_config([a.address, b.address]))
    rule = RewriteRule("canary", (RewriteTarget("model-b"),), frozenset({"model-a"}))
    picker.objectives.set(_rewriting(rule))
    stream, reply = await _send(channel, PROMPT, {})
    assert ep.destination(reply) == b.address
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
    assert json.loads(body) == {**PROMPT, "model": "model-b"}
    assert set_headers["content-length"] == str(len(body))
    await stream.close()


async def test_a_sheddable_objective_is_refused_under_saturation(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(
        _config([server.address], scheduling={"saturation_requests": 1})
    )
    picker.objectives.set(_rewriting())
    first, reply = await _send(channel, PROMPT, {})
    assert ep.destination(reply) == server.address
    # Saturated now: the sheddable objective is refused as upstream refuses it (429)...
    _, reply = await _send(channel, PROMPT, {"x-gateway-inference-objective": "batch"})
    status, _, error = ep.immediate(reply)
    assert (status, error["error"]["code"]) == (429, "request_shed")
    assert set(error["error"]) == {"message", "type", "param", "code"}
    # ...while a request of priority 0 (no objective, or an unknown one) still goes.
    _, reply = await _send(channel, PROMPT, {"x-llm-d-inference-objective": "unknown"})
    assert ep.destination(reply) == server.address
    await first.close()


async def test_with_tenancy_an_objective_lowers_the_tenants_priority_to_sheddable(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    tenancy = {
        "enabled": True,
        "identity": ["default"],
        "default_tenant": "acme",
        "tenants": {"acme": {"priority": 0}},
        "queue_timeout_seconds": 0.5,
    }
    config = _config([server.address], scheduling={"saturation_requests": 1}, tenancy=tenancy)
    picker, channel = await start_picker(config)
    picker.objectives.set(_rewriting())
    first, reply = await _send(channel, PROMPT, {})
    assert ep.destination(reply) == server.address
    # The tenant's own requests would queue (and time out); its batch objective is shed at once.
    _, reply = await _send(channel, PROMPT, {"x-llm-d-inference-objective": "batch"})
    status, _, error = ep.immediate(reply)
    assert (status, error["error"]["code"]) == (429, "request_shed")
    await first.close()
