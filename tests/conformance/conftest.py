"""Skip the conformance suite when vLLM's wheel is not unpacked (`make conformance` fetches it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.vllm_src import VLLM_VERSION, source_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    missing = source_dir() is None
    reason = f"vLLM {VLLM_VERSION}'s wheel is not unpacked: run `make conformance`"
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.conformance)
            if missing:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def vllm_root() -> Path:
    root = source_dir()
    assert root is not None
    return root
