"""One ext_proc stream = one HTTP request, from its headers to the end of its response.

Envoy sends the request headers, body chunks and trailers, then (after the model server answers)
the response headers, body chunks and trailers, each as a ProcessingRequest on one gRPC stream.
In FULL_DUPLEX_STREAMED mode the reply to the request headers is held until the body has ended:
only then can the body be parsed and the endpoint picked. In BUFFERED mode Envoy wants the headers
answered first, so the decision rides on the body reply instead. Header-only requests are routed
on their headers.

How the response reaches the picker depends on Envoy's config (docs/envoy.md, "The response
path"):
- `ended` (the bundled default): nothing of the response comes on this stream, and Envoy ends
  it when the response has ended (the config declares this in gRPC metadata); the usage and the
  endpoint that served come separately, from Envoy's gRPC access log (`server/access_log.py`),
  joined by the request's name. The decision is released at the stream's end
  (`Pipeline.ended`) and settled when the entry arrives (`Pipeline.settle`), in either order.
  `headers` is the same with the response headers on this stream (they name the server).
- `inline` (the protocol's shape): every response chunk comes on this stream and goes back.
- `observer`: a second ext_proc filter in observability mode reads the response; Envoy does not
  wait for the picker on the response path at all.
The routing stream names the request in dynamic metadata (`extproc` / `request-id`); the observer
stream and the access log carry that name back, and the decision waits in `_Awaiting` between.
Names start with this process's random prefix: an access log entry for a name without it was
routed by another replica (Envoy sends each worker's log to one picker), and is settled here from
the tenant the entry names (`Pipeline.settle_foreign`) instead of waiting for a stream that never
comes.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Generic, NoReturn, TypeVar

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)

from extproc.config import BodyMode
from extproc.decision import LocalAnswer, RequestHead, Routed
from extproc.metrics import PickerMetrics
from extproc.pipeline import Pipeline
from extproc.request import errors
from extproc.request.errors import OpenAIError
from extproc.request.usage import Usage, UsageReader
from extproc.server import reply
from extproc.server.access_log import LogEntry

log = logging.getLogger(__name__)

_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
_BUFFERED = ProcessingMode.BUFFERED
_SUBSET_NAMESPACE = "envoy.lb.subset_hint"
_SUBSET_KEY = "x-gateway-destination-endpoint-subset"
_SERVED_KEY = "x-gateway-destination-endpoint-served"
_EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
_UPSTREAM_ADDRESS = "upstream.address"
_OWN_NAMESPACE = "extproc"
_REQUEST_ID = "request-id"
_NONE = ProcessingMode.NONE
_REQUEST_PHASES = frozenset({"request_headers", "request_body", "request_trailers"})
# gRPC metadata the bundled Envoy configs set on the ext_proc service: "ended" declares that the
# routing stream stays open until the response has ended (response trailers SEND).
RESPONSE_PATH_METADATA = "x-extproc-response-path"
T = TypeVar("T")


@dataclass(slots=True)
class _Stream:
    """Everything one stream remembers between messages."""

    request_mode: int
    response_mode: int
    head: RequestHead | None = None
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    routed: Routed | None = None
    served: str | None = None
    usage: UsageReader | None = None
    # The response headers came on this stream (so its end is the response's end).
    responded: bool = False
    finished: bool = False
    request_id: str = ""
    # True on an observability-mode stream: Envoy does not read replies, so none are sent.
    observer: bool = False
    # Envoy's config says this stream ends when the response does, response headers or not
    # (the lean `ended` shape: `StreamHandler.process`).
    ends_with_response: bool = False


class StreamHandler:
    """Turns ext_proc messages into pipeline calls, and pipeline answers into Envoy replies."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: PickerMetrics,
        *,
        default_body_mode: BodyMode,
        awaiting_response_seconds: float = 900.0,
        usage_wait_seconds: float = 10.0,
        destination: reply.Destination = reply.PROTOCOL,
        prefix: str | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._destination = destination
        self._metrics = metrics
        self._default_mode = _FULL_DUPLEX if default_body_mode == "streamed" else _BUFFERED
        self._awaiting: _Awaiting[Routed] = _Awaiting(ttl=awaiting_response_seconds)
        # Ended responses whose usage has not come yet, and usage that came before the end.
        self._unsettled: _Awaiting[_Ended] = _Awaiting(ttl=usage_wait_seconds)
        self._early: _Awaiting[_Logged] = _Awaiting(ttl=usage_wait_seconds)
        # Request names are unique among this process's requests in flight, and the prefix
        # tells this process's names from other replicas' (`logged`); with `--workers` it
        # also names the worker (`LoadBoard.prefix`).
        self._names = itertools.count()
        self._prefix = prefix or secrets.token_hex(6)

    async def process(
        self, messages: AsyncIterator[ProcessingRequest], *, ends_with_response: bool = False
    ) -> AsyncIterator[ProcessingResponse]:
        """One stream. `ends_with_response`: Envoy's config declares (gRPC metadata
        `x-extproc-response-path: ended`) that this stream stays open until the response has
        ended, so its end releases the request even when no response headers came on it."""
        state = _Stream(
            self._default_mode, self._default_mode, ends_with_response=ends_with_response
        )
        self._metrics.streams.inc()
        try:
            async for message in messages:
                if message.HasField("protocol_config"):
                    state.request_mode = message.protocol_config.request_body_mode
                    state.response_mode = message.protocol_config.response_body_mode
                if message.observability_mode:
                    self._observe(state, message)
                    continue
                if message.WhichOneof("request") in _REQUEST_PHASES:
                    async for response in self._request_phase(state, message):
                        yield response
                else:
                    for response in self._response_phase(state, message):
                        yield response
        except _Immediate as stop:
            # Envoy ends the request on an ImmediateResponse: nothing more to read or send.
            yield stop.response
        finally:
            self._metrics.streams.dec()
            self._end_of_stream(state)

    async def _request_phase(
        self, state: _Stream, message: ProcessingRequest
    ) -> AsyncIterator[ProcessingResponse]:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            async for response in self._request_headers(state, message):
                yield response
        elif kind == "request_body":
            body = message.request_body
            async for response in self._request_body(
                state, body.body, end_of_stream=body.end_of_stream
            ):
                yield response
        else:
            # Trailers end the body too (a body whose last chunk did not say so).
            if state.routed is None and state.head is not None:
                async for response in self._request_body(
                    state, b"", end_of_stream=True, trailers=True
                ):
                    yield response
            yield reply.REQUEST_TRAILERS

    def _response_phase(
        self, state: _Stream, message: ProcessingRequest
    ) -> Iterator[ProcessingResponse]:
        kind = message.WhichOneof("request")
        if kind == "response_headers":
            yield from self._response_headers(state, message)
        elif kind == "response_body":
            body = message.response_body
            if state.usage is not None:
                state.usage.feed(body.body)
            if state.response_mode == _FULL_DUPLEX:
                yield reply.streamed_response_body(body.body, end_of_stream=body.end_of_stream)
            else:
                yield reply.CONTINUE_RESPONSE_BODY
            if body.end_of_stream:
                self._finish(state)
        elif kind == "response_trailers":
            yield reply.RESPONSE_TRAILERS
            self._finish(state)

    async def _request_headers(
        self, state: _Stream, message: ProcessingRequest
    ) -> AsyncIterator[ProcessingResponse]:
        headers = message.request_headers
        state.head = _read_head(headers, _subset(message))
        if headers.end_of_stream:
            yield await self._decide(state, None, in_headers=True)
            return
        length = state.head.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._pipeline.max_body_bytes:
            yield self._refuse(errors.body_too_large(self._pipeline.max_body_bytes))
        if state.request_mode != _FULL_DUPLEX:
            yield reply.CONTINUE_REQUEST_HEADERS

    async def _request_body(
        self, state: _Stream, chunk: bytes, *, end_of_stream: bool, trailers: bool = False
    ) -> AsyncIterator[ProcessingResponse]:
        if state.head is None or state.routed is not None:
            # Nothing to decide (body after a decision): let it pass unchanged.
            if state.request_mode == _FULL_DUPLEX:
                for response in reply.streamed_request_body(chunk, end_of_stream=end_of_stream):
                    yield response
            else:
                yield reply.CONTINUE_REQUEST_BODY
            return
        if chunk:
            state.parts.append(chunk)
            state.size += len(chunk)
            if state.size > self._pipeline.max_body_bytes:
                yield self._refuse(errors.body_too_large(self._pipeline.max_body_bytes))
        if not end_of_stream:
            if state.request_mode != _FULL_DUPLEX:
                yield reply.CONTINUE_REQUEST_BODY  # STREAMED mode: not ours to hold
            return
        body = b"".join(state.parts) if len(state.parts) != 1 else state.parts[0]
        state.parts = []
        full_duplex = state.request_mode == _FULL_DUPLEX
        yield await self._decide(state, body, in_headers=full_duplex)
        if full_duplex:
            # The held body goes back (unchanged unless the pipeline rewrote it); with trailers
            # still to come it is not the end.
            rewritten = state.routed.body if state.routed is not None else None
            for response in reply.streamed_request_body(
                body if rewritten is None else rewritten, end_of_stream=not trailers
            ):
                yield response

    async def _decide(
        self, state: _Stream, body: bytes | None, *, in_headers: bool
    ) -> ProcessingResponse:
        assert state.head is not None
        try:
            outcome = await self._pipeline.route(state.head, body)
        except Exception:
            log.exception(
                "routing failed for %s %s",
                errors.client_text(state.head.method),
                errors.client_text(state.head.path),
            )
            self._metrics.stream_errors.labels("pick_failed").inc()
            outcome = errors.internal_error()
        if isinstance(outcome, OpenAIError):
            return self._refuse(outcome)
        if isinstance(outcome, LocalAnswer):
            raise _Immediate(
                reply.immediate(outcome.status, outcome.body, content_type=outcome.content_type)
            )
        state.routed = outcome
        state.request_id = f"{self._prefix}-{next(self._names)}"
        targets = ",".join(outcome.targets)
        log.debug(
            "routed %s %s model=%s tenant=%s strategy=%s to %s prefill=%s",
            state.head.method,
            state.head.path,
            outcome.request.model,
            outcome.tenant.name if outcome.tenant is not None else "-",
            outcome.strategy,
            targets,
            outcome.prefill or "-",
        )
        explanation = outcome.explanation
        tenant = outcome.tenant.name if outcome.tenant is not None else None
        if in_headers:
            return reply.route_in_headers(
                targets,
                request_id=state.request_id,
                explanation=explanation,
                content_length=len(outcome.body) if outcome.body is not None else None,
                headers=outcome.headers,
                remove=outcome.remove_headers,
                tenant=tenant,
                destination=self._destination,
                scores=outcome.scores,
            )
        return reply.route_in_body(
            targets,
            request_id=state.request_id,
            explanation=explanation,
            body=outcome.body,
            headers=outcome.headers,
            remove=outcome.remove_headers,
            tenant=tenant,
            destination=self._destination,
            scores=outcome.scores,
        )

    def _refuse(self, error: OpenAIError) -> NoReturn:
        raise _Immediate(
            reply.immediate(
                error.status,
                error.body(),
                content_type="application/json",
                headers=error.headers,
                details=error.code,
            )
        )

    def _response_headers(
        self, state: _Stream, message: ProcessingRequest
    ) -> Iterator[ProcessingResponse]:
        _read_response_head(state, message)
        yield reply.CONTINUE_RESPONSE_HEADERS
        if message.response_headers.end_of_stream:
            self._finish(state)

    def _observe(self, state: _Stream, message: ProcessingRequest) -> None:
        """A message of an observability-mode stream: read the response, send nothing back."""
        kind = message.WhichOneof("request")
        if kind == "response_headers":
            state.observer = True
            state.routed = self._awaiting.claim(_request_id(message))
            if state.routed is None:
                return  # not ours, or it waited too long: nothing to account
            _read_response_head(state, message)
            if message.response_headers.end_of_stream:
                self._finish(state)
        elif kind == "response_body":
            if state.usage is not None:
                state.usage.feed(message.response_body.body)
            if message.response_body.end_of_stream:
                self._finish(state)
        elif kind == "response_trailers":
            self._finish(state)

    def _end_of_stream(self, state: _Stream) -> None:
        routed = state.routed
        if routed is None or state.finished or state.observer or state.response_mode != _NONE:
            self._finish(state)
            return
        if not state.responded and not state.ends_with_response:
            # No response on this stream: an observer stream will bring it, or the access log
            # the request's end (a client that left before the model server answered).
            for expired in self._awaiting.put(state.request_id, routed):
                self._metrics.stream_errors.labels("response_never_observed").inc()
                self._pipeline.finish(expired, served=None, usage=None)
            return
        # `ended`: this stream's end is the response's end; its usage comes from the access log,
        # and so does the endpoint that served when no response headers came (the lean shape).
        state.finished = True
        lean = not state.responded
        self._pipeline.ended(routed)
        if not lean:
            self._pipeline.served(routed, state.served)
        early = self._early.claim(state.request_id)
        if early is not None:
            self._settle(_Ended(routed, lean), early.usage, early.upstream)
            return
        for unlogged in self._unsettled.put(state.request_id, _Ended(routed, lean)):
            self._metrics.stream_errors.labels("usage_never_logged").inc()
            self._settle(unlogged, None, None)

    def _settle(self, ended: _Ended, usage: Usage | None, upstream: str | None) -> None:
        if ended.served_later:
            self._pipeline.served(ended.routed, upstream)
        self._pipeline.settle(ended.routed, usage)

    def logged(self, entry: LogEntry) -> None:
        """Envoy's access log says request `entry.request_id` is over, with its usage if the
        model server sent one."""
        request_id, usage = entry.request_id, entry.usage
        if not request_id.startswith(f"{self._prefix}-"):
            # Another replica routed it (or this process before a restart): that one never sees
            # this entry, so its usage is counted here, against the tenant the entry names.
            if usage is not None:
                self._pipeline.settle_foreign(entry.tenant, usage)
            return
        unsettled = self._unsettled.claim(request_id)
        if unsettled is not None:
            self._settle(unsettled, usage, entry.upstream)
            return
        parked = self._awaiting.claim(request_id)
        if parked is not None:  # it ended before the model server answered
            self._pipeline.finish(parked, served=None, usage=usage)
            return
        # The stream's end is still on its way. Left unclaimed, the entry expires: its request
        # was settled on its own stream (`inline` or `observer`, with an access log as well).
        self._early.put(request_id, _Logged(usage, entry.upstream))

    def _finish(self, state: _Stream) -> None:
        if state.routed is None or state.finished:
            return
        state.finished = True
        usage = state.usage.result() if state.usage is not None else None
        self._pipeline.finish(state.routed, served=state.served, usage=usage)


