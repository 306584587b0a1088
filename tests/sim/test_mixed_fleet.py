"""Mixed fleets (a profile per server), busy-time accounting, and the benchmarks' fleet host."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from dataclasses import asdict

import aiohttp
import pytest
from aiohttp import web

from extproc.bench.simhost import _app, config_from_json
from extproc.prefix.tokenizers import Tokenizer
from extproc.sim import SimConfig, SimFleet
from extproc.sim.cli import add_arguments, config_from_args
from extproc.sim.profiles import get_profile, parse_profile_spec
from tests.sim.conftest import post, words


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a100-8b:2,h100-8b:1", ("a100-8b", "a100-8b", "h100-8b")),
        ("h100-8b", ("h100-8b",)),
        (" a100-8b:1 , h100-8b ", ("a100-8b", "h100-8b")),
    ],
    ids=["counts", "one-name", "spaces"],
)
def test_profile_spec(spec: str, expected: tuple[str, ...]) -> None:
    assert parse_profile_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["b200-8b:2", "a100-8b:x", "a100-8b:0", ""], ids=["unknown", "nan", "zero", "empty"]
)
def test_bad_profile_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="profile"):
        parse_profile_spec(spec)


def test_profiles_must_name_every_server() -> None:
    with pytest.raises(ValueError, match="pods"):
        SimConfig(pods=3, profiles=("a100-8b", "h100-8b"))
    with pytest.raises(ValueError, match="unknown profile"):
        SimConfig(pods=1, profiles=("b200-8b",))


@pytest.mark.parametrize(
    ("text", "pods", "profiles"),
    [
        ('{"profiles": "a100-8b:2,h100-8b:1"}', 3, ("a100-8b", "a100-8b", "h100-8b")),
        ('{"pods": 2, "profiles": ["h100-8b", "a100-8b"]}', 2, ("h100-8b", "a100-8b")),
        ('{"pods": 2}', 2, ()),
    ],
    ids=["spec-sets-pods", "list", "none"],
)
def test_simhost_json_profiles(text: str, pods: int, profiles: tuple[str, ...]) -> None:
    config = config_from_json(text)
    assert (config.pods, config.profiles) == (pods, profiles)


@pytest.mark.parametrize(
    ("argv", "pods", "profiles"),
    [
        (["--profiles", "a100-8b:4,h100-8b:4"], 8, ("a100-8b",) * 4 + ("h100-8b",) * 4),
        (["--pods", "3"], 3, ()),
        ([], 1, ()),
    ],
    ids=["profiles-set-pods", "pods", "default"],
)
def test_cli_profiles(argv: list[str], pods: int, profiles: tuple[str, ...]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    assert (config.pods, config.profiles) == (pods, profiles)


async def test_each_server_runs_its_own_profile(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    config = SimConfig(pods=2, speed=100, profiles=parse_profile_spec("a100-8b:1,h100-8b:1"))
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        a100, h100 = fleet.servers
        assert (a100.profile, h100.profile) == ("a100-8b", "h100-8b")
        for server, batched in ((a100, 2048), (h100, 8192)):
            async with http.get(f"{server.url}/server_info") as resp:
                info = await resp.json()
            assert info["sim_profile"] == server.profile
            assert info["max_num_batched_tokens"] == batched
            expected_blocks = get_profile(server.profile).num_gpu_blocks(16)
            assert info["num_gpu_blocks"] == expected_blocks
            assert server.stats().num_gpu_blocks == expected_blocks

        prompt = words(3000)
        prefill_seconds = {}
        for server in (a100, h100):
            _, body = await post(
                http, f"{server.url}/v1/completions", {"prompt": prompt, "max_tokens": 1}
            )
            record = server.finished(body["id"])
            assert record is not None
            assert record.first_token is not None
            assert record.scheduled is not None
            prefill_seconds[server.profile] = record.first_token - record.scheduled
        # Same prompt, same engine settings but the GPU: the A100 takes about 3.4 times longer.
        assert prefill_seconds["a100-8b"] > 2 * prefill_seconds["h100-8b"]


async def test_num_gpu_blocks_override_applies_to_every_profile(tokenizer: Tokenizer) -> None:
    config = SimConfig(pods=2, profiles=("a100-8b", "h100-8b"), num_gpu_blocks=500)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        assert [s.stats().num_gpu_blocks for s in fleet.servers] == [500, 500]


async def test_busy_seconds_count_step_time_only(
    http: aiohttp.ClientSession, tokenizer: Tokenizer
) -> None:
    async with SimFleet(SimConfig(pods=2, speed=100), tokenizer=tokenizer) as fleet:
        busy, idle = fleet.servers
        assert busy.stats().busy_seconds == 0.0
        url = f"{busy.url}/v1/completions"
        _, body = await post(http, url, {"prompt": words(400), "max_tokens": 10})
        record = busy.finished(body["id"])
        assert record is not None
        assert record.scheduled is not None
        first = busy.stats().busy_seconds
        # One request alone: its steps ran back to back from its scheduling to its end.
        assert first == pytest.approx(record.finished - record.scheduled)
        await post(http, url, {"prompt": words(400, 1), "max_tokens": 10})
        second = busy.stats().busy_seconds
        assert second > first
        assert second <= busy.sim_time()
        assert 'sim:busy_seconds_total{engine="0"' in busy.metrics_text()
        assert idle.stats().busy_seconds == 0.0


@pytest.fixture
async def simhost(tokenizer: Tokenizer) -> AsyncIterator[tuple[SimFleet, str]]:
    config = SimConfig(pods=2, speed=100, profiles=("a100-8b", "h100-8b"))
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        runner = web.AppRunner(_app(fleet), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield fleet, f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def test_simhost_records_and_stats_of_a_disaggregated_request(
    http: aiohttp.ClientSession, simhost: tuple[SimFleet, str]
) -> None:
    fleet, url = simhost
    prefiller, decoder = fleet.servers
    body = {"prompt": words(600), "max_tokens": 4}
    headers = {"x-prefiller-host-port": prefiller.url.removeprefix("http://")}
    async with http.post(f"{decoder.url}/v1/completions", json=body, headers=headers) as resp:
        answer = await resp.json()
    (prefill,) = prefiller.finished_requests()
    _, records = await post(http, f"{url}/records", {"ids": [answer["id"], prefill.request_id]})
    decode_record, prefill_record = records["records"]
    assert prefill_record == {**asdict(prefill), "server": 0}
    assert decode_record["server"] == 1
    took = prefill.finished - prefill.arrival
    assert decode_record["prefill_arrival"] == pytest.approx(
        decode_record["arrival"] - took, abs=1e-6
    )
    assert decode_record["transfer_seconds"] > 0
    assert decode_record["itl_mean"] > 0
    # The client's TTFT, as a benchmark computes it from the record.
    ttft = decode_record["first_token"] - min(
        decode_record["arrival"], decode_record["prefill_arrival"]
    )
    assert ttft > decode_record["first_token"] - decode_record["arrival"]

    async with http.get(f"{url}/stats") as resp:
        servers = (await resp.json())["servers"]
    assert [s["profile"] for s in servers] == ["a100-8b", "h100-8b"]
    assert all(s["busy_seconds"] > 0 for s in servers)
    assert servers[1]["kv_transfer_blocks"] == decode_record["transferred_blocks"]
    assert servers[0]["kv_held_blocks"] == 0
