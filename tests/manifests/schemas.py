"""Schema validation of Kubernetes objects, for every kind our manifests may contain.

- Built-in kinds: `kubernetes_validate`'s strict schemas (unknown fields are errors), for each
  Kubernetes version in `KUBERNETES_VERSIONS`.
- Our own CRDs' kinds: the `openAPIV3Schema` of the CustomResourceDefinitions under
  `manifests/crds/`, closed (`additionalProperties: false` wherever properties are listed and
  unknown fields are not preserved), the way the API server's strict field validation treats them.
- Third-party CRD kinds (Gateway API, InferencePool, Envoy Gateway, LeaderWorkerSet, Prometheus
  Operator): the small schemas in `schemas/`, written for these tests (no network here to fetch
  the real CRDs). They list only the fields our manifests use, closed, so a misspelling fails.

Any other kind is an error: a manifest whose kind nothing here knows is not validated at all.
Pod templates and label selectors inside CRD kinds are checked against Kubernetes' own
definitions through `$ref`s into kubernetes_validate's definitions file.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import referencing.jsonschema

SCHEMAS = Path(__file__).parent / "schemas"
# The oldest release the manifests support (the preStop `sleep` action is on by default from
# 1.30) and the newest kubernetes_validate ships.
KUBERNETES_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
_K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation error, located by object and field path."""

    where: str  # "Deployment/extproc-picker"
    path: str  # "spec.template.spec.containers.0.imagePullPolicy"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path or '(top)'}: {self.message}"


def _kind_key(api_version: str, kind: str) -> str:
    return f"{kind}/{api_version}"


def _strict(schema: Any) -> Any:
    """Close every object schema that lists properties, as strict field validation does."""
    if isinstance(schema, dict):
        closed = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in closed
            and "additionalProperties" not in closed
            and not closed.get("x-kubernetes-preserve-unknown-fields")
        ):
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def crd_schemas(crds: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Schemas by kind key from CustomResourceDefinition objects, one per served version."""
    out: dict[str, dict[str, Any]] = {}
    for crd in crds:
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        for version in spec["versions"]:
            raw = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            api_version = f"{spec['group']}/{version['name']}"
            schema = _strict(raw)
            properties = schema.setdefault("properties", {})
            properties["apiVersion"] = {"const": api_version}
            properties["kind"] = {"const": kind}
            # The API server validates metadata itself, as ObjectMeta, whatever the CRD says.
            properties["metadata"] = {
                "$ref": f"{_K8S_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
            }
            schema["additionalProperties"] = False
            schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind"})
            out[_kind_key(api_version, kind)] = schema
    return out


@functools.cache
def third_party_schemas() -> dict[str, dict[str, Any]]:
    """The schemas in `schemas/`, by kind key."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        out[_kind_key(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return out


@functools.cache
def _k8s_registry(version: str) -> referencing.Registry[Any]:
    """Kubernetes' definitions (strict) of `version`, for `$ref`s from CRD-kind schemas."""
    folder = f"v{version}.0-local-strict"
    files = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / folder
    definitions = json.loads((files / "_definitions.json").read_text())
    resource = referencing.jsonschema.DRAFT202012.create_resource(definitions)
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(
        _K8S_DEFINITIONS, resource
    )
    return registry


class Validator:
    """Validates objects against the schema of their kind (see the module docstring)."""

    def __init__(self, crds: Iterable[Mapping[str, Any]] = ()) -> None:
        self._custom = {**third_party_schemas(), **crd_schemas(crds)}

    def known(self, api_version: str, kind: str) -> bool:
        return _kind_key(api_version, kind) in self._custom

    def validate(self, obj: Mapping[str, Any]) -> list[Problem]:
        where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
        custom = self._custom.get(_kind_key(api_version, kind))
        found: dict[tuple[str, str], list[str]] = {}
        for version in KUBERNETES_VERSIONS:
            if custom is not None:
                validator = jsonschema.Draft202012Validator(custom, registry=_k8s_registry(version))
                for error in validator.iter_errors(obj):
                    key = (".".join(map(str, error.absolute_path)), error.message)
                    found.setdefault(key, []).append(version)
                continue
            try:
                kubernetes_validate.validate(dict(obj), version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                return [Problem(where, "", f"unknown kind {kind} ({api_version}): no schema")]
            except kubernetes_validate.ValidationError as exc:
                key = (".".join(map(str, exc.path)), str(exc.message))
                found.setdefault(key, []).append(version)
        return [
            Problem(where, path, f"{message} (Kubernetes {', '.join(versions)})")
            for (path, message), versions in found.items()
        ]
