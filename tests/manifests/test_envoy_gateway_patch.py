"""The EnvoyPatchPolicy of manifests/gateway/envoy-gateway, applied to a cluster shaped like the
one Envoy Gateway generates for the route (STATIC hosts stand in for its EDS; releases before 1.8
set lb_policy LEAST_REQUEST, which Envoy ignores once load_balancing_policy is set; 1.8 and later
set a load_balancing_policy, which the patch's `add` replaces), is a valid Envoy config, and the
real Envoy then routes by the address written to envoy.lb / x-gateway-destination-endpoint, as
the picker writes it.
"""

from __future__ import annotations

import copy
import http.server
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.bench.envoy import running_envoy, validate_config
from extproc.bench.processes import free_ports

POLICY = Path(__file__).resolve().parents[2] / "manifests/gateway/envoy-gateway/patch-policy.yaml"


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def apply_json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add / replace / remove on objects (all the patch uses)."""
    out = copy.deepcopy(document)
    for operation in operations:
        *parents, leaf = _pointer(operation["path"])
        target: Any = out
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if operation["op"] in ("add", "replace"):
            if operation["op"] == "replace" and leaf not in target:
                raise KeyError(f"replace: no {operation['path']}")
            target[leaf] = copy.deepcopy(operation["value"])
        elif operation["op"] == "remove":
            del target[leaf]
        else:
            raise ValueError(f"unsupported op {operation['op']}")
    return out


# How Envoy Gateway writes the route cluster's balancer: before 1.8, and from 1.8 on.
BALANCERS: dict[str, dict[str, Any]] = {
    "lb_policy": {"lb_policy": "LEAST_REQUEST"},
    "load_balancing_policy": {
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.least_request",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies"
                            ".least_request.v3.LeastRequest"
                        },
                    }
                }
            ]
        }
    },
}


def _patched_cluster(hosts: list[int], balancer: str) -> dict[str, Any]:
    (patch,) = yaml.safe_load(POLICY.read_text())["spec"]["jsonPatches"]
    generated = {
        "name": patch["name"],
        "type": "STATIC",
        "connect_timeout": "10s",
        **BALANCERS[balancer],
        "per_connection_buffer_limit_bytes": 32768,
        "load_assignment": {
            "cluster_name": patch["name"],
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                        for port in hosts
                    ]
                }
            ],
        },
    }
    return apply_json_patch(generated, [patch["operation"]])


def _bootstrap(
    *, listen: int, admin: int, hosts: list[int], picked: str, balancer: str
) -> dict[str, Any]:
    """A listener whose set_metadata filter writes `picked` where the picker's answer goes."""
    cluster = _patched_cluster(hosts, balancer)
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster["name"]}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.set_metadata",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3"
                    ".Config",
                    "metadata": [
                        {
                            "metadata_namespace": "envoy.lb",
                            "value": {"x-gateway-destination-endpoint": picked},
                        }
                    ],
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "test",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


@pytest.mark.parametrize("balancer", BALANCERS)
def test_patched_cluster_is_valid_envoy_config(tmp_path: Path, balancer: str) -> None:
    path = tmp_path / "envoy.yaml"
    config = _bootstrap(
        listen=18080, admin=19901, hosts=[18001, 18002], picked="127.0.0.1:18002", balancer=balancer
    )
    path.write_text(yaml.safe_dump(config))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


class _Named(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        _, port = self.connection.getsockname()[:2]
        body = str(port).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[list[int]]:
    """Two HTTP servers on loopback that answer with their own port."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Named) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield [s.server_address[1] for s in servers]
    for server, thread in zip(servers, threads, strict=True):
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.e2e
@pytest.mark.parametrize("balancer", BALANCERS)
def test_envoy_routes_by_the_picked_address(backends: list[int], balancer: str) -> None:
    first, second = backends
    listen, admin, unknown = free_ports(3)
    # The first address is no host of the cluster (a pod Envoy does not know yet): skipped.
    picked = f"127.0.0.1:{unknown},127.0.0.1:{second},127.0.0.1:{first}"
    config = _bootstrap(
        listen=listen, admin=admin, hosts=backends, picked=picked, balancer=balancer
    )
    with running_envoy(yaml.safe_dump(config), admin_port=admin, concurrency=1):
        served = []
        for _ in range(6):
            with urllib.request.urlopen(f"http://127.0.0.1:{listen}/", timeout=10) as response:
                served.append(int(response.read()))
    # Least-request alone would spread six requests over both hosts.
    assert served == [second] * 6
