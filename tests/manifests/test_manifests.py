"""Every Kubernetes file under manifests/: built, schema-checked, wired together, and consistent
with the picker's config loader and the Envoy files.

How: `kustomize.py` builds each kustomization (and `kubectl kustomize` must agree when kubectl is
installed); `schemas.py` validates each object (Kubernetes' strict schemas, our CRDs' own
schemas, the upstream schemas of the Gateway API and Prometheus Operator kinds from the npm
packages in `upstream/`, and small hand-written schemas for the other third-party CRD kinds);
`wiring.py` checks the names objects use for each other. A file no kustomization reaches fails
the suite, so nothing under manifests/ escapes these checks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import Config
from extproc.server.app import add_arguments, config_from_args
from tests.manifests import kustomize, wiring
from tests.manifests.kustomize import Build, KustomizeError
from tests.manifests.schemas import Validator

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
NAMESPACE = "llm"
DIRS = kustomize.kustomization_dirs(MANIFESTS)
OVERLAYS = [d for d in DIRS if d.parent.name == "overlays"]
# Overlays that install the picker from base/ (all of them).
PICKER_OVERLAYS = OVERLAYS
# The lead asked for the controllers and CRDs only in overlays/full, so the others build before
# manifests/crds and manifests/controllers exist.
EXTERNAL_DIRS = ("crds", "controllers")


def _id(path: Path) -> str:
    return str(path.relative_to(MANIFESTS))


@functools.cache
def _build(directory: Path) -> Build | KustomizeError:
    try:
        return kustomize.build(directory)
    except KustomizeError as exc:
        return exc


def built(directory: Path) -> Build:
    """The build of `directory`; a kustomization that does not build fails only
    test_kustomization_builds (with the reason) and skips the checks that need its objects."""
    result = _build(directory)
    if isinstance(result, KustomizeError):
        pytest.skip(f"does not build: {result}")
    return result


@functools.cache
def validator() -> Validator:
    crds = []
    for path in sorted((MANIFESTS / "crds").glob("*.yaml")):
        crds += [
            d for d in kustomize.load_documents(path) if d["kind"] == "CustomResourceDefinition"
        ]
    return Validator(crds)


# --- every file is built ---------------------------------------------------------------------


def test_every_manifest_file_is_reached_by_a_kustomization() -> None:
    reached: set[Path] = set()
    for directory in DIRS:
        partial = Build()
        # A kustomization that cannot build (test_kustomization_builds says why) still counts
        # the files it read.
        with contextlib.suppress(KustomizeError):
            kustomize.build(directory, into=partial)
        reached |= partial.files
    files = {
        p.resolve()
        for p in MANIFESTS.rglob("*")
        if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
    }
    orphans = sorted(str(p.relative_to(MANIFESTS)) for p in files - reached)
    assert not orphans, f"no kustomization reaches {orphans}"


def test_overlay_full_names_the_controllers_and_crds() -> None:
    spec = yaml.safe_load((MANIFESTS / "overlays/full/kustomization.yaml").read_text())
    assert {f"../../{name}" for name in EXTERNAL_DIRS} <= set(spec["resources"])
    for directory in DIRS:
        if directory.name == "full" or _id(directory).split("/")[0] in EXTERNAL_DIRS:
            continue
        text = (directory / kustomize.KUSTOMIZATION).read_text()
        assert not any(f"../{name}" in text for name in EXTERNAL_DIRS), _id(directory)


@pytest.mark.parametrize("directory", DIRS, ids=_id)
def test_kustomization_builds(directory: Path) -> None:
    result = _build(directory)
    if isinstance(result, KustomizeError):
        pytest.fail(str(result))
    assert result.objects


@pytest.mark.parametrize("directory", DIRS, ids=_id)
def test_objects_match_their_schemas(directory: Path) -> None:
    problems = [str(p) for obj in built(directory).objects for p in validator().validate(obj)]
    assert not problems, "\n".join(problems)


kubectl = shutil.which("kubectl")


def _normalised(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], Any]:
    """Objects by id, with kustomize's name-hash suffixes removed (this resolver adds none)."""
    text = yaml.safe_dump(objects)
    hashes = {
        o["metadata"]["name"]
        for o in objects
        if re.search(r"-[a-z0-9]{10}$", o["metadata"]["name"])
    }
    for name in hashes:
        text = text.replace(name, name[:-11])
    return {kustomize.object_id(o): o for o in yaml.safe_load(text)}


@pytest.mark.skipif(kubectl is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("directory", DIRS, ids=_id)
def test_kubectl_kustomize_agrees(directory: Path) -> None:
    assert kubectl is not None
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = _build(directory)
    if isinstance(ours, KustomizeError):
        assert done.returncode != 0, "kubectl builds what the test resolver refuses"
        return
    assert done.returncode == 0, done.stderr
    theirs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert _normalised(theirs) == _normalised(ours.objects)


# --- overlays work as a whole -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_id)
def test_overlay_wiring(overlay: Path) -> None:
    problems = wiring.check(built(overlay))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_id)
def test_overlay_installs_into_one_namespace(overlay: Path) -> None:
    for obj in built(overlay).objects:
        if obj["kind"] not in kustomize.CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, wiring._name(obj)


