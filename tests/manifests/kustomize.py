"""A small kustomize for the tests: builds a kustomization the way `kubectl kustomize` does, for
the features our manifests use, and records every file it read.

Why not only the real binary: CI machines need not have kustomize or kubectl, and the orphan
check needs to know which files a build reads, which kustomize does not report. When kubectl is
installed, `test_manifests.py` checks that this build and `kubectl kustomize` agree.

Supported, with kustomize's meaning: `resources` (files and directories, recursively),
`namespace`, `labels` (metadata only: `includeSelectors`/`includeTemplates` must be false),
`configMapGenerator` (`files`, `literals`, `behavior` create / replace / merge, `options.labels`
and `options.disableNameSuffixHash`). Generated names keep no hash suffix here. Any other key
is refused, so a kustomization this module cannot build is an error rather than a wrong build.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
_KNOWN_KEYS = frozenset(
    {"apiVersion", "kind", "resources", "namespace", "labels", "configMapGenerator"}
)
_GENERATOR_KEYS = frozenset({"name", "files", "literals", "behavior", "options"})
_GENERATOR_OPTIONS = frozenset({"labels", "disableNameSuffixHash"})

# Kinds kustomize knows to be cluster-scoped among those we ship or may ship: its namespace
# transformer leaves them alone. It knows only built-in kinds' scopes, so it sets the namespace
# on cluster-scoped custom resources too (our GatewayClass); the API server drops it.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "StorageClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "PersistentVolume",
        "APIService",
    }
)


class KustomizeError(ValueError):
    """The kustomization cannot be built; the message names the file and the problem."""


@dataclass
class Build:
    """The objects of one build, in kustomize's order, and every file it read."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    files: set[Path] = field(default_factory=set)

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        for obj in self.objects:
            if obj.get("kind") == kind and obj.get("metadata", {}).get("name") == name:
                return obj
        return None

    def of_kind(self, *kinds: str) -> Iterator[dict[str, Any]]:
        return (obj for obj in self.objects if obj.get("kind") in kinds)


def object_id(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): what kustomize and the API server key objects by."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return group, str(obj.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file, empty ones dropped; each must be a mapping."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{path}: not valid YAML: {exc}") from exc
    for document in documents:
        if not isinstance(document, dict):
            raise KustomizeError(f"{path}: every document must be a mapping")
    return documents


def build(directory: Path, *, into: Build | None = None) -> Build:
    """Build the kustomization in `directory`. With `into`, objects and files go there, so the
    files read before an error are still known to the caller."""
    result = into if into is not None else Build()
    _build(directory.resolve(), result, stack=())
    return result


def _build(directory: Path, result: Build, *, stack: tuple[Path, ...]) -> None:
    if directory in stack:
        raise KustomizeError(f"{directory}: kustomizations include each other")
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise KustomizeError(f"{directory}: no {KUSTOMIZATION} (referenced, but missing)")
    result.files.add(path)
    (spec,) = load_documents(path) or [{}]
    unknown = sorted(set(spec) - _KNOWN_KEYS)
    if unknown:
        raise KustomizeError(f"{path}: {unknown[0]!r} is not supported by the test resolver")

    # Each kustomization transforms only what it builds: its own resources and generators.
    own = Build(files=result.files)
    for entry in spec.get("resources") or ():
        target = (directory / str(entry)).resolve()
        if target.is_dir():
            _build(target, own, stack=(*stack, directory))
        elif target.is_file():
            own.files.add(target)
            own.objects.extend(load_documents(target))
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist")
    for generator in spec.get("configMapGenerator") or ():
        _generate_config_map(path, generator, own)
    if "namespace" in spec:
        _set_namespace(own.objects, str(spec["namespace"]))
    for label_set in spec.get("labels") or ():
        _add_labels(path, label_set, own.objects)
    _check_unique(path, own.objects)
    result.objects.extend(own.objects)


def _generate_config_map(path: Path, generator: Mapping[str, Any], own: Build) -> None:
    unknown = sorted(set(generator) - _GENERATOR_KEYS)
    options = generator.get("options") or {}
    unknown += sorted(set(options) - _GENERATOR_OPTIONS)
    if unknown:
        raise KustomizeError(f"{path}: configMapGenerator {unknown[0]!r} is not supported")
    data: dict[str, str] = {}
    for name in generator.get("files") or ():
        source = (path.parent / str(name)).resolve()
        if path.parent not in source.parents:
            # kustomize's default load restrictor: only files under the kustomization's folder.
            raise KustomizeError(f"{path}: {name!r} is outside the kustomization's folder")
        if not source.is_file():
            raise KustomizeError(f"{path}: configMapGenerator file {name!r} does not exist")
        own.files.add(source)
        data[source.name] = source.read_text()
    for literal in generator.get("literals") or ():
        key, sep, value = str(literal).partition("=")
        if not sep:
            raise KustomizeError(f"{path}: literal {literal!r} is not key=value")
        data[key] = value
    name = str(generator["name"])
    behavior = generator.get("behavior", "create")
    existing = next(
        (o for o in own.objects if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == name),
        None,
    )
    if behavior == "create":
        if existing is not None:
            raise KustomizeError(f"{path}: ConfigMap {name!r} is generated twice")
        config_map: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name},
            "data": data,
        }
        if options.get("labels"):
            config_map["metadata"]["labels"] = dict(options["labels"])
        own.objects.append(config_map)
    elif behavior in ("replace", "merge"):
        if existing is None:
            raise KustomizeError(f"{path}: no ConfigMap {name!r} to {behavior}")
        existing["data"] = data if behavior == "replace" else {**existing.get("data", {}), **data}
    else:
        raise KustomizeError(f"{path}: unknown behavior {behavior!r}")


def _set_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    accounts = {o["metadata"]["name"] for o in objects if o.get("kind") == "ServiceAccount"}
    for obj in objects:
        if obj.get("kind") not in CLUSTER_SCOPED:
            obj.setdefault("metadata", {})["namespace"] = namespace
        if obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            # kustomize moves the subjects that are this build's own service accounts along.
            for subject in obj.get("subjects") or ():
                if subject.get("kind") == "ServiceAccount" and subject.get("name") in accounts:
                    subject["namespace"] = namespace


def _add_labels(path: Path, label_set: Mapping[str, Any], objects: list[dict[str, Any]]) -> None:
    if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
        raise KustomizeError(f"{path}: labels into selectors or templates are not supported")
    unknown = sorted(set(label_set) - {"pairs", "includeSelectors", "includeTemplates"})
    if unknown:
        raise KustomizeError(f"{path}: labels {unknown[0]!r} is not supported")
    for obj in objects:
        labels = obj.setdefault("metadata", {}).setdefault("labels", {})
        labels.update(copy.deepcopy(label_set.get("pairs") or {}))


def _check_unique(path: Path, objects: list[dict[str, Any]]) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        key = object_id(obj)
        if key in seen:
            raise KustomizeError(f"{path}: {key[1]} {key[3]!r} appears twice")
        seen.add(key)


def kustomization_dirs(root: Path) -> list[Path]:
    """Every folder under `root` that holds a kustomization, sorted."""
    return sorted(p.parent for p in root.rglob(KUSTOMIZATION))
