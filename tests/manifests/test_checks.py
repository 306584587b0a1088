"""The checkers themselves catch what they claim to: an unknown kind, a misspelled field (in a
built-in kind, a third-party CRD kind and our own CRD kind), a broken reference between objects,
a kustomization the resolver cannot build faithfully."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.manifests import kustomize, promql, wiring
from tests.manifests.kustomize import KustomizeError
from tests.manifests.schemas import Validator

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


@pytest.fixture(scope="module")
def overlay() -> kustomize.Build:
    return kustomize.build(MANIFESTS / "overlays/envoy-gateway")


def _object(build: kustomize.Build, kind: str, name: str) -> dict[str, Any]:
    obj = build.find(kind, name)
    assert obj is not None
    return copy.deepcopy(obj)


def _messages(validator: Validator, obj: dict[str, Any]) -> str:
    return "\n".join(str(p) for p in validator.validate(obj))


def test_unknown_kind_is_an_error() -> None:
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "unknown kind Widget" in _messages(Validator(), obj)


@pytest.mark.parametrize(
    ("kind", "name", "path", "typo"),
    [
        ("Deployment", "extproc-picker", ("spec", "template", "spec"), "serviceAcountName"),
        ("Service", "extproc-picker", ("spec",), "selectr"),
        ("InferencePool", "llama-3-8b", ("spec", "endpointPickerRef"), "failuremode"),
        ("HTTPRoute", "llama-3-8b", ("spec", "rules", 0), "backendRef"),
        ("EnvoyExtensionPolicy", "extproc-picker", ("spec", "extProc", 0), "failopen"),
        ("EnvoyPatchPolicy", "extproc-override-host", ("spec",), "jsonPatch"),
        ("Gateway", "inference-gateway", ("metadata",), "lables"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_misspelled_field_is_an_error(
    overlay: kustomize.Build, kind: str, name: str, path: tuple[Any, ...], typo: str
) -> None:
    obj = _object(overlay, kind, name)
    target: Any = obj
    for key in path:
        target = target[key]
    target[typo] = "x"
    assert f"'{typo}' was unexpected" in _messages(Validator(), obj)


def test_pod_template_inside_a_crd_kind_is_checked_as_kubernetes_does() -> None:
    build = kustomize.build(MANIFESTS / "examples/multinode")
    obj = _object(build, "LeaderWorkerSet", "vllm-llama-3-70b")
    container = obj["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    container["imagePullPolcy"] = "Always"
    assert "'imagePullPolcy' was unexpected" in _messages(Validator(), obj)


def test_wrong_enum_value_is_an_error(overlay: kustomize.Build) -> None:
    obj = _object(overlay, "InferencePool", "llama-3-8b")
    obj["spec"]["endpointPickerRef"]["failureMode"] = "FailSafe"
    assert "FailSafe" in _messages(Validator(), obj)


_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Gadget", "plural": "gadgets"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "replicas": {"type": "integer"},
                                    "extra": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_own_crd_schema_is_closed_like_strict_field_validation() -> None:
    validator = Validator([_CRD])
    good: dict[str, Any] = {
        "apiVersion": "example.com/v1",
        "kind": "Gadget",
        "metadata": {"name": "g"},
        "spec": {"replicas": 2, "extra": {"anything": 1}},
    }
    assert validator.validate(good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["replica"] = 2
    assert "'replica' was unexpected" in _messages(validator, bad)
    bad = copy.deepcopy(good)
    bad["spec"]["replicas"] = "two"
    assert "'two' is not of type 'integer'" in _messages(validator, bad)


@pytest.mark.parametrize(
    ("kind", "name", "change", "problem"),
    [
        ("InferencePool", "llama-3-8b", ("endpointPickerRef", "name", "picker"), "no Service"),
        ("InferencePool", "llama-3-8b", ("selector", "matchLabels", {"app": "x"}), "selects no"),
        ("Service", "extproc-picker", ("selector", {"app.kubernetes.io/name": "x"}), "selects no"),
    ],
    ids=["picker-service", "pool-selector", "service-selector"],
)
def test_broken_reference_is_found(
    overlay: kustomize.Build, kind: str, name: str, change: tuple[Any, ...], problem: str
) -> None:
    build = kustomize.Build(objects=copy.deepcopy(overlay.objects))
    obj = build.find(kind, name)
    assert obj is not None
    target = obj["spec"]
    *keys, last, value = change
    for key in keys:
        target = target[key]
    target[last] = value
    assert any(problem in p for p in wiring.check(build)), wiring.check(build)


def test_patch_of_a_cluster_that_is_not_the_routes_is_found(overlay: kustomize.Build) -> None:
    build = kustomize.Build(objects=copy.deepcopy(overlay.objects))
    policy = build.find("EnvoyPatchPolicy", "extproc-override-host")
    assert policy is not None
    policy["spec"]["jsonPatches"][0]["name"] = "httproute/default/llama-3-8b/rule/0"
    assert any("does not name" in p for p in wiring.check(build))


def _kustomization(tmp_path: Path, text: str, files: dict[str, str] | None = None) -> Path:
    (tmp_path / "kustomization.yaml").write_text(text)
    for name, content in (files or {}).items():
        (tmp_path / name).write_text(content)
    return tmp_path


_CM = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"


@pytest.mark.parametrize(
    ("text", "files", "message"),
    [
        ("resources: [missing.yaml]\n", {}, "does not exist"),
        ("resources: [../nowhere]\n", {}, "does not exist"),
        ("patches: []\n", {}, "not supported"),
        ("resources: [a.yaml, b.yaml]\n", {"a.yaml": _CM, "b.yaml": _CM}, "appears twice"),
        (
            "configMapGenerator: [{name: c, files: [../x.yaml]}]\n",
            {},
            "outside the kustomization's folder",
        ),
    ],
    ids=["missing-file", "missing-dir", "unsupported-key", "duplicate", "outside-folder"],
)
def test_resolver_refuses_what_it_cannot_build(
    tmp_path: Path, text: str, files: dict[str, str], message: str
) -> None:
    folder = tmp_path / "k"
    folder.mkdir()
    with pytest.raises(KustomizeError, match=message):
        kustomize.build(_kustomization(folder, text, files))


def test_resolver_records_the_files_it_reads(tmp_path: Path) -> None:
    folder = _kustomization(
        tmp_path,
        "namespace: x\nresources: [a.yaml]\nconfigMapGenerator: [{name: c, files: [c.txt]}]\n",
        {"a.yaml": _CM, "c.txt": "hello"},
    )
    build = kustomize.build(folder)
    assert {p.name for p in build.files} == {"kustomization.yaml", "a.yaml", "c.txt"}
    generated = build.find("ConfigMap", "c")
    assert generated is not None and generated["data"] == {"c.txt": "hello"}
    assert all(o["metadata"]["namespace"] == "x" for o in build.objects)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("sum by (namespace, le) (rate(vllm:x_bucket[5m]))", {"vllm:x_bucket"}),
        ('a:extproc_b:rate1m{namespace="$namespace", kind="x:y:z"}', {"a:extproc_b:rate1m"}),
        ("max(extproc_a) / sum(extproc_b_total) > 0.5", {"extproc_a", "extproc_b_total"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql.metric_names(expr) == names
