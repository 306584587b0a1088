"""The bundled Envoy config's defences, through the real Envoy:

- a client's own tenant header (`x-tenant-id`) never reaches the picker or a model server;
- with the picker down, Envoy's 503 carries the OpenAI error envelope and Retry-After;
- only the OpenAI API paths (and /health) are routed; any other path is Envoy's own 404 in the
  envelope, the picker not asked; paths are normalised first (`/v1/%63ompletions` is
  completions, an encoded slash is refused);
- request_timeout bounds a slow upload (ext_proc's message_timeout does not, in streamed mode).

Paths are sent over a raw socket: aiohttp's URL handling would normalise them on the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.config import BodyMode

from .harness import MODEL_A, Fleet, Picker, Received, Stack, free_port, run_envoy, run_picker

pytestmark = pytest.mark.e2e

BODY = json.dumps({"model": MODEL_A, "prompt": "hi", "max_tokens": 2}).encode()


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI error envelope, checked for its shape."""
        assert self.headers.get("content-type") == "application/json", self
        payload = json.loads(self.body)
        error: dict[str, Any] = payload["error"]
        assert set(error) == {"message", "type", "param", "code"}, payload
        assert isinstance(error["message"], str) and error["message"]
        assert error["param"] is None
        return error


async def _raw(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    byte_delay: float = 0.0,
    within: float = 20.0,
) -> Reply:
    """One HTTP/1.1 request with the path exactly as given; the reply is read while the body is
    still being written (`byte_delay` between bytes), so an early answer is not lost."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fields = {"host": "gateway", "content-type": "application/json", **(headers or {})}
    if body or method == "POST":
        fields["content-length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "connection: close\r\n\r\n"

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode())
            if not byte_delay:
                writer.write(body)
            else:
                for i in range(len(body)):
                    writer.write(body[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(byte_delay)
            await writer.drain()

    async def receive() -> bytes:
        data = b""
        with contextlib.suppress(ConnectionError):
            while not _complete(data) and (chunk := await reader.read(65536)):
                data += chunk
        return data

    try:
        async with asyncio.timeout(within):
            sending = asyncio.create_task(send())
            data = await receive()
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
    finally:
        # Closed before the test's event loop is: a transport still open when the loop closes
        # is garbage-collected later, unclosed, and its ResourceWarning fails another test. A
        # body Envoy never read can hold the close back, so after a second it is aborted.
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)
        writer.transport.abort()
        await asyncio.sleep(0)  # abort() closes the socket on the loop's next turn
    raw_head, _, raw_body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    reply_headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        reply_headers[name.strip().lower()] = value.strip()
    if reply_headers.get("transfer-encoding") == "chunked":
        raw_body = _unchunk(raw_body)
    return Reply(int(status_line.split()[1]), reply_headers, raw_body)


def _complete(data: bytes) -> bool:
    """Whether `data` holds a whole HTTP/1.1 response. Read to the end instead, the client would
    wait on Envoy: after a reply of its own it closes the connection only once the client has,
    or after its `delayed_close_timeout` (1 s)."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    fields = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    if fields.get(b"transfer-encoding") == b"chunked":
        return body.endswith(b"0\r\n\r\n")
    length = fields.get(b"content-length")
    return length is not None and len(body) >= int(length)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def _served(fleet: Fleet) -> int:
    return sum(len(b.via_envoy()) for b in fleet.backends)


def _via_envoy(fleet: Fleet) -> dict[int, int]:
    """Requests each backend has had through Envoy. Not `received`: the picker's own /v1/models
    polls land there at any moment (a local run failed on one between two lines)."""
    return {b.port: len(b.via_envoy()) for b in fleet.backends}


def _the_one_sent(fleet: Fleet, reply: Reply, before: dict[int, int]) -> Received:
    """What the backend that answered `reply` was sent for it."""
    (backend,) = [b for b in fleet.backends if str(b.port) == reply.headers["x-backend"]]
    (received,) = backend.via_envoy()[before[backend.port] :]
    return received


# --- 1. the tenant header ---------------------------------------------------------------------


async def test_a_clients_tenant_header_never_reaches_a_model_server(
    stack: Stack, fleet: Fleet
) -> None:
    before = _via_envoy(fleet)
    reply = await _raw(
        stack.port, "POST", "/v1/completions", body=BODY, headers={"x-tenant-id": "premium"}
    )
    assert reply.status == 200, (reply, stack.logs())
    received = _the_one_sent(fleet, reply, before)
    assert received.path == "/v1/completions"
    assert "x-tenant-id" not in {k.lower() for k in received.headers}


@pytest.fixture(scope="module")
def header_tenancy(logs: Path, addresses: list[str]) -> Iterator[dict[str, Stack]]:
    """A picker that identifies tenants by the trusted header only, behind both body modes."""
    tenancy = {"enabled": True, "identity": ["header"], "tenants": {"premium": {}}}
    with run_picker(logs, addresses, config={"tenancy": tenancy}) as picker:
        common: dict[str, Any] = {"extproc": picker.address, "endpoints": addresses}
        with (
            run_envoy(logs, **common, picker=picker, body_mode="streamed") as streamed,
            run_envoy(logs, **common, picker=picker, body_mode="buffered") as buffered,
        ):
            yield {"streamed": streamed, "buffered": buffered}


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
async def test_a_spoofed_tenant_header_does_not_select_the_tenant(
    header_tenancy: dict[str, Stack], fleet: Fleet, body_mode: str
) -> None:
    stack = header_tenancy[body_mode]
    before = _served(fleet)
    reply = await _raw(
        stack.port, "POST", "/v1/completions", body=BODY, headers={"x-tenant-id": "premium"}
    )
    # The picker saw no tenant header at all: the request is unidentified, not "premium".
    assert reply.status == 401, (reply, stack.logs())
    reply.error()
    assert _served(fleet) == before


