"""What every section of the configuration is made of: the `ConfigError` naming a key's dotted
path, the `key` helper declaring a key (default, reference sentence, lower bound), and the
value sets (Literal types) the loader checks against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field
from types import MappingProxyType
from typing import Any, Literal

BodyMode = Literal["streamed", "buffered"]
FailureMode = Literal["FailClose", "FailOpen"]
StalePolicy = Literal["saturated", "drop"]
HashAlgoName = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
PrefixIndexMode = Literal["auto", "precise", "approximate"]
IdentitySource = Literal["api-key", "header", "default"]
LimitsBackend = Literal["memory", "redis"]
RedisFailureMode = Literal["open", "closed"]
EndpointRole = Literal["prefill", "decode", "both"]
DisaggregationMode = Literal["off", "p2p", "centralized"]


class ConfigError(ValueError):
    """A configuration problem, naming the key (dotted path) and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


def key(default: Any, doc: str, *, minimum: float | None = None) -> Any:
    """A config key: its default, the sentence the reference prints, and a lower bound."""
    metadata = {"doc": doc, "min": minimum}
    if isinstance(default, Mapping):
        # Mappings are unhashable, so dataclasses want a factory; every instance gets its own.
        frozen = dict(default)
        return field(default_factory=lambda: MappingProxyType(frozen), metadata=metadata)
    return field(default=default, metadata=metadata)
