"""Static discovery: the config file's endpoints, reloaded on change, last good kept on errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from extproc.config import EndpointConfig
from extproc.state.discovery import Discovery
from extproc.state.discovery.static import FixedDiscovery, StaticDiscovery
from tests.state.kubeapi import Sets, eventually

GOOD = """
routing: {strategy: round-robin}
endpoints:
  - {address: "10.0.0.2:8000", models: [llama]}
  - {address: "10.0.0.1:8000", kv_events: "tcp://10.0.0.1:5557"}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "picker.yaml"
    path.write_text(GOOD)
    return path


# The file operations a test makes are a few bytes on a local disk: plain blocking calls.
def _write(path: Path, text: str, *, by_rename: bool = False) -> None:
    if by_rename:  # the way a ConfigMap volume replaces a file
        fresh = path.with_suffix(".new")
        fresh.write_text(text)
        fresh.rename(path)
    else:
        path.write_text(text)


def _remove(path: Path) -> None:
    path.unlink()


def _loads(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the discovery has seen new content and loaded it."""
    return sum("changed; loading it" in r.getMessage() for r in caplog.records)


@pytest.fixture
async def watch(config_file: Path) -> AsyncIterator[Callable[..., Sets]]:
    tasks: list[asyncio.Task[None]] = []

    def start(overrides: dict[str, Any] | None = None) -> Sets:
        sets = Sets()
        discovery: Discovery = StaticDiscovery(config_file, overrides=overrides, interval=0.01)
        tasks.append(asyncio.create_task(discovery.run(sets)))
        return sets

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_loads_sorted_endpoints_and_reloads_on_change(
    config_file: Path, watch: Callable[..., Sets]
) -> None:
    sets = watch()
    await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})
    assert sets.seen[0] == (
        EndpointConfig("10.0.0.1:8000", kv_events="tcp://10.0.0.1:5557"),
        EndpointConfig("10.0.0.2:8000", models=("llama",)),
    )
    # Same size, same second: only the content tells the files apart.
    _write(config_file, GOOD.replace("10.0.0.2", "10.0.0.3"))
    await sets.until({"10.0.0.1:8000", "10.0.0.3:8000"})


async def test_a_rewrite_with_the_same_endpoints_delivers_nothing(
    config_file: Path, watch: Callable[..., Sets], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="extproc.state.discovery.static")
    sets = watch()
    await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})
    # Another section changes: loaded again, but the endpoint set is the same.
    _write(config_file, GOOD.replace("round-robin", "random"))
    await eventually(lambda: _loads(caplog) == 2)
    # Touched without a change: not even loaded.
    os.utime(config_file)
    _write(config_file, GOOD.replace("10.0.0.1", "10.0.0.4"))
    await sets.until({"10.0.0.4:8000", "10.0.0.2:8000"})
    assert len(sets.seen) == 2


@pytest.mark.parametrize(
    ("broken", "logged"),
    [
        ('endpoints:\n  - {address: "10.0.0.1"}\n', "endpoints[0].address: expected host:port"),
        ("endpoints:\n  - {adress: 10.0.0.1:8000}\n", "endpoints[0].adress: unknown key"),
        ("endpoints: [\n", "is not valid YAML"),
    ],
    ids=["bad-value", "unknown-key", "bad-yaml"],
)
async def test_an_invalid_file_keeps_the_last_good_endpoints(
    config_file: Path,
    watch: Callable[..., Sets],
    caplog: pytest.LogCaptureFixture,
    broken: str,
    logged: str,
) -> None:
    with caplog.at_level(logging.ERROR, logger="extproc.state.discovery.static"):
        sets = watch()
        await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})
        _write(config_file, broken)
        await eventually(lambda: any(logged in r.getMessage() for r in caplog.records))
    errors = [r for r in caplog.records if logged in r.getMessage()]
    assert len(errors) == 1  # once per bad content, not once per poll
    assert "keeping the last good endpoints" in errors[0].getMessage()
    assert len(sets.seen) == 1
    # Fixed: loaded again.
    _write(config_file, GOOD.replace("10.0.0.2", "10.0.0.5"))
    await sets.until({"10.0.0.1:8000", "10.0.0.5:8000"})


async def test_a_removed_file_keeps_the_last_good_endpoints_until_it_returns(
    config_file: Path, watch: Callable[..., Sets], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="extproc.state.discovery.static"):
        sets = watch()
        await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})
        _remove(config_file)
        await eventually(lambda: any("cannot read" in r.getMessage() for r in caplog.records))
    assert len(sets.seen) == 1
    _write(config_file, GOOD.replace("10.0.0.1", "10.0.0.6"), by_rename=True)
    await sets.until({"10.0.0.6:8000", "10.0.0.2:8000"})


async def test_overrides_win_over_the_file_on_every_load(
    config_file: Path, watch: Callable[..., Sets], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="extproc.state.discovery.static")
    sets = watch(overrides={"endpoints": [{"address": "10.0.0.9:8000"}]})
    await sets.until({"10.0.0.9:8000"})
    _write(config_file, GOOD.replace("10.0.0.1", "10.0.0.7"))
    await eventually(lambda: _loads(caplog) == 2)
    assert len(sets.seen) == 1  # the file changed; the override did not


async def test_fixed_endpoints_are_delivered_once() -> None:
    sets = Sets()
    endpoints = [EndpointConfig("10.0.0.2:8000"), EndpointConfig("10.0.0.1:8000")]
    task = asyncio.create_task(FixedDiscovery(endpoints).run(sets))
    await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})
    assert [e.address for e in sets.seen[0]] == ["10.0.0.1:8000", "10.0.0.2:8000"]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert len(sets.seen) == 1


def test_a_picker_with_a_fixed_list_never_loads_the_kubernetes_client() -> None:
    """The Kubernetes client is a quarter of the picker's import time: a picker given its
    endpoints builds its server and discovery without it (a fresh interpreter, so nothing
    another test imported counts)."""
    script = (
        "import sys\n"
        "from extproc.config import load_config\n"
        "from extproc.server.app import PickerServer\n"
        "from extproc.state.discovery.configured import discovery_for\n"
        "config = load_config(None, {'endpoints': [{'address': '127.0.0.1:8000'}]})\n"
        "PickerServer(config, discovery=discovery_for(config))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.strip() == "[]", run.stdout
