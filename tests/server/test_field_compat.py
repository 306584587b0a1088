"""A drop-in for the field's endpoint picker: its metric names, its metadata namespace and key,
and its per-endpoint scores, over real gRPC and a real /metrics scrape.

The pool comes from Kubernetes discovery against the API emulator on loopback (one pod on
127.0.0.1 whose InferencePool lists two target ports, each a small model server with its own
load, plus a pod that is not ready); requests go through the ext_proc stream as Envoy sends
them, with the response and its usage fed back inline."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from extproc.cli import defaults_from_environment
from extproc.config import Config, load_config
from extproc.server import reply
from extproc.server.app import PickerServer
from extproc.server.cli import add_arguments, config_from_args
from tests import extproc_client as ep
from tests.conftest import StartPicker
from tests.fakes import ModelServer
from tests.state.kubeapi import NAMESPACE, Cluster, eventually, running_cluster

POOL = "llama"
LABELS = {"app": "llama"}
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@dataclass
class LoadedServer(ModelServer):
    """A model server whose /metrics shows the load it is given."""

    waiting: int = 0
    running: int = 0
    kv: float = 0.0

    async def _metrics(self, request: web.Request) -> web.Response:
        labels = f'engine="0",model_name="{self.model}"'
        text = (
            f"vllm:num_requests_running{{{labels}}} {self.running}.0\n"
            f"vllm:num_requests_waiting{{{labels}}} {self.waiting}.0\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} {self.kv}\n"
        )
        return web.Response(text=text, content_type="text/plain")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for cluster in running_cluster(tmp_path):
        yield cluster


@pytest.fixture
async def loaded_servers() -> AsyncIterator[list[LoadedServer]]:
    servers = [
        LoadedServer("model-a", waiting=1, running=2, kv=0.2),
        LoadedServer("model-a", waiting=3, running=4, kv=0.6),
    ]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop()


def _config(cluster: Cluster | None = None, **routing: Any) -> Config:
    values: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
        "routing": {"strategy": "least-request", "fallbacks": 1, **routing},
        "collector": {"interval_seconds": 0.02},
    }
    if cluster is None:
        values["endpoints"] = [{"address": "127.0.0.1:9"}]  # never dialled by these tests
    else:
        values["discovery"] = {
            "models_refresh_seconds": 0.05,
            "kubernetes": {
                "pool_name": POOL,
                "namespace": NAMESPACE,
                "kubeconfig": str(cluster.kubeconfig),
                "backoff_initial_seconds": 0.01,
            },
        }
    return load_config(None, values)


async def _exchange(
    channel: grpc.aio.Channel, payload: dict[str, Any] | bytes, usage: dict[str, int] | None
) -> ProcessingResponse:
    """One request as Envoy sends it (full duplex), and, when routed, its JSON response with
    `usage` fed back inline. Returns the picker's first reply."""
    body = payload if isinstance(payload, bytes) else ep.json_body(payload)
    stream = ep.Stream(channel)
    await stream.send(ep.request_headers("/v1/completions"))
    await stream.send(ep.request_body(body, end_of_stream=True))
    first = await stream.receive()
    if first.WhichOneof("response") == "immediate_response":
        await stream.close()
        return first
    while not (
        await stream.receive()
    ).request_body.response.body_mutation.streamed_response.end_of_stream:
        pass
    await stream.send(ep.response_headers())
    await stream.receive()
    document = {"id": "cmpl-1", "choices": [], **({"usage": usage} if usage else {})}
    await stream.send(ep.response_body(json.dumps(document).encode(), end_of_stream=True))
    await stream.receive()
    await stream.close()
    return first


async def _scrape(picker: PickerServer) -> dict[str, Any]:
    """The picker's /metrics over HTTP, as Prometheus reads it: families by name."""
    url = f"http://127.0.0.1:{picker.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(family: Any, suffix: str = "") -> list[Sample]:
    return [s for s in family.samples if s.name == family.name + suffix]


def _value(family: Any, suffix: str = "", **labels: str) -> float:
    matching = [s.value for s in _samples(family, suffix) if s.labels == labels]
    assert len(matching) == 1, (family.name, suffix, labels, family.samples)
    return float(matching[0])


def _buckets(family: Any, **labels: str) -> list[float]:
    return [
        float(s.labels["le"])
        for s in _samples(family, "_bucket")
        if {k: v for k, v in s.labels.items() if k != "le"} == labels and s.labels["le"] != "+Inf"
    ]


# The llm-d router's buckets (llm-d/llm-d-router pkg/epp/metrics/metrics.go), as its dashboards'
# histogram_quantile queries expect them.
LATENCY_BUCKETS = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20,
    30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
]  # fmt: skip
OUTPUT_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
NTPOT_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


