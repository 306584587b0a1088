"""The `ended` response path, over real gRPC with Envoy's message sequences: no response chunk
reaches the picker; the end of the ext_proc stream releases the request, and the usage comes
from Envoy's access log (AccessLogService on the picker's port), before or after that end.
Also: a client that hangs up mid-stream, or before the answer, holds nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import Metadata
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from google.protobuf.struct_pb2 import Struct

from extproc.config import Config, load_config
from extproc.server.app import PickerServer
from extproc.tenancy.limits import Granted
from extproc.tenancy.policy import key_digest
from tests import extproc_client as ep
from tests.conftest import StartPicker

KEY = "sk-solo-0123456789abcdef"
PROMPT = {"model": "model-a", "prompt": "Hello there, how are you today?", "max_tokens": 5}


def _config(address: str) -> Config:
    solo = {"api_keys": [key_digest(KEY)], "max_concurrency": 1, "tokens_per_minute": 10_000}
    return load_config(
        None,
        {
            "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
            "collector": {"enabled": False},
            "routing": {"strategy": "least-request", "fallbacks": 0},
            "endpoints": [{"address": address}],
            "tenancy": {"enabled": True, "tenants": {"solo": solo}},
        },
    )


# What the bundled configs' ext_proc grpc_service sends: the stream ends when the response does.
ENDED = (("x-extproc-response-path", "ended"),)


async def _route(
    channel: grpc.aio.Channel, *, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[ep.Stream, str]:
    """A request as Envoy sends it with the `ended` path: the response body mode is NONE."""
    stream = ep.Stream(channel, metadata=metadata)
    await stream.send(
        ep.request_headers(
            "/v1/completions",
            headers={"authorization": f"Bearer {KEY}"},
            response_mode=ep.NONE,
        )
    )
    await stream.send(ep.request_body(ep.json_body(PROMPT), end_of_stream=True))
    reply = await stream.receive()
    assert ep.destination(reply), reply
    async for _ in _rest_of_request(stream):
        pass
    return stream, ep.request_id(reply)


async def _rest_of_request(stream: ep.Stream) -> Any:
    # In FULL_DUPLEX_STREAMED the held body comes back after the header reply.
    while True:
        reply = await stream.receive()
        yield reply
        chunk = reply.request_body.response.body_mutation.streamed_response
        if chunk.end_of_stream:
            return


async def _log(
    channel: grpc.aio.Channel, request_id: str, *, upstream: str | None = None, **usage: float
) -> None:
    """Envoy's access log entry for `request_id`, with what its Lua filter found and the
    endpoint that served (`ip:port`)."""
    fields = Struct()
    fields.update({"request-id": request_id, **usage})
    entry = HTTPAccessLogEntry()
    entry.common_properties.metadata.CopyFrom(Metadata(filter_metadata={"extproc": fields}))
    if upstream is not None:
        address = entry.common_properties.upstream_remote_address.socket_address
        address.address, port = upstream.rsplit(":", 1)
        address.port_value = int(port)
    message = StreamAccessLogsMessage()
    message.http_logs.log_entry.append(entry)
    stub = als_pb2_grpc.AccessLogServiceStub(channel)
    await stub.StreamAccessLogs(iter([message]))


def _value(picker: PickerServer, name: str, **labels: str) -> float:
    return picker.metrics.registry.get_sample_value(name, labels) or 0.0


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _slot_free(picker: PickerServer) -> bool:
    tenancy = picker.tenancy
    assert tenancy is not None
    verdict = await tenancy.limiter.acquire(tenancy.directory.tenants["solo"], 0)
    if isinstance(verdict, Granted):
        tenancy.limiter.release(verdict.lease, 0)
        return True
    return False


@pytest.mark.parametrize("log_first", [False, True], ids=["end-then-log", "log-then-end"])
async def test_the_stream_end_releases_and_the_access_log_settles(
    model_servers: Any, start_picker: StartPicker, log_first: bool
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    stream, request_id = await _route(channel)
    assert picker.inflight.total() == 1
    await stream.send(ep.response_headers(content_type="text/event-stream"))
    await stream.receive()
    if log_first:
        await _log(channel, request_id, completion_tokens=42, prompt_tokens=9, cached_tokens=3)
        assert picker.inflight.total() == 1  # the response has not ended yet
    await stream.close()  # Envoy ends the stream when the response has ended
    await _until(lambda: picker.inflight.total() == 0, "the in-flight count released")
    assert await _slot_free(picker)
    if not log_first:
        await _log(channel, request_id, completion_tokens=42, prompt_tokens=9, cached_tokens=3)
    await _until(
        lambda: (
            _value(picker, "extproc_tenant_tokens_total", tenant="solo", kind="completion") == 42
        ),
        "the completion tokens counted for the tenant",
    )
    assert _value(picker, "extproc_usage_tokens_total", kind="cached") == 3
    assert _value(picker, "extproc_stream_errors_total", reason="usage_never_logged") == 0


async def test_a_client_that_hangs_up_mid_stream_holds_nothing(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    stream, request_id = await _route(channel)
    await stream.send(ep.response_headers(content_type="text/event-stream"))
    await stream.receive()
    assert not await _slot_free(picker)  # the one slot is this request's
    stream.cancel()  # the client went away: Envoy cancels the ext_proc stream
    await _until(lambda: picker.inflight.total() == 0, "the in-flight count released")
    assert await _slot_free(picker)
    await _log(channel, request_id)  # the entry of a cut-off stream has no usage
    assert _value(picker, "extproc_tenant_tokens_total", tenant="solo", kind="completion") == 0


async def test_a_client_that_leaves_before_the_answer_is_released_by_the_access_log(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    stream, request_id = await _route(channel)
    stream.cancel()  # no response headers ever came on this stream
    await asyncio.sleep(0.1)
    # Without a response the picker cannot tell an observer path from a hang-up: it waits...
    assert picker.inflight.total() == 1
    await _log(channel, request_id)  # ...until Envoy's access log says the request is over
    await _until(lambda: picker.inflight.total() == 0, "the in-flight count released")
    assert await _slot_free(picker)


@pytest.mark.parametrize("log_first", [False, True], ids=["end-then-log", "log-then-end"])
async def test_the_lean_shape_releases_at_the_streams_end_and_reads_the_server_from_the_log(
    model_servers: Any, start_picker: StartPicker, log_first: bool
) -> None:
    """The bundled configs skip the response headers and say so in gRPC metadata: the stream's
    end alone releases the request, and the access log names the endpoint that served."""
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    stream, request_id = await _route(channel, metadata=ENDED)
    assert picker.inflight.total() == 1
    retried_to = "127.0.0.9:8000"  # Envoy walked the fallback list
    if log_first:
        await _log(channel, request_id, upstream=retried_to, completion_tokens=7)
    await stream.close()  # no response headers came: the response has ended
    await _until(lambda: picker.inflight.total() == 0, "the in-flight count released")
    assert await _slot_free(picker)
    if not log_first:
        await _log(channel, request_id, upstream=retried_to, completion_tokens=7)
    await _until(
        lambda: _value(picker, "extproc_served_requests_total", endpoint=retried_to) == 1,
        "the serving endpoint counted from the access log",
    )
    assert _value(picker, "extproc_fallback_served_requests_total") == 1
    assert _value(picker, "extproc_served_requests_total", endpoint=server.address) == 0
    assert _value(picker, "extproc_tenant_tokens_total", tenant="solo", kind="completion") == 7


async def test_the_lean_shape_counts_the_first_pick_when_the_log_never_names_a_server(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    stream, request_id = await _route(channel, metadata=ENDED)
    stream.cancel()  # the client hung up before Envoy picked an upstream
    await _until(lambda: picker.inflight.total() == 0, "the in-flight count released at once")
    await _log(channel, request_id)
    await _until(
        lambda: _value(picker, "extproc_served_requests_total", endpoint=server.address) == 1,
        "the first pick counted as the server",
    )
    assert _value(picker, "extproc_fallback_served_requests_total") == 0
