"""Schema validation of Kubernetes objects, for every kind our manifests may contain.

- Built-in kinds: `kubernetes_validate`'s strict schemas (unknown fields are errors), for each
  Kubernetes version in `KUBERNETES_VERSIONS`.
- Our own CRDs' kinds: the `openAPIV3Schema` of the CustomResourceDefinitions under
  `manifests/crds/`, closed (`additionalProperties: false` wherever properties are listed and
  unknown fields are not preserved), the way the API server's strict field validation treats them.
- Gateway API and Prometheus Operator kinds: the upstream CRDs' schemas, as the npm packages
  pinned in `upstream/package.json` ship them (`@kubernetes-models/*` releases generated from
  the projects' released CRDs; `make setup` installs them with `npm ci`). Each kind's module
  holds its schema as a JSON literal (`const schema = {...};`), read here without running any
  JavaScript. Their `$ref`s to Kubernetes' own types (ObjectMeta) go to kubernetes_validate's
  definitions, those to another schema of the same package into the kind schema's `$defs`.
  Closed like our own CRDs' (what `allOf`/`anyOf`/`oneOf`/`not` hold stays open: it adds no
  fields). `nullable`, which the generator puts on every optional field, is not a JSON Schema
  keyword and is ignored: a null value is an error. Packages that are missing, or not the
  pinned versions, are an error, never a skip.
- Third-party kinds no registry ships a schema for (InferencePool, Envoy Gateway's policies,
  LeaderWorkerSet): the small schemas in `schemas/`, written for these tests. They list only the
  fields our manifests use, closed, so a misspelling fails. A kind both there and upstream is
  an error: the upstream schema is the one to use.

Any other kind is an error: a manifest whose kind nothing here knows is not validated at all.
Pod templates and label selectors inside CRD kinds are checked against Kubernetes' own
definitions through `$ref`s into kubernetes_validate's definitions file.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import referencing.jsonschema

SCHEMAS = Path(__file__).parent / "schemas"
# The npm project whose packages ship the upstream schemas; `make setup` runs `npm ci` there.
UPSTREAM = Path(__file__).parent / "upstream"
UPSTREAM_PACKAGES = ("@kubernetes-models/gateway-api", "@kubernetes-models/prometheus-operator")
# The oldest release the manifests support (the preStop `sleep` action is on by default from
# 1.30) and the newest kubernetes_validate ships.
KUBERNETES_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
_K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
_OBJECT_META = {
    "$ref": f"{_K8S_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
}
# How @kubernetes-models' generated modules hold a schema and its id (from `crd-generate`).
_SCHEMA_LITERAL = re.compile(r"^const schema = (\{.*?^\});$", re.MULTILINE | re.DOTALL)
_SCHEMA_ID = re.compile(r'^const schemaId = "([^"]+)";$', re.MULTILINE)
# Logical junctors: in Kubernetes' structural schemas what they hold only validates values; the
# fields are the ones the enclosing schema lists.
_JUNCTORS = frozenset({"allOf", "anyOf", "oneOf", "not"})
_ROOT = Path(__file__).resolve().parents[2]


class UpstreamSchemaError(RuntimeError):
    """The upstream schemas cannot be loaded: the message says why and what to run."""


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
    """Close every object schema that lists properties, as strict field validation does.

    What logical junctors hold is left open: it adds no fields, and closing it would reject
    fields the enclosing schema lists."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {
        key: value if key in _JUNCTORS else _strict(value)
        for key, value in schema.items()
        if key != "properties"
    }
    if "properties" in schema:
        closed["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in closed and not closed.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            closed["additionalProperties"] = False
    return closed


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
            properties["metadata"] = dict(_OBJECT_META)
            schema["additionalProperties"] = False
            schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind"})
            out[_kind_key(api_version, kind)] = schema
    return out


@functools.cache
def hand_written_schemas() -> dict[str, dict[str, Any]]:
    """The schemas in `schemas/`, by kind key."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        out[_kind_key(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return out


def _installed_package(package: str) -> Path:
    """The folder of `package` under upstream/node_modules, which must hold the pinned version."""
    pinned = json.loads((UPSTREAM / "package.json").read_text())["dependencies"][package]
    folder = UPSTREAM / "node_modules" / package
    manifest = folder / "package.json"
    version = json.loads(manifest.read_text())["version"] if manifest.is_file() else None
    if version != pinned:
        state = "is not installed" if version is None else f"is {version}, not the pinned {pinned}"
        upstream = UPSTREAM.relative_to(_ROOT)
        raise UpstreamSchemaError(
            f"{package} {state} in {upstream}/node_modules, so the upstream schemas of the "
            f"Gateway API and Prometheus Operator kinds cannot be loaded: run `make setup` "
            f"(which runs `npm ci --prefix {upstream}`), or that npm command itself"
        )
    return folder


def package_schemas(folder: Path) -> dict[str, dict[str, Any]]:
    """Every schema the modules of the npm package in `folder` hold, by schema id."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*.js")):
        if "node_modules" in path.relative_to(folder).parts:
            continue
        text = path.read_text()
        literal, schema_id = _SCHEMA_LITERAL.search(text), _SCHEMA_ID.search(text)
        if literal and schema_id:
            out[schema_id[1]] = json.loads(literal[1])
    return out


