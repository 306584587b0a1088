"""The default tokenizer (`auto`) and the run-time check of the picker's hashes against the
servers' KV events, with a simulated fleet that tokenizes like the picker or not."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.config import (
    CollectorConfig,
    Config,
    DiscoveryConfig,
    EndpointConfig,
    KvEventsConfig,
    PrefixConfig,
    ServerConfig,
)
from extproc.prefix.blocks import BlocksSettings, PromptBlocks
from extproc.prefix.resolve import fetch_from_hub, find_local
from extproc.prefix.tokenizers import HFTokenizer, load_tokenizer, resolve_spec
from extproc.request.openai import ParsedRequest, parse_request
from extproc.server.app import PickerServer
from extproc.server.health import PREFIX_HASHING_CONDITION
from extproc.sim.fleet import DEFAULT_MODEL, SimConfig, SimFleet
from tests.prefix.helpers import random_text, train_hf_bpe

MODEL = DEFAULT_MODEL
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hub_cache(root: Path, model: str = MODEL, *, template: str | None = None) -> Path:
    """A Hugging Face cache holding `model`'s tokenizer files, as `huggingface_hub` lays it."""
    repo = root / ("models--" + model.replace("/", "--"))
    snapshot = train_hf_bpe(repo / "snapshots" / "0123abcd")
    if template is not None:
        config = json.loads((snapshot / "tokenizer_config.json").read_text())
        (snapshot / "tokenizer_config.json").write_text(
            json.dumps(config | {"chat_template": template})
        )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def _parsed(messages: list[dict[str, Any]]) -> ParsedRequest:
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    parsed = parse_request("/v1/chat/completions", body)
    assert isinstance(parsed, ParsedRequest)
    return parsed


# -- resolving a model's files ---------------------------------------------------------------


def test_find_local_layouts(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache)
    # A newer snapshot that refs/main does not name is not the one used.
    train_hf_bpe(snapshot.parent / "ffff")
    env = {"HF_HUB_CACHE": str(cache)}
    assert find_local(MODEL, environ=env) == snapshot
    assert find_local(MODEL, environ={"HF_HOME": str(tmp_path), "HF_HUB_CACHE": ""}) == snapshot
    models = tmp_path / "models"
    by_path = train_hf_bpe(models / MODEL)
    assert find_local(MODEL, models_dirs=[models], environ=env) == by_path
    assert find_local("Qwen/Qwen2.5-7B-Instruct", models_dirs=[models], environ=env) is None
    # A model name is a name, never a way out of the directories it is looked up in.
    assert find_local("../models/" + MODEL, models_dirs=[models], environ=env) is None
    assert resolve_spec("auto", MODEL, environ=env) == f"hf:{snapshot}"
    assert resolve_spec("auto", "other/model", environ=env) == "cl100k_base"
    assert resolve_spec("bytes:4", MODEL, environ=env) == "bytes:4"


