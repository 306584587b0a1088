"""Two picker replicas behind one real Envoy on the `ended` response path (issue 19).

Envoy spreads the ext_proc streams over both pickers, while its access log (one gRPC stream per
worker, `--concurrency 1` here) reaches one of them: about half of the entries name a request the
other replica routed. Those are settled where they land, from the tenant the routing reply wrote
into the entry, so the tenant's shared token limit (Redis) and the two replicas' token metrics
together see the completion tokens of every request, each once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.bench import envoy, envoy_config
from tests.redis_server import RedisServer

from .harness import MODEL_A, Picker, Stack, free_port, run_picker

pytestmark = pytest.mark.e2e

TENANT_HEADER = "x-e2e-tenant"  # passed through by the bundled Envoy (x-tenant-id is dropped)
TOKENS_PER_MINUTE = 600  # 10 tokens per second: little refills while the test runs
START_LEVEL = 300.0  # the seeded bucket stays below its capacity, so no refill is cut off
REQUESTS = 16
COMPLETION_TOKENS = 4  # what the harness' backends report for each answer


@contextlib.contextmanager
def _envoy_in_front_of(logs: Path, pickers: list[Picker], endpoints: list[str]) -> Iterator[Stack]:
    """The bundled `ended` Envoy with both pickers in its `extproc` cluster, which carries the
    ext_proc streams and the access log alike."""
    port, admin_port = free_port(), free_port()
    rendered = envoy_config.render_bootstrap(
        port=port,
        extproc=pickers[0].address,
        endpoints=endpoints,
        admin_port=admin_port,
        listen_host="127.0.0.1",
    )
    config = yaml.safe_load(rendered)
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extproc")
    cluster["load_assignment"]["endpoints"] = [
        {
            "lb_endpoints": [
                {
                    "endpoint": {
                        "address": {
                            "socket_address": {"address": "127.0.0.1", "port_value": p.grpc_port}
                        }
                    }
                }
                for p in pickers
            ]
        }
    ]
    log = logs / f"envoy-{port}-two-replicas.log"
    with log.open("wb") as out:
        process = envoy.start_envoy(
            yaml.safe_dump(config), admin_port=admin_port, concurrency=1, stdout=out, stderr=out
        )
    try:
        process.wait_ready(within=20)
        yield Stack(port, process, log, pickers[0])
    finally:
        process.stop()


async def _counters(session: aiohttp.ClientSession, picker: Picker) -> dict[str, float]:
    """The picker's token and request counters, by series."""
    url = f"http://127.0.0.1:{picker.metrics_port}/metrics"
    async with session.get(url) as response:
        text = await response.text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "extproc_usage_tokens_total":
                found[f"usage:{labels['kind']}"] = sample.value
            elif sample.name == "extproc_tenant_tokens_total" and labels["tenant"] == "acme":
                found[f"acme:{labels['kind']}"] = sample.value
            elif sample.name == "extproc_tenant_requests_total" and labels["outcome"] == "routed":
                found["routed"] = found.get("routed", 0) + sample.value
    return found


async def test_a_tenants_token_limit_sees_every_completion_with_two_replicas(
    logs: Path, addresses: list[str], redis_server: RedisServer
) -> None:
    tenancy = {
        "enabled": True,
        "identity": ["header"],
        "header": TENANT_HEADER,
        "tenants": {"acme": {"tokens_per_minute": TOKENS_PER_MINUTE}},
        "limits_backend": "redis",
        "redis_url": redis_server.url,
    }
    redis = aioredis.Redis.from_url(redis_server.url)
    key = "extproc:{acme}:tokens"
    with (
        run_picker(logs, addresses, config={"tenancy": tenancy}) as one,
        run_picker(logs, addresses, config={"tenancy": tenancy}) as two,
        _envoy_in_front_of(logs, [one, two], addresses) as stack,
    ):
        try:
            seconds, micros = await redis.time()
            seeded_ms = seconds * 1000 + micros // 1000
            await redis.hset(key, mapping={"level": str(START_LEVEL), "ts": seeded_ms})
            body = json.dumps({"model": MODEL_A, "prompt": "hi", "max_tokens": 4}).encode()
            headers = {TENANT_HEADER: "acme", "content-type": "application/json"}
            async with aiohttp.ClientSession() as session:
                for _ in range(REQUESTS):
                    async with session.post(
                        f"{stack.url}/v1/completions", data=body, headers=headers
                    ) as response:
                        assert response.status == 200, (await response.read(), stack.logs())
                        await response.read()
                total = REQUESTS * COMPLETION_TOKENS
                counted: list[dict[str, float]] = []
                for _ in range(200):
                    counted = [await _counters(session, p) for p in (one, two)]
                    if sum(c.get("acme:completion", 0) for c in counted) >= total:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # anything counted twice would show up by now
                counted = [await _counters(session, p) for p in (one, two)]
            report = f"{counted}\n{stack.logs()}"
            # Both replicas routed, and one of them got entries for the other's requests.
            assert all(c.get("routed", 0) > 0 for c in counted), report
            assert any(
                c.get("acme:completion", 0) != c["routed"] * COMPLETION_TOKENS for c in counted
            ), report
            # The two replicas' counts add up to every request's completion tokens, once.
            assert sum(c.get("usage:completion", 0) for c in counted) == total, report
            assert sum(c.get("acme:completion", 0) for c in counted) == total, report
            # The shared bucket: seeded, refilled at 10 tokens/s since, less every prompt token
            # (charged at the pick) and every completion token (charged by whichever replica
            # got the entry). Redis' own clock and the last write's time make this exact.
            prompt = sum(c.get("acme:prompt", 0) for c in counted)
            raw_level, raw_ts = await redis.hmget(key, ["level", "ts"])
            refilled = (int(raw_ts) - seeded_ms) * TOKENS_PER_MINUTE / 60_000
            expected = START_LEVEL + refilled - prompt - total
            assert float(raw_level) == pytest.approx(expected, abs=0.01), report
        finally:
            await redis.aclose()
