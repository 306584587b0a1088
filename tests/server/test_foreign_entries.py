"""Access log entries with several picker replicas behind one Envoy (issue 19): the routing reply
names the tenant, `read_entry` reads it back, and an entry that reaches a replica which did not
route the request is settled there (`Pipeline.settle_foreign`): the token metrics, the cost
model and the tenant's token limit see it, once. Two real in-process pickers over real gRPC."""

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
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from google.protobuf.struct_pb2 import Struct

from extproc.config import Config, EndpointConfig, load_config
from extproc.request.usage import Usage
from extproc.server.access_log import LogEntry, read_entry
from extproc.server.app import PickerServer
from extproc.tenancy.limits import Granted, Limited
from extproc.tenancy.policy import key_digest
from tests import extproc_client as ep
from tests.conftest import StartPicker

KEY = "sk-solo-0123456789abcdef"
PROMPT = {"model": "model-a", "prompt": "Hello there, how are you today?", "max_tokens": 5}
TOKENS_PER_MINUTE = 1000


def _config(address: str, *, tenancy: bool = True) -> Config:
    solo = {"api_keys": [key_digest(KEY)], "tokens_per_minute": TOKENS_PER_MINUTE}
    return load_config(
        None,
        {
            "server": {"host": "127.0.0.1", "grpc_port": 0, "health_port": 0, "metrics_port": 0},
            "collector": {"enabled": False},
            "routing": {"strategy": "least-request", "fallbacks": 0},
            "endpoints": [{"address": address}],
            "tenancy": {"enabled": tenancy, "tenants": {"solo": solo}},
        },
    )


def _entry(**fields: Any) -> HTTPAccessLogEntry:
    values = Struct()
    values.update(fields)
    entry = HTTPAccessLogEntry()
    entry.common_properties.metadata.CopyFrom(Metadata(filter_metadata={"extproc": values}))
    return entry


async def _log(channel: grpc.aio.Channel, **fields: Any) -> None:
    """One access log entry, as Envoy's http_grpc logger sends it."""
    message = StreamAccessLogsMessage()
    message.http_logs.log_entry.append(_entry(**fields))
    await als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter([message]))


async def _route_and_end(channel: grpc.aio.Channel) -> ProcessingResponse:
    """A whole request on the `ended` path: routed, answered, the stream ended by Envoy."""
    stream = ep.Stream(channel)
    await stream.send(
        ep.request_headers(
            "/v1/completions",
            headers={"authorization": f"Bearer {KEY}"},
            response_mode=ep.NONE,
        )
    )
    await stream.send(ep.request_body(ep.json_body(PROMPT), end_of_stream=True))
    routing = await stream.receive()
    assert ep.destination(routing), routing
    while not (
        await stream.receive()
    ).request_body.response.body_mutation.streamed_response.end_of_stream:
        pass
    await stream.send(ep.response_headers(content_type="application/json"))
    await stream.receive()
    await stream.close()
    return routing


def _own_metadata(reply: ProcessingResponse) -> dict[str, str]:
    fields = reply.dynamic_metadata.fields["extproc"].struct_value.fields
    return {key: value.string_value for key, value in fields.items()}


def _value(picker: PickerServer, name: str, **labels: str) -> float:
    return picker.metrics.registry.get_sample_value(name, labels) or 0.0


def _completion(picker: PickerServer) -> tuple[float, float]:
    """(all completion tokens, the tenant's) this replica counted."""
    return (
        _value(picker, "extproc_usage_tokens_total", kind="completion"),
        _value(picker, "extproc_tenant_tokens_total", tenant="solo", kind="completion"),
    )


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _tokens_left(picker: PickerServer) -> bool:
    """Whether the tenant's token bucket on this replica still grants a request."""
    tenancy = picker.tenancy
    assert tenancy is not None
    verdict = await tenancy.limiter.acquire(tenancy.directory.tenants["solo"], 0)
    if isinstance(verdict, Granted):
        tenancy.limiter.release(verdict.lease, 0)
        return True
    assert isinstance(verdict, Limited) and verdict.limit == "tokens_per_minute"
    return False


# --- read_entry ---------------------------------------------------------------------------------


def test_read_entry_returns_the_tenant_the_routing_reply_named() -> None:
    entry = _entry(**{"request-id": "ab-1", "tenant": "solo", "completion_tokens": 7.0})
    assert read_entry(entry) == LogEntry("ab-1", Usage(0, 7, 0), "solo")


