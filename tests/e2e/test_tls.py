"""TLS on the ext_proc port, through the real Envoy: a certificate the test makes (checked by
Envoy against its CA), the self-signed default (not checked, as the field's gateways connect),
a plaintext client refused, and a rotated certificate served on the next connection."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import extproc_client as ep
from tests.certs import authority, write_server_pair

from .harness import MODEL_A, Picker, Stack, run_envoy, run_picker

pytestmark = pytest.mark.e2e

GOOD = json.dumps({"model": MODEL_A, "prompt": "hi", "max_tokens": 2}).encode()


async def _served(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.url}/v1/completions",
            data=GOOD,
            headers={"content-type": "application/json"},
        ) as response,
    ):
        raw = await response.read()
        assert response.status == 200, (raw, stack.logs())
        assert "x-backend" in response.headers


async def test_envoy_reaches_the_picker_over_tls_with_a_certificate_it_checks(
    logs: Path, tmp_path: Path, addresses: list[str]
) -> None:
    ca = authority()
    write_server_pair(ca, tmp_path / "certs")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    argv = ["--secure-serving", "--cert-path", str(tmp_path / "certs")]
    with (
        run_picker(logs, addresses, extra=argv) as picker,
        run_envoy(
            logs,
            extproc=picker.address,
            endpoints=addresses,
            picker=picker,
            extproc_ca=tmp_path / "ca.pem",
        ) as stack,
    ):
        await _served(stack)
        # An Envoy that trusts another CA gets no pick: the picker's certificate is checked.
        (tmp_path / "other.pem").write_bytes(authority("another CA").pem)
        with run_envoy(
            logs,
            extproc=picker.address,
            endpoints=addresses,
            picker=picker,
            extproc_ca=tmp_path / "other.pem",
        ) as wrong:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{wrong.url}/v1/completions", data=GOOD) as response,
            ):
                assert response.status == 503, wrong.logs()


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
async def test_the_self_signed_default_serves_envoy_over_tls(
    logs: Path, addresses: list[str], body_mode: str
) -> None:
    with (
        run_picker(logs, addresses, extra=["--secure-serving"]) as picker,
        run_envoy(
            logs,
            extproc=picker.address,
            endpoints=addresses,
            picker=picker,
            extproc_tls=True,
            body_mode=body_mode,
        ) as stack,
    ):
        await _served(stack)


async def test_a_plaintext_envoy_is_refused_on_the_tls_port(
    logs: Path, addresses: list[str]
) -> None:
    with (
        run_picker(logs, addresses, extra=["--secure-serving"]) as picker,
        run_envoy(logs, extproc=picker.address, endpoints=addresses, picker=picker) as stack,
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{stack.url}/v1/completions", data=GOOD) as response,
        ):
            raw = await response.read()
            assert response.status == 503, (raw, stack.logs())
            assert json.loads(raw)["error"]["code"] == "picker_unavailable"
        _health_still_plain(picker)
    log = picker.log.read_text()
    assert "a plaintext client is refused" in log and "WRONG_VERSION_NUMBER" in log, log[-2000:]


def _health_still_plain(picker: Picker) -> None:
    """The health port stays plaintext (kubelet's gRPC probe speaks no TLS)."""
    with grpc.insecure_channel(f"127.0.0.1:{picker.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_rotated_certificate_is_served_on_the_next_connection(
    logs: Path, tmp_path: Path, addresses: list[str]
) -> None:
    first, second = authority("first CA"), authority("second CA")
    certs = tmp_path / "certs"
    write_server_pair(first, certs)
    argv = ["--secure-serving", "--cert-path", str(certs)]
    with run_picker(logs, addresses, extra=argv) as picker:
        assert await _handshake(picker, first.pem)
        write_server_pair(second, certs)
        assert await _handshake(picker, second.pem), "the new certificate was not served"
        assert not await _handshake(picker, first.pem)


async def _handshake(picker: Picker, ca: bytes) -> bool:
    """A new connection trusting `ca` gets a routing decision from the picker."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(picker.address, credentials) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), 3)
        except TimeoutError:  # the handshake keeps failing: gRPC retries it for good
            return False
        stream = ep.Stream(channel)
        try:
            await stream.send(ep.request_headers("/v1/completions"))
            await stream.send(ep.request_body(GOOD, end_of_stream=True))
            reply = await stream.receive()
        except grpc.aio.AioRpcError:
            return False
        await stream.close()
        return bool(ep.destination(reply))
