"""An `InferenceModelRewrite` through the real Envoy and the real picker: the picker finds its pool
and the rewrite in a Kubernetes API on loopback (kmock's emulator, on the fleet's event loop),
and the model server behind Envoy receives the rewritten model."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kmock
import pytest

from tests.state.kubeapi import NAMESPACE, PODS, POOLS, Cluster, write_kubeconfig

from .harness import MODEL_A, MODEL_B, Fleet, run_envoy, run_picker

pytestmark = pytest.mark.e2e

GROUP_VERSION = "llm-d.ai/v1alpha2"
REWRITES = kmock.resource(f"{GROUP_VERSION}/inferencemodelrewrites")
OBJECTIVES = kmock.resource(f"{GROUP_VERSION}/inferenceobjectives")


@contextlib.contextmanager
def kube_api(fleet: Fleet, tmp_path: Path) -> Iterator[Cluster]:
    """The emulator served from the fleet's loop (it outlives the test's synchronous body)."""
    stack = contextlib.AsyncExitStack()

    async def start() -> Cluster:
        api = await stack.enter_async_context(kmock.KubernetesEmulator())
        server = await stack.enter_async_context(kmock.Server(api))
        for resource in (PODS, POOLS, REWRITES, OBJECTIVES):
            api.resources[resource] = kmock.ResourceInfo()
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"))
        return Cluster(api, kubeconfig)

    cluster: Cluster = fleet._call(start())
    try:
        yield cluster
    finally:
        fleet._call(stack.aclose())


def _post(url: str, model: str) -> tuple[int, dict[str, str]]:
    body = json.dumps({"model": model, "prompt": "Say hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers)


def test_a_rewrite_rule_changes_the_model_the_server_receives(
    own_fleet: Fleet, tmp_path: Path
) -> None:
    a, b = own_fleet.start(MODEL_A), own_fleet.start(MODEL_B)
    with kube_api(own_fleet, tmp_path) as cluster:
        labels = {"app": "llama"}
        own_fleet._call(cluster.add_pool("llama", labels, [a.port, b.port]))
        own_fleet._call(cluster.add_pod("pod", "127.0.0.1", labels=labels))
        rewrite = {
            "apiVersion": GROUP_VERSION,
            "kind": "InferenceModelRewrite",
            "metadata": {"name": "to-b", "namespace": NAMESPACE},
            "spec": {
                "poolRef": {"name": "llama"},
                "rules": [
                    {
                        "matches": [{"model": {"value": MODEL_A}}],
                        "targets": [{"modelRewrite": MODEL_B, "weight": 1}],
                    }
                ],
            },
        }
        path = f"/apis/{GROUP_VERSION}/namespaces/{NAMESPACE}/inferencemodelrewrites"
        own_fleet._call(cluster._write("post", path, rewrite))
        kubernetes = {
            "kubeconfig": str(cluster.kubeconfig),
            "namespace": NAMESPACE,
            "pool_name": "llama",
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 0.2,
        }
        config = {"discovery": {"models_refresh_seconds": 0.2, "kubernetes": kubernetes}}
        logs = tmp_path / "logs"
        logs.mkdir()
        with (
            run_picker(logs, [], strategy="least-request", config=config) as picker,
            run_envoy(
                logs, extproc=picker.address, endpoints=[a.address, b.address], picker=picker
            ) as stack,
        ):
            # The rewrite is watched apart from the pool (readiness does not wait for it):
            # ask until it has arrived, within a bound.
            deadline = time.monotonic() + 20
            served = ""
            while not served and time.monotonic() < deadline:
                status, headers = _post(stack.url, MODEL_A)
                assert status == 200, stack.logs()
                if headers["x-backend"] == str(b.port):
                    served = headers["x-backend"]
                else:
                    time.sleep(0.1)
            assert served, stack.logs()
            # From then on every model-a request is model-b's, and says so in its body.
            for _ in range(3):
                status, headers = _post(stack.url, MODEL_A)
                assert (status, headers["x-backend"]) == (200, str(b.port))
            received = [json.loads(r.body)["model"] for r in b.via_envoy("/v1/completions")]
            assert len(received) >= 4 and set(received) == {MODEL_B}
