"""Reading the configuration: YAML and dotted-key overrides, walked against the schema so a
wrong key or value is reported with its dotted path, and a file's fingerprint to see it change.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import hashlib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from extproc.config.base import ConfigError
from extproc.config.schema import Config


def file_fingerprint(path: str | Path) -> tuple[str, str]:
    """A hash of a file's content (to see it change), or a marker and the reason it cannot be
    read. Content, not mtime: a Kubernetes ConfigMap or Secret volume swaps a symlink, and a
    rewrite within the mtime's granularity would go unseen."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        return f"unreadable:{exc.strerror}", f"cannot read {path}: {exc.strerror}"
    return hashlib.sha256(content).hexdigest(), ""


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read YAML at `path` (if any), apply dotted-key `overrides`, validate, return a Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("", f"{path}: the top level must be a mapping")
        raw = loaded or {}
    for dotted, value in (overrides or {}).items():
        target = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    config: Config = build(Config, raw, "")
    return config


def build(cls: type[Any], data: Any, path: str) -> Any:
    """Build dataclass `cls` from plain YAML data, checking every key and value."""
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(map(str, unknown))[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
        raise ConfigError(_join(path, key), f"unknown key{hint}")
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _convert(
                hints[name], data[name], _join(path, name), spec.metadata.get("min")
            )
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(_join(path, exc.key), exc.problem) from exc
    except TypeError as exc:
        missing = [n for n, f in fields.items() if n not in values and _required(f)]
        if missing:
            raise ConfigError(_join(path, missing[0]), "required key is missing") from exc
        raise


def _convert(hint: Any, value: Any, path: str, bound: float | None = None) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(typing.cast(type[Any], hint), value, path)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                path, f"expected one of {', '.join(map(str, allowed))}, got {_show(value)}"
            )
        return value
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_show(value)}")
        value_hint = typing.get_args(hint)[1]
        converted = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, got {_show(key)}")
            converted[key] = (
                item if value_hint is Any else _convert(value_hint, item, f"{path}.{key}")
            )
        return MappingProxyType(converted)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if isinstance(value, str) and item_hint is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {_show(value)}")
        return tuple(_convert(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(args[0], value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_show(value)}")
        return value
    if hint in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if hint is int:
            ok = ok and float(value).is_integer()
        if not ok or (bound is not None and value < bound):
            kind = "an integer" if hint is int else "a number"
            at_least = f" >= {bound:g}" if bound is not None else ""
            raise ConfigError(path, f"expected {kind}{at_least}, got {_show(value)}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"expected a non-empty string, got {_show(value)}")
        return value
    raise ConfigError(path, f"unsupported type {hint}")  # pragma: no cover - schema bug


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _show(value: Any) -> str:
    return (
        f"{type(value).__name__} {value!r}"
        if not isinstance(value, Mapping | list)
        else type(value).__name__
    )