@dataclass(frozen=True, slots=True)
class _Logged:
    """An access log entry that came before its stream's end."""

    usage: Usage | None
    upstream: str | None


@dataclass(frozen=True, slots=True)
class _Ended:
    """A response that ended on its stream and waits for its access log entry."""

    routed: Routed
    # The entry also names the endpoint that served it (lean `ended`: no response headers).
    served_later: bool


class _Immediate(Exception):
    """Carries an ImmediateResponse out of the message handlers; the stream ends after it."""

    def __init__(self, response: ProcessingResponse) -> None:
        super().__init__()
        self.response = response


def _read_head(headers: HttpHeaders, subset: frozenset[str] | None) -> RequestHead:
    values: dict[str, str] = {}
    for header in headers.headers.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        values[header.key.lower()] = value
    return RequestHead(
        method=values.get(":method", "GET"),
        path=values.get(":path", "/"),
        headers=values,
        subset=subset,
    )


def _header(headers: HttpHeaders, name: str) -> str:
    for header in headers.headers.headers:
        if header.key.lower() == name:
            value: str = header.raw_value.decode("latin-1") if header.raw_value else header.value
            return value
    return ""


def _subset(message: ProcessingRequest) -> frozenset[str] | None:
    namespaces = message.metadata_context.filter_metadata
    if _SUBSET_NAMESPACE not in namespaces:
        return None
    fields = namespaces[_SUBSET_NAMESPACE].fields
    if _SUBSET_KEY not in fields:
        return None
    # The forms the reference picker takes: a list of `ip:port` (or bare `ip`) strings, its
    # non-strings ignored; also one comma-separated string. An empty result means "none".
    value = fields[_SUBSET_KEY]
    if value.HasField("string_value"):
        entries = value.string_value.split(",")
    else:
        entries = [v.string_value for v in value.list_value.values if v.HasField("string_value")]
    return frozenset(e.strip() for e in entries if e.strip())