def _resolve(schema: Any, package: Mapping[str, Any], defs: dict[str, Any], where: str) -> Any:
    """`schema` with its `$ref`s (`"<schema id>#"`) pointing where this module finds them:
    Kubernetes' types in kubernetes_validate's definitions, the package's own schemas in
    `defs` (the `$defs` of the kind's schema)."""
    if isinstance(schema, list):
        return [_resolve(item, package, defs, where) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _resolve(v, package, defs, where) for k, v in schema.items() if k != "$ref"}
    if "$ref" not in schema:
        return out
    target, _, pointer = str(schema["$ref"]).partition("#")
    if target.startswith("io.k8s.") and all(
        target in _k8s_definitions(version)["$defs"] for version in KUBERNETES_VERSIONS
    ):
        out["$ref"] = f"{_K8S_DEFINITIONS}#/$defs/{target}{pointer}"
    elif target in package:
        if target not in defs:
            defs[target] = {}  # taken, for a schema that refers to itself
            defs[target] = _strict(_resolve(package[target], package, defs, where))
        out["$ref"] = f"#/$defs/{target}{pointer}"
    else:
        raise UpstreamSchemaError(f"{where}: $ref {schema['$ref']!r} resolves to no schema")
    return out


def kind_schemas(package: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The closed schema of every kind among a package's schemas (by schema id), by kind key."""
    out: dict[str, dict[str, Any]] = {}
    for schema_id, raw in package.items():
        props = raw.get("properties", {})
        api_versions = props.get("apiVersion", {}).get("enum", ())
        kinds = props.get("kind", {}).get("enum", ())
        if len(api_versions) != 1 or len(kinds) != 1:
            continue  # a schema other schemas refer to, not a kind's
        defs: dict[str, Any] = {}
        schema = _strict(_resolve(raw, package, defs, f"{where}: {schema_id}"))
        # The API server validates metadata itself, as ObjectMeta (the package also allows null).
        schema["properties"]["metadata"] = dict(_OBJECT_META)
        schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind"})
        if defs:
            schema["$defs"] = defs
        out[_kind_key(api_versions[0], kinds[0])] = schema
    return out


@functools.cache
def upstream_schemas() -> dict[str, dict[str, Any]]:
    """The upstream schemas of every kind the packages in `UPSTREAM_PACKAGES` cover, by kind key."""
    out: dict[str, dict[str, Any]] = {}
    for name in UPSTREAM_PACKAGES:
        kinds = kind_schemas(package_schemas(_installed_package(name)), name)
        if not kinds:
            raise UpstreamSchemaError(
                f"{name}: no module holds a kind's schema as a JSON literal (the releases "
                f"generated from Go types ship compiled validators only): pin one built from CRDs"
            )
        if kinds.keys() & out.keys():
            raise UpstreamSchemaError(f"{name}: {sorted(kinds.keys() & out.keys())} twice")
        out.update(kinds)
    return out


@functools.cache
def third_party_schemas() -> dict[str, dict[str, Any]]:
    """Upstream and hand-written schemas of third-party kinds, by kind key."""
    upstream, written = upstream_schemas(), hand_written_schemas()
    both = sorted(upstream.keys() & written.keys())
    if both:
        raise UpstreamSchemaError(
            f"{both}: hand-written in {SCHEMAS.relative_to(_ROOT)} although an upstream schema "
            f"exists: delete those files"
        )
    return {**upstream, **written}


@functools.cache
def _k8s_definitions(version: str) -> dict[str, Any]:
    """kubernetes_validate's definitions file (strict) of Kubernetes `version`."""
    folder = f"v{version}.0-local-strict"
    files = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / folder
    definitions: dict[str, Any] = json.loads((files / "_definitions.json").read_text())
    return definitions


@functools.cache
def _k8s_registry(version: str) -> referencing.Registry[Any]:
    """Kubernetes' definitions (strict) of `version`, for `$ref`s from CRD-kind schemas."""
    resource = referencing.jsonschema.DRAFT202012.create_resource(_k8s_definitions(version))
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
