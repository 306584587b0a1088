"""A picker rolled under load: on SIGTERM it says not serving on its ext_proc port (where Envoy's
health check asks) and still takes new streams for `server.drain_delay_seconds`, so the requests
that reach it meanwhile are served, not refused; then it stops."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server.health import EXT_PROC_SERVICE
from tests import extproc_client as ep

from .harness import MODEL_A, run_picker

pytestmark = pytest.mark.e2e

GOOD = json.dumps({"model": MODEL_A, "prompt": "hi", "max_tokens": 2}).encode()


def _ext_proc_health(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE), timeout=1
            )
        except grpc.RpcError:
            return None
        status: int = reply.status
        return status


async def test_a_draining_picker_still_routes_while_it_says_not_serving(
    logs: Path, addresses: list[str]
) -> None:
    config = {"server": {"drain_delay_seconds": 3, "shutdown_grace_seconds": 1}}
    with run_picker(logs, addresses, config=config) as picker:
        assert _ext_proc_health(picker.address) == health_pb2.HealthCheckResponse.SERVING
        picker.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while _ext_proc_health(picker.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "the picker never said not serving"
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(picker.address) as channel:
            stream = ep.Stream(channel)
            await stream.send(ep.request_headers("/v1/completions"))
            await stream.send(ep.request_body(GOOD, end_of_stream=True))
            assert ep.destination(await stream.receive()).split(",")[0] in addresses
            await stream.close()
        assert picker.popen.wait(timeout=10) == 0
