"""The upstream schemas (Gateway API, Prometheus Operator) as `schemas.py` loads them from the npm
packages in `upstream/`: closed, so misspelled fields and wrong types fail and correct objects
pass; used for every kind of theirs in our manifests; refused when not installed."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.manifests import kustomize, schemas, wiring
from tests.manifests.schemas import KUBERNETES_VERSIONS, UpstreamSchemaError, Validator

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
# API groups whose kinds the upstream packages cover.
UPSTREAM_GROUPS = ("gateway.networking.k8s.io", "monitoring.coreos.com")


def _object(directory: str, kind: str, name: str) -> dict[str, Any]:
    obj = kustomize.build(MANIFESTS / directory).find(kind, name)
    assert obj is not None, f"{kind}/{name}"
    return copy.deepcopy(obj)


def _messages(obj: dict[str, Any]) -> str:
    return "\n".join(str(p) for p in Validator().validate(obj))


def _route() -> dict[str, Any]:
    return _object("overlays/envoy-gateway", "HTTPRoute", "llama-3-8b")


def _rule() -> dict[str, Any]:
    return _object("observability", "PrometheusRule", "extproc")


def test_correct_objects_pass() -> None:
    for obj in (
        _route(),
        _object("overlays/gateway-api", "HTTPRoute", "llama-3-8b"),
        _object("overlays/envoy-gateway", "GatewayClass", "eg"),
        _rule(),
    ):
        assert Validator().validate(obj) == []


def test_httproute_misspelled_field_fails() -> None:
    route = _route()
    route["spec"]["rules"][0]["timeouts"]["requst"] = "10s"
    assert "'requst' was unexpected" in _messages(route)


def test_httproute_wrong_type_fails() -> None:
    route = _route()
    route["spec"]["rules"][0]["backendRefs"][0]["port"] = "8000"
    assert "spec.rules.0.backendRefs.0.port: '8000' is not of type 'integer'" in _messages(route)


def test_httproute_wrong_enum_fails() -> None:
    route = _route()
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"
    assert "'Prefix' is not one of" in _messages(route)


def test_prometheusrule_misspelled_field_fails() -> None:
    rule = _rule()
    rule["spec"]["groups"][0]["rules"][0]["recrd"] = "x"
    assert "'recrd' was unexpected" in _messages(rule)


def test_prometheusrule_wrong_type_fails() -> None:
    rule = _rule()
    rule["spec"]["groups"][0]["rules"][0]["labels"] = {"severity": 2}
    assert "spec.groups.0.rules.0.labels.severity: 2 is not of type 'string'" in _messages(rule)


def test_metadata_is_checked_as_object_meta() -> None:
    rule = _rule()
    rule["metadata"]["lables"] = {}
    assert "'lables' was unexpected" in _messages(rule)


def test_fields_under_a_junctor_are_not_closed() -> None:
    """The Gateway's `addresses` items carry a oneOf that lists only `type`: closing it would
    reject every `value` of a non-IPAddress address."""
    gateway = _object("overlays/envoy-gateway", "Gateway", "inference-gateway")
    gateway["spec"]["addresses"] = [{"type": "Hostname", "value": "llm.example.com"}]
    assert Validator().validate(gateway) == []
    gateway["spec"]["addresses"][0]["vaule"] = "x"
    assert "'vaule' was unexpected" in _messages(gateway)


def _manifest_kinds() -> set[tuple[str, str]]:
    return {
        (str(obj["apiVersion"]), str(obj["kind"]))
        for directory in kustomize.kustomization_dirs(MANIFESTS)
        for obj in kustomize.build(directory).objects
    }


def test_every_kind_in_the_manifests_has_a_schema() -> None:
    crds = [
        d
        for path in sorted((MANIFESTS / "crds").glob("*.yaml"))
        for d in kustomize.load_documents(path)
        if d["kind"] == "CustomResourceDefinition"
    ]
    validator = Validator(crds)
    upstream = schemas.upstream_schemas()
    for api_version, kind in sorted(_manifest_kinds()):
        key = f"{kind}/{api_version}"
        if api_version.split("/")[0] in UPSTREAM_GROUPS:
            assert key in upstream, f"{key}: not validated by the upstream schemas"
        elif not validator.known(api_version, kind):
            for version in KUBERNETES_VERSIONS:  # a built-in kind
                obj = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}}
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    pytest.fail(f"{key}: no schema for Kubernetes {version}")
                except kubernetes_validate.ValidationError:
                    pass  # known, and this stub is incomplete


def test_the_manifests_use_every_upstream_kind_we_expect() -> None:
    """So the tests above cover what ships: a kind leaving the manifests is noticed here."""
    used = {
        f"{kind}/{api}" for api, kind in _manifest_kinds() if api.split("/")[0] in UPSTREAM_GROUPS
    }
    assert used == {
        "Gateway/gateway.networking.k8s.io/v1",
        "GatewayClass/gateway.networking.k8s.io/v1",
        "HTTPRoute/gateway.networking.k8s.io/v1",
        "PodMonitor/monitoring.coreos.com/v1",
        "PrometheusRule/monitoring.coreos.com/v1",
        "ServiceMonitor/monitoring.coreos.com/v1",
    }


def test_hand_written_schemas_do_not_shadow_upstream_ones() -> None:
    assert not schemas.hand_written_schemas().keys() & schemas.upstream_schemas().keys()


# --- loading ------------------------------------------------------------------------------------


def _upstream_copy(tmp_path: Path) -> Path:
    """upstream/ with its package.json only: nothing installed."""
    folder = tmp_path / "upstream"
    folder.mkdir()
    shutil.copy(schemas.UPSTREAM / "package.json", folder / "package.json")
    return folder


def test_missing_packages_say_to_run_make_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schemas, "UPSTREAM", _upstream_copy(tmp_path))
    monkeypatch.setattr(schemas, "_ROOT", tmp_path)
    with pytest.raises(UpstreamSchemaError, match=r"is not installed .* run `make setup`"):
        schemas._installed_package(schemas.UPSTREAM_PACKAGES[0])


def test_a_version_other_than_the_pinned_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _upstream_copy(tmp_path)
    name = schemas.UPSTREAM_PACKAGES[0]
    installed = folder / "node_modules" / name
    installed.mkdir(parents=True)
    (installed / "package.json").write_text(json.dumps({"name": name, "version": "0.0.1"}))
    monkeypatch.setattr(schemas, "UPSTREAM", folder)
    monkeypatch.setattr(schemas, "_ROOT", tmp_path)
    with pytest.raises(UpstreamSchemaError, match=r"is 0\.0\.1, not the pinned"):
        schemas._installed_package(name)


_MODULE = """"use strict";
const schemaId = "{id}";
const schema = {body};
class X {{}}
"""


def test_refs_resolve_to_kubernetes_and_to_the_same_package(tmp_path: Path) -> None:
    kind = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string", "enum": ["example.com/v1"]},
            "kind": {"type": "string", "enum": ["Widget"]},
            "metadata": {"$ref": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta#"},
            "spec": {
                "type": "object",
                "properties": {
                    "part": {"$ref": "com.example.v1.Part#"},
                    "selector": {"$ref": "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector#"},
                },
            },
        },
        "required": ["apiVersion", "kind"],
    }
    part = {"type": "object", "properties": {"size": {"type": "integer"}}}
    folder = tmp_path / "package"
    (folder / "example.com" / "v1").mkdir(parents=True)
    (folder / "_schemas").mkdir()
    for path, schema_id, body in (
        (folder / "example.com/v1/Widget.js", "example.com.v1.Widget", kind),
        (folder / "_schemas/ComExampleV1Part.js", "com.example.v1.Part", part),
    ):
        path.write_text(_MODULE.format(id=schema_id, body=json.dumps(body, indent=4)))
    (folder / "index.js").write_text("module.exports = {};\n")

    found = schemas.kind_schemas(schemas.package_schemas(folder), "example")
    assert list(found) == ["Widget/example.com/v1"]
    validator = Validator()
    validator._custom = found  # the fake kind only
    good: dict[str, Any] = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"part": {"size": 1}, "selector": {"matchLabels": {"a": "b"}}},
    }
    assert validator.validate(good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["part"]["sise"] = 1
    bad["spec"]["selector"]["matchLabel"] = {}
    messages = "\n".join(str(p) for p in validator.validate(bad))
    assert "spec.part: Additional properties are not allowed ('sise'" in messages
    assert "spec.selector: Additional properties are not allowed ('matchLabel'" in messages


def test_a_ref_to_nothing_is_an_error() -> None:
    package = {
        "example.com.v1.Widget": {
            "properties": {
                "apiVersion": {"enum": ["example.com/v1"]},
                "kind": {"enum": ["Widget"]},
                "spec": {"$ref": "com.example.v1.Missing#"},
            }
        }
    }
    with pytest.raises(UpstreamSchemaError, match=re.escape("'com.example.v1.Missing#' resolves")):
        schemas.kind_schemas(package, "example")


def test_gateway_with_a_class_the_overlay_lacks_is_found() -> None:
    build = kustomize.build(MANIFESTS / "overlays/envoy-gateway")
    assert not [p for p in wiring.check(build) if "GatewayClass" in p]
    gateway = build.find("Gateway", "inference-gateway")
    assert gateway is not None
    gateway["spec"]["gatewayClassName"] = "envoy"
    assert any("no GatewayClass 'envoy'" in p for p in wiring.check(build))