def _served(message: ProcessingRequest) -> str | None:
    """The endpoint that answered, after Envoy's retries: the protocol's metadata key when the
    data plane writes it, else the `upstream.address` attribute (all Envoy 1.40 can give)."""
    namespaces = message.metadata_context.filter_metadata
    if "envoy.lb" in namespaces:
        fields = namespaces["envoy.lb"].fields
        if _SERVED_KEY in fields and fields[_SERVED_KEY].string_value:
            return str(fields[_SERVED_KEY].string_value)
    attributes = message.attributes
    if _EXT_PROC_ATTRIBUTES in attributes:
        fields = attributes[_EXT_PROC_ATTRIBUTES].fields
        if _UPSTREAM_ADDRESS in fields and fields[_UPSTREAM_ADDRESS].string_value:
            return str(fields[_UPSTREAM_ADDRESS].string_value)
    return None


def _read_response_head(state: _Stream, message: ProcessingRequest) -> None:
    state.responded = True
    served = _served(message)
    if served:
        state.served = served
    content_type = _header(message.response_headers, "content-type")
    state.usage = UsageReader(sse="text/event-stream" in content_type)


def _request_id(message: ProcessingRequest) -> str:
    namespaces = message.metadata_context.filter_metadata
    if _OWN_NAMESPACE not in namespaces:
        return ""
    fields = namespaces[_OWN_NAMESPACE].fields
    return str(fields[_REQUEST_ID].string_value) if _REQUEST_ID in fields else ""


class _Awaiting(Generic[T]):
    """What waits, by request name, for a message that comes another way (the response on an
    observer stream, the usage in the access log), oldest first.

    An entry whose message never shows up (the client went away before the model answered, the
    access log stream was down) is handed back after `ttl` seconds, so nothing stays up for good.
    """

    def __init__(self, *, ttl: float) -> None:
        self._ttl = ttl
        self._entries: dict[str, tuple[float, T]] = {}

    def put(self, request_id: str, routed: T) -> list[T]:
        """Park `routed`; returns the entries that have waited too long (to be released)."""
        now = time.monotonic()
        expired = []
        for key, (deadline, old) in self._entries.items():
            if deadline > now:
                break
            expired.append((key, old))
        for key, _ in expired:
            del self._entries[key]
        self._entries[request_id] = (now + self._ttl, routed)
        return [old for _, old in expired]

    def claim(self, request_id: str) -> T | None:
        entry = self._entries.pop(request_id, None)
        return entry[1] if entry is not None else None
