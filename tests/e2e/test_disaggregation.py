"""Prefill/decode disaggregation through the real Envoy and the simulator: in `p2p` mode the
picker names the prefill endpoint in `x-prefiller-host-port` and the decode server (as the llm-d
sidecar would) has it prefill and pulls the KV; in `centralized` mode the picker runs the
prefill and hands the decode server vLLM's `kv_transfer_params`. Either way the client gets a
whole answer, the prefill server computed the prompt and made one token, and the decode server
pulled the blocks instead of computing them. A short prompt is served by a decode server alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.sim import SimConfig, SimFleet

from .harness import Stack, run_envoy, run_picker

pytestmark = pytest.mark.e2e

PROMPT = "The quarterly report says revenue grew in every region, led by exports. " * 120


@pytest.fixture
async def sim() -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(pods=3, speed=20)) as fleet:
        yield fleet


@contextlib.contextmanager
def _split_stack(logs: Path, sim: SimFleet, mode: str) -> Iterator[Stack]:
    """The picker and Envoy over `sim`: its first server prefills, the others decode."""
    prefill, *decode = (url.removeprefix("http://") for url in sim.urls)
    config = {
        "discovery": {"models_refresh_seconds": 0.2},
        "disaggregation": {"mode": mode, "threshold_tokens": 256},
        "endpoints": [{"address": prefill, "role": "prefill"}]
        + [{"address": a, "role": "decode"} for a in decode],
    }
    with (
        run_picker(logs, [], config=config, ready=False) as picker,
        run_envoy(
            logs, extproc=picker.address, endpoints=[prefill, *decode], picker=picker
        ) as stack,
    ):
        yield stack


async def _until_listed(stack: Stack, model: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"{stack.url}/v1/models") as response:
                if response.status == 200:
                    listed = [m["id"] for m in (await response.json())["data"]]
                    if model in listed:
                        return
            await asyncio.sleep(0.1)
    pytest.fail(f"the picker never listed {model}:\n{stack.logs()}")


async def _complete(
    stack: Stack, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", **(headers or {})},
        ) as response,
    ):
        raw = await response.read()
    assert response.status == 200, (raw, stack.logs())
    answer: dict[str, Any] = json.loads(raw)
    return answer


@pytest.mark.parametrize("mode", ["p2p", "centralized"])
async def test_a_long_prompt_is_prefilled_on_one_server_and_decoded_on_another(
    logs: Path, sim: SimFleet, mode: str
) -> None:
    model = sim.config.model
    with _split_stack(logs, sim, mode) as stack:
        await _until_listed(stack, model)
        answer = await _complete(stack, {"model": model, "prompt": PROMPT, "max_tokens": 12})
        assert answer["usage"]["completion_tokens"] == 12
        servers = sim.servers
        # The prefill server computed the prompt and made the one token the prefill asks for.
        prefilled = servers[0].stats()
        assert prefilled.prompt_tokens == answer["usage"]["prompt_tokens"]
        assert prefilled.generation_tokens == 1
        # The decode server that answered pulled the prompt's blocks.
        served = next(s for s in servers[1:] if s.finished(answer["id"]) is not None)
        record = served.finished(answer["id"])
        assert record is not None
        assert record.transferred_blocks > 0 and record.prefill_arrival is not None
        assert served.stats().generation_tokens == 12

        # A prompt under the threshold never visits the prefill server.
        short = await _complete(stack, {"model": model, "prompt": "Hello there.", "max_tokens": 3})
        assert short["usage"]["completion_tokens"] == 3
        assert servers[0].stats().generation_tokens == 1


async def test_a_clients_own_prefiller_header_never_reaches_the_sidecar(
    logs: Path, sim: SimFleet
) -> None:
    """The sidecar on a decode pod prefills wherever `x-prefiller-host-port` says, so a client
    could point it at any address; the picker removes the client's header when it sets none."""
    prefill = sim.urls[0].removeprefix("http://")
    model = sim.config.model
    with _split_stack(logs, sim, "p2p") as stack:
        await _until_listed(stack, model)
        # Under the threshold: the picker keeps the request whole and names no prefiller.
        answer = await _complete(
            stack,
            {"model": model, "prompt": "Hello there.", "max_tokens": 3},
            headers={"x-prefiller-host-port": prefill},
        )
        assert answer["usage"]["completion_tokens"] == 3
        assert sim.servers[0].stats().prompt_tokens == 0, "the client's header reached a sidecar"