async def test_the_fields_metrics_after_a_few_requests(
    cluster: Cluster, loaded_servers: list[LoadedServer], start_picker: StartPicker
) -> None:
    # A third target port where nothing answers: an endpoint of the pool, never ready.
    ports = [*(s.port for s in loaded_servers), _closed_port()]
    await cluster.add_pool(POOL, LABELS, ports)
    await cluster.add_pod("llama-0", "127.0.0.1", labels=LABELS)
    await cluster.add_pod("llama-1", "127.0.0.2", labels=LABELS, ready=False)
    picker, channel = await start_picker(_config(cluster))

    def fresh() -> bool:
        endpoints = picker.store.current.endpoints
        return len(endpoints) == 3 and sum(e.ready and e.stats is not None for e in endpoints) == 2

    await eventually(fresh)
    prompts = [
        {"model": "model-a", "prompt": "Hello there", "max_tokens": 3},
        {"model": "model-a", "prompt": "How are you today?", "max_tokens": 3},
        {"model": "model-a", "prompt": "x" * 300, "max_tokens": 3},
    ]
    for payload in prompts:
        assert ep.destination(await _exchange(channel, payload, USAGE))
    unknown = await _exchange(channel, {"model": "nope", "prompt": "hi"}, None)
    assert ep.immediate(unknown)[0] == 404
    broken = await _exchange(channel, b"{not json", None)
    assert ep.immediate(broken)[0] == 400

    families = await _scrape(picker)
    model = {"model_name": "model-a", "target_model_name": "model-a"}

    # Per pool: the ready endpoints (not the dead port's, nor the not-ready pod's), their
    # average load.
    for name in (
        "inference_pool_ready_pods",
        "inference_pool_average_kv_cache_utilization",
        "inference_pool_average_queue_size",
        "inference_pool_average_running_requests",
    ):
        assert families[name].type == "gauge", name
    assert _value(families["inference_pool_ready_pods"], name=POOL) == 2
    assert _value(families["inference_pool_average_kv_cache_utilization"], name=POOL) == (
        pytest.approx(0.4)
    )
    assert _value(families["inference_pool_average_queue_size"], name=POOL) == 2.0
    assert _value(families["inference_pool_average_running_requests"], name=POOL) == 3.0

    # Per request.
    requests = families["inference_objective_request"]
    assert requests.type == "counter"
    assert _value(requests, "_total", **model, priority="0") == 3
    errors = families["inference_objective_request_error"]
    assert errors.type == "counter"
    assert (
        _value(errors, "_total", model_name="nope", target_model_name="nope", error_code="NotFound")
        == 1
    )
    assert (
        _value(errors, "_total", model_name="", target_model_name="", error_code="BadRequest") == 1
    )
    running = families["inference_objective_running_requests"]
    assert running.type == "gauge"
    assert _value(running, model_name="model-a") == 0  # all three have ended

    sizes = families["inference_objective_request_sizes"]
    assert sizes.type == "histogram"
    assert _value(sizes, "_count", **model) == 3
    assert _value(sizes, "_sum", **model) == sum(len(ep.json_body(p)) for p in prompts)
    assert _buckets(sizes, **model)[:3] == [64, 128, 256]

    inputs = families["inference_objective_input_tokens"]
    assert (_value(inputs, "_count", **model), _value(inputs, "_sum", **model)) == (3, 21)
    outputs = families["inference_objective_output_tokens"]
    assert (_value(outputs, "_count", **model), _value(outputs, "_sum", **model)) == (3, 9)
    assert _buckets(outputs, **model) == OUTPUT_TOKEN_BUCKETS

    duration = families["inference_objective_request_duration_seconds"]
    assert duration.type == "histogram"
    assert _value(duration, "_count", **model) == 3
    assert _buckets(duration, **model) == LATENCY_BUCKETS
    ntpot = families["inference_objective_normalized_time_per_output_token_seconds"]
    assert _value(ntpot, "_count", **model) == 3
    # Each request's time over its 3 output tokens.
    assert _value(ntpot, "_sum", **model) == pytest.approx(_value(duration, "_sum", **model) / 3)
    assert _buckets(ntpot, **model) == NTPOT_BUCKETS

    # The picker's own series are still there beside them.
    assert "extproc_requests" in families


async def test_no_pool_series_without_a_named_pool(start_picker: StartPicker) -> None:
    picker, _ = await start_picker(_config())
    families = await _scrape(picker)
    assert not [name for name in families if name.startswith("inference_pool_")]
    assert "inference_objective_request" in families


