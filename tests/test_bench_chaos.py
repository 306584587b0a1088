"""`extproc bench chaos`: how failures are split around a fault, the report, the two-replica
Envoy config, the relay and the fake Kubernetes API the bench cuts, and a quick run of every
scenario against real processes.

Nothing asserts on the figures themselves (the machine is shared and the faults race the load):
only what must hold whatever the timing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.bench import faultload as fl
from extproc.bench.chaos import (
    KUBE_NAMESPACE,
    SCENARIOS,
    ChaosOptions,
    ChaosReport,
    Measured,
    Script,
    picker_config,
    render_markdown,
    run_chaos,
    summarize,
    to_json,
)
from extproc.bench.envoy import validate_config
from extproc.bench.processes import free_ports
from extproc.config import EndpointConfig, KubernetesDiscoveryConfig, load_config
from extproc.state.discovery.kubernetes import KubernetesDiscovery


def _shot(sent: float, finished: float, status: int = 200, reason: str = "") -> fl.Shot:
    return fl.Shot(sent, finished, status, reason, True)


def test_failures_are_split_by_when_they_were_sent() -> None:
    script = Script()
    script.visible_at = 12.0
    shots = [
        _shot(1, 2),  # ok
        _shot(1, 2, 503, "http_503"),  # failed before the fault (at 10 s)
        _shot(9, 11, 0, "ClientPayloadError"),  # in flight at the fault
        _shot(10.5, 11, 503, "http_503"),  # after the fault, before it was visible
        _shot(13, 14, 200, "truncated_stream"),  # after visible
        _shot(13, 14),
    ]
    result = summarize(
        "a", "test", "rule", Measured(shots, script, (0.0,), 0, "probe"), fault_at=10.0, seconds=1
    )
    assert (result.sent, result.ok, result.failed) == (6, 2, 4)
    assert (result.failed_before_fault, result.failed_in_flight, result.failed_after_visible) == (
        1,
        1,
        1,
    )
    assert result.failures == {"ClientPayloadError": 1, "http_503": 2, "truncated_stream": 1}
    assert result.failed_sent_between == (1, 13)
    assert result.nothing_held
    held = summarize(
        "a", "t", "r", Measured(shots, Script(), (0.0, 2.0), None, ""), fault_at=10.0, seconds=1
    )
    assert held.failed_after_visible == 0  # never visible: nothing counts as after it
    assert not held.nothing_held


@pytest.mark.parametrize("redis_url", [None, "redis://127.0.0.1:6390/0"])
def test_picker_config_is_valid(tmp_path: Path, redis_url: str | None) -> None:
    path = tmp_path / "picker.yaml"
    path.write_text(yaml.safe_dump(picker_config(ChaosOptions(), redis_url=redis_url, grace=5)))
    config = load_config(path)
    assert config.tenancy.enabled
    assert config.tenancy.limits_backend == ("memory" if redis_url is None else "redis")
    assert config.server.shutdown_grace_seconds == 5


def test_the_extra_sections_of_e_f_g_are_valid(tmp_path: Path) -> None:
    """What (e), (f) and (g) add to the picker's config loads as they mean it to."""
    path = tmp_path / "picker.yaml"
    extra: dict[str, Any] = {
        "collector": {"source": "127.0.0.1:9004"},
        "kv_events": {"enabled": True},
        "endpoints": [{"address": "127.0.0.1:8001", "kv_events": "tcp://127.0.0.1:5557"}],
    }
    options = ChaosOptions()
    path.write_text(
        yaml.safe_dump(picker_config(options, redis_url=None, strategy="cost", extra=extra))
    )
    config = load_config(path)
    assert config.collector.source == "127.0.0.1:9004"
    assert config.kv_events.enabled
    assert config.endpoints[0].kv_events == "tcp://127.0.0.1:5557"
    assert config.routing.strategy == "cost"
    kube = {
        "discovery": {
            "kubernetes": {"namespace": "chaos", "kubeconfig": "k.yaml", "all_pools": True}
        }
    }
    path.write_text(yaml.safe_dump(picker_config(options, redis_url=None, extra=kube)))
    discovery = load_config(path).discovery.kubernetes
    assert discovery is not None
    assert discovery.namespace == "chaos"


@contextlib.contextmanager
def _side() -> Iterator[fl.LoopThread]:
    side = fl.LoopThread("test-side")
    try:
        yield side
    finally:
        side.close()


