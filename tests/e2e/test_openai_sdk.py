"""The official OpenAI Python SDK as the client, through the real Envoy and `extproc serve` in
front of the fake fleet: what works with the SDK works with the picker, and each refusal the
picker makes reaches the SDK as the exception its status code stands for.

One picker with tenancy on (API keys only, so a bad key is a 401), in front of both body modes.
The SDK never retries here (`max_retries=0`), so each status is the picker's first answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from extproc.tenancy.policy import key_digest

from .harness import MODEL_A, MODEL_B, Fleet, Picker, Stack, free_port, run_envoy, run_picker

pytestmark = pytest.mark.e2e

MODES = ("streamed", "buffered")
KEYS = {
    "sdk": "sk-sdk-open-0123456789abcdef",
    "limited": "sk-sdk-limited-0123456789abcdef",
    **{f"rate-{mode}": f"sk-sdk-rate-{mode}-0123456789abcdef" for mode in MODES},
}
MODEL_DOWN = "model-down"  # declared for an endpoint nothing listens on: known, never ready
MAX_BODY_BYTES = 1_000_000


def _tenancy() -> dict[str, Any]:
    tenants: dict[str, Any] = {
        "sdk": {"api_keys": [key_digest(KEYS["sdk"])]},
        "limited": {"api_keys": [key_digest(KEYS["limited"])], "models": [MODEL_A]},
    }
    for mode in MODES:  # one per Envoy: the picker (and so the bucket) is shared by both
        tenants[f"rate-{mode}"] = {
            "api_keys": [key_digest(KEYS[f"rate-{mode}"])],
            "requests_per_minute": 1,
        }
    return {"enabled": True, "identity": ["api-key"], "tenants": tenants}


@pytest.fixture(scope="module")
def sdk_picker(logs: Path, addresses: list[str]) -> Iterator[Picker]:
    endpoints: list[dict[str, Any]] = [{"address": a} for a in addresses]
    endpoints.append({"address": f"127.0.0.1:{free_port()}", "models": [MODEL_DOWN]})
    config = {
        "tenancy": _tenancy(),
        "endpoints": endpoints,
        # The dead endpoint is found not ready within a fraction of a second.
        "discovery": {"models_refresh_seconds": 0.2, "request_timeout_seconds": 0.5},
    }
    extra = ["--max-body-bytes", str(MAX_BODY_BYTES)]
    with run_picker(logs, [], config=config, extra=extra) as picker:
        yield picker


@pytest.fixture(scope="module", params=MODES)
def sdk_stack(
    request: pytest.FixtureRequest, logs: Path, addresses: list[str], sdk_picker: Picker
) -> Iterator[Stack]:
    with run_envoy(
        logs,
        extproc=sdk_picker.address,
        endpoints=addresses,
        picker=sdk_picker,
        body_mode=request.param,
    ) as stack:
        yield stack


def _mode(stack: Stack) -> str:
    return "buffered" if "-buffered-" in stack.envoy_log.name else "streamed"


@pytest.fixture
async def client(sdk_stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with _client(sdk_stack, KEYS["sdk"]) as sdk:
        yield sdk


def _client(stack: Stack, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=15.0)


async def _inflight(picker: Picker) -> float:
    """The picker's in-flight requests, from its own /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{picker.metrics_port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("extproc_inflight_requests{")
    )


async def _nothing_in_flight(stack: Stack) -> None:
    assert stack.picker is not None
    for _ in range(100):  # the stream's end reaches the picker just after the client's
        if await _inflight(stack.picker) == 0:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"requests left in flight at the picker:\n{stack.logs()}")


# --- what the SDK does ---------------------------------------------------------------------------


async def test_completions(client: AsyncOpenAI, sdk_stack: Stack) -> None:
    completion = await client.completions.create(model=MODEL_A, prompt="Hello", max_tokens=4)
    assert completion.model == MODEL_A
    assert completion.choices[0].text == "Hello from the fleet"
    assert completion.usage is not None and completion.usage.total_tokens == 11
    await _nothing_in_flight(sdk_stack)


async def test_chat_completions(client: AsyncOpenAI, sdk_stack: Stack) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL_B, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert raw.headers["x-backend"], sdk_stack.logs()  # served by a backend, through Envoy
    chat = raw.parse()
    assert chat.model == MODEL_B
    assert chat.choices[0].message.content == "Hello from the fleet"
    await _nothing_in_flight(sdk_stack)


async def test_streaming_chat_ends_with_the_usage_chunk(
    client: AsyncOpenAI, sdk_stack: Stack
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL_A,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fleet"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, last
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 4)
    assert all(c.usage is None for c in chunks[:-1])
    await _nothing_in_flight(sdk_stack)


