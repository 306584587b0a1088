"""What a watch delivers: a whole list of one resource, or one change to it (pure records).

Written by the reflectors (`extproc.state.discovery.reflector`, the I/O), read by the pure code
that keeps the latest objects (`extproc.state.discovery.inference_pools`, `.objectives`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast


@dataclass(frozen=True, slots=True)
class Listed:
    """A complete list of one resource: it replaces everything known about that resource."""

    resource: str
    objects: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Changed:
    resource: str
    kind: str  # ADDED, MODIFIED, DELETED
    object: Mapping[str, Any]


Update = Listed | Changed


def as_mapping(value: Any) -> Mapping[str, Any]:
    """`value` if the API object holds a map there, else an empty one (raw JSON, unchecked)."""
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else {}
