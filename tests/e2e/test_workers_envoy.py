"""`extproc serve --workers 2` behind the real Envoy on the bundled `ended` path (issue 19).

Envoy (two worker threads, so two connections the kernel hashes over the picker's processes)
sends each request's ext_proc stream and its access log entry to the picker's one port. Every
request must be released, counted as served and have its usage counted once, whichever worker
each stream and each entry reached: nothing is left to `usage_wait_seconds`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import MODEL_A, Picker, run_envoy, run_picker

pytestmark = pytest.mark.e2e

REQUESTS = 24
COMPLETION_TOKENS = 4  # what the harness' backends report for each answer


async def _counters(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "extproc_served_requests_total":
                found["served"] = found.get("served", 0) + sample.value
            elif name == "extproc_usage_tokens_total" and labels["kind"] == "completion":
                found["completion"] = sample.value
            elif name == "extproc_stream_errors_total":
                found[labels["reason"]] = sample.value
            elif name == "extproc_inflight_requests":
                found["inflight"] = found.get("inflight", 0) + sample.value
    return found


async def _both(session: aiohttp.ClientSession, picker: Picker) -> list[dict[str, float]]:
    return [await _counters(session, picker.metrics_port + i) for i in (0, 1)]


async def test_two_workers_settle_every_request_through_envoy(
    logs: Path, addresses: list[str]
) -> None:
    with (
        run_picker(logs, addresses, workers=2) as picker,
        run_envoy(
            logs, extproc=picker.address, endpoints=addresses, picker=picker, concurrency=2
        ) as stack,
    ):
        usage = {"include_usage": True}
        request = {"model": MODEL_A, "prompt": "hi", "max_tokens": 4, "stream": True}
        body = json.dumps({**request, "stream_options": usage}).encode()
        async with aiohttp.ClientSession() as session:

            async def one() -> None:
                async with session.post(
                    f"{stack.url}/v1/completions",
                    data=body,
                    headers={"content-type": "application/json"},
                ) as response:
                    assert response.status == 200, await response.read()
                    await response.read()

            for _ in range(REQUESTS // 4):
                await asyncio.gather(*(one() for _ in range(4)))
            counted: list[dict[str, float]] = []
            # Well inside `usage_wait_seconds` (10 s): an entry that reached no worker that
            # knew its request would be settled only then.
            for _ in range(60):
                counted = await _both(session, picker)
                if sum(c.get("served", 0) for c in counted) >= REQUESTS:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # anything counted twice would show up by now
            counted = await _both(session, picker)
        report = f"{counted}\n{stack.logs()}"
    assert sum(c.get("served", 0) for c in counted) == REQUESTS, report
    assert sum(c.get("completion", 0) for c in counted) == REQUESTS * COMPLETION_TOKENS, report
    assert sum(c.get("inflight", 0) for c in counted) == 0, report
    assert all(c.get("usage_never_logged", 0) == 0 for c in counted), report
