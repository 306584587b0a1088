"""What happens when parts are missing: the picker is down, or the picked model server is.

"Picker down" is an Envoy whose ext_proc cluster points at a port nothing listens on; the
session's picker is not touched. The fallback test has its own picker and backends, since it
stops one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from extproc.config import BodyMode, FailureMode

from .harness import MODEL_A, MODEL_F, Fleet, Stack, free_port, run_envoy, run_picker

pytestmark = pytest.mark.e2e

BODY = json.dumps({"model": MODEL_A, "prompt": "hi", "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def picker_down(logs: Path, addresses: list[str]) -> Iterator[dict[tuple[str, str], Stack]]:
    """Envoys in every failure mode x body mode whose picker address has nothing behind it."""
    dead = f"127.0.0.1:{free_port()}"
    modes: list[tuple[FailureMode, BodyMode]] = [
        ("FailClose", "streamed"),
        ("FailClose", "buffered"),
        ("FailOpen", "streamed"),
        ("FailOpen", "buffered"),
    ]
    with contextlib.ExitStack() as started:
        yield {
            (failure, body): started.enter_context(
                run_envoy(
                    logs,
                    extproc=dead,
                    endpoints=addresses,
                    picker=None,
                    failure_mode=failure,
                    body_mode=body,
                )
            )
            for failure, body in modes
        }


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/completions", BODY), ("GET", "/v1/models", None)],
    ids=["completion", "header-only"],
)
async def test_fail_close_answers_503_without_a_picker(
    picker_down: dict[tuple[str, str], Stack],
    *,
    fleet: Fleet,
    body_mode: str,
    method: str,
    path: str,
    body: bytes | None,
) -> None:
    stack = picker_down["FailClose", body_mode]
    before = sum(len(b.via_envoy()) for b in fleet.backends)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, stack.url + path, data=body) as response,
    ):
        assert response.status == 503, stack.logs()
    assert sum(len(b.via_envoy()) for b in fleet.backends) == before


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/v1/completions", BODY), ("GET", "/health", None)],
    ids=["completion", "header-only"],
)
async def test_fail_open_reaches_a_backend_without_a_picker(
    picker_down: dict[tuple[str, str], Stack],
    fleet: Fleet,
    method: str,
    path: str,
    body: bytes | None,
) -> None:
    """Buffered body mode: Envoy still holds the body when the stream fails, so it goes on."""
    stack = picker_down["FailOpen", "buffered"]
    ports = {str(b.port) for b in fleet.backends}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, stack.url + path, data=body) as response,
    ):
        assert response.status == 200, stack.logs()
        assert response.headers["x-backend"] in ports


async def test_fail_open_streamed_passes_header_only_requests(
    picker_down: dict[tuple[str, str], Stack], fleet: Fleet
) -> None:
    stack = picker_down["FailOpen", "streamed"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{stack.url}/health") as response,
    ):
        assert response.status == 200, stack.logs()
        assert response.headers["x-backend"] in {str(b.port) for b in fleet.backends}


async def test_fail_open_streamed_still_refuses_a_body_envoy_1_40(
    picker_down: dict[tuple[str, str], Stack], fleet: Fleet
) -> None:
    """Pins a limitation of Envoy 1.40 (docs/envoy.md): with FULL_DUPLEX_STREAMED, body chunks
    handed to the ext_proc stream are gone from Envoy, so when the stream fails after that,
    failure_mode_allow cannot resume the request and Envoy answers with status_on_error (503).
    If this starts passing requests, FailOpen works in streamed mode: update the docs."""
    stack = picker_down["FailOpen", "streamed"]
    before = sum(len(b.via_envoy()) for b in fleet.backends)
    # Headers and body in one write, so the body is in Envoy before the stream can fail (with a
    # body arriving later, Envoy would fail open before it and pass the request on).
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\nconnection: close\r\n\r\n"
    )
    writer.write(head.encode() + BODY)
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"503", (status_line, stack.logs())
    assert sum(len(b.via_envoy()) for b in fleet.backends) == before


async def test_retries_walk_the_fallback_list(logs: Path, own_fleet: Fleet) -> None:
    """The picker learns two servers of model-f; one dies; every request still succeeds.

    Discovery is slowed down so the picker keeps naming the dead server first for half the
    requests; Envoy's retry then takes the next address of the list (x-envoy-attempt-count 2).
    """
    doomed, survivor = own_fleet.start(MODEL_F), own_fleet.start(MODEL_F)
    addresses = [doomed.address, survivor.address]
    config = {"discovery": {"models_refresh_seconds": 300}}
    body = json.dumps({"model": MODEL_F, "prompt": "hi"}).encode()
    with run_picker(logs, addresses, config=config) as picker:
        stacks = [
            run_envoy(
                logs, extproc=picker.address, endpoints=addresses, picker=picker, body_mode=mode
            )
            for mode in ("streamed", "buffered")
        ]
        with stacks[0] as streamed, stacks[1] as buffered:
            own_fleet.stop(doomed)
            attempts: list[int] = []
            async with aiohttp.ClientSession() as session:
                for stack in [streamed, buffered] * 3:
                    async with session.post(f"{stack.url}/v1/completions", data=body) as response:
                        assert response.status == 200, (await response.read(), stack.logs())
                        assert response.headers["x-backend"] == str(survivor.port)
                        attempts.append(int(response.headers["x-envoy-attempt-count"]))
            # The picker learns from Envoy which endpoint really served (upstream.address).
            await _until_fallbacks_counted(picker.metrics_port, attempts.count(2))
    assert set(attempts) == {1, 2}, attempts
    primaries = [
        r.headers["x-gateway-destination-endpoint"].split(",")[0]
        for r in survivor.via_envoy("/v1/completions")
    ]
    # Every request the survivor got as a retry named the dead server first.
    retried = [p for p, a in zip(primaries, attempts, strict=True) if a == 2]
    assert retried and set(retried) == {doomed.address}


async def _until_fallbacks_counted(metrics_port: int, expected: int) -> None:
    """The response path's last message may reach the picker just after the client's reply."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    seen = None
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(url) as response:
                text = await response.text()
            seen = next(
                (
                    float(line.split()[-1])
                    for line in text.splitlines()
                    if line.startswith("extproc_fallback_served_requests_total")
                ),
                None,
            )
            if seen == expected:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"picker counted {seen} fallback-served requests, expected {expected}")