def test_read_entry_without_a_tenant_or_usage() -> None:
    usage = {"prompt_tokens": 3.0, "completion_tokens": 7.0, "cached_tokens": 1.0}
    assert read_entry(_entry(**{"request-id": "ab-1"}, **usage)) == LogEntry(
        "ab-1", Usage(3, 7, 1), None
    )
    # A hang-up: no usage, but still the tenant.
    assert read_entry(_entry(**{"request-id": "ab-2", "tenant": "solo"})) == LogEntry(
        "ab-2", None, "solo"
    )
    assert read_entry(_entry(**{"request-id": "ab-3", "tenant": ""})) == LogEntry(
        "ab-3", None, None
    )
    assert read_entry(_entry(tenant="solo")) is None  # no request of ours


@pytest.mark.parametrize(
    ("ip", "served"), [("10.0.0.7", "10.0.0.7:8000"), ("fd00::7", "[fd00::7]:8000")]
)
def test_read_entry_names_the_endpoint_as_the_endpoints_list_does(ip: str, served: str) -> None:
    """The upstream is matched against endpoint addresses, which put an IPv6 host in brackets
    (`EndpointConfig`, Kubernetes discovery)."""
    entry = _entry(**{"request-id": "ab-1"})
    socket = entry.common_properties.upstream_remote_address.socket_address
    socket.address, socket.port_value = ip, 8000
    read = read_entry(entry)
    assert read is not None and read.upstream == served
    EndpointConfig(address=served)  # an address the picker accepts


# --- the routing reply --------------------------------------------------------------------------


async def test_the_routing_reply_names_the_tenant_only_when_there_is_one(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    _, with_tenancy = await start_picker(_config(server.address))
    _, without = await start_picker(_config(server.address, tenancy=False))
    named = _own_metadata(await _route_and_end(with_tenancy))
    assert named["tenant"] == "solo" and named["request-id"]
    assert set(_own_metadata(await _route_and_end(without))) == {"request-id"}


# --- which replica settles an entry ---------------------------------------------------------------


async def test_an_entry_on_another_replica_is_charged_there_once(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    routing, channel_a = await start_picker(_config(server.address))
    other, channel_b = await start_picker(_config(server.address))
    request_id = ep.request_id(await _route_and_end(channel_a))
    await _until(lambda: routing.inflight.total() == 0, "the stream's end released")
    assert await _tokens_left(other)  # the other replica has charged nothing yet
    # Envoy's log stream goes to the other replica: more completion tokens than the limit.
    used = {"prompt_tokens": 9.0, "completion_tokens": 5000.0, "cached_tokens": 2.0}
    await _log(channel_b, **{"request-id": request_id, "tenant": "solo"}, **used)
    await _until(lambda: _completion(other) == (5000, 5000), "the foreign entry counted")
    assert _value(other, "extproc_usage_tokens_total", kind="prompt") == 9
    assert _value(other, "extproc_usage_tokens_total", kind="cached") == 2
    assert not await _tokens_left(other)  # its token limit saw them: in debt
    assert _completion(routing) == (0, 0)  # and the routing replica never counts them


async def test_an_own_entry_is_settled_not_charged_as_foreign(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    routing, channel = await start_picker(_config(server.address))
    request_id = ep.request_id(await _route_and_end(channel))
    await _until(lambda: routing.inflight.total() == 0, "the stream's end released")
    await _log(channel, **{"request-id": request_id, "tenant": "solo"}, completion_tokens=42.0)
    await _until(lambda: _completion(routing) == (42, 42), "the entry settled")
    await asyncio.sleep(0.05)
    assert _completion(routing) == (42, 42)  # once, not again as a foreign entry


async def test_a_foreign_entry_naming_an_unknown_or_no_tenant_counts_only_the_tokens(
    model_servers: Any, start_picker: StartPicker
) -> None:
    server = await model_servers("model-a")
    picker, channel = await start_picker(_config(server.address))
    foreign = "0123456789ab-7"  # another replica's name
    await _log(channel, **{"request-id": foreign, "tenant": "initech"}, completion_tokens=5000.0)
    await _log(channel, **{"request-id": foreign + "1"}, completion_tokens=5000.0)
    await _log(channel, **{"request-id": foreign + "2", "tenant": "solo"})  # no usage
    await _until(lambda: _completion(picker)[0] == 10_000, "both entries counted")
    assert _completion(picker)[1] == 0
    tenancy = picker.tenancy
    assert tenancy is not None and set(tenancy.directory.tenants) == {"solo"}
    assert _value(picker, "extproc_tenant_tokens_total", tenant="initech", kind="completion") == 0
    assert await _tokens_left(picker)
