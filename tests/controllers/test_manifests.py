"""The CRDs are structural OpenAPI v3 schemas that accept the documented examples and reject
broken ones; every manifest in manifests/crds and manifests/controllers validates against the
Kubernetes schemas `kubernetes-validate` ships (strict: unknown fields fail)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.controllers.autoscaler.spec import parse_spec as parse_autoscaler
from extproc.controllers.kvpool.render import owner_reference, render
from extproc.controllers.kvpool.render import parse_spec as parse_pool
from extproc.controllers.lora.controller import parse_spec as parse_adapter

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
CRDS = MANIFESTS / "crds"
CONTROLLERS = MANIFESTS / "controllers"
VERSION = kubernetes_validate.latest_version()  # the newest schemas the package ships

AUTOSCALER = {
    "apiVersion": "extproc.io/v1alpha1",
    "kind": "PodAutoscaler",
    "metadata": {"name": "llama", "namespace": "llm"},
    "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llama"},
        "minReplicas": 1,
        "maxReplicas": 8,
        "algorithm": "kpa",
        "metrics": [
            {"metric": "concurrency", "target": 16},
            {"metric": "kv-usage", "target": 0.8},
            {"metric": "tokens-per-second", "target": 4000, "port": 8000},
        ],
        "kpa": {"stableWindowSeconds": 60, "panicWindowSeconds": 6, "scaleDownDelaySeconds": 300},
    },
}
ADAPTER = {
    "apiVersion": "extproc.io/v1alpha1",
    "kind": "ModelAdapter",
    "metadata": {"name": "sql-lora", "namespace": "llm"},
    "spec": {
        "baseModel": "meta-llama/Llama-3.1-8B-Instruct",
        "source": "/models/sql-lora",
        "replicas": 2,
        "placement": "bin-pack",
        "podSelector": {"matchLabels": {"app": "llama"}},
    },
}
POOL = {
    "apiVersion": "extproc.io/v1alpha1",
    "kind": "KVCachePool",
    "metadata": {"name": "llama-kv", "namespace": "llm"},
    "spec": {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "replicas": 1,
        "server": {"port": 65432, "resources": {"requests": {"memory": "64Gi"}}},
        "cache": {"chunkSize": 256, "localCpuGB": 5, "serde": "naive"},
    },
}
SAMPLES = {"PodAutoscaler": AUTOSCALER, "ModelAdapter": ADAPTER, "KVCachePool": POOL}


def _documents(directory: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path.name, document


def _crd(kind: str) -> dict[str, Any]:
    for _, document in _documents(CRDS):
        if document["kind"] == "CustomResourceDefinition" and (
            document["spec"]["names"]["kind"] == kind
        ):
            return document
    raise AssertionError(kind)


def _schema(kind: str) -> dict[str, Any]:
    (version,) = _crd(kind)["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _structural_problems(node: Mapping[str, Any], where: str) -> Iterator[str]:
    """Kubernetes' structural-schema rules that matter here: every node has a type (unless it
    preserves unknown fields or is int-or-string), no properties beside additionalProperties,
    and no constructs the API server refuses (no $ref, no anyOf at the top of a node)."""
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-int-or-string"
    )
    if "type" not in node and not free:
        yield f"{where}: no type"
    if "properties" in node and "additionalProperties" in node:
        yield f"{where}: properties and additionalProperties"
    for key in ("$ref", "definitions", "dependencies", "patternProperties"):
        if key in node:
            yield f"{where}: {key} is not allowed"
    for name, child in (node.get("properties") or {}).items():
        yield from _structural_problems(child, f"{where}.{name}")
    if isinstance(node.get("items"), Mapping):
        yield from _structural_problems(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from _structural_problems(node["additionalProperties"], f"{where}{{}}")


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_crd_is_a_valid_structural_schema(kind: str) -> None:
    crd = _crd(kind)
    assert kubernetes_validate.validate(crd, VERSION, strict=True)
    schema = _schema(kind)
    assert list(_structural_problems(schema, kind)) == []
    # An OpenAPI v3.0 schema is a JSON Schema draft 4 one for what is used here (boolean
    # exclusiveMinimum included); x-kubernetes-* keywords are ignored by the validator.
    jsonschema.Draft4Validator.check_schema(schema)
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.extproc.io"


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_samples_validate_and_parse(kind: str) -> None:
    sample = SAMPLES[kind]
    jsonschema.Draft4Validator(_schema(kind)).validate(sample)
    name, spec = sample["metadata"]["name"], sample["spec"]
    if kind == "PodAutoscaler":
        parsed = parse_autoscaler(spec)
        assert [s.metric for s in parsed.sources] == [
            "concurrency",
            "kv-usage",
            "tokens-per-second",
        ]
    elif kind == "ModelAdapter":
        assert parse_adapter(name, spec).policy == "bin-pack"
    else:
        owner = owner_reference({**sample, "metadata": {**sample["metadata"], "uid": "u1"}})
        rendered = render(parse_pool(name, spec), namespace="llm", owner=owner)
        for obj in rendered.objects:  # what the pool controller creates is valid Kubernetes too
            assert kubernetes_validate.validate(obj, VERSION, strict=True)


def _broken(kind: str, path: tuple[str, ...], value: Any) -> dict[str, Any]:
    sample = copy.deepcopy(SAMPLES[kind])
    node = sample
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return sample


_DELETE = object()


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("PodAutoscaler", ("spec", "metrics"), []),
        ("PodAutoscaler", ("spec", "algorithm"), "pid"),
        ("PodAutoscaler", ("spec", "metrics"), [{"metric": "queue", "target": 0}]),
        ("PodAutoscaler", ("spec", "scaleTargetRef"), _DELETE),
        ("ModelAdapter", ("spec", "podSelector"), {"matchLabels": {}}),
        ("ModelAdapter", ("spec", "placement"), "random"),
        ("ModelAdapter", ("spec", "replicas"), -1),
        ("KVCachePool", ("spec", "model"), _DELETE),
        ("KVCachePool", ("spec", "cache"), {"serde": "zstd"}),
    ],
    ids=[
        "no-metrics", "bad-algorithm", "zero-target", "no-target-ref", "empty-selector",
        "bad-placement", "negative-replicas", "no-model", "bad-serde",
    ],
)  # fmt: skip
def test_broken_objects_are_rejected(kind: str, path: tuple[str, ...], value: Any) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(_schema(kind)).validate(_broken(kind, path, value))


@pytest.mark.parametrize("directory", [CRDS, CONTROLLERS], ids=["crds", "controllers"])
def test_every_manifest_validates_and_the_kustomization_lists_them(directory: Path) -> None:
    for name, document in _documents(directory):
        if document.get("kind") == "Kustomization":
            listed = sorted(document["resources"])
            assert listed == sorted(p.name for p in directory.glob("*.yaml") if p.name != name)
            continue
        assert kubernetes_validate.validate(document, VERSION, strict=True), name


def test_rbac_covers_what_the_controllers_call() -> None:
    (role,) = [d for _, d in _documents(CONTROLLERS) if d["kind"] == "Role"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        ("extproc.io", "podautoscalers", "list"),
        ("extproc.io", "podautoscalers/status", "patch"),
        ("extproc.io", "modeladapters", "patch"),  # the finalizer
        ("extproc.io", "kvcachepools/status", "patch"),
        ("apps", "deployments/scale", "get"),
        ("apps", "deployments/scale", "patch"),
        ("apps", "statefulsets/scale", "patch"),
        ("apps", "statefulsets", "create"),
        ("apps", "statefulsets", "patch"),
        ("", "pods", "list"),
        ("", "services", "create"),
        ("", "configmaps", "patch"),
        ("", "events", "create"),
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "patch"),
    }
    assert needed <= granted
    (deployment,) = [d for _, d in _documents(CONTROLLERS) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == role["metadata"]["name"]
    assert deployment["spec"]["replicas"] == 2  # leader election makes two safe
