"""The "ended" response path through the real Envoy: the `extproc.usage` Lua filter reads vLLM's
usage from the response and the gRPC access log delivers it with the picker's request-id.

The access log is pointed at an AccessLogService server inside the test (a cluster of its own,
added to the rendered bootstrap) instead of the picker, so what Envoy sends is read directly.
The Lua filter is the shipped one: it is taken from the rendered bootstrap, never copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import json_format

from extproc.bench import envoy, envoy_config
from extproc.config import BodyMode

from .harness import MODEL_A, MODEL_B, Fleet, Picker, free_port

pytestmark = pytest.mark.e2e

_ALS_CLUSTER = "test_access_log"
_WAIT = 10.0  # seconds for an entry; Envoy sends it 1-4 ms after the response


class _Collector(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's access log entries as they arrive."""

    def __init__(self) -> None:
        self.entries: list[HTTPAccessLogEntry] = []
        self.log_names: list[str] = []
        self._changed = asyncio.Condition()

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            if message.HasField("identifier"):  # only on a stream's first message
                self.log_names.append(message.identifier.log_name)
            async with self._changed:
                self.entries.extend(message.http_logs.log_entry)
                self._changed.notify_all()
        return als_pb2.StreamAccessLogsResponse()

    async def wait_for(self, count: int) -> list[HTTPAccessLogEntry]:
        async with asyncio.timeout(_WAIT), self._changed:
            await self._changed.wait_for(lambda: len(self.entries) >= count)
        return list(self.entries)


@contextlib.asynccontextmanager
async def _access_log_server() -> AsyncIterator[tuple[_Collector, int]]:
    collector = _Collector()
    server = grpc.aio.server()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector, port
    finally:
        await server.stop(grace=None)


def _ingress(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "ingress"]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _log_to(config: dict[str, Any], als_port: int) -> dict[str, Any]:
    """Send the usage log to the test's server: a copy of the picker's cluster at its port."""
    (usage_log,) = [
        x for x in _ingress(config)["access_log"] if x["name"] == "envoy.access_loggers.http_grpc"
    ]
    usage_log["typed_config"]["common_config"]["grpc_service"] = {
        "envoy_grpc": {"cluster_name": _ALS_CLUSTER}
    }
    clusters = config["static_resources"]["clusters"]
    (picker,) = [c for c in clusters if c["name"] == "extproc"]
    cluster = copy.deepcopy(picker)
    cluster["name"] = _ALS_CLUSTER
    address = {"address": "127.0.0.1", "port_value": als_port}
    cluster["load_assignment"] = {
        "cluster_name": _ALS_CLUSTER,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": address}}}]}],
    }
    clusters.append(cluster)
    found: dict[str, Any] = usage_log
    return found


@dataclass(frozen=True, slots=True)
class _Envoy:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@contextlib.asynccontextmanager
async def _envoy(logs: Path, config: dict[str, Any], *, admin_port: int) -> AsyncIterator[_Envoy]:
    port = _ingress_port(config)
    log = logs / f"envoy-{port}-usage.log"
    with log.open("wb") as out:
        process = envoy.start_envoy(
            yaml.safe_dump(config, sort_keys=False),
            admin_port=admin_port,
            concurrency=1,
            stdout=out,
            stderr=out,
        )
    try:
        await process.wait_ready_async(within=20)
        yield _Envoy(port, log)
    finally:
        process.stop()


def _ingress_port(config: dict[str, Any]) -> int:
    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "ingress"]
    port: int = listener["address"]["socket_address"]["port_value"]
    return port


def _extproc_metadata(entry: HTTPAccessLogEntry) -> dict[str, Any]:
    metadata = entry.common_properties.metadata.filter_metadata
    if "extproc" not in metadata:
        return {}
    fields: dict[str, Any] = json_format.MessageToDict(metadata["extproc"])
    return fields


def _tokens(entry: HTTPAccessLogEntry) -> dict[str, Any]:
    return {k: v for k, v in _extproc_metadata(entry).items() if k != "request-id"}


