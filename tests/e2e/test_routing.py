"""Requests through the real Envoy and the real picker reach the right backend, intact.

Each test runs once per ext_proc body mode (FULL_DUPLEX_STREAMED and BUFFERED), against the same
picker and the same three backends (two serve model-a, one serves model-b).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .harness import MODEL_A, MODEL_B, Fleet, Stack

pytestmark = pytest.mark.e2e


async def _post(
    session: aiohttp.ClientSession, stack: Stack, path: str, body: bytes
) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json"}
    async with session.post(stack.url + path, data=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


def _completion(model: str, prompt: str = "Say hello") -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": 4}).encode()


async def test_round_robin_spreads_over_the_model_servers(stack: Stack, fleet: Fleet) -> None:
    serving_a = {str(b.port) for b in fleet.backends if b.model == MODEL_A}
    async with aiohttp.ClientSession() as session:
        served = Counter[str]()
        for _ in range(6):
            status, headers, body = await _post(
                session, stack, "/v1/completions", _completion(MODEL_A)
            )
            assert status == 200, (body, stack.logs())
            served[headers["x-backend"]] += 1
    assert set(served) == serving_a
    assert sorted(served.values()) == [3, 3], served


async def test_requests_only_reach_servers_of_their_model(stack: Stack, fleet: Fleet) -> None:
    by_port = {str(b.port): b.model for b in fleet.backends}
    async with aiohttp.ClientSession() as session:
        for model in [MODEL_B, MODEL_A, MODEL_B, MODEL_A, MODEL_B]:
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
            status, headers, raw = await _post(
                session, stack, "/v1/chat/completions", body.encode()
            )
            assert status == 200, (raw, stack.logs())
            assert by_port[headers["x-backend"]] == model
            assert json.loads(raw)["usage"]["completion_tokens"] == 4


async def test_the_backend_gets_the_picked_address_first(stack: Stack, fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await _post(session, stack, "/v1/completions", _completion(MODEL_B))
    assert status == 200
    backend = next(b for b in fleet.backends if str(b.port) == headers["x-backend"])
    received = backend.via_envoy("/v1/completions")[-1]
    picked = received.headers["x-gateway-destination-endpoint"].split(",")
    assert picked[0] == backend.address


def _large_body(key: str) -> bytes:
    # ~220 KB, not ASCII-only, with spacing and key order a re-serialiser would change.
    text = "".join(f"line {i}: café ☕ {'x' * (i % 17)}\n" for i in range(7000))
    head = b'{ "' + key.encode() + b'" :  ' + json.dumps(text, ensure_ascii=False).encode()
    return head + b',\n  "max_tokens": 4, "model": "' + MODEL_A.encode() + b'"  }'


@pytest.mark.parametrize(
    ("path", "key"), [("/v1/completions", "prompt"), ("/v1/embeddings", "input")]
)
async def test_a_large_body_arrives_byte_identical(
    stack: Stack, fleet: Fleet, path: str, key: str
) -> None:
    body = _large_body(key)
    assert 200_000 < len(body) < 300_000
    async with aiohttp.ClientSession() as session:
        status, headers, raw = await _post(session, stack, path, body)
    assert status == 200, (raw, stack.logs())
    backend = next(b for b in fleet.backends if str(b.port) == headers["x-backend"])
    assert backend.via_envoy(path)[-1].body == body


async def test_a_body_sent_in_many_chunks_arrives_byte_identical(
    stack: Stack, fleet: Fleet
) -> None:
    body = json.dumps({"model": MODEL_A, "prompt": "chunked " * 12_000}, indent=1).encode()
    pieces = [body[i : i + 1500] for i in range(0, len(body), 1500)]
    assert len(pieces) > 50

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0)

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{stack.url}/v1/completions", data=chunks()) as response,
    ):
        assert response.status == 200, (await response.read(), stack.logs())
        port = response.headers["x-backend"]
    backend = next(b for b in fleet.backends if str(b.port) == port)
    assert backend.via_envoy("/v1/completions")[-1].body == body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_sse_passes_through_chunk_by_chunk(stack: Stack, fleet: Fleet, path: str) -> None:
    """The client reads the first chunk while the backend is still held after sending it."""
    (only_b,) = [b for b in fleet.backends if b.model == MODEL_B]
    finished_before = only_b.streams_finished
    payload: dict[str, object] = {
        "model": MODEL_B,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if path.endswith("chat/completions"):
        payload["messages"] = [{"role": "user", "content": "hi"}]
    else:
        payload["prompt"] = "hi"
    fleet.hold_streams()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(stack.url + path, json=payload) as response,
        ):
            assert response.status == 200, stack.logs()
            assert response.headers["content-type"].startswith("text/event-stream")
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
            # The backend has not finished: it waits for release_streams().
            assert only_b.streams_finished == finished_before
            assert first.startswith(b"data: {")
            fleet.release_streams()
            rest = await asyncio.wait_for(response.content.read(), 10)
    finally:
        fleet.release_streams()
    events = [e for e in (first + rest).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert len(chunks) == 5
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert only_b.streams_finished == finished_before + 1


async def test_get_models_lists_the_models_of_the_fleet(stack: Stack, fleet: Fleet) -> None:
    """The picker answers GET /v1/models itself, with what its ready endpoints serve."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{stack.url}/v1/models") as response,
    ):
        assert response.status == 200, stack.logs()
        listing = await response.json()
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {b.model for b in fleet.backends}


async def test_a_header_only_request_is_routed_to_a_backend(stack: Stack, fleet: Fleet) -> None:
    ports = {str(b.port) for b in fleet.backends}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{stack.url}/health") as response,
    ):
        assert response.status == 200, stack.logs()
        port = response.headers["x-backend"]
    assert port in ports
    (backend,) = [b for b in fleet.backends if str(b.port) == port]
    assert backend.via_envoy("/health"), "the request came through Envoy"


async def test_the_picker_sees_every_response_end_and_its_usage(stack: Stack) -> None:
    """Usage is read and in-flight counts drop back to zero, whichever way Envoy reports the
    response (the observer filter or the routing stream)."""
    assert stack.picker is not None
    metrics_url = f"http://127.0.0.1:{stack.picker.metrics_port}/metrics"
    streaming = json.dumps(
        {
            "model": MODEL_A,
            "prompt": "hi",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    async with aiohttp.ClientSession() as session:
        before = await _scrape(session, metrics_url)
        for body in [_completion(MODEL_A), streaming] * 3:
            status, _, _ = await _post(session, stack, "/v1/completions", body)
            assert status == 200
        for _ in range(100):
            after = await _scrape(session, metrics_url)
            prompt = after.get('extproc_usage_tokens_total{kind="prompt"}', 0) - before.get(
                'extproc_usage_tokens_total{kind="prompt"}', 0
            )
            inflight = sum(
                v for k, v in after.items() if k.startswith("extproc_inflight_requests{")
            )
            if prompt == 6 * 7 and inflight == 0:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"prompt tokens counted {prompt}, in flight {inflight}")


async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url) as response:
        text = await response.text()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
