"""The picker's refusals reach the client through Envoy as OpenAI error JSON; it goes on serving.

Each case runs in both body modes; after every refusal the same client session sends a
good request, which must still be served.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .harness import MODEL_A, MODEL_F, Fleet, Stack, free_port, run_envoy, run_picker

pytestmark = pytest.mark.e2e

GOOD = json.dumps({"model": MODEL_A, "prompt": "hi", "max_tokens": 2}).encode()
TOO_BIG = json.dumps({"model": MODEL_A, "prompt": "y" * 1_200_000}).encode()  # limit: 1,000,000


def _check_envelope(raw: bytes, *, code: str | None = None) -> dict[str, Any]:
    payload = json.loads(raw)
    error: dict[str, Any] = payload["error"]
    assert set(error) >= {"message", "type", "param", "code"}, payload
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, payload
    return error


async def _still_serves(session: aiohttp.ClientSession, stack: Stack) -> None:
    async with session.post(f"{stack.url}/v1/completions", data=GOOD) as response:
        assert response.status == 200, (await response.read(), stack.logs())
        assert "x-backend" in response.headers


CASES = [
    pytest.param(b'{"model": "model-a", "prompt": ', 400, None, id="invalid-json"),
    pytest.param(b'{"prompt": "no model here"}', 400, None, id="missing-model"),
    pytest.param(
        b'{"model": "no-such-model", "prompt": "hi"}', 404, "model_not_found", id="unknown"
    ),
    pytest.param(TOO_BIG, 413, None, id="too-large"),
]


@pytest.mark.parametrize(("body", "status", "code"), CASES)
async def test_refusal_comes_back_as_openai_error(
    stack: Stack, fleet: Fleet, body: bytes, status: int, code: str | None
) -> None:
    served_before = sum(len(b.via_envoy("/v1/completions")) for b in fleet.backends)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        # A BytesIO: aiohttp warns (an error here) about large raw bytes bodies.
        async with session.post(
            f"{stack.url}/v1/completions", data=io.BytesIO(body), headers=headers
        ) as response:
            raw = await response.read()
            assert response.status == status, (raw, stack.logs())
            assert response.headers["content-type"].startswith("application/json")
        _check_envelope(raw, code=code)
        served_after = sum(len(b.via_envoy("/v1/completions")) for b in fleet.backends)
        assert served_after == served_before, "a refused request must not reach a backend"
        await _still_serves(session, stack)


async def test_a_too_large_chunked_body_is_refused(stack: Stack) -> None:
    """No content-length: the picker counts the streamed (or buffered) bytes."""

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(TOO_BIG), 64 * 1024):
            yield TOO_BIG[i : i + 64 * 1024]

    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(f"{stack.url}/v1/completions", data=chunks()) as response:
                raw = await response.read()
                assert response.status == 413, (raw, stack.logs())
                _check_envelope(raw)
        except aiohttp.ClientOSError:
            pytest.fail("Envoy reset the connection instead of answering 413")
        await _still_serves(session, stack)


@pytest.fixture(scope="module")
def nothing_learned(logs: Path) -> Iterator[Stack]:
    """A picker whose only endpoint never answered /v1/models, behind a streamed-mode Envoy."""
    dead = f"127.0.0.1:{free_port()}"
    with (
        run_picker(logs, [dead], ready=False) as picker,
        run_envoy(logs, extproc=picker.address, endpoints=[dead], picker=picker) as stack,
    ):
        yield stack


async def test_with_nothing_learned_models_are_unknown(nothing_learned: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{nothing_learned.url}/v1/completions", data=GOOD) as response:
            raw = await response.read()
            assert response.status == 404, (raw, nothing_learned.logs())
        _check_envelope(raw, code="model_not_found")
        async with session.get(f"{nothing_learned.url}/v1/models") as response:
            assert response.status == 200
            assert (await response.json())["data"] == []


async def test_a_header_only_request_with_no_ready_endpoint_is_503(nothing_learned: Stack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{nothing_learned.url}/health") as response,
    ):
        raw = await response.read()
        assert response.status == 503, (raw, nothing_learned.logs())
        assert int(response.headers["retry-after"]) >= 0
    _check_envelope(raw)


async def test_a_model_whose_servers_are_all_down_is_503(logs: Path, own_fleet: Fleet) -> None:
    """The endpoint serving the model stops answering: the model is known, nobody can take it.

    The model is declared in the picker's config: a model only learned from /v1/models is
    forgotten with its endpoint, and then the answer is 404.
    """
    lonely = own_fleet.start(MODEL_F)
    config = {
        "discovery": {"models_refresh_seconds": 0.2, "request_timeout_seconds": 0.5},
        "endpoints": [{"address": lonely.address, "models": [MODEL_F]}],
    }
    body = json.dumps({"model": MODEL_F, "prompt": "hi"}).encode()
    with (
        run_picker(logs, [], config=config) as picker,
        run_envoy(logs, extproc=picker.address, endpoints=[lonely.address], picker=picker) as stack,
    ):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{stack.url}/v1/completions", data=body) as response:
                assert response.status == 200, stack.logs()
            own_fleet.stop(lonely)
            deadline = time.monotonic() + 10
            while True:  # until a refresh has marked the endpoint not ready
                async with session.post(f"{stack.url}/v1/completions", data=body) as response:
                    raw = await response.read()
                    retry_after = response.headers.get("retry-after")
                if response.status == 503 and retry_after is not None:
                    break
                assert time.monotonic() < deadline, (response.status, raw, stack.logs())
                await asyncio.sleep(0.1)
    assert int(retry_after) >= 0
    _check_envelope(raw)


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
async def test_a_body_over_grpcs_default_message_size_but_within_the_limit_is_served(
    logs: Path, fleet: Fleet, addresses: list[str], body_mode: str
) -> None:
    """6 MiB (base64 images make such bodies normal): over gRPC's 4 MiB default, under the
    picker's 8 MiB `max_body_bytes`. It used to get an empty 503 from Envoy."""
    body = json.dumps({"model": MODEL_A, "prompt": "z" * (6 << 20), "max_tokens": 1}).encode()
    with (
        run_picker(logs, addresses) as picker,
        run_envoy(
            logs, extproc=picker.address, endpoints=addresses, picker=picker, body_mode=body_mode
        ) as stack,
    ):
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # streamed mode failed about half the time
                async with session.post(
                    f"{stack.url}/v1/completions",
                    data=io.BytesIO(body),
                    headers={"content-type": "application/json"},
                ) as response:
                    raw = await response.read()
                    assert response.status == 200, (response.status, raw[:300], stack.logs())
