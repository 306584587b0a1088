"""Fixtures for the end-to-end tests; the machinery is in `harness.py`.

Session-scoped: one fleet of backends (two serve model-a, one model-b), one picker in front of
them, and one Envoy per body mode in front of that picker. Tests that need their own processes
(failure modes, fallbacks) start them with the harness' context managers.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import MODEL_A, MODEL_B, Fleet, Picker, Stack, run_envoy, run_picker

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-logs")


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    """Two backends serving model-a, one serving model-b."""
    fleet = Fleet()
    for model in (MODEL_A, MODEL_A, MODEL_B):
        fleet.start(model)
    yield fleet
    fleet.close()


@pytest.fixture
def own_fleet() -> Iterator[Fleet]:
    """An empty fleet for a test that starts and stops its own backends."""
    fleet = Fleet()
    yield fleet
    fleet.close()


@pytest.fixture(scope="session")
def addresses(fleet: Fleet) -> list[str]:
    return [b.address for b in fleet.backends]


@pytest.fixture(scope="session")
def picker(logs: Path, addresses: list[str]) -> Iterator[Picker]:
    with run_picker(logs, addresses, extra=["--max-body-bytes", "1000000"]) as picker:
        yield picker


@pytest.fixture(scope="session")
def stacks(logs: Path, addresses: list[str], picker: Picker) -> Iterator[dict[str, Stack]]:
    """One Envoy per way of wiring it to the shared picker (it serves them all at once): both
    body modes with the default `ended` response path, and the other two response paths."""
    common: dict[str, Any] = {"extproc": picker.address, "endpoints": addresses, "picker": picker}
    with (
        run_envoy(logs, **common, body_mode="streamed") as streamed,
        run_envoy(logs, **common, body_mode="buffered") as buffered,
        run_envoy(logs, **common, body_mode="streamed", response_path="inline") as inline,
        run_envoy(logs, **common, body_mode="streamed", response_path="observer") as observed,
    ):
        yield {
            "streamed": streamed,
            "buffered": buffered,
            "streamed-inline": inline,
            "streamed-observer": observed,
        }


@pytest.fixture(params=["streamed", "buffered", "streamed-inline", "streamed-observer"])
def stack(request: pytest.FixtureRequest, stacks: dict[str, Stack]) -> Stack:
    return stacks[request.param]


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """A socket leaked by a test warns only when the garbage collector reaches it, often in a
    later, innocent test (a CI run failed that way). Collecting after each test pins the
    warning on the test that leaked: autouse fixtures are torn down after the test's own event
    loop is closed, which is when a leaked transport becomes garbage."""
    yield
    gc.collect()
