"""Kubernetes discovery against a Kubernetes API on loopback (kmock's emulator, see kubeapi.py).

The official client talks HTTP to the emulator through a kubeconfig file; nothing is patched.
Every assertion polls the delivered endpoint sets with a bound; none measures time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import kmock
import pytest

from extproc.cli import defaults_from_environment
from extproc.config import ConfigError, EndpointConfig, FleetConfig, load_config
from extproc.server.app import PickerServer
from extproc.server.cli import add_arguments, config_from_args
from extproc.state.discovery.inference_pools import (
    WAITING,
    PodState,
    PoolSpec,
    derive_endpoints,
    parse_pod,
    parse_pool,
)
from extproc.state.discovery.kubernetes import KubernetesDiscovery, KubernetesSettings
from extproc.state.discovery.reflector import Backoff
from tests.state.kubeapi import (
    NAMESPACE,
    PODS,
    POOLS,
    Cluster,
    Sets,
    eventually,
    gate_then,
    pod,
    running_cluster,
)

LLAMA = {"app": "llama"}
QWEN = {"app": "qwen"}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for cluster in running_cluster(tmp_path):
        yield cluster


@pytest.fixture
async def discover(cluster: Cluster) -> AsyncIterator[Callable[..., Sets]]:
    """Start discoveries against `cluster`; each is cancelled (threads joined) at teardown."""
    tasks: list[asyncio.Task[None]] = []

    def start(**overrides: Any) -> Sets:
        """Every pool of the namespace unless the test names one (`pool_name=`, `pools=`)."""
        if not {"pool_name", "pools"} & set(overrides):
            overrides.setdefault("all_pools", True)
        settings = KubernetesSettings(
            namespace=NAMESPACE,
            kubeconfig=str(cluster.kubeconfig),
            backoff_initial_seconds=0.01,
            backoff_max_seconds=0.05,
            **overrides,
        )
        sets = Sets()
        discovery = KubernetesDiscovery(settings)
        discovery.on_problem(sets.problems.append)
        tasks.append(asyncio.create_task(discovery.run(sets)))
        return sets

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not [t for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


def _requests(cluster: Cluster, action: str, resource: kmock.resource) -> list[kmock.Request]:
    return list(cluster.api[action, resource])


async def test_pods_becoming_ready_unready_and_deleted(
    cluster: Cluster, discover: Callable[..., Sets]
) -> None:
    await cluster.add_pool("llama", LLAMA, [8000])
    annotations = {"extproc.io/models": "llama-8b, sql-lora", "extproc.io/kv-events": "5557"}
    await cluster.add_pod("a", "10.0.0.1", labels=LLAMA, annotations=annotations)
    await cluster.add_pod("b", "10.0.0.2", labels=LLAMA, ready=False)
    await cluster.add_pod("other", "10.0.0.9", labels={"app": "other"})

    sets = discover()
    await sets.until({"10.0.0.1:8000"})
    assert sets.seen[-1] == (
        EndpointConfig("10.0.0.1:8000", ("llama-8b", "sql-lora"), "tcp://10.0.0.1:5557"),
    )

    await cluster.set_ready("b", True)
    await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})
    await cluster.set_ready("a", False)
    await sets.until({"10.0.0.2:8000"})
    await cluster.delete_pod("b")
    await sets.until(set())
    # A pod added later, ready from the start.
    await cluster.add_pod("c", "10.0.0.3", labels=LLAMA)
    await sets.until({"10.0.0.3:8000"})
    # Each delivered set differs from the one before it.
    assert all(a != b for a, b in zip(sets.seen, sets.seen[1:], strict=False))


async def test_two_pools_a_changed_selector_and_a_deleted_pool(
    cluster: Cluster, discover: Callable[..., Sets]
) -> None:
    await cluster.add_pool("llama", LLAMA, [8000, 8001])
    await cluster.add_pool("qwen", QWEN, [9000])
    await cluster.add_pod("l1", "10.0.0.1", labels=LLAMA)
    await cluster.add_pod("q1", "10.0.0.2", labels=QWEN)

    every = discover()
    only_qwen = discover(pools=("qwen",))
    await every.until({"10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:9000"})
    await only_qwen.until({"10.0.0.2:9000"})

    # The qwen pool now selects the llama pods, on its own port.
    await cluster.change_pool("qwen", LLAMA, [9000])
    await every.until({"10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.1:9000"})
    await only_qwen.until({"10.0.0.1:9000"})

    await cluster.delete_pool("llama")
    await every.until({"10.0.0.1:9000"})
    await cluster.delete_pool("qwen")
    await every.until(set())
    await only_qwen.until(set())


async def test_a_named_pool_ignores_another_pool_in_the_namespace(
    cluster: Cluster, discover: Callable[..., Sets]
) -> None:
    await cluster.add_pool("llama", LLAMA, [8000])
    await cluster.add_pool("qwen", QWEN, [9000])
    await cluster.add_pod("l1", "10.0.0.1", labels=LLAMA)
    await cluster.add_pod("q1", "10.0.0.2", labels=QWEN)

    llama = discover(pool_name="llama")
    await llama.until({"10.0.0.1:8000"})
    assert llama.problems[-1] == ""
    # Only that pool is asked for, list and watch alike (the emulator ignores the selector and
    # answers every pool, so the discovery must drop the others itself, as above).
    pool_requests = [*_requests(cluster, "list", POOLS), *_requests(cluster, "watch", POOLS)]
    assert pool_requests
    assert {r.params.get("fieldSelector") for r in pool_requests} == {"metadata.name=llama"}

    # The other pool changes to select the llama pods on its own port: not this picker's pool.
    await cluster.change_pool("qwen", LLAMA, [9000])
    await cluster.add_pod("l2", "10.0.0.3", labels=LLAMA)  # seen after the change above
    await llama.until({"10.0.0.1:8000", "10.0.0.3:8000"})
    await cluster.delete_pool("qwen")
    await cluster.delete_pod("l2")
    await llama.until({"10.0.0.1:8000"})
    assert all("9000" not in e.address for seen in llama.seen for e in seen)
    assert set(llama.problems) == {"", WAITING}


async def test_a_missing_pool_is_logged_and_reported_until_it_appears(
    cluster: Cluster, discover: Callable[..., Sets], caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.add_pool("qwen", QWEN, [9000])
    await cluster.add_pod("l1", "10.0.0.1", labels=LLAMA)
    await cluster.add_pod("q1", "10.0.0.2", labels=QWEN)

    with caplog.at_level(logging.INFO, logger="extproc.state.discovery.kubernetes"):
        llama = discover(pool_name="llama")
        await llama.until(set())
        await eventually(lambda: llama.problems[-1] == f"InferencePool {NAMESPACE}/llama not found")
        assert llama.problems == [WAITING, f"InferencePool {NAMESPACE}/llama not found"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "InferencePool llm/llama not found" in warnings[0]
        assert "--pool-name" in warnings[0] and "not ready" in warnings[0]

        await cluster.add_pool("llama", LLAMA, [8000])
        await llama.until({"10.0.0.1:8000"})
        await eventually(lambda: llama.problems[-1] == "")
        # Deleted again: no endpoints, and the problem is back.
        await cluster.delete_pool("llama")
        await llama.until(set())
        await eventually(lambda: llama.problems[-1] != "")
    assert llama.problems[-1] == f"InferencePool {NAMESPACE}/llama not found"
    # Reported on changes only.
    assert all(a != b for a, b in zip(llama.problems, llama.problems[1:], strict=False))


async def test_a_named_pool_that_selects_nothing_usable_is_a_problem(
    cluster: Cluster, discover: Callable[..., Sets]
) -> None:
    await cluster.add_pool("llama", {}, [8000])  # no matchLabels: unusable
    llama = discover(pool_name="llama")
    await eventually(lambda: bool(llama.problems) and llama.problems[-1] != WAITING)
    assert llama.problems[-1] == f"InferencePool {NAMESPACE}/llama selects nothing usable"
    await cluster.change_pool("llama", LLAMA, [8000])
    await eventually(lambda: llama.problems[-1] == "")


async def test_several_named_pools_serve_while_one_exists(
    cluster: Cluster, discover: Callable[..., Sets]
) -> None:
    await cluster.add_pool("qwen", QWEN, [9000])
    await cluster.add_pool("other", {"app": "other"}, [7000])
    await cluster.add_pod("q1", "10.0.0.2", labels=QWEN)
    await cluster.add_pod("o1", "10.0.0.3", labels={"app": "other"})
    both = discover(pools=("llama", "qwen"))
    await both.until({"10.0.0.2:9000"})
    await eventually(lambda: both.problems[-1] == "")
    # Several names cannot be one field selector: all pools are read and filtered here.
    assert all("fieldSelector" not in r.params for r in _requests(cluster, "list", POOLS))
    # The emulator does not replay from a resourceVersion: delete only once the watch is open.
    await eventually(lambda: bool(_requests(cluster, "watch", POOLS)))
    await cluster.delete_pool("qwen")
    await both.until(set())
    gone = f"InferencePool {NAMESPACE}/llama not found; InferencePool {NAMESPACE}/qwen not found"
    await eventually(lambda: both.problems[-1] == gone)


async def test_readiness_follows_the_named_pool(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The picker itself: its gRPC readiness is NOT_SERVING while its pool does not exist."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = load_config(
        None,
        {
            "server.host": "127.0.0.1",
            "server.grpc_port": 0,
            "server.health_port": 0,
            "server.metrics_port": 0,
            "server.drain_delay_seconds": 0,
            "server.shutdown_grace_seconds": 0,
            "discovery.kubernetes.pool_name": "llama",
            "discovery.kubernetes.namespace": NAMESPACE,
            "discovery.kubernetes.kubeconfig": str(cluster.kubeconfig),
        },
    )
    picker = PickerServer(config)
    with caplog.at_level(logging.WARNING, logger="extproc.state.discovery.kubernetes"):
        await picker.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                reply = await stub.Check(request)
                return int(reply.status)

            serving, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            for service in ("readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert await status(service) == not_serving
            assert await status("liveness") == serving
            assert picker.health.problems == {
                "discovery": f"InferencePool {NAMESPACE}/llama not found"
            }
            assert any("llama not found" in r.getMessage() for r in caplog.records)

            await cluster.add_pool("llama", LLAMA, [8000])
            for _ in range(1000):  # bounded: 10 s
                if await status("readiness") == serving:
                    break
                await asyncio.sleep(0.01)
            assert await status("readiness") == serving
            await cluster.delete_pool("llama")
            for _ in range(1000):
                if await status("readiness") == not_serving:
                    break
                await asyncio.sleep(0.01)
            assert await status("readiness") == not_serving
    finally:
        await picker.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


async def test_a_watch_that_ends_is_resumed_from_the_last_resource_version(
    cluster: Cluster, discover: Callable[..., Sets]
) -> None:
    await cluster.add_pool("llama", LLAMA, [8000])
    # The first pod watch delivers a pod and a bookmark, then ends as a server timeout would.
    added = {"type": "ADDED", "object": pod("a", "10.0.0.1", LLAMA, version="7")}
    bookmark = {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "9"}}}
    cluster.api["watch", PODS][:1] << (b"", added, bookmark)

    sets = discover()
    await sets.until({"10.0.0.1:8000"})
    await eventually(lambda: len(_requests(cluster, "watch", PODS)) >= 2)
    first, second = _requests(cluster, "watch", PODS)[:2]
    assert second.params["resourceVersion"] == "9"
    assert first.params["timeoutSeconds"] == "300"
    assert len(_requests(cluster, "list", PODS)) == 1  # resumed, not listed again
    # The pod was never written to the server, so the resumed watch reports nothing for it; it
    # stays until a list says otherwise.
    assert sets.addresses == {"10.0.0.1:8000"}


@pytest.mark.parametrize("how", ["error-event", "http-status"])
async def test_an_expired_watch_lists_again(
    cluster: Cluster, discover: Callable[..., Sets], how: str
) -> None:
    await cluster.add_pool("llama", LLAMA, [8000])
    await cluster.add_pod("a", "10.0.0.1", labels=LLAMA)
    await cluster.add_pod("b", "10.0.0.2", labels=LLAMA)
    gate = asyncio.Event()
    gone = {"kind": "Status", "status": "Failure", "code": 410, "reason": "Expired"}
    if how == "error-event":
        # 200, then an ERROR event: how a real server reports a version too old mid-watch.
        gone["message"] = "too old resource version: 101 (120)"
        cluster.api["watch", PODS][:1] << (
            lambda: gate_then(gate, {"type": "ERROR", "object": gone})
        )
    else:

        async def gone_later() -> dict[str, Any]:
            await gate.wait()
            return gone

        # 410 on the watch request itself, once the gate opens.
        cluster.api["watch", PODS][:1] << 410 << gone_later

    sets = discover()
    await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})
    # While the watch is stalled, pod b disappears without a DELETED event (as if it happened
    # during a long disconnection, beyond the server's event history): only a list can tell.
    cluster.api.objects[PODS, NAMESPACE, "b"].delete()
    gate.set()
    await sets.until({"10.0.0.1:8000"})
    assert len(_requests(cluster, "list", PODS)) == 2
    assert len(_requests(cluster, "list", POOLS)) == 1


async def test_server_errors_back_off_and_recover(
    cluster: Cluster, discover: Callable[..., Sets], caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.add_pool("llama", LLAMA, [8000])
    await cluster.add_pod("a", "10.0.0.1", labels=LLAMA)
    cluster.api["list", PODS][:3] << 500
    cluster.api["watch", POOLS][:2] << 503

    with caplog.at_level(logging.WARNING, logger="extproc.state.discovery.kubernetes"):
        sets = discover()
        await sets.until({"10.0.0.1:8000"})
        await eventually(lambda: len(_requests(cluster, "watch", POOLS)) >= 3)
    assert len(_requests(cluster, "list", PODS)) == 4
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert sum("pods list failed: HTTP 500" in m for m in retries) == 3
    assert sum("pools watch failed: HTTP 503" in m for m in retries) == 2
    # A failed watch is retried from the same version; it does not list again.
    watches = _requests(cluster, "watch", POOLS)
    assert len({w.params["resourceVersion"] for w in watches[:3]}) == 1
    assert len(_requests(cluster, "list", POOLS)) == 1

    # Still live after the errors.
    await cluster.add_pod("b", "10.0.0.2", labels=LLAMA)
    await sets.until({"10.0.0.1:8000", "10.0.0.2:8000"})


async def test_nothing_is_delivered_before_both_lists_and_an_absent_crd_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
        # Pods exist, but no InferencePool resource: the CRD is not installed (404).
        api.resources[PODS] = kmock.ResourceInfo()
        from tests.state.kubeapi import write_kubeconfig

        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"))
        settings = KubernetesSettings(
            namespace=NAMESPACE,
            kubeconfig=str(kubeconfig),
            backoff_initial_seconds=0.01,
            backoff_max_seconds=0.02,
            all_pools=True,
        )
        sets = Sets()
        with caplog.at_level(logging.WARNING, logger="extproc.state.discovery.kubernetes"):
            task = asyncio.create_task(KubernetesDiscovery(settings).run(sets))
            await eventually(lambda: len(list(api["list", POOLS])) >= 3)
            assert sets.seen == []
            api.resources[POOLS] = kmock.ResourceInfo()  # the CRD is installed
            await eventually(lambda: sets.seen == [()])
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert any("pools list failed: HTTP 404" in r.getMessage() for r in caplog.records)


async def test_cancel_stops_both_threads_while_watches_are_open(
    cluster: Cluster,
) -> None:
    await cluster.add_pool("llama", LLAMA, [8000])
    settings = KubernetesSettings(
        namespace=NAMESPACE, kubeconfig=str(cluster.kubeconfig), all_pools=True
    )
    sets = Sets()
    task = asyncio.create_task(KubernetesDiscovery(settings).run(sets))
    await eventually(lambda: sets.seen == [()])
    await eventually(lambda: len(list(cluster.api["watch"])) >= 2)  # both watches are open
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task
    assert not [t for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


# Pure parts, table-driven.


def _pod_state(name: str, ip: str, **kw: Any) -> PodState:
    return PodState(
        name=name, labels=kw.pop("labels", LLAMA), ip=ip, ready=kw.pop("ready", True), **kw
    )


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        ([_pod_state("a", "10.0.0.1")], ["10.0.0.1:8000", "10.0.0.1:8001"]),
        ([_pod_state("a", "10.0.0.1", ready=False)], []),
        ([_pod_state("a", "")], []),
        (
            [_pod_state("a", "10.0.0.1", labels={"app": "llama", "tier": "x"})],
            ["10.0.0.1:8000", "10.0.0.1:8001"],
        ),
        ([_pod_state("a", "10.0.0.1", labels={"tier": "x"})], []),
        ([_pod_state("a", "fd00::1")], ["[fd00::1]:8000", "[fd00::1]:8001"]),
    ],
    ids=["ready", "unready", "no-ip", "superset-labels", "other-labels", "ipv6"],
)
def test_derive_endpoints(pods: list[PodState], expected: list[str]) -> None:
    pool = PoolSpec("llama", (("app", "llama"),), (8000, 8001))
    assert [e.address for e in derive_endpoints([pool], pods)] == expected


def test_pods_selected_by_two_pools_on_one_port_are_one_endpoint() -> None:
    pools = [
        PoolSpec("a", (("app", "llama"),), (8000,)),
        PoolSpec("b", (("app", "llama"),), (8000,)),
    ]
    assert len(derive_endpoints(pools, [_pod_state("a", "10.0.0.1")])) == 1


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [("5557", "tcp://10.0.0.1:5557"), ("tcp://10.9.9.9:7000", "tcp://10.9.9.9:7000"), ("", "")],
    ids=["port", "url", "none"],
)
def test_kv_events_annotation(annotation: str, expected: str) -> None:
    state = parse_pod(pod("a", "10.0.0.1", LLAMA, annotations={"extproc.io/kv-events": annotation}))
    pool = PoolSpec("llama", (("app", "llama"),), (8000,))
    assert derive_endpoints([pool], [state])[0].kv_events == expected


def test_terminating_pods_are_not_ready() -> None:
    raw = pod("a", "10.0.0.1", LLAMA)
    assert parse_pod(raw).ready
    raw["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert not parse_pod(raw).ready


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]},
        {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": []},
    ],
    ids=["empty", "no-labels", "no-ports"],
)
def test_unusable_pools_select_nothing(spec: dict[str, Any]) -> None:
    assert parse_pool({"metadata": {"name": "p"}, "spec": spec}) is None


def test_backoff_grows_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, _random=random.Random(7))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [backoff.delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.reset()
    assert backoff.delay() <= 0.5


# The RBAC manifest: exactly what discovery reads, checked against the client's own models.

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def test_rbac_grants_exactly_what_discovery_reads() -> None:
    import kubernetes.client
    import yaml

    documents = list(yaml.safe_load_all((MANIFESTS / "picker" / "rbac.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["ServiceAccount", "Role", "RoleBinding"]
    api: Any = kubernetes.client.ApiClient()  # untyped client
    try:
        for document in documents:
            # Parse with the client's model and serialise again: a misspelt or misplaced key is
            # dropped on the way (so the round trip differs), a missing required one raises.
            model = getattr(kubernetes.client, f"V1{document['kind']}")
            assert api.sanitize_for_serialization(model.from_dict(document)) == document
    finally:
        api.close()
    account, role, binding = documents
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"] for r in role["rules"]}
    assert rules == {
        (("inference.networking.k8s.io",), ("inferencepools",)): ["get", "list", "watch"],
        (("",), ("pods",)): ["get", "list", "watch"],
        # The objectives watch (extproc/state/discovery/objectives.py): both groups it may use.
        (
            ("llm-d.ai", "inference.networking.x-k8s.io"),
            ("inferenceobjectives", "inferencemodelrewrites"),
        ): ["list", "watch"],
    }
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({}, ("both", "", 0.0)),
        ({"llm-d.ai/role": "prefill"}, ("prefill", "", 0.0)),
        ({"llm-d.ai/role": "decode"}, ("decode", "", 0.0)),
        ({"llm-d.ai/role": "prefill-decode"}, ("both", "", 0.0)),
        (
            {"extproc.io/accelerator": "a100", "extproc.io/cost-per-hour": "1.29"},
            ("both", "a100", 1.29),
        ),
        ({"extproc.io/cost-per-hour": "cheap"}, ("both", "", 0.0)),
        ({"extproc.io/cost-per-hour": "-3"}, ("both", "", 0.0)),
    ],
    ids=["none", "prefill", "decode", "llm-d-both", "gpu-and-price", "bad-price", "negative-price"],
)
def test_role_accelerator_and_price_come_from_pod_labels(
    labels: dict[str, str], expected: tuple[str, str, float]
) -> None:
    state = _pod_state("a", "10.0.0.1", labels={**LLAMA, **labels})
    pool = PoolSpec("llama", (("app", "llama"),), (8000,))
    (endpoint,) = derive_endpoints([pool], [state])
    assert (endpoint.role, endpoint.accelerator, endpoint.cost_per_hour) == expected


def test_the_label_names_are_configurable() -> None:
    fleet = FleetConfig(role_label="example.com/role", accelerator_label="example.com/gpu")
    labels = {**LLAMA, "example.com/role": "decode", "example.com/gpu": "h100"}
    pool = PoolSpec("llama", (("app", "llama"),), (8000,))
    (endpoint,) = derive_endpoints([pool], [_pod_state("a", "10.0.0.1", labels=labels)], fleet)
    assert (endpoint.role, endpoint.accelerator) == ("decode", "h100")


# The pool flags and config keys.


def _serve_config(argv: list[str], env: dict[str, str] | None = None) -> Any:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults_from_environment(parser, env or {})
    config, _ = config_from_args(parser.parse_args(argv))
    return config


def test_pool_flags_and_their_environment_forms() -> None:
    by_flag = _serve_config(["--pool-name", "llama", "--pool-namespace", "llm"])
    by_env = _serve_config([], {"EXTPROC_POOL_NAME": "llama", "EXTPROC_POOL_NAMESPACE": "llm"})
    for config in (by_flag, by_env):
        kube = config.discovery.kubernetes
        assert kube is not None
        assert (kube.pool_name, kube.namespace, kube.all_pools) == ("llama", "llm", False)
        assert kube.selected_pools == ("llama",)
    # A flag given wins over its environment form.
    flag_wins = _serve_config(["--pool-name", "qwen"], {"EXTPROC_POOL_NAME": "llama"})
    assert flag_wins.discovery.kubernetes.pool_name == "qwen"
    every = _serve_config([], {"EXTPROC_ALL_POOLS": "true"})
    assert every.discovery.kubernetes.all_pools
    assert every.discovery.kubernetes.selected_pools == ()
    # A switch turned off is no request for Kubernetes discovery.
    static = _serve_config(["--endpoints", "127.0.0.1:8000"], {"EXTPROC_ALL_POOLS": "false"})
    assert static.discovery.kubernetes is None


def test_the_collector_takes_the_same_pool_flags() -> None:
    from extproc.collector import app as collector_app

    parser = argparse.ArgumentParser()
    collector_app.add_arguments(parser)
    defaults_from_environment(parser, {"EXTPROC_POOL_NAMESPACE": "llm"})
    config, _ = collector_app.config_from_args(parser.parse_args(["--pool-name", "llama"]))
    assert config.discovery.kubernetes is not None
    assert (config.discovery.kubernetes.pool_name, config.discovery.kubernetes.namespace) == (
        "llama",
        "llm",
    )


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ({"namespace": "llm"}, "pool_name", "name the InferencePool this picker serves"),
        ({"pool_name": "a", "all_pools": True}, "all_pools", "give only one of"),
        ({"pool_name": "a", "pools": ["b"]}, "pools", "give only one of"),
        ({"pools": ["a"], "all_pools": True}, "all_pools", "give only one of"),
    ],
    ids=["none", "name-and-all", "name-and-list", "list-and-all"],
)
def test_one_pool_choice_is_required(section: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, {f"discovery.kubernetes.{k}": v for k, v in section.items()})
    assert raised.value.key == f"discovery.kubernetes.{key}"
    assert problem in raised.value.problem


def test_the_pools_list_of_earlier_configs_still_works(tmp_path: Path) -> None:
    path = tmp_path / "picker.yaml"
    path.write_text("discovery:\n  kubernetes:\n    pools: [llama, qwen]\n")
    kube = load_config(path).discovery.kubernetes
    assert kube is not None and kube.selected_pools == ("llama", "qwen")
