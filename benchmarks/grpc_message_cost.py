"""Server CPU per ext_proc message in Python gRPC: the floor under the picker's cost per request.

A servicer that answers every ProcessingRequest with an empty ProcessingResponse, driven over
loopback by a grpc.aio client in this process with short streams (5 messages each, like one
Envoy request), 20 streams at a time. The server runs in a child process so its CPU time is its
own; four variants: grpc.aio on asyncio, grpc.aio on uvloop (the picker's), the same with
grpc.aio's read/write API instead of the request iterator and async generator, and the sync
server. Then the latency of a round trip with one stream at a time (client included: it is
Python too).

    .venv/bin/python benchmarks/grpc_message_cost.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    ProcessingRequest,
    ProcessingResponse,
)

STREAMS, PER_STREAM = 1000, 5


class _Async(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self, messages: AsyncIterator[ProcessingRequest], context: Any
    ) -> AsyncIterator[ProcessingResponse]:
        async for _ in messages:
            yield ProcessingResponse()


class _ReadWrite(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The same, on grpc.aio's read/write API instead of the iterator and async generator."""

    async def Process(self, messages: AsyncIterator[ProcessingRequest], context: Any) -> None:
        while (await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            await context.write(ProcessingResponse())


class _Sync(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def Process(
        self, messages: Iterator[ProcessingRequest], context: Any
    ) -> Iterator[ProcessingResponse]:
        for _ in messages:
            yield ProcessingResponse()


async def _serve_async(port: int, servicer: Any) -> None:
    server = grpc.aio.server()
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _serve(variant: str, port: int) -> None:
    if variant == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(_Sync(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
    elif variant.startswith("uvloop"):
        import uvloop

        uvloop.run(_serve_async(port, _ReadWrite() if variant.endswith("rw") else _Async()))
    else:
        asyncio.run(_serve_async(port, _Async()))


async def _drive(port: int, streams: int, at_once: int = 20) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ext_proc_grpc.ExternalProcessorStub(channel)
        gate = asyncio.Semaphore(at_once)
        message = ProcessingRequest(request_body=HttpBody(body=b"x" * 1000))

        async def one() -> None:
            async with gate:
                call = stub.Process()
                for _ in range(PER_STREAM):
                    await call.write(message)
                    await call.read()
                await call.done_writing()

        await asyncio.gather(*(one() for _ in range(streams)))


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    if len(sys.argv) == 3:
        _serve(sys.argv[1], int(sys.argv[2]))
        return
    from extproc.bench.processes import free_ports, process

    print("| server | CPU µs per message (in + reply) | µs per round trip, one stream at a time |")
    print("|---|---:|---:|")
    for variant in ("asyncio", "uvloop", "uvloop-rw", "sync"):
        (port,) = free_ports(1)
        with process([sys.executable, __file__, variant, str(port)], ready_line="ready") as child:
            asyncio.run(_drive(port, 20))  # warm up
            before = _cpu(child.pid)
            asyncio.run(_drive(port, STREAMS))
            used = _cpu(child.pid) - before
            started = time.perf_counter()
            asyncio.run(_drive(port, STREAMS // 5, at_once=1))
            trip = (time.perf_counter() - started) / (STREAMS // 5 * PER_STREAM)
        print(f"| grpc {variant} | {1e6 * used / (STREAMS * PER_STREAM):.0f} | {1e6 * trip:.0f} |")


if __name__ == "__main__":
    main()
