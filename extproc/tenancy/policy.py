"""Tenants as the request path sees them: built from `tenancy` config, replaced whole on reload."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from extproc.config import ConfigError, TenancyConfig, TenantConfig, is_key_digest


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute rates and concurrency; 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrency: int = 0

    @property
    def any(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrency)


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    limits: Limits = field(default_factory=Limits)
    models: frozenset[str] = frozenset()  # empty: every model
    priority: int = 0
    weight: float = 1.0
    cache_isolation: bool = False

    def may_use(self, model: str | None) -> bool:
        """A tenant limited to some models may use only those: a request whose model is not
        known (None) is refused, since it could be any."""
        return not self.models or model in self.models

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


@dataclass(frozen=True, slots=True)
class Directory:
    """Every tenant by name and by API key digest; immutable, so a request reads one version."""

    tenants: Mapping[str, Tenant] = field(default_factory=lambda: MappingProxyType({}))
    by_key: Mapping[str, Tenant] = field(default_factory=lambda: MappingProxyType({}))
    default: Tenant | None = None


def directory_from(
    config: TenancyConfig, file_keys: Mapping[str, tuple[str, ...]] | None = None
) -> Directory:
    """Build the directory; `file_keys` (tenant -> digests, from `api_keys_file`) add keys.

    Raises ConfigError naming the key when the file names an unknown tenant or a bad digest."""
    tenants = {name: _tenant(name, t) for name, t in config.tenants.items()}
    by_key: dict[str, Tenant] = {}
    for name, tenant_config in config.tenants.items():
        for digest in tenant_config.api_keys:
            by_key[digest] = tenants[name]
    for name, digests in (file_keys or {}).items():
        if name not in tenants:
            raise ConfigError(f"api_keys_file.{name}", "no such tenant in tenancy.tenants")
        for i, digest in enumerate(digests):
            if not is_key_digest(digest):
                raise ConfigError(f"api_keys_file.{name}[{i}]", "expected a SHA-256 hex digest")
            owner = by_key.setdefault(digest, tenants[name])
            if owner.name != name:
                raise ConfigError(
                    f"api_keys_file.{name}[{i}]", f"also a key of tenant {owner.name!r}"
                )
    default = tenants.get(config.default_tenant) if config.default_tenant else None
    return Directory(MappingProxyType(tenants), MappingProxyType(by_key), default)


def key_digest(key: str) -> str:
    """How an API key is stored and looked up: its SHA-256. Keys are long random strings, so a
    fast hash is enough (a slow one protects guessable passwords, which keys are not)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _tenant(name: str, config: TenantConfig) -> Tenant:
    return Tenant(
        name=name,
        limits=Limits(config.requests_per_minute, config.tokens_per_minute, config.max_concurrency),
        models=frozenset(config.models),
        priority=config.priority,
        weight=config.weight,
        cache_isolation=config.cache_isolation,
    )
