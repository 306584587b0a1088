"""Build the ext_proc messages Envoy expects, as the endpoint-picker protocol defines them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

DESTINATION = "x-gateway-destination-endpoint"
# The scheduler's score for each endpoint it scored, beside the destination in its metadata
# namespace: the llm-d router's key (`--emit-endpoint-scores`), a struct of `ip:port` -> number.
ENDPOINT_SCORES = "x-gateway-destination-endpoint-scores"
# Per-endpoint scores of the decision, upstream only, when scheduling.explain is on.
SCORES = "x-extproc-scores"
LB_NAMESPACE = "envoy.lb"
OWN_NAMESPACE = "extproc"
REQUEST_ID = "request-id"
TENANT = "tenant"
# Envoy takes at most ~64 KiB per streamed body message; stay under it as the reference does.
CHUNK = 62_000

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a decision is written for Envoy: the header and the dynamic-metadata namespace and
    key (the protocol's unless configured otherwise, as the field's picker once allowed with
    `--destination-endpoint-hint-metadata-namespace` and `--destination-endpoint-hint-key`), and
    whether the scheduler's per-endpoint scores go beside it."""

    namespace: str = LB_NAMESPACE
    key: str = DESTINATION
    emit_scores: bool = False


PROTOCOL = Destination()

# Replies that carry no decision are the same every time: build them once.
CONTINUE_REQUEST_HEADERS = ProcessingResponse(request_headers=HeadersResponse())
CONTINUE_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse())
CONTINUE_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse())
CONTINUE_RESPONSE_BODY = ProcessingResponse(response_body=BodyResponse())
REQUEST_TRAILERS = ProcessingResponse(request_trailers=TrailersResponse())
RESPONSE_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse())


def _routing(
    targets: str,
    request_id: str,
    explanation: str | None,
    *,
    content_length: int | None = None,
    extra: tuple[tuple[str, str], ...] = (),
    remove: tuple[str, ...] = (),
    tenant: str | None = None,
    destination: Destination = PROTOCOL,
    scores: Mapping[str, float] | None = None,
) -> tuple[CommonResponse, Struct]:
    headers = [(destination.key, targets), *extra]
    if explanation is not None:
        headers.append((SCORES, explanation))
    if content_length is not None:
        # The body is rewritten (a cache salt added): its length changes with it.
        headers.append(("content-length", str(content_length)))
    mutation = HeaderMutation(
        set_headers=[
            HeaderValueOption(
                header=HeaderValue(key=key, raw_value=value.encode()),
                append_action=_OVERWRITE,
            )
            for key, value in headers
        ],
        remove_headers=list(remove),
    )
    metadata = Struct()
    lb = metadata.get_or_create_struct(destination.namespace)
    lb[destination.key] = targets
    if destination.emit_scores and scores:
        lb.get_or_create_struct(ENDPOINT_SCORES).update(scores)
    # Names the request for the response observer (a second ext_proc filter) and the access log;
    # the tenant lets a replica that did not route the request charge its usage (access_log.py).
    own = metadata.get_or_create_struct(OWN_NAMESPACE)
    own[REQUEST_ID] = request_id
    if tenant is not None:
        own[TENANT] = tenant
    return CommonResponse(header_mutation=mutation, clear_route_cache=True), metadata


def route_in_headers(
    targets: str,
    *,
    request_id: str,
    explanation: str | None = None,
    content_length: int | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    remove: tuple[str, ...] = (),
    tenant: str | None = None,
    destination: Destination = PROTOCOL,
    scores: Mapping[str, float] | None = None,
) -> ProcessingResponse:
    """The answer to the request headers: destination header, envoy.lb metadata, new route.
    `content_length` is the length of a rewritten body, which follows as streamed chunks;
    `headers` are set on the upstream request too (the prefill endpoint's name), and `remove`
    taken off it (the client's own copy of a header only the picker may set). `scores` go in
    the metadata when `destination.emit_scores` says so."""
    common, metadata = _routing(
        targets,
        request_id,
        explanation,
        content_length=content_length,
        extra=headers,
        remove=remove,
        tenant=tenant,
        destination=destination,
        scores=scores,
    )
    return ProcessingResponse(
        request_headers=HeadersResponse(response=common), dynamic_metadata=metadata
    )


def route_in_body(
    targets: str,
    *,
    request_id: str,
    explanation: str | None = None,
    body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    remove: tuple[str, ...] = (),
    tenant: str | None = None,
    destination: Destination = PROTOCOL,
    scores: Mapping[str, float] | None = None,
) -> ProcessingResponse:
    """The same answer given on the body, for BUFFERED mode where headers were answered first
    (Envoy still holds them, so the header mutation applies). `body` replaces the buffered body;
    Envoy leaves content-length as the client sent it, so it is set here."""
    content_length = len(body) if body is not None else None
    common, metadata = _routing(
        targets,
        request_id,
        explanation,
        content_length=content_length,
        extra=headers,
        remove=remove,
        tenant=tenant,
        destination=destination,
        scores=scores,
    )
    if body is not None:
        common.body_mutation.body = body
    return ProcessingResponse(request_body=BodyResponse(response=common), dynamic_metadata=metadata)


def streamed_request_body(body: bytes, *, end_of_stream: bool) -> Iterator[ProcessingResponse]:
    """Send the held body back to Envoy in FULL_DUPLEX_STREAMED mode, in chunks Envoy accepts."""
    if not body:
        yield _streamed_request_chunk(b"", end_of_stream)
        return
    view = memoryview(body)
    for start in range(0, len(body), CHUNK):
        last = start + CHUNK >= len(body)
        yield _streamed_request_chunk(bytes(view[start : start + CHUNK]), end_of_stream and last)


def _streamed_request_chunk(chunk: bytes, end_of_stream: bool) -> ProcessingResponse:
    streamed = StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
    return ProcessingResponse(
        request_body=BodyResponse(
            response=CommonResponse(body_mutation=BodyMutation(streamed_response=streamed))
        )
    )


def streamed_response_body(chunk: bytes, *, end_of_stream: bool) -> ProcessingResponse:
    """Pass one response chunk straight through (FULL_DUPLEX_STREAMED response bodies)."""
    streamed = StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
    return ProcessingResponse(
        response_body=BodyResponse(
            response=CommonResponse(body_mutation=BodyMutation(streamed_response=streamed))
        )
    )


def immediate(
    status: int,
    body: bytes,
    *,
    content_type: str,
    headers: tuple[tuple[str, str], ...] = (),
    details: str = "",
) -> ProcessingResponse:
    """Answer the client directly; Envoy ends the request here."""
    all_headers = (("content-type", content_type), *headers)
    mutation = HeaderMutation(
        set_headers=[
            HeaderValueOption(
                header=HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
            )
            for k, v in all_headers
        ]
    )
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),
            headers=mutation,
            body=body,
            details=details,
        )
    )
