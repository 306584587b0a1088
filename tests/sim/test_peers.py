"""The real peers route to a simulated fleet: sglang-router and vllm-router (PyPI).

Each router runs as a subprocess on loopback ports and is stopped at the end. The test checks that
their start-up probes are answered (they report ready), requests reach the simulated servers, and
vllm-router's kv_aware policy subscribes to the simulator's KV-event publishers.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from extproc.prefix.tokenizers import Tokenizer
from extproc.sim import SimConfig, SimFleet
from tests.sim.conftest import words

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install {name})")
    return found


@contextlib.asynccontextmanager
async def _router(args: list[str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*args, stdout=out, stderr=out)
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _wait_ready(
    http: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process
) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            raise AssertionError(f"router exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/health") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError("router never became ready")


async def _send(http: aiohttp.ClientSession, url: str, n: int) -> None:
    for i in range(n):
        body = {"model": MODEL, "prompt": words(120, i % 3), "max_tokens": 2}
        async with http.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            payload = await resp.json()
            assert payload["usage"]["completion_tokens"] == 2


def _served(fleet: SimFleet) -> int:
    return sum(s.stats().finished_by_reason.get("length", 0) for s in fleet.servers)


@pytest.mark.e2e
@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
async def test_sglang_router(
    http: aiohttp.ClientSession, tokenizer: Tokenizer, tmp_path: Path, policy: str
) -> None:
    exe = _binary("sglang-router")
    async with SimFleet(SimConfig(pods=2, speed=50), tokenizer=tokenizer) as fleet:
        port = _free_port()
        args = [exe, "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
        args += ["--prometheus-port", str(_free_port()), "--worker-urls", *fleet.urls]
        async with _router(args, tmp_path / "sglang.log") as proc:
            url = f"http://127.0.0.1:{port}"
            await _wait_ready(http, url, proc)
            await _send(http, url, 9)
        assert _served(fleet) == 9
        if policy == "round_robin":
            assert all(s.stats().finished_by_reason.get("length", 0) > 0 for s in fleet.servers)


@pytest.mark.e2e
async def test_vllm_router_cache_aware(
    http: aiohttp.ClientSession, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    exe = _binary("vllm-router")
    async with SimFleet(SimConfig(pods=2, speed=50), tokenizer=tokenizer) as fleet:
        port = _free_port()
        args = [exe, "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware"]
        args += ["--prometheus-port", str(_free_port()), "--worker-urls", *fleet.urls]
        async with _router(args, tmp_path / "vllm-router.log") as proc:
            url = f"http://127.0.0.1:{port}"
            await _wait_ready(http, url, proc)
            await _send(http, url, 9)
        assert _served(fleet) == 9
        # Repeated prompts went where their prefix was: the fleet saw prefix-cache hits.
        assert sum(s.stats().prefix_cache_hits for s in fleet.servers) > 0


@pytest.mark.e2e
async def test_vllm_router_kv_aware_consumes_events(
    http: aiohttp.ClientSession, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    exe = _binary("vllm-router")
    config = SimConfig(pods=2, speed=50, kv_events=True)
    async with SimFleet(config, tokenizer=tokenizer) as fleet:
        port = _free_port()
        args = [exe, "--host", "127.0.0.1", "--port", str(port), "--policy", "kv_aware"]
        args += ["--prometheus-port", str(_free_port()), "--worker-urls", *fleet.urls]
        args += ["--kv-event-model", MODEL, "--log-level", "debug"]
        for server in fleet.servers:
            args += ["--kv-event-source", f"{server.url}={server.kv_events_endpoint}"]
            args += ["--kv-event-replay-source", f"{server.url}={server.kv_replay_endpoint}"]
        log = tmp_path / "vllm-router-kv.log"
        async with _router(args, log) as proc:
            url = f"http://127.0.0.1:{port}"
            await _wait_ready(http, url, proc)
            await _send(http, url, 9)
        assert _served(fleet) == 9
        text = log.read_text(errors="replace")
        for server in fleet.servers:
            assert f"subscriber for {server.url} rank0 on {server.kv_events_endpoint}" in text
        assert "KV prefix decision" in text
        assert "invalid KV event" not in text
        assert "unsupported KV event" not in text