def test_a_resolved_directory_renders_its_own_chat_template(tmp_path: Path) -> None:
    snapshot = _hub_cache(tmp_path, template=CHATML)
    tok = load_tokenizer(f"hf:{snapshot}")
    assert isinstance(tok, HFTokenizer)
    messages = [{"role": "user", "content": "hello"}]
    text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages) == tok.encode(text)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_hub_fails_fast_and_writes_nothing(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_CACHE": str(tmp_path)}
    started = time.monotonic()
    assert await fetch_from_hub(MODEL, environ=env, timeout_seconds=2) is None
    assert time.monotonic() - started < 1.5
    assert await fetch_from_hub(MODEL, environ={**env, "HF_HUB_OFFLINE": "1"}) is None
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []


async def test_auto_uses_the_models_files_and_the_endpoint_meanwhile(tmp_path: Path) -> None:
    snapshot = _hub_cache(tmp_path / "hub")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    blocks = PromptBlocks(BlocksSettings(default_tokenizer="auto", environ=env))
    try:
        messages = [{"role": "user", "content": random_text(random.Random(1), 80)}]
        first = await blocks.blocks(
            _parsed(messages), lora=None, cache_salt=None, endpoint_for_remote=None
        )
        # Before the files are found: the endpoint's /tokenize (none given here: an estimate).
        assert (first.source, first.exact) == ("bytes:4", False)
        assert await blocks.resolved(MODEL) == f"hf:{snapshot}"
        tokens = await blocks.blocks(
            _parsed(messages), lora=None, cache_salt=None, endpoint_for_remote=None
        )
        assert (tokens.source, tokens.exact) == (f"hf:{snapshot}", True)
        assert await blocks.resolved("other/model") == "remote:bytes:4"
    finally:
        await blocks.aclose()


# -- detecting a mismatch from the servers' KV events -----------------------------------------


def _picker_config(fleet: SimFleet, **prefix: Any) -> Config:
    return Config(
        server=ServerConfig(host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0),
        discovery=DiscoveryConfig(models_refresh_seconds=300),
        collector=CollectorConfig(interval_seconds=0.05),
        kv_events=KvEventsConfig(enabled=True),
        prefix=PrefixConfig(index="precise", mismatch_window_blocks=24, **prefix),
        endpoints=tuple(EndpointConfig(url.removeprefix("http://")) for url in fleet.urls),
    )


async def _exchange(picker: PickerServer, fleet: SimFleet, *, count: int = 8) -> None:
    """Prompts the picker hashes (its predictions), then served by the simulator, until the
    first verdict."""
    rng = random.Random(3)
    address = fleet.urls[0].removeprefix("http://")
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            messages = [
                {"role": "system", "content": random_text(rng, 60)},
                {"role": "user", "content": random_text(rng, 30)},
            ]
            await picker.blocks.blocks(
                _parsed(messages), lora=None, cache_salt=None, endpoint_for_remote=address
            )
            body = {"model": MODEL, "messages": messages, "max_tokens": 1}
            async with http.post(f"{fleet.urls[0]}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
    for _ in range(250):
        if picker.mismatch.verdicts():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no verdict: the KV events never reached the detector")


def _gauge(picker: PickerServer, address: str) -> float | None:
    return picker.metrics.registry.get_sample_value(
        "extproc_prefix_tokenizer_mismatch", {"model": MODEL, "endpoint": address}
    )


async def _run(
    sim: SimConfig, caplog: pytest.LogCaptureFixture, **prefix: Any
) -> tuple[PickerServer, str]:
    caplog.set_level(logging.WARNING, logger="extproc.prefix.mismatch")
    fleet = SimFleet(sim)
    await fleet.start()
    address = fleet.urls[0].removeprefix("http://")
    picker = PickerServer(_picker_config(fleet, **prefix))
    try:
        await picker.start()
        await _exchange(picker, fleet)
        await asyncio.sleep(0)  # the health condition's task
    finally:
        await picker.stop()
        await fleet.close()
    return picker, address


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


SIM = {"speed": 200, "kv_events": True}


async def test_no_mismatch_when_both_tokenize_alike(caplog: pytest.LogCaptureFixture) -> None:
    picker, address = await _run(
        SimConfig(**SIM, tokenizer="cl100k_base"), caplog, default_tokenizer="cl100k_base"
    )
    (verdict,) = picker.mismatch.verdicts()
    assert verdict.kind == "ok" and verdict.predicted > 0
    assert _gauge(picker, address) == 0
    assert PREFIX_HASHING_CONDITION not in picker.health.conditions
    assert _warnings(caplog) == []


async def test_auto_on_both_sides_agrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The picker and the simulator find the same files in the same Hugging Face cache.
    _hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    picker, address = await _run(SimConfig(**SIM, tokenizer="auto"), caplog)
    assert picker.blocks.tokenizer_of(MODEL).startswith("hf:")
    assert [v.kind for v in picker.mismatch.verdicts()] == ["ok"]
    assert _gauge(picker, address) == 0


async def test_a_server_tokenizing_otherwise_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The picker finds the model's tokenizer files; the server runs cl100k_base.
    _hub_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    picker, address = await _run(SimConfig(**SIM, tokenizer="cl100k_base"), caplog)
    (verdict,) = picker.mismatch.verdicts()
    assert (verdict.kind, verdict.predicted) == ("tokens", 0)
    assert _gauge(picker, address) == 1
    sample = picker.metrics.registry.get_sample_value
    labels = {"model": MODEL, "outcome": "unpredicted"}
    assert (sample("extproc_prefix_checked_blocks_total", labels) or 0) >= verdict.blocks
    condition = picker.health.conditions[PREFIX_HASHING_CONDITION]
    assert MODEL in condition and "prefix.tokenizers" in condition
    # Loud once, not once a window.
    (warning,) = _warnings(caplog)
    assert MODEL in warning and address in warning and "tokenizes prompts differently" in warning


async def test_another_hash_seed_is_told_from_another_tokenizer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    picker, address = await _run(
        SimConfig(**SIM, tokenizer="cl100k_base", hash_seed="the fleet's PYTHONHASHSEED"),
        caplog,
        default_tokenizer="cl100k_base",
    )
    (verdict,) = picker.mismatch.verdicts()
    assert verdict.kind == "hash" and verdict.hash_checks > 0 and verdict.hash_matches == 0
    assert _gauge(picker, address) == 1
    (warning,) = _warnings(caplog)
    assert "prefix.hash_seed" in warning