# --- 2. picker down -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def picker_down(logs: Path, addresses: list[str]) -> Iterator[dict[str, Stack]]:
    dead = f"127.0.0.1:{free_port()}"
    with (
        run_envoy(logs, extproc=dead, endpoints=addresses, picker=None) as streamed,
        run_envoy(
            logs, extproc=dead, endpoints=addresses, picker=None, body_mode="buffered"
        ) as buffered,
    ):
        yield {"streamed": streamed, "buffered": buffered}


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/completions", BODY), ("GET", "/v1/models", b"")],
    ids=["completion", "header-only"],
)
async def test_picker_down_503_is_an_openai_error_with_retry_after(
    picker_down: dict[str, Stack], body_mode: str, method: str, path: str, body: bytes
) -> None:
    stack = picker_down[body_mode]
    reply = await _raw(stack.port, method, path, body=body)
    assert reply.status == 503, (reply, stack.logs())
    assert reply.error()["code"] == "picker_unavailable"
    assert reply.error()["type"] == "service_unavailable"
    assert int(reply.headers["retry-after"]) >= 1


async def test_the_pickers_own_503_keeps_its_body(logs: Path) -> None:
    """The local-reply mappers match Envoy's own failures only: the picker's immediate response
    (no ready endpoint) keeps its code and Retry-After."""
    dead = f"127.0.0.1:{free_port()}"
    with (
        run_picker(logs, [dead], ready=False) as picker,
        run_envoy(logs, extproc=picker.address, endpoints=[dead], picker=picker) as stack,
    ):
        reply = await _raw(stack.port, "GET", "/health")
    assert reply.status == 503, (reply, stack.logs())
    assert reply.error()["code"] == "no_ready_endpoint"


# --- 3. the path allow-list and normalisation ------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/sim/state", "/metrics", "/v1/load_lora_adapter", "/v1/Completions", "/v1/completions/x"],
)
async def test_other_paths_get_envoys_404_without_reaching_a_backend(
    stack: Stack, fleet: Fleet, path: str
) -> None:
    before = _served(fleet)
    reply = await _raw(stack.port, "POST", path, body=BODY)
    assert reply.status == 404, (reply, stack.logs())
    assert reply.error()["code"] == "unknown_url"
    assert "x-backend" not in reply.headers
    assert _served(fleet) == before


async def test_the_404_does_not_ask_the_picker(picker_down: dict[str, Stack]) -> None:
    """ext_proc is off on the catch-all route: with no picker the answer is still 404, not 503."""
    reply = await _raw(picker_down["streamed"].port, "GET", "/sim/state")
    assert reply.status == 404, reply
    assert reply.error()["code"] == "unknown_url"


@pytest.mark.parametrize(
    "path", ["/v1/%63ompletions", "/v1//completions", "/sim/../v1/completions", "/v1/./completions"]
)
async def test_paths_are_normalised_before_routing(stack: Stack, fleet: Fleet, path: str) -> None:
    """Envoy decodes percent-encoded unreserved characters and resolves dot segments and double
    slashes: the picker and the server see /v1/completions (measured on Envoy 1.40)."""
    before = _via_envoy(fleet)
    reply = await _raw(stack.port, "POST", path, body=BODY)
    assert reply.status == 200, (reply, stack.logs())
    received = _the_one_sent(fleet, reply, before)
    assert received.path == "/v1/completions"


@pytest.mark.parametrize("path", ["/v1%2Fcompletions", "/v1/chat%2fcompletions", "/v1%5Cmodels"])
async def test_an_encoded_slash_is_refused(stack: Stack, fleet: Fleet, path: str) -> None:
    before = _served(fleet)
    reply = await _raw(stack.port, "POST", path, body=BODY)
    assert reply.status == 400, (reply, stack.logs())
    assert reply.error()["code"] == "invalid_path"
    assert _served(fleet) == before


# --- 4. request_timeout -----------------------------------------------------------------------


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
async def test_request_timeout_bounds_a_slow_upload(
    logs: Path, picker: Picker, addresses: list[str], fleet: Fleet, body_mode: BodyMode
) -> None:
    """A body dribbled over ~4 s: the 10 s message_timeout never fires for it (streamed: no
    message timer at all; buffered: the timer starts only once the body is complete), the
    1.5 s request_timeout does, with a 408 in the envelope."""
    before = _served(fleet)
    with run_envoy(
        logs,
        extproc=picker.address,
        endpoints=addresses,
        picker=picker,
        body_mode=body_mode,
        request_timeout_ms=1500,
    ) as stack:
        port = stack.port
        started = time.monotonic()
        slow = BODY[:40]
        reply = await _raw(port, "POST", "/v1/completions", body=slow, byte_delay=0.1)
        took = time.monotonic() - started
    assert reply.status == 408, reply
    assert reply.error()["code"] == "request_timeout"
    assert int(reply.headers["retry-after"]) >= 1
    assert took < 3.5
    assert _served(fleet) == before