async def test_the_model_list(client: AsyncOpenAI) -> None:
    listed = {model.id async for model in client.models.list()}
    assert {MODEL_A, MODEL_B} <= listed


# --- each refusal as the SDK's exception ---------------------------------------------------------


def _check_error(exc: openai.APIStatusError, status: int, code: str | None = None) -> None:
    assert exc.status_code == status, (exc.status_code, exc.body)
    assert exc.response.headers["content-type"].startswith("application/json")
    # The SDK reads the OpenAI envelope: `body` is the inner error object.
    assert isinstance(exc.body, dict) and exc.body.get("message"), exc.body
    assert json.loads(exc.response.content)["error"]["message"] == exc.body["message"]
    if code is not None:
        assert exc.code == code, exc.body


async def test_a_bad_request_is_bad_request_error(client: AsyncOpenAI, sdk_stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as negative:
        await client.completions.create(model=MODEL_A, prompt="hi", max_tokens=-1)
    _check_error(negative.value, 400, "invalid_value")
    assert negative.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as malformed:
        await client.chat.completions.create(
            model=MODEL_A, messages=[], extra_body={"messages": "not a list"}
        )
    _check_error(malformed.value, 400, "invalid_value")


async def test_a_bad_api_key_is_authentication_error(sdk_stack: Stack) -> None:
    async with _client(sdk_stack, "sk-not-a-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as raised:
            await sdk.completions.create(model=MODEL_A, prompt="hi", max_tokens=2)
    _check_error(raised.value, 401, "invalid_api_key")
    assert raised.value.response.headers["www-authenticate"].startswith("Bearer")


async def test_a_model_not_allowed_is_permission_denied_error(sdk_stack: Stack) -> None:
    async with _client(sdk_stack, KEYS["limited"]) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            await sdk.completions.create(model=MODEL_B, prompt="hi", max_tokens=2)
        _check_error(raised.value, 403, "model_not_allowed")
        allowed = await sdk.completions.create(model=MODEL_A, prompt="hi", max_tokens=2)
        assert allowed.model == MODEL_A


async def test_an_unknown_model_is_not_found_error(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    _check_error(raised.value, 404, "model_not_found")


async def test_an_oversized_body_is_a_413(client: AsyncOpenAI, sdk_stack: Stack) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        await client.completions.create(model=MODEL_A, prompt="y" * (MAX_BODY_BYTES + 200_000))
    # The SDK has no class of its own for 413: the base class, with the status.
    assert type(raised.value) is openai.APIStatusError, type(raised.value)
    _check_error(raised.value, 413)
    await _nothing_in_flight(sdk_stack)


async def test_the_rate_limit_is_rate_limit_error(sdk_stack: Stack) -> None:
    async with _client(sdk_stack, KEYS[f"rate-{_mode(sdk_stack)}"]) as sdk:
        served = await sdk.completions.create(model=MODEL_A, prompt="hi", max_tokens=2)
        assert served.model == MODEL_A
        with pytest.raises(openai.RateLimitError) as raised:
            await sdk.completions.create(model=MODEL_A, prompt="hi", max_tokens=2)
    _check_error(raised.value, 429, "rate_limit_exceeded")
    headers = raised.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert int(headers["retry-after"]) >= 1


async def test_no_ready_endpoint_is_internal_server_error(
    client: AsyncOpenAI, sdk_stack: Stack
) -> None:
    """The SDK calls every 5xx an InternalServerError; the status says which."""
    for _ in range(50):  # until a refresh has found the dead endpoint not ready
        try:
            await client.completions.create(model=MODEL_DOWN, prompt="hi", max_tokens=2)
        except openai.InternalServerError as exc:
            if exc.response.headers.get("content-type", "").startswith("application/json"):
                _check_error(exc, 503, "no_ready_endpoint")
                assert int(exc.response.headers["retry-after"]) >= 0
                return
            # Envoy's own 503 (nothing listens there): the picker did not know it down yet.
        await asyncio.sleep(0.1)
    pytest.fail(f"never a 503 for {MODEL_DOWN}:\n{sdk_stack.logs()}")


async def test_it_goes_on_serving_after_every_refusal(
    client: AsyncOpenAI, fleet: Fleet, sdk_stack: Stack
) -> None:
    """Last in the module: after all the refusals above, the same SDK client is served."""
    completion = await client.completions.create(model=MODEL_A, prompt="again", max_tokens=2)
    assert completion.choices[0].text == "Hello from the fleet"
    await _nothing_in_flight(sdk_stack)