def _metadata(response: ProcessingResponse) -> dict[str, Any]:
    return {
        namespace: dict(value.struct_value.fields)
        for namespace, value in response.dynamic_metadata.fields.items()
    }


def _set_headers(response: ProcessingResponse) -> dict[str, str]:
    common = response.request_headers.response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


@pytest.mark.parametrize(
    ("destination", "namespace", "key"),
    [
        (reply.PROTOCOL, "envoy.lb", "x-gateway-destination-endpoint"),
        (reply.Destination(namespace="gateway.lb"), "gateway.lb", "x-gateway-destination-endpoint"),
        (reply.Destination(key="x-pick"), "envoy.lb", "x-pick"),
    ],
    ids=["protocol", "namespace", "key"],
)
def test_the_decision_goes_where_configured(
    destination: reply.Destination, namespace: str, key: str
) -> None:
    response = reply.route_in_headers(
        "10.0.0.1:8000,10.0.0.2:8000",
        request_id="r-1",
        destination=destination,
        scores={"10.0.0.1:8000": 0.9, "10.0.0.2:8000": 0.5},
    )
    metadata = _metadata(response)
    assert metadata[namespace][key].string_value == "10.0.0.1:8000,10.0.0.2:8000"
    assert reply.ENDPOINT_SCORES not in metadata[namespace]  # scores are off by default
    assert set(metadata) == {namespace, "extproc"}
    assert _set_headers(response)[key] == "10.0.0.1:8000,10.0.0.2:8000"


def test_scores_ride_in_the_fields_key_when_asked() -> None:
    scores = {"10.0.0.1:8000": 0.9, "10.0.0.2:8000": 0.5, "10.0.0.3:8000": 0.25}
    response = reply.route_in_body(
        "10.0.0.1:8000",
        request_id="r-1",
        destination=reply.Destination(emit_scores=True),
        scores=scores,
    )
    lb = _metadata(response)["envoy.lb"]
    emitted = {k: v.number_value for k, v in lb[reply.ENDPOINT_SCORES].struct_value.fields.items()}
    assert emitted == scores
    assert reply.ENDPOINT_SCORES == "x-gateway-destination-endpoint-scores"


async def test_a_configured_namespace_and_scores_reach_envoy(
    loaded_servers: list[LoadedServer], start_picker: StartPicker
) -> None:
    addresses = [s.address for s in loaded_servers]
    config = load_config(
        None,
        {
            "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
            "routing": {
                "strategy": "least-request",
                "destination_metadata_namespace": "gateway.lb",
                "emit_endpoint_scores": True,
            },
            "endpoints": [{"address": a} for a in addresses],
        },
    )
    picker, channel = await start_picker(config)
    await eventually(lambda: sum(e.ready for e in picker.store.current.endpoints) == 2)
    first = await _exchange(channel, {"model": "model-a", "prompt": "hi", "max_tokens": 1}, USAGE)
    metadata = _metadata(first)
    assert "envoy.lb" not in metadata
    lb = metadata["gateway.lb"]
    picked = lb["x-gateway-destination-endpoint"].string_value.split(",")
    assert picked[0] in addresses
    scores = {k: v.number_value for k, v in lb[reply.ENDPOINT_SCORES].struct_value.fields.items()}
    assert set(scores) == set(addresses)  # every scored endpoint, as the field's picker
    assert scores[picked[0]] == max(scores.values())


@pytest.mark.parametrize("from_env", [False, True], ids=["flags", "environment"])
def test_the_fields_flags_and_their_environment_forms(from_env: bool) -> None:
    values = {
        "destination-endpoint-hint-metadata-namespace": "gateway.lb",
        "destination-endpoint-hint-key": "x-pick",
    }
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--endpoints", "127.0.0.1:8000"]
    if from_env:
        env = {f"EXTPROC_{k.replace('-', '_').upper()}": v for k, v in values.items()}
        env["EXTPROC_EMIT_ENDPOINT_SCORES"] = "true"
        defaults_from_environment(parser, env)
    else:
        argv += [*(f"--{k}={v}" for k, v in values.items()), "--emit-endpoint-scores"]
    config, _ = config_from_args(parser.parse_args(argv))
    assert config.routing.destination_metadata_namespace == "gateway.lb"
    assert config.routing.destination_key == "x-pick"
    assert config.routing.emit_endpoint_scores is True


def test_defaults_are_the_protocols() -> None:
    routing = load_config(None, {}).routing
    assert (routing.destination_metadata_namespace, routing.destination_key) == (
        reply.LB_NAMESPACE,
        reply.DESTINATION,
    )
    assert routing.emit_endpoint_scores is False