# --- with the picker: usage and request-id in one entry per routed request ---------------------


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
async def test_usage_reaches_the_access_log_with_the_pickers_request_id(
    logs: Path, fleet: Fleet, addresses: list[str], picker: Picker, body_mode: BodyMode
) -> None:
    by_port = {str(b.port): b for b in fleet.backends}
    async with _access_log_server() as (collector, als_port):
        admin_port = free_port()
        config = yaml.safe_load(
            envoy_config.render_bootstrap(
                port=free_port(),
                extproc=picker.address,
                endpoints=addresses,
                admin_port=admin_port,
                listen_host="127.0.0.1",
                body_mode=body_mode,
            )
        )
        _log_to(config, als_port)
        async with (
            _envoy(logs, config, admin_port=admin_port) as envoy,
            aiohttp.ClientSession() as session,
        ):

            async def post(path: str, payload: dict[str, Any]) -> tuple[str, bytes]:
                async with session.post(envoy.url + path, json=payload) as response:
                    body = await response.read()
                    assert response.status == 200, (body, envoy.tail())
                    return response.headers["x-backend"], body

            # Not routed (Envoy's own 404, ext_proc and Lua off): no entry. Sent first, so that
            # an entry for it would arrive before the next one's on the single log stream.
            async with session.get(envoy.url + "/metrics") as response:
                assert response.status == 404
                await response.read()

            # 1. Streamed, with usage asked for: usage in the last SSE event.
            chat = {
                "model": MODEL_B,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            served, body = await post("/v1/chat/completions", chat)
            events = [line for line in body.split(b"\n\n") if line.startswith(b"data: ")]
            assert events[-1] == b"data: [DONE]"
            assert json.loads(events[-2][len(b"data: ") :])["usage"]["completion_tokens"] == 4
            (first,) = await collector.wait_for(1)
            assert collector.log_names == ["extproc"]
            tokens = {"prompt_tokens": 7.0, "completion_tokens": 4.0}
            assert _tokens(first) == tokens, envoy.tail()
            assert first.request.path == "/v1/chat/completions"
            assert by_port[served].model == MODEL_B
            assert first.common_properties.upstream_remote_address.socket_address.port_value == (
                by_port[served].port
            )

            # 2. Not streamed: usage in the JSON body.
            completion = {"model": MODEL_A, "prompt": "Say hello", "max_tokens": 4}
            _, body = await post("/v1/completions", completion)
            assert json.loads(body)["usage"]["completion_tokens"] == 4
            # 3. Streamed without usage: the entry comes, without tokens.
            await post("/v1/completions", {**completion, "stream": True})

            first, second, third = await collector.wait_for(3)
            await asyncio.sleep(0.2)  # nothing else arrives (the 404 was not logged)
            assert len(collector.entries) == 3
            assert _tokens(second) == tokens
            assert _tokens(third) == {}
            ids = [_extproc_metadata(e)["request-id"] for e in (first, second, third)]
            # The picker's names (`<process prefix>-<n>`): one per request, from one process.
            assert len(set(ids)) == 3, ids
            assert len({i.rsplit("-", 1)[0] for i in ids}) == 1, ids
            for entry in (first, second, third):
                # The picker's own pick travels in the same entry.
                assert "x-gateway-destination-endpoint" in json_format.MessageToDict(
                    entry.common_properties.metadata.filter_metadata["envoy.lb"]
                )


# --- the Lua parser against vLLM's usage shapes, however the body is cut into chunks ----------


def _sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events
    )


def _compact(value: dict[str, Any]) -> str:
    """As vLLM writes it (pydantic's model_dump_json: no blanks)."""
    return json.dumps(value, separators=(",", ":"))


def _vllm_usage(prompt: int, completion: int, cached: int | None) -> dict[str, Any]:
    # vLLM's UsageInfo field order: prompt, total, completion, details (null when not asked).
    details = None if cached is None else {"cached_tokens": cached}
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": details,
    }


def _chat_json(usage: dict[str, Any]) -> str:
    message = {
        "role": "assistant",
        "content": 'a "usage": {"completion_tokens": 999}',
        "tool_calls": [],
    }
    return _compact(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": usage,
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def _chat_chunk(text: str, usage: dict[str, Any] | None = None) -> str:
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}
    chunk.update({"model": "m", "choices": [choice], "usage": usage})
    return _compact(chunk)


def _final_chunk(usage: dict[str, Any]) -> str:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return _compact({**chunk, "choices": [], "usage": usage})


# Text a model could generate that looks like usage: in the SSE JSON it is an escaped string.
_DECOY = '"usage": {"prompt_tokens": 1, "completion_tokens": 999}'