def _picker_config(build: Build, tmp_path: Path) -> Config:
    """The picker's config as `extproc serve --config` would load it from the ConfigMap."""
    config_map = build.find("ConfigMap", "extproc-picker-config")
    assert config_map is not None
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "picker.yaml"
    path.write_text(config_map["data"]["picker.yaml"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # The Deployment's own arguments, with the file's path swapped for the copy.
    picker = build.find("Deployment", "extproc-picker")
    assert picker is not None
    args = list(picker["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args[0] == "serve"
    args[args.index("--config") + 1] = str(path)
    config, _ = config_from_args(parser.parse_args(args[1:]))
    return config


def _container(build: Build, kind: str, name: str) -> dict[str, Any]:
    obj = build.find(kind, name)
    assert obj is not None, f"{kind}/{name}"
    container: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize("overlay", PICKER_OVERLAYS, ids=_id)
def test_picker_config_loads_and_matches_the_deployment(overlay: Path, tmp_path: Path) -> None:
    build = built(overlay)
    config = _picker_config(build, tmp_path)
    assert config.discovery.kubernetes is not None  # endpoints from the InferencePools
    container = _container(build, "Deployment", "extproc-picker")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc-ext-proc": config.server.grpc_port,
        "grpc-health": config.server.health_port,
        "metrics": config.server.metrics_port,
    }
    for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        assert container[probe]["grpc"] == {"port": config.server.health_port, "service": service}
    pod = build.find("Deployment", "extproc-picker")
    assert pod is not None
    spec = pod["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pre_stop + config.server.shutdown_grace_seconds


def _model_server_args(build: Build) -> list[tuple[str, str]]:
    """(owner, command line) of every container that runs `vllm serve`."""
    out = []
    for template in wiring.pod_templates(build):
        for container in template.spec["containers"]:
            line = " ".join([*container.get("command", ()), *container.get("args", ())])
            if "vllm serve" in line:
                out.append((template.owner, line))
    return out


@pytest.mark.parametrize("overlay", PICKER_OVERLAYS, ids=_id)
def test_model_servers_hash_prompts_as_the_picker_does(overlay: Path, tmp_path: Path) -> None:
    """Precise prefix routing needs the picker's block hashes to equal vLLM's: same block size,
    same hash algorithm, the model's own tokenizer, and KV events published."""
    build = built(overlay)
    config = _picker_config(build, tmp_path)
    servers = _model_server_args(build)
    assert servers
    for owner, line in servers:
        assert f"--block-size={config.prefix.block_size}" in line, owner
        assert f"--prefix-caching-hash-algo={config.prefix.hash_algo}" in line, owner
        assert "--enable-prefix-caching" in line, owner
        assert '"enable_kv_cache_events":true' in line, owner
        assert config.kv_events.enabled
    models = {
        model.strip()
        for template in wiring.pod_templates(build)
        for model in template.annotations.get("extproc.io/models", "").split(",")
        if model.strip()
    }
    assert models
    missing = models - set(config.prefix.tokenizers)
    assert not missing, f"no tokenizer configured for {sorted(missing)} (cl100k would not match)"


def test_shared_collector_config_differs_only_in_its_source(tmp_path: Path) -> None:
    base = _picker_config(built(MANIFESTS / "overlays/gateway-api"), tmp_path / "a")
    shared = _picker_config(built(MANIFESTS / "overlays/shared-collector"), tmp_path / "b")
    assert shared.collector.source == "extproc-collector:9004"
    service = built(MANIFESTS / "overlays/shared-collector").find("Service", "extproc-collector")
    assert service is not None and {p["port"] for p in service["spec"]["ports"]} >= {9004}
    assert base.collector.source == ""
    assert dataclasses.replace(shared, collector=base.collector) == base


def test_envoy_ingress_runs_the_shipped_envoy_file() -> None:
    config_map = built(MANIFESTS / "gateway/envoy-ingress").find("ConfigMap", "envoy-ingress")
    assert config_map is not None
    shipped = (ROOT / "envoy/envoy-kubernetes.yaml").read_text()
    assert yaml.safe_load(config_map["data"]["envoy.yaml"]) == yaml.safe_load(shipped)


def test_envoy_ingress_names_services_that_exist() -> None:
    build = built(MANIFESTS / "overlays/mesh-ingress")
    bootstrap = yaml.safe_load((ROOT / "envoy/envoy-kubernetes.yaml").read_text())
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["type"] != "STRICT_DNS":
            continue
        (group,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = group["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        name, namespace, *_ = address["address"].split(".")
        service = build.find("Service", name)
        assert service is not None, name
        assert namespace == service["metadata"]["namespace"]
        # Headless: DNS gives every pod, so Envoy balances (and override_host matches) pod IPs.
        assert service["spec"].get("clusterIP") == "None", name
        assert address["port_value"] in {p["port"] for p in service["spec"]["ports"]}


def test_picker_rbac_is_exactly_what_discovery_reads() -> None:
    role = built(MANIFESTS / "picker").find("Role", "extproc-picker")
    assert role is not None
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("inference.networking.k8s.io", "inferencepools"): ["get", "list", "watch"],
        ("", "pods"): ["get", "list", "watch"],
    }


def test_picker_is_highly_available() -> None:
    build = built(MANIFESTS / "base")
    picker = build.find("Deployment", "extproc-picker")
    budget = build.find("PodDisruptionBudget", "extproc-picker")
    assert picker is not None and budget is not None
    assert picker["spec"]["replicas"] >= 2
    assert picker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert budget["spec"]["maxUnavailable"] < picker["spec"]["replicas"]
    resources = _container(build, "Deployment", "extproc-picker")["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])


def test_multinode_pool_routes_to_leaders_only() -> None:
    build = built(MANIFESTS / "overlays/multinode")
    pool = build.find("InferencePool", "llama-3-70b")
    assert pool is not None
    selected = [
        t.owner
        for t in wiring.pod_templates(build)
        if all(t.labels.get(k) == v for k, v in pool["spec"]["selector"]["matchLabels"].items())
    ]
    assert selected == ["LeaderWorkerSet/vllm-llama-3-70b (leaderTemplate)"]
