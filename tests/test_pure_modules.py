"""The pure halves of the state side and the cost model import none of the I/O they were split
from: KV-event decoding no sockets or event loop, the pool translation no Kubernetes client, the
frozen cost model not its mutable learner. Each module is imported alone in a fresh interpreter,
so a module some other test imported first cannot hide a new dependency."""

from __future__ import annotations

import subprocess
import sys

import pytest

_NO_IO = ("zmq", "aiohttp", "asyncio", "socket", "grpc", "redis", "kubernetes")

CASES = [
    pytest.param("extproc.state.kv_decoding", _NO_IO, id="kv-decoding"),
    pytest.param("extproc.state.kv_sources", _NO_IO, id="kv-sources"),
    pytest.param("extproc.state.kv_groups", _NO_IO, id="kv-groups"),
    pytest.param("extproc.state.discovery.inference_pools", _NO_IO, id="inference-pools"),
    pytest.param("extproc.state.discovery.watch", _NO_IO, id="watch-records"),
    pytest.param(
        "extproc.scheduling.cost_model",
        (*_NO_IO, "extproc.scheduling.cost_learner"),
        id="cost-model",
    ),
]

_PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
print(" ".join(name for name in sys.argv[2:] if name in sys.modules))
"""


@pytest.mark.parametrize(("module", "forbidden"), CASES)
def test_pure_module_imports_no_io(module: str, forbidden: tuple[str, ...]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module, *forbidden],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"{module} imports {done.stdout.strip()}"