def _split_every(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def _split_inside(body: bytes, *marks: bytes) -> list[bytes]:
    """Cut the body in the middle of each mark (a key, a value), in order."""
    parts, start = [], 0
    for mark in marks:
        cut = body.index(mark, start) + len(mark) // 2
        parts.append(body[start:cut])
        start = cut
    return [*parts, body[start:]]


def _cases() -> dict[str, tuple[list[bytes], dict[str, float]]]:
    usage = _vllm_usage(12, 8, None)
    cached = _vllm_usage(40, 9, 32)
    stream = _sse(
        _chat_chunk(""),
        _chat_chunk(_DECOY),
        _chat_chunk(" done"),
        _final_chunk(cached),
        "[DONE]",
    )
    decoy_only = _sse(_chat_chunk(_DECOY), _chat_chunk(" x"), "[DONE]")
    continuous = _sse(
        _chat_chunk("a", _vllm_usage(5, 1, None)),
        _chat_chunk("b", _vllm_usage(5, 2, None)),
        _final_chunk(_vllm_usage(5, 2, None)),
        "[DONE]",
    )
    openai_order = json.dumps(
        {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 21, "total_tokens": 24}}
    ).encode()
    embedding = _compact(
        {
            "object": "list",
            "data": [],
            "model": "m",
            "usage": {"prompt_tokens": 6, "total_tokens": 6},
        }
    ).encode()
    return {
        "json-one-chunk": (
            [_chat_json(usage).encode()],
            {"prompt_tokens": 12, "completion_tokens": 8},
        ),
        "json-cached-7-byte-chunks": (
            _split_every(_chat_json(cached).encode(), 7),
            {"prompt_tokens": 40, "completion_tokens": 9, "cached_tokens": 32},
        ),
        "sse-usage-split-in-key-and-object": (
            # '"usa' | 'ge":{"prompt_tokens":40,...,"comple' | 'tion_tokens":9,...'
            _split_inside(stream, b'"usage":{', b'"completion_tokens"', b'"cached_tokens":32'),
            {"prompt_tokens": 40, "completion_tokens": 9, "cached_tokens": 32},
        ),
        "sse-usage-split-after-colon": (
            _split_inside(stream, b'"usage":{"prompt'),
            {"prompt_tokens": 40, "completion_tokens": 9, "cached_tokens": 32},
        ),
        "sse-one-chunk": (
            [stream],
            {"prompt_tokens": 40, "completion_tokens": 9, "cached_tokens": 32},
        ),
        "sse-no-usage-decoy-text": (_split_every(decoy_only, 5), {}),
        "sse-continuous-usage-last-wins": (
            _split_every(continuous, 33),
            {"prompt_tokens": 5, "completion_tokens": 2},
        ),
        "json-openai-order-blanks": (
            _split_inside(openai_order, b'"prompt_tokens"'),
            {"prompt_tokens": 21, "completion_tokens": 3},
        ),
        "embedding-prompt-only": ([embedding], {"prompt_tokens": 6}),
    }


CASES = _cases()


async def _shapes_backend(cases: dict[str, tuple[list[bytes], dict[str, float]]]) -> web.AppRunner:
    async def handle(request: web.Request) -> web.StreamResponse:
        chunks, _ = cases[request.query["case"]]
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.005)  # one read (and one Lua chunk) per write in Envoy
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _without_picker(config: dict[str, Any], backend_port: int) -> None:
    """The shipped filters minus ext_proc, the pool being one shapes backend; every request is
    logged (there is no picker to name it)."""
    hcm = _ingress(config)
    hcm["http_filters"] = [
        f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
    ]
    (pool,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "pool"]
    address = {"address": "127.0.0.1", "port_value": backend_port}
    pool["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": address}}}]}
    ]


async def test_lua_reads_vllm_usage_however_it_is_chunked(logs: Path) -> None:
    runner = await _shapes_backend(CASES)
    try:
        backend_port = runner.addresses[0][1]
        async with _access_log_server() as (collector, als_port):
            admin_port = free_port()
            config = yaml.safe_load(
                envoy_config.render_bootstrap(
                    port=free_port(),
                    extproc=f"127.0.0.1:{free_port()}",  # not used: ext_proc is removed
                    endpoints=[f"127.0.0.1:{backend_port}"],
                    admin_port=admin_port,
                    listen_host="127.0.0.1",
                )
            )
            usage_log = _log_to(config, als_port)
            usage_log.pop("filter")
            _without_picker(config, backend_port)
            async with (
                _envoy(logs, config, admin_port=admin_port) as envoy,
                aiohttp.ClientSession() as session,
            ):
                got: dict[str, dict[str, Any]] = {}
                for n, (case, (chunks, _)) in enumerate(CASES.items(), start=1):
                    url = f"{envoy.url}/v1/completions?case={case}"
                    async with session.post(url, data=b"{}") as response:
                        assert response.status == 200, envoy.tail()
                        # The filter only reads: the client gets the body as sent.
                        assert await response.read() == b"".join(chunks)
                    entries = await collector.wait_for(n)
                    got[case] = _extproc_metadata(entries[-1])
                    assert entries[-1].request.path.endswith(case)
    finally:
        await runner.cleanup()
    assert got == {case: expected for case, (_, expected) in CASES.items()}
