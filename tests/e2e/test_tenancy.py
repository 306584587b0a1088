"""Tenancy through the real Envoy: every refusal reaches the client as OpenAI error JSON with its
status and headers, the picker goes on serving, an isolated tenant's cache salt reaches the model
server in both body modes, and on the simulator two tenants sending one prompt share no KV
blocks while one tenant does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import BodyMode
from extproc.sim import SimConfig, SimFleet
from extproc.tenancy.policy import key_digest
from extproc.tenancy.salt import tenant_salt
from tests.redis_server import RedisServer

from .harness import MODEL_A, MODEL_B, Fleet, Picker, Stack, run_envoy, run_picker

pytestmark = pytest.mark.e2e

KEYS = {"acme": "sk-e2e-acme-0123456789", "globex": "sk-e2e-globex-9876543210"}
SALT_KEY = "e2e-salt-key-0123456789"
# The trusted tenant header, as a trusted filter in front of the picker would set it. The bundled
# Envoy drops the default x-tenant-id from client requests (docs/envoy.md, "Tenant header";
# tests/e2e/test_envoy_hardening.py), so these tests name one it passes through.
TRUSTED_HEADER = "x-e2e-tenant"


def _tenancy(**more: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "identity": ["api-key", "header"],
        "header": TRUSTED_HEADER,
        "cache_salt_key": SALT_KEY,
        "tenants": {
            "acme": {"api_keys": [key_digest(KEYS["acme"])], "cache_isolation": True},
            "globex": {
                "api_keys": [key_digest(KEYS["globex"])],
                "models": [MODEL_A],
                "requests_per_minute": 3,
            },
        },
        **more,
    }


@pytest.fixture(scope="module")
def tenant_picker(logs: Path, addresses: list[str]) -> Iterator[Picker]:
    with run_picker(logs, addresses, config={"tenancy": _tenancy()}) as picker:
        yield picker


@pytest.fixture(scope="module", params=["streamed", "buffered"])
def tenant_stack(
    request: pytest.FixtureRequest, logs: Path, addresses: list[str], tenant_picker: Picker
) -> Iterator[Stack]:
    with run_envoy(
        logs,
        extproc=tenant_picker.address,
        endpoints=addresses,
        picker=tenant_picker,
        body_mode=request.param,
    ) as stack:
        yield stack


def _bearer(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}", "content-type": "application/json"}


async def _post(
    session: aiohttp.ClientSession, stack: Stack, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.post(
        f"{stack.url}/v1/completions", data=json.dumps(body).encode(), headers=headers
    ) as response:
        return response.status, response.headers.copy(), await response.read()


REFUSALS = [
    pytest.param(
        {"content-type": "application/json"}, MODEL_A, 401, "missing_api_key", id="no-key"
    ),
    pytest.param(
        {"authorization": "Bearer sk-guess", "content-type": "application/json"},
        MODEL_A,
        401,
        "invalid_api_key",
        id="bad-key",
    ),
    pytest.param(
        {TRUSTED_HEADER: "initech", "content-type": "application/json"},
        MODEL_A,
        401,
        "unknown_tenant",
        id="unknown-tenant",
    ),
    pytest.param(_bearer("globex"), MODEL_B, 403, "model_not_allowed", id="model-not-allowed"),
]


@pytest.mark.parametrize(("headers", "model", "status", "code"), REFUSALS)
async def test_tenancy_refusals_through_envoy(
    tenant_stack: Stack, fleet: Fleet, headers: dict[str, str], model: str, status: int, code: str
) -> None:
    served_before = sum(len(b.via_envoy("/v1/completions")) for b in fleet.backends)
    async with aiohttp.ClientSession() as session:
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        got, reply_headers, raw = await _post(session, tenant_stack, body, headers)
        assert got == status, (raw, tenant_stack.logs())
        error = json.loads(raw)["error"]
        assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
        if status == 401:
            assert reply_headers["www-authenticate"].startswith("Bearer")
        served_after = sum(len(b.via_envoy("/v1/completions")) for b in fleet.backends)
        assert served_after == served_before, "a refused request must not reach a backend"
        good = {"model": MODEL_A, "prompt": "hi", "max_tokens": 2}
        got, _, raw = await _post(session, tenant_stack, good, _bearer("acme"))
        assert got == 200, (raw, tenant_stack.logs())
    assert KEYS["acme"] not in tenant_stack.logs()


async def test_the_rate_limit_reaches_the_client_with_retry_after(
    logs: Path, addresses: list[str]
) -> None:
    with (
        run_picker(logs, addresses, config={"tenancy": _tenancy()}) as picker,
        run_envoy(logs, extproc=picker.address, endpoints=addresses, picker=picker) as stack,
    ):
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL_A, "prompt": "hi", "max_tokens": 2}
            statuses = []
            for _ in range(4):
                status, headers, raw = await _post(session, stack, body, _bearer("globex"))
                statuses.append(status)
            assert statuses == [200, 200, 200, 429], stack.logs()
            assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
            assert headers["x-ratelimit-limit-requests"] == "3"
            assert int(headers["retry-after"]) >= 1
            # Another tenant is not affected.
            status, _, _ = await _post(session, stack, body, _bearer("acme"))
            assert status == 200


async def test_the_isolated_tenants_salt_reaches_the_model_server(
    tenant_stack: Stack, fleet: Fleet
) -> None:
    body = {"model": MODEL_A, "prompt": "salted prompt", "max_tokens": 2, "cache_salt": "u1"}
    async with aiohttp.ClientSession() as session:
        status, _, raw = await _post(session, tenant_stack, body, _bearer("acme"))
        assert status == 200, (raw, tenant_stack.logs())
    received = [
        json.loads(r.body)
        for b in fleet.backends
        for r in b.via_envoy("/v1/completions")
        if b"salted prompt" in r.body
    ]
    # The backend parsed the rewritten body: its length and content-length agreed.
    assert received and received[-1] == {
        **body,
        "cache_salt": tenant_salt("acme", "u1", key=SALT_KEY),
    }


# --- isolation on the simulator -----------------------------------------------------------------


async def _until_listed(stack: Stack, model: str, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"{stack.url}/v1/models", headers=headers) as response:
                listed = [m["id"] for m in (await response.json())["data"]]
            if model in listed:
                return
            await asyncio.sleep(0.1)
    pytest.fail(f"the picker never listed {model}:\n{stack.logs()}")


@pytest.fixture
async def sim() -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(pods=1, speed=50)) as fleet:
        yield fleet


async def test_tenants_share_no_kv_blocks_but_a_tenant_shares_its_own(
    logs: Path, sim: SimFleet
) -> None:
    address = sim.urls[0].removeprefix("http://")
    tenancy = _tenancy(
        tenants={
            name: {"api_keys": [key_digest(key)], "cache_isolation": True}
            for name, key in KEYS.items()
        }
        | {"open-a": {}, "open-b": {}}
    )
    prompt = "The quarterly report says revenue grew in every region. " * 40
    body = {"model": sim.config.model, "prompt": prompt, "max_tokens": 1}
    # The simulator runs in this test's event loop, which starting the picker blocks: the picker
    # reads /v1/models again every 0.2 s, and the test waits until it lists the model.
    config = {"tenancy": tenancy, "discovery": {"models_refresh_seconds": 0.2}}
    with (
        run_picker(logs, [address], config=config, ready=False) as picker,
        run_envoy(logs, extproc=picker.address, endpoints=[address], picker=picker) as stack,
    ):
        await _until_listed(stack, sim.config.model, _bearer("acme"))

        async def cached(headers: dict[str, str]) -> int:
            async with aiohttp.ClientSession() as session:
                status, _, raw = await _post(session, stack, body, headers)
            assert status == 200, (raw, stack.logs())
            return int(json.loads(raw)["usage"]["prompt_tokens_details"]["cached_tokens"])

        assert await cached(_bearer("acme")) == 0
        assert await cached(_bearer("globex")) == 0  # same prompt, another tenant: no hit
        assert await cached(_bearer("acme")) > 0  # the same tenant again: its blocks are there
        # Control: two tenants without isolation do share the cache.
        header = {"content-type": "application/json"}
        assert await cached({**header, TRUSTED_HEADER: "open-a"}) == 0
        assert await cached({**header, TRUSTED_HEADER: "open-b"}) > 0


# --- refusals of a saturated pool and of a missing Redis, through Envoy -------------------------


async def test_a_saturated_pool_queues_sheds_and_times_out_through_envoy(
    logs: Path, own_fleet: Fleet
) -> None:
    """One backend that takes one request at a time (`saturation_requests: 1`), held busy by a
    stream the test keeps open: the next request waits in the fair queue and times out (429),
    one more from the same tenant finds its queue full (429), a sheddable tenant's is refused at
    once (429), and all come back as OpenAI errors."""
    backend = own_fleet.start(MODEL_A)
    tenancy = {
        "enabled": True,
        "identity": ["header"],
        "header": TRUSTED_HEADER,
        "queue_timeout_seconds": 1.0,
        "max_queued_per_tenant": 1,
        "tenants": {"steady": {}, "batch": {"priority": -1}},
    }
    config = {
        "tenancy": tenancy,
        "scheduling": {"saturation_requests": 1, "saturation_queue": 1000.0},
    }
    own_fleet.hold_streams()
    with (
        run_picker(logs, [backend.address], config=config) as picker,
        run_envoy(
            logs, extproc=picker.address, endpoints=[backend.address], picker=picker
        ) as stack,
    ):
        async with aiohttp.ClientSession() as session:
            held = {"model": MODEL_A, "prompt": "hold", "max_tokens": 4, "stream": True}
            async with session.post(
                f"{stack.url}/v1/completions",
                data=json.dumps(held).encode(),
                headers={TRUSTED_HEADER: "steady", "content-type": "application/json"},
            ) as streaming:
                assert streaming.status == 200, stack.logs()
                await streaming.content.readuntil(b"\n\n")  # the first chunk: it is in flight
                body = {"model": MODEL_A, "prompt": "next", "max_tokens": 2}
                steady = {TRUSTED_HEADER: "steady", "content-type": "application/json"}
                batch = {TRUSTED_HEADER: "batch", "content-type": "application/json"}
                waiting = asyncio.create_task(_post(session, stack, body, steady))
                await asyncio.sleep(0.3)  # it is in steady's queue now, which holds one
                answers = [
                    (await _post(session, stack, body, steady), "queue_full"),
                    (await waiting, "queue_timeout"),
                    (await _post(session, stack, body, batch), "request_shed"),
                ]
                for (status, reply_headers, raw), code in answers:
                    assert status == 429, (raw, stack.logs())
                    assert json.loads(raw)["error"]["code"] == code
                    assert int(reply_headers["retry-after"]) >= 1
                own_fleet.release_streams()
                await streaming.read()
            # The stream has ended: room again, and the same request is served.
            headers = {TRUSTED_HEADER: "steady", "content-type": "application/json"}
            status, _, raw = await _post(session, stack, body, headers)
            assert status == 200, (raw, stack.logs())


async def test_redis_down_with_failing_closed_is_503_through_envoy(
    logs: Path, addresses: list[str], redis_server: RedisServer
) -> None:
    tenancy = _tenancy(
        limits_backend="redis", redis_url=redis_server.url, redis_failure_mode="closed"
    )
    with (
        run_picker(logs, addresses, config={"tenancy": tenancy}) as picker,
        run_envoy(logs, extproc=picker.address, endpoints=addresses, picker=picker) as stack,
    ):
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL_A, "prompt": "hi", "max_tokens": 2}
            status, _, raw = await _post(session, stack, body, _bearer("globex"))
            assert status == 200, (raw, stack.logs())
            redis_server.kill()
            status, headers, raw = await _post(session, stack, body, _bearer("globex"))
            assert status == 503, (raw, stack.logs())
            assert json.loads(raw)["error"]["code"] == "limiter_unavailable"
            assert "retry-after" in headers
            # A tenant without limits never needs Redis.
            status, _, raw = await _post(session, stack, body, _bearer("acme"))
            assert status == 200, (raw, stack.logs())


# --- a client that hangs up mid-stream, through Envoy ---------------------------------------------


async def _inflight(session: aiohttp.ClientSession, picker: Picker) -> float:
    async with session.get(f"http://127.0.0.1:{picker.metrics_port}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "extproc_inflight_requests"
    )


async def _until_none_in_flight(session: aiohttp.ClientSession, picker: Picker) -> None:
    """Envoy ends the ext_proc stream a few ms after the response (or the hang-up)."""
    for _ in range(100):
        if await _inflight(session, picker) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still in flight after 5 s:\n{picker.log.read_text()[-2000:]}")


@pytest.mark.parametrize("body_mode", ["buffered", "streamed"])
async def test_a_client_that_hangs_up_mid_stream_gives_back_its_slot_through_envoy(
    logs: Path, own_fleet: Fleet, body_mode: BodyMode
) -> None:
    """The default (`ended`) response path sends the picker no response chunk: the end of the
    ext_proc stream is the request's end. A client that leaves mid-answer must free its
    in-flight count and its tenant's one concurrency slot at once, not at a timeout."""
    backend = own_fleet.start(MODEL_A)
    tenancy = {
        "enabled": True,
        "identity": ["header"],
        "header": TRUSTED_HEADER,
        "tenants": {"solo": {"max_concurrency": 1}},
    }
    headers = {TRUSTED_HEADER: "solo", "content-type": "application/json"}
    streamed = {"model": MODEL_A, "prompt": "hold", "max_tokens": 4, "stream": True}
    own_fleet.hold_streams()  # each answer stops after its first chunk
    with (
        run_picker(logs, [backend.address], config={"tenancy": tenancy}) as picker,
        run_envoy(
            logs,
            extproc=picker.address,
            endpoints=[backend.address],
            picker=picker,
            body_mode=body_mode,
        ) as stack,
    ):
        async with aiohttp.ClientSession() as session:
            url = f"{stack.url}/v1/completions"
            response = await session.post(url, data=json.dumps(streamed).encode(), headers=headers)
            assert response.status == 200, stack.logs()
            await response.content.readuntil(b"\n\n")  # mid-stream: one chunk in, more to come
            assert await _inflight(session, picker) == 1
            body = {"model": MODEL_A, "prompt": "next", "max_tokens": 2}
            status, _, raw = await _post(session, stack, body, headers)
            assert status == 429, raw  # the tenant's one slot is taken
            assert json.loads(raw)["error"]["type"] == "concurrency", raw

            response.close()  # the client hangs up; the backend is still streaming
            await _until_none_in_flight(session, picker)
            own_fleet.release_streams()
            status, _, raw = await _post(session, stack, body, headers)
            assert status == 200, (raw, stack.logs())  # the slot came back
            await _until_none_in_flight(session, picker)  # and this one's end is seen too
