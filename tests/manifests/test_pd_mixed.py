"""The P/D and mixed-GPU overlays, read the way the picker reads them.

Each pod template becomes the pod object the API server would list (its labels and annotations,
a pod IP, Ready), and goes through the picker's own discovery code (`parse_pool`, `parse_pod`,
`derive_endpoints`, `PoolState`) with the overlay's own config: the roles, GPU types and prices
asserted here are the ones the picker would see. P/D also needs its wiring right: the address
the picker answers for a decode pod must be the routing sidecar, the one it names in
`x-prefiller-host-port` must be a prefill pod's vLLM, the sidecar must forward to its vLLM's
port, in plain HTTP, and both roles must move KV blocks with NIXL.

The checks return problems as sentences; the tests that break a copy of a build show that each
check fails when its wiring is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from extproc.config import Config, DisaggregationConfig
from extproc.scheduling.disaggregation import roles
from extproc.scheduling.types import Candidate
from extproc.state.discovery.inference_pools import derive_endpoints, parse_pod, parse_pool
from extproc.state.inflight import Load
from extproc.state.pool import PoolState
from extproc.state.snapshot import Endpoint, SnapshotStore
from tests.manifests import wiring
from tests.manifests.kustomize import Build
from tests.manifests.test_manifests import MANIFESTS, _picker_config, built

PD = MANIFESTS / "overlays/pd"
MIXED = MANIFESTS / "overlays/mixed-gpu"
BASE = MANIFESTS / "overlays/gateway-api"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# The header llm-d's sidecar reads the prefill pod from (llm-d-inference-scheduler:
# pkg/common/routing, PrefillEndpointHeader).
SIDECAR_HEADER = "x-prefiller-host-port"
# The node label NVIDIA's GPU feature discovery sets to the card's product name.
GPU_PRODUCT = "nvidia.com/gpu.product"


# --- the picker's view of a build -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """One endpoint of the model as the picker sees it, and the pod template it came from."""

    endpoint: Endpoint
    template: wiring.PodTemplate

    @property
    def port(self) -> int:
        return int(self.endpoint.address.rpartition(":")[2])


def picker_view(build: Build, config: Config) -> list[Served]:
    """The endpoints serving MODEL, from one Ready pod per template, through the picker's own
    pool and pod parsing, label reading (config.fleet) and snapshot building (fleet.prices)."""
    settings = config.discovery.kubernetes
    assert settings is not None
    pools = [
        pool
        for pool in (parse_pool(obj) for obj in build.of_kind("InferencePool"))
        if pool is not None and (not settings.pools or pool.name in settings.pools)
    ]
    templates: dict[str, wiring.PodTemplate] = {}
    pods = []
    for i, template in enumerate(wiring.pod_templates(build)):
        ip = f"10.0.{i}.1"
        templates[ip] = template
        pods.append(
            parse_pod(
                {
                    "metadata": {
                        "name": f"pod-{i}",
                        "labels": dict(template.labels),
                        "annotations": dict(template.annotations),
                    },
                    "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
                }
            )
        )
    store = SnapshotStore()
    PoolState(store, prices=config.fleet.prices).set_endpoints(
        derive_endpoints(pools, pods, config.fleet)
    )
    return [
        Served(endpoint, templates[endpoint.address.rpartition(":")[0]])
        for endpoint in store.current.serving(MODEL)
    ]


def _candidates(served: Sequence[Served]) -> list[Candidate]:
    return [Candidate(s.endpoint, Load()) for s in served]


# --- reading containers -----------------------------------------------------------------------


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a command line."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _args(container: Mapping[str, Any]) -> list[str]:
    return [*container.get("command", ()), *container.get("args", ())]


def _vllm(template: wiring.PodTemplate) -> Mapping[str, Any] | None:
    for container in template.running_containers():
        if "vllm serve" in " ".join(_args(container)):
            return container
    return None


def _sidecar(template: wiring.PodTemplate) -> Mapping[str, Any] | None:
    """The routing sidecar: the running container that forwards to a vLLM port."""
    for container in template.running_containers():
        if _flag(_args(container), "--vllm-port") is not None:
            return container
    return None


def _port(container: Mapping[str, Any], name: str = "--port") -> int | None:
    value = _flag(_args(container), name)
    return int(value) if value is not None and value.isdigit() else None


def _env(container: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return next((e for e in container.get("env", ()) if e["name"] == name), {})


def _declared(container: Mapping[str, Any]) -> set[int]:
    return {p["containerPort"] for p in container.get("ports", ())}


def _granted(build: Build, account: str) -> set[tuple[str, str, str]]:
    """(api group, resource, verb) the Roles bound to ServiceAccount `account` grant."""
    granted = set()
    for binding in build.of_kind("RoleBinding"):
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]
        ):
            continue
        role = build.find(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in (role or {}).get("rules", ()):
            granted |= {
                (group, resource, verb)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
    return granted


# --- P/D ---------------------------------------------------------------------------------------


def pd_problems(build: Build, config: Config) -> list[str]:
    """Everything that would stop the P/D overlay from splitting requests, as sentences."""
    problems = []
    if config.disaggregation.mode != "p2p":
        problems.append(f"disaggregation.mode is {config.disaggregation.mode!r}, not 'p2p'")
    if config.disaggregation.prefiller_header != SIDECAR_HEADER:
        problems.append(f"the sidecar reads {SIDECAR_HEADER}, the picker sets another header")
    served = picker_view(build, config)
    split = roles(_candidates(served))
    if not split.prefill:
        problems.append("the picker does not see a split pool (no prefill endpoint)")
    decode = {c.address for c in split.decode}
    prefill = {c.address for c in split.prefill}
    for s in served:
        problems += _pd_endpoint(build, s, decode, prefill)
    return problems


def _pd_endpoint(build: Build, s: Served, decode: set[str], prefill: set[str]) -> Iterator[str]:
    where = f"{s.template.owner} ({s.endpoint.role}, {s.endpoint.address})"
    vllm = _vllm(s.template)
    if vllm is None:
        yield f"{where}: no vLLM"
        return
    yield from _nixl(where, s.template, vllm)
    sidecar = _sidecar(s.template)
    if s.endpoint.address in prefill and s.endpoint.role == "prefill":
        # The sidecar sends the prefill to this address itself: it must be vLLM.
        if _port(vllm) != s.port:
            yield f"{where}: the pool's port is not vLLM's --port ({_port(vllm)})"
        return
    if s.endpoint.address not in decode:
        yield f"{where}: neither a prefill nor a decode endpoint"
        return
    if s.endpoint.role != "decode":
        yield f"{where}: generates but is not labelled decode"
    if sidecar is None:
        yield f"{where}: no routing sidecar in front of vLLM"
        return
    args = _args(sidecar)
    if _port(sidecar) != s.port or s.port not in _declared(sidecar):
        yield f"{where}: the pool's port is not the sidecar's --port ({_port(sidecar)})"
    if _port(sidecar, "--vllm-port") != _port(vllm):
        yield f"{where}: the sidecar forwards to {_port(sidecar, '--vllm-port')}, not vLLM's port"
    if _port(vllm) == s.port:
        yield f"{where}: vLLM listens on the pool's port, in front of its sidecar"
    if "--secure-proxy=false" not in args:
        yield f"{where}: the sidecar serves TLS (its default); the gateway speaks HTTP"
    if _flag(args, "--kv-connector") != "nixlv2":
        yield f"{where}: the sidecar does not speak vLLM's NixlConnector protocol"
    yield from _ssrf(build, where, s.template, sidecar)


def _nixl(where: str, template: wiring.PodTemplate, vllm: Mapping[str, Any]) -> Iterator[str]:
    transfer = json.loads(_flag(_args(vllm), "--kv-transfer-config") or "{}")
    if transfer.get("kv_connector") != "NixlConnector" or transfer.get("kv_role") != "kv_both":
        yield f"{where}: vLLM does not transfer KV with NixlConnector as kv_both"
    host = _env(vllm, "VLLM_NIXL_SIDE_CHANNEL_HOST").get("valueFrom", {}).get("fieldRef", {})
    if host.get("fieldPath") != "status.podIP":
        yield f"{where}: the NIXL side channel is not on the pod's IP"
    side = int(_env(vllm, "VLLM_NIXL_SIDE_CHANNEL_PORT").get("value", "5600"))
    if side not in _declared(vllm):
        yield f"{where}: the NIXL side channel port {side} is not declared"
    # The other ports the pod listens on: vLLM's KV event sockets and every HTTP --port.
    events = json.loads(_flag(_args(vllm), "--kv-events-config") or "{}")
    used = {str(events.get(k, "")).rpartition(":")[2] for k in ("endpoint", "replay_endpoint")}
    used |= {str(_port(c)) for c in template.running_containers()}
    if str(side) in used:
        yield f"{where}: the NIXL side channel port {side} is taken"


def _ssrf(
    build: Build, where: str, template: wiring.PodTemplate, sidecar: Mapping[str, Any]
) -> Iterator[str]:
    if "--enable-ssrf-protection=true" not in _args(sidecar):
        return
    name = _env(sidecar, "INFERENCE_POOL_NAME").get("value")
    pool = build.find("InferencePool", str(name))
    if pool is None or not all(
        template.labels.get(k) == v for k, v in pool["spec"]["selector"]["matchLabels"].items()
    ):
        yield f"{where}: the sidecar's allowlist pool {name!r} does not select this pod"
    namespace = _env(sidecar, "INFERENCE_POOL_NAMESPACE").get("valueFrom", {}).get("fieldRef", {})
    if namespace.get("fieldPath") != "metadata.namespace":
        yield f"{where}: the sidecar's allowlist namespace is not the pod's"
    need = {
        (group, resource, verb)
        for group, resource in (("inference.networking.k8s.io", "inferencepools"), ("", "pods"))
        for verb in ("get", "list", "watch")
    }
    missing = need - _granted(build, str(template.spec.get("serviceAccountName", "default")))
    if missing:
        yield f"{where}: the sidecar may not read {sorted(missing)}"


def test_pd_overlay_splits_the_pool_and_wires_the_sidecar(tmp_path: Path) -> None:
    build = built(PD)
    config = _picker_config(build, tmp_path)
    problems = pd_problems(build, config)
    assert not problems, "\n".join(problems)
    served = picker_view(build, config)
    assert {s.endpoint.role for s in served} == {"prefill", "decode"}


def test_pd_config_differs_from_the_base_only_in_disaggregation(tmp_path: Path) -> None:
    base = _picker_config(built(BASE), tmp_path / "base")
    pd = _picker_config(built(PD), tmp_path / "pd")
    assert pd.disaggregation.mode == "p2p"
    assert base.disaggregation == DisaggregationConfig()
    assert dataclasses.replace(pd, disaggregation=base.disaggregation) == base


def _sidecar_args(build: Build) -> list[str]:
    decode = build.find("Deployment", "vllm-llama-3-8b-decode")
    assert decode is not None
    (sidecar,) = decode["spec"]["template"]["spec"]["initContainers"]
    args: list[str] = sidecar["args"]
    return args


def _replace(args: list[str], old: str, new: str | None) -> None:
    index = args.index(old)
    if new is None:
        del args[index]
    else:
        args[index] = new


def _vllm_template(build: Build, name: str) -> dict[str, Any]:
    obj = build.find("Deployment", name)
    assert obj is not None
    template: dict[str, Any] = obj["spec"]["template"]
    return template


def _break_pool_port(build: Build) -> None:
    pool = build.find("InferencePool", "llama-3-8b")
    assert pool is not None
    pool["spec"]["targetPorts"] = [{"number": 8200}]


def _unlabel_prefill(build: Build) -> None:
    del _vllm_template(build, "vllm-llama-3-8b-prefill")["metadata"]["labels"]["llm-d.ai/role"]


def _drop_nixl_host(build: Build) -> None:
    (vllm,) = _vllm_template(build, "vllm-llama-3-8b-prefill")["spec"]["containers"]
    vllm["env"] = [e for e in vllm["env"] if e["name"] != "VLLM_NIXL_SIDE_CHANNEL_HOST"]


def _unbind_sidecar(build: Build) -> None:
    role = build.find("Role", "vllm-pd-sidecar")
    assert role is not None
    role["rules"] = role["rules"][1:]


PD_BREAKS: dict[str, Callable[[Build], None]] = {
    "sidecar forwards elsewhere": lambda b: _replace(
        _sidecar_args(b), "--vllm-port=8200", "--vllm-port=8300"
    ),
    "sidecar on TLS": lambda b: _replace(_sidecar_args(b), "--secure-proxy=false", None),
    "pool targets vLLM behind the sidecar": _break_pool_port,
    "prefill pods without their role": _unlabel_prefill,
    "NIXL side channel on localhost": _drop_nixl_host,
    "sidecar cannot read the pool": _unbind_sidecar,
}


@pytest.mark.parametrize("name", PD_BREAKS)
def test_pd_check_catches_broken_wiring(name: str, tmp_path: Path) -> None:
    build = built(PD)
    config = _picker_config(build, tmp_path)
    broken = Build(objects=copy.deepcopy(build.objects))
    PD_BREAKS[name](broken)
    assert pd_problems(broken, config)


def test_pd_check_catches_a_picker_without_disaggregation(tmp_path: Path) -> None:
    build = built(PD)
    config = _picker_config(build, tmp_path)
    assert pd_problems(build, dataclasses.replace(config, disaggregation=DisaggregationConfig()))


# --- mixed GPU fleet ----------------------------------------------------------------------------


def mixed_problems(build: Build, config: Config) -> list[str]:
    """Everything that would leave the picker pricing the mixed fleet wrong, as sentences."""
    problems = []
    if config.routing.strategy != "cheapest":
        problems.append(f"routing.strategy is {config.routing.strategy!r}, not 'cheapest'")
    served = picker_view(build, config)
    if roles(_candidates(served)).prefill:
        problems.append("the mixed pool is split into prefill and decode")
    accelerators = {s.endpoint.accelerator for s in served}
    if len(accelerators) < 2:
        problems.append(f"one pool of several GPU types expected, the picker sees {accelerators}")
    for s in served:
        where = f"{s.template.owner} ({s.endpoint.address})"
        accelerator = s.endpoint.accelerator
        if not accelerator:
            problems.append(f"{where}: no accelerator")
        elif accelerator not in config.fleet.speeds:
            problems.append(f"{where}: no fleet.speeds for {accelerator!r}")
        if not s.endpoint.cost_per_hour > 0:
            problems.append(f"{where}: no price")
        product = s.template.spec.get("nodeSelector", {}).get(GPU_PRODUCT, "")
        if not accelerator or accelerator.lower() not in product.lower():
            problems.append(f"{where}: labelled {accelerator!r}, scheduled on {product!r} nodes")
    return problems


def test_mixed_overlay_gives_every_pod_a_gpu_type_speed_and_price(tmp_path: Path) -> None:
    build = built(MIXED)
    config = _picker_config(build, tmp_path)
    problems = mixed_problems(build, config)
    assert not problems, "\n".join(problems)
    prices = {s.endpoint.accelerator: s.endpoint.cost_per_hour for s in picker_view(build, config)}
    assert set(prices) == {"a100", "h100"}
    assert prices["a100"] < prices["h100"]
    assert config.fleet.speeds["a100"] < config.fleet.speeds["h100"]


def test_mixed_config_differs_from_the_base_only_in_price_routing(tmp_path: Path) -> None:
    base = _picker_config(built(BASE), tmp_path / "base")
    mixed = _picker_config(built(MIXED), tmp_path / "mixed")
    assert mixed.routing.strategy == "cheapest"
    assert mixed.scheduling.ttft_target_seconds != base.scheduling.ttft_target_seconds
    assert (
        dataclasses.replace(
            mixed,
            routing=dataclasses.replace(mixed.routing, strategy=base.routing.strategy),
            scheduling=base.scheduling,
            fleet=base.fleet,
        )
        == base
    )


def _mixed_template(build: Build, gpu: str) -> dict[str, Any]:
    return _vllm_template(build, f"vllm-llama-3-8b-{gpu}")


def _swap_nodes(build: Build) -> None:
    a100, h100 = _mixed_template(build, "a100")["spec"], _mixed_template(build, "h100")["spec"]
    a100["nodeSelector"], h100["nodeSelector"] = h100["nodeSelector"], a100["nodeSelector"]


def _unprice(build: Build) -> None:
    del _mixed_template(build, "h100")["metadata"]["labels"]["extproc.io/cost-per-hour"]


MIXED_BREAKS: dict[str, Callable[[Build], None]] = {
    "GPU labels swapped with the nodes": _swap_nodes,
    "a pod without a price": _unprice,
}


@pytest.mark.parametrize("name", MIXED_BREAKS)
def test_mixed_check_catches_broken_labels(name: str, tmp_path: Path) -> None:
    build = built(MIXED)
    config = _picker_config(build, tmp_path)
    broken = Build(objects=copy.deepcopy(build.objects))
    MIXED_BREAKS[name](broken)
    assert mixed_problems(broken, config)


def test_mixed_check_catches_a_gpu_type_without_a_speed(tmp_path: Path) -> None:
    build = built(MIXED)
    config = _picker_config(build, tmp_path)
    speeds = {k: v for k, v in config.fleet.speeds.items() if k != "h100"}
    fleet = dataclasses.replace(config.fleet, speeds=speeds)
    assert mixed_problems(build, dataclasses.replace(config, fleet=fleet))


def test_wiring_counts_native_sidecar_ports_only() -> None:
    """The pool's port on decode pods is the sidecar's: wiring counts it because the sidecar
    keeps running (restartPolicy Always); a plain init container's port serves nothing."""
    build = built(PD)
    assert not wiring.check(build)
    broken = Build(objects=copy.deepcopy(build.objects))
    decode = _vllm_template(broken, "vllm-llama-3-8b-decode")
    del decode["spec"]["initContainers"][0]["restartPolicy"]
    problems = wiring.check(broken)
    assert any("vllm-llama-3-8b-decode does not listen on 8000" in p for p in problems), problems
