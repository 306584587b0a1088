"""Drive the picker's ext_proc service over real gRPC with the messages Envoy sends."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from google.protobuf.struct_pb2 import Struct

STREAMED = ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = ProcessingMode.BUFFERED
NONE = ProcessingMode.NONE


def request_headers(
    path: str,
    *,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    end_of_stream: bool = False,
    mode: int | None = STREAMED,
    response_mode: int | None = None,
    subset: Sequence[str | int] | str | None = None,
) -> ProcessingRequest:
    """`mode` is the request body mode Envoy announces, and the response's too unless
    `response_mode` differs (NONE with the `ended` response path)."""
    values = {":method": method, ":path": path, ":authority": "gateway", **(headers or {})}
    header_map = HeaderMap(
        headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
    )
    message = ProcessingRequest(
        request_headers=HttpHeaders(headers=header_map, end_of_stream=end_of_stream)
    )
    if mode is not None:
        message.protocol_config.CopyFrom(
            ProtocolConfiguration(
                request_body_mode=mode,  # type: ignore[arg-type]
                response_body_mode=mode if response_mode is None else response_mode,  # type: ignore[arg-type]
            )
        )
    if subset is not None:
        hint = Struct()
        value = subset if isinstance(subset, str) else list(subset)
        hint.update({"x-gateway-destination-endpoint-subset": value})
        message.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb.subset_hint": hint}))
    return message


def request_body(data: bytes, *, end_of_stream: bool) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=data, end_of_stream=end_of_stream))


def response_headers(
    *,
    content_type: str = "application/json",
    served: str | None = None,
    upstream_address: str | None = None,
    end_of_stream: bool = False,
) -> ProcessingRequest:
    header_map = HeaderMap(
        headers=[
            HeaderValue(key=":status", raw_value=b"200"),
            HeaderValue(key="content-type", raw_value=content_type.encode()),
        ]
    )
    message = ProcessingRequest(
        response_headers=HttpHeaders(headers=header_map, end_of_stream=end_of_stream)
    )
    if served is not None:
        lb = Struct()
        lb.update({"x-gateway-destination-endpoint-served": served})
        message.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb": lb}))
    if upstream_address is not None:
        # What Envoy 1.40 sends when asked for response_attributes: [upstream.address].
        message.attributes["envoy.filters.http.ext_proc"].update(
            {"upstream.address": upstream_address}
        )
    return message


def response_body(data: bytes, *, end_of_stream: bool) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=data, end_of_stream=end_of_stream))


def request_id(response: ProcessingResponse) -> str:
    """The name the picker gave the request (dynamic metadata `extproc` / `request-id`)."""
    fields = response.dynamic_metadata.fields["extproc"].struct_value.fields
    return str(fields["request-id"].string_value)


def json_body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


class Stream:
    """One ext_proc stream, written and read message by message like Envoy does."""

    def __init__(
        self, channel: grpc.aio.Channel, *, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        # `metadata`: the gRPC initial metadata of Envoy's grpc_service (the bundled configs
        # declare the `ended` shape there).
        self._call = ext_proc_grpc.ExternalProcessorStub(channel).Process(metadata=metadata)

    async def send(self, message: ProcessingRequest) -> None:
        await self._call.write(message)

    async def receive(self) -> ProcessingResponse:
        response = await self._call.read()
        assert response is not grpc.aio.EOF, "the picker closed the stream"
        assert isinstance(response, ProcessingResponse)
        return response

    async def ended(self) -> bool:
        """True when the picker has closed its side (after an ImmediateResponse)."""
        await self._call.done_writing()
        return bool(await self._call.read() is grpc.aio.EOF)

    async def close(self) -> None:
        await self._call.done_writing()
        self._call.cancel()

    def cancel(self) -> None:
        """Cut the stream without a half-close, as Envoy does when its client hangs up."""
        self._call.cancel()


def destination(response: ProcessingResponse) -> str:
    """The picked targets from a routing reply; checks header and metadata agree."""
    kind = response.WhichOneof("response")
    common = getattr(response, kind).response
    assert common.clear_route_cache
    header = {
        h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers
    }["x-gateway-destination-endpoint"]
    metadata = (
        response.dynamic_metadata.fields["envoy.lb"]
        .struct_value.fields["x-gateway-destination-endpoint"]
        .string_value
    )
    assert header == metadata
    return header


def immediate(response: ProcessingResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert response.WhichOneof("response") == "immediate_response", response
    reply = response.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in reply.headers.set_headers}
    return reply.status.code, headers, json.loads(reply.body)
