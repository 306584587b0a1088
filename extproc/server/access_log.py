"""Envoy's gRPC access log, received by the picker: the end of each request and its usage.

With the bundled `ended` response path (docs/envoy.md, "The response path") no response chunk
reaches the picker. A Lua filter in Envoy reads vLLM's `usage` object as the response streams
past and writes its counts into the request's dynamic metadata, in the `extproc` namespace where
the picker named the request (`request-id`); Envoy's `http_grpc` access logger sends one entry
per finished request to this service, on the picker's own port. Each entry becomes one
`StreamHandler.logged` call: cost per request, not per chunk.

Envoy sends each worker's entries to one picker, which need not be the one that routed the
request (several replicas behind one Envoy). The routing reply also names the request's tenant
in that namespace (`tenant`), so the replica that gets the entry can charge the tenant even when
it has never seen the request (`StreamHandler.logged`, `Pipeline.settle_foreign`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse

from extproc.config import host_port
from extproc.request.usage import Usage

log = logging.getLogger(__name__)

_NAMESPACE = "extproc"
_REQUEST_ID = "request-id"
_TENANT = "tenant"


@dataclass(frozen=True, slots=True)
class LogEntry:
    """What one access log entry tells the picker about one of its requests."""

    request_id: str
    # None when the model server sent no usage (a hang-up, a stream without include_usage).
    usage: Usage | None
    # The tenant the routing replica identified (None: tenancy off, or no tenant), so that a
    # replica that did not route the request can still charge it.
    tenant: str | None = None
    # The endpoint that served it (`ip:port`, after Envoy's retries; None: no upstream, say a
    # hang-up before one was picked). The lean `ended` shape learns it only here.
    upstream: str | None = None


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Hands every entry that names one of our requests to `on_entry`."""

    def __init__(self, on_entry: Callable[[LogEntry], None]) -> None:
        self._on_entry = on_entry

    async def StreamAccessLogs(
        self,
        messages: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> StreamAccessLogsResponse:
        async for message in messages:
            for entry in message.http_logs.log_entry:
                read = read_entry(entry)
                if read is not None:
                    self._on_entry(read)
        return StreamAccessLogsResponse()


def read_entry(entry: HTTPAccessLogEntry) -> LogEntry | None:
    """The request's name, usage and tenant, or None for an entry that names no request of ours
    (Envoy's own 404s, say)."""
    namespaces = entry.common_properties.metadata.filter_metadata
    if _NAMESPACE not in namespaces:
        return None
    fields = namespaces[_NAMESPACE].fields
    if _REQUEST_ID not in fields or not fields[_REQUEST_ID].string_value:
        return None
    request_id = str(fields[_REQUEST_ID].string_value)
    tenant = str(fields[_TENANT].string_value) if _TENANT in fields else ""
    upstream = _upstream(entry)
    if "completion_tokens" not in fields:
        return LogEntry(request_id, None, tenant or None, upstream)

    def count(key: str) -> int:
        # Lua writes numbers (doubles); anything odd counts as 0 rather than failing the entry.
        value = fields[key].number_value if key in fields else 0.0
        return int(value) if 0 <= value < 2**31 else 0

    usage = Usage(
        prompt_tokens=count("prompt_tokens"),
        completion_tokens=count("completion_tokens"),
        cached_tokens=count("cached_tokens"),
    )
    return LogEntry(request_id, usage, tenant or None, upstream)


def _upstream(entry: HTTPAccessLogEntry) -> str | None:
    socket = entry.common_properties.upstream_remote_address.socket_address
    return host_port(socket.address, socket.port_value) if socket.address else None
