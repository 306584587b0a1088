"""The Prometheus port the picker and the collector serve, and its close."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from extproc.serving.prometheus import close_metrics, serve_metrics


def test_the_port_serves_the_registry_and_close_ends_its_thread() -> None:
    registry = CollectorRegistry()
    Counter("extproc_test_things", "Things.", registry=registry).inc(3)
    before = set(threading.enumerate())
    server = serve_metrics(0, "127.0.0.1", registry)
    # Named after its target; only new threads, so another test's is never taken for it.
    (serving,) = [t for t in set(threading.enumerate()) - before if "serve_forever" in t.name]
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert "extproc_test_things_total 3.0" in reply.read().decode()

    close_metrics(server)

    # shutdown() returned only once serve_forever() had: the thread is at its end.
    serving.join(timeout=5)
    assert not serving.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
