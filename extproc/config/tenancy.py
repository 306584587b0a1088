"""Tenants: identity, limits, fair sharing and KV-cache isolation. The one section reloaded
when the config file changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from extproc.config.base import (
    ConfigError,
    IdentitySource,
    LimitsBackend,
    RedisFailureMode,
    key,
)


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """One tenant: how it is recognised and what it may do. A limit of 0 is no limit."""

    api_keys: tuple[str, ...] = key(
        (),
        'SHA-256 hex digests of its API keys (`printf %s "$KEY" | sha256sum`), never the '
        "keys themselves.",
    )
    models: tuple[str, ...] = key((), "Models (bases or adapters) it may use; empty: all.")
    requests_per_minute: int = key(0, "Requests per minute.", minimum=0)
    tokens_per_minute: int = key(
        0,
        "Tokens per minute: prompt tokens counted at the pick, completion tokens from the "
        "response's usage.",
        minimum=0,
    )
    max_concurrency: int = key(0, "Requests in flight at once.", minimum=0)
    priority: int = key(
        0, "Higher is served first from the fair queue; negative: shed when saturated."
    )
    weight: float = key(
        1.0, "Share of the pool under saturation, relative to others.", minimum=0.01
    )
    cache_isolation: bool = key(
        False,
        "Give its requests a `cache_salt` derived from the tenant, so its KV blocks are never "
        "shared with another tenant's.",
    )

    def __post_init__(self) -> None:
        for i, digest in enumerate(self.api_keys):
            if not is_key_digest(digest):
                raise ConfigError(
                    f"api_keys[{i}]",
                    "expected a SHA-256 hex digest (64 lower-case hex characters); store "
                    "digests of keys, never the keys",
                )


# Shortest `cache_salt_key` taken: a guessable key makes the salt computable again.
MIN_SALT_KEY_CHARS = 16


@dataclass(frozen=True, slots=True)
class TenancyConfig:
    """Tenants, their limits, fair sharing and KV-cache isolation (docs/tenancy.md). This
    section is reloaded when the config file changes."""

    enabled: bool = key(False, "Identify a tenant for every request and apply its policy.")
    identity: tuple[IdentitySource, ...] = key(
        ("api-key", "default"),
        "Where the tenant comes from, first match wins: `api-key` (Authorization: Bearer), "
        "`header` (opt-in: the `header` below, trusted as is, so it must be set by an "
        "authenticator in front, e.g. Envoy's JWT filter, and removed from clients' requests; "
        "the bundled Envoy configs remove `x-tenant-id`), `default`.",
    )
    header: str = key(
        "x-tenant-id", "Header naming the tenant, for the `header` source (when listed)."
    )
    default_tenant: str = key(
        "", "Tenant of requests that name none; empty: such requests are refused with 401."
    )
    tenants: Mapping[str, TenantConfig] = key(MappingProxyType({}), "Tenant name -> policy.")
    api_keys_file: str = key(
        "",
        "YAML file of tenant name -> list of API key SHA-256 digests, e.g. a mounted Kubernetes "
        "Secret; added to `tenants[].api_keys` and reloaded when it changes.",
    )
    limits_backend: LimitsBackend = key(
        "memory",
        "`memory` (this replica's own counts) or `redis` (one limit shared by every replica).",
    )
    redis_url: str = key("redis://127.0.0.1:6379/0", "Redis for `limits_backend: redis`.")
    redis_timeout_seconds: float = key(
        0.05, "Timeout of one Redis call; the picker waits on it per request.", minimum=0.001
    )
    redis_failure_mode: RedisFailureMode = key(
        "open",
        "When Redis cannot be reached: `open` (enforce this replica's own limits) or `closed` "
        "(refuse with 503).",
    )
    redis_retry_seconds: float = key(
        1.0,
        "After a Redis failure, how long to use the failure mode before trying again.",
        minimum=0.01,
    )
    lease_seconds: float = key(
        30.0,
        "A concurrency slot held in Redis expires this long after its replica last renewed it "
        "(each replica renews its slots every third of this), so a replica that dies frees "
        "its slots within this time.",
        minimum=1,
    )
    fair_sharing: bool = key(
        True,
        "While every endpoint is saturated, hold requests in per-tenant queues served by "
        "weighted fair queuing on tokens (priority first).",
    )
    queue_timeout_seconds: float = key(
        30.0, "A request held longer than this is refused with 429.", minimum=0.001
    )
    max_queued_per_tenant: int = key(
        1000, "Requests one tenant may have waiting; more are refused with 429.", minimum=1
    )
    headroom_requests: int = key(
        0,
        "Request slots per endpoint kept free for tenants under their weighted share of the "
        "pool: a tenant at or over its share finds the pool saturated this many requests "
        "early (needs `scheduling.saturation_requests`). Trades a flood's throughput for the "
        "other tenants' latency; 0 keeps no headroom.",
        minimum=0,
    )
    cache_salt_key: str = key(
        "",
        "Secret mixed into the derived `cache_salt` (a keyed hash of the tenant and any salt "
        "the client sent); the same on every replica so the salt, and the cache, are stable. "
        f"Required (at least {MIN_SALT_KEY_CHARS} characters) when a tenant has "
        "`cache_isolation`: without it the salt is a hash anyone can compute, and another "
        "tenant sending it would share the isolated tenant's KV cache.",
    )

    def __post_init__(self) -> None:
        if self.default_tenant and self.default_tenant not in self.tenants:
            raise ConfigError("default_tenant", f"no tenant named {self.default_tenant!r}")
        isolated = sorted(name for name, t in self.tenants.items() if t.cache_isolation)
        if isolated and len(self.cache_salt_key) < MIN_SALT_KEY_CHARS:
            raise ConfigError(
                "cache_salt_key",
                f"tenants {isolated} have cache_isolation, which needs a secret key of at least "
                f"{MIN_SALT_KEY_CHARS} characters (the same on every replica)",
            )
        owners: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for digest in tenant.api_keys:
                if owners.setdefault(digest, name) != name:
                    raise ConfigError(
                        f"tenants.{name}.api_keys",
                        f"a key digest is also a key of tenant {owners[digest]!r}",
                    )


def is_key_digest(value: str) -> bool:
    """A SHA-256 hex digest, as API keys are stored."""
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