def test_the_relay_cuts_and_restores() -> None:
    """An open connection through the relay is reset by `cut`, a new one refused; after
    `restore` bytes flow again. Real sockets on loopback."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(OSError):
                while data := await reader.read(1024):
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()

    async def stop(server: asyncio.Server) -> None:
        server.close()
        await server.wait_closed()

    listen, target = free_ports(2)
    with _side() as side:
        server = side.call(asyncio.start_server(echo, "127.0.0.1", target))
        relay = fl.TcpRelay({listen: target})
        side.call(relay.restore())
        try:
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as conn:
                conn.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                side.call(relay.cut())
                with pytest.raises(OSError):  # reset: a send or a read fails
                    for _ in range(20):
                        conn.sendall(b"x")
                        if not conn.recv(1):
                            raise ConnectionResetError("closed")
                        time.sleep(0.05)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", listen), timeout=5).close()
            side.call(relay.restore())
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as conn:
                conn.sendall(b"pong")
                assert conn.recv(4) == b"pong"
            assert relay.connections == 2
        finally:
            side.call(relay.cut())
            side.call(stop(server))


async def _discovered(kubeconfig: Path, *, within: float = 10.0) -> tuple[EndpointConfig, ...]:
    found: asyncio.Future[tuple[EndpointConfig, ...]] = asyncio.get_running_loop().create_future()
    discovery = KubernetesDiscovery(
        KubernetesDiscoveryConfig(
            namespace=KUBE_NAMESPACE, kubeconfig=str(kubeconfig), all_pools=True
        )
    )

    def first(endpoints: tuple[EndpointConfig, ...]) -> None:
        if not found.done():
            found.set_result(endpoints)

    task = asyncio.create_task(discovery.run(first))
    try:
        return await asyncio.wait_for(found, within)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_the_fake_kubernetes_api_feeds_the_real_discovery(tmp_path: Path) -> None:
    """The picker's Kubernetes discovery (the official client) lists and watches the fake API
    and finds one endpoint per pool; with the API cut, nothing answers."""
    port = free_ports(1)[0]
    endpoints = ["127.0.0.1:8001", "127.0.0.1:8002"]
    pools, pods = fl.kube_objects(endpoints, namespace=KUBE_NAMESPACE)
    api = fl.FakeKubeApi(port, namespace=KUBE_NAMESPACE, pools=pools, pods=pods)
    kubeconfig = fl.write_kubeconfig(tmp_path / "kube", port=port, namespace=KUBE_NAMESPACE)
    with _side() as side:
        side.call(api.restore())
        try:
            found = asyncio.run(_discovered(kubeconfig))
            assert [e.address for e in found] == endpoints
            assert {what for _, what in api.requests} >= {"list pods", "list pools"}
        finally:
            side.call(api.cut())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("health_checks", [False, True])
def test_two_replicas_are_two_hosts_of_the_extproc_cluster(
    tmp_path: Path, health_checks: bool
) -> None:
    ports = fl.allocate_rig_ports(2, replicas=2)
    text = fl.envoy_bootstrap(ports, pods=2, health_checks=health_checks)
    config = yaml.safe_load(text)
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extproc")
    hosts = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert hosts == [grpc for grpc, _, _ in ports.pickers]
    # The bundled config health-checks the ext_proc port itself (since the drain fix); (c2)
    # only adds a no-traffic interval, without which Envoy re-checks after 60 s.
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == fl.EXT_PROC_HEALTH_SERVICE
    # Bundled since the chaos finding; (c2) used to add it and now renders the same check.
    assert check["no_traffic_interval"] == "0.5s"
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    checked = validate_config(path)
    assert checked.returncode == 0, checked.stderr


def _quick(tmp_path: Path, scenarios: tuple[str, ...]) -> ChaosOptions:
    return ChaosOptions.quick_options(
        output=tmp_path,
        scenarios=scenarios,
        seconds=8.0,
        roll_seconds=22.0,
        fault_at=3.0,
        rate=8.0,
        pods=2,
    )


def _check_common(options: ChaosOptions, report: ChaosReport) -> None:
    assert [s.key for s in report.scenarios] == list(options.scenarios)
    for s in report.scenarios:
        # Evenly spaced sends: exactly rate x seconds requests (more in the longer ones).
        assert s.sent >= options.rate * options.seconds
        assert s.ok + s.failed == s.sent
        assert s.failed_before_fault + s.failed_in_flight <= s.failed
        # Every replica's /metrics and the leases were readable after the load.
        assert None not in s.leftover_inflight
        assert s.leftover_leases is not None
        assert s.visible_at is not None, s.events
    json.dumps(to_json(report))


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_pod_picker_and_redis_faults(tmp_path: Path) -> None:
    """(a), (b), (d) short, end to end (real Envoy, picker, simulator, redis-server)."""
    options = _quick(tmp_path, ("a", "b", "d"))
    report = run_chaos(options)
    _check_common(options, report)
    table = render_markdown(report)
    assert "| (a) pod killed mid-stream" in table
    killed = next(s for s in report.scenarios if s.key == "b")
    assert any("picker SIGKILLed" in e for e in killed.events)


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_roll_of_two_replicas(tmp_path: Path) -> None:
    """(c2): both replicas drained and restarted in turn behind one Envoy."""
    options = _quick(tmp_path, ("c2",))
    report = run_chaos(options)
    _check_common(options, report)
    (roll,) = report.scenarios
    assert len(roll.leftover_inflight) == 2
    assert any("replica 1 restarted" in e for e in roll.events), roll.events
    assert set(SCENARIOS) >= {"a", "b", "c", "c2", "d"}


# What each of (e)-(g) must have logged: the fault was noticed and recovered from.
RECOVERED = {
    "e": ("picker scraping by itself", "picker following the collector again"),
    "f": ("0 batches applied while cut", "KV events applied again"),
    "g": ("fewest ready endpoints while it was gone: 2", "picker back on the API"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("key", sorted(RECOVERED))
@pytest.mark.slow
def test_quick_state_side_outages_fail_no_request(tmp_path: Path, key: str) -> None:
    """(e) collector hung then killed, (f) KV-event streams cut, (g) Kubernetes API gone: none
    is on the request path, so no request may fail, and the picker must notice and recover."""
    options = replace(_quick(tmp_path, (key,)), seconds=10.0, outage_seconds=3.0)
    report = run_chaos(options)
    _check_common(options, report)
    (result,) = report.scenarios
    assert result.failed == 0, (result.failures, result.events)
    assert result.nothing_held, (result.leftover_inflight, result.leftover_leases)
    for wanted in RECOVERED[key]:
        assert any(wanted in e for e in result.events), (wanted, result.events)
