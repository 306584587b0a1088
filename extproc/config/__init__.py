"""The picker's configuration: typed, frozen, read once from YAML and flags.

The schema is frozen dataclasses, one module per group of sections (`server`, `discovery`,
`scheduling`, `tenancy`, joined in `schema`), built from the `key` helper in `base`;
`loading.load_config` walks them, so a wrong key or value is reported with its dotted path
("routing.fallbacks: expected an integer >= 0, got 'two'"), and `reference` generates the
configuration reference in `docs/` from the same classes. Everything the rest of extproc uses is
importable from here.
"""

from extproc.config.base import (
    BodyMode,
    ConfigError,
    DisaggregationMode,
    EndpointRole,
    FailureMode,
    HashAlgoName,
    IdentitySource,
    LimitsBackend,
    PrefixIndexMode,
    RedisFailureMode,
    StalePolicy,
)
from extproc.config.discovery import (
    CollectorConfig,
    DiscoveryConfig,
    EndpointConfig,
    KubernetesDiscoveryConfig,
    KvEventsConfig,
    host_port,
)
from extproc.config.loading import build, file_fingerprint, load_config
from extproc.config.reference import reference_markdown
from extproc.config.scheduling import (
    DisaggregationConfig,
    FleetConfig,
    PrefixConfig,
    SchedulingConfig,
)
from extproc.config.schema import Config
from extproc.config.server import RoutingConfig, ServerConfig
from extproc.config.tenancy import (
    MIN_SALT_KEY_CHARS,
    TenancyConfig,
    TenantConfig,
    is_key_digest,
)

__all__ = [
    "MIN_SALT_KEY_CHARS",
    "BodyMode",
    "CollectorConfig",
    "Config",
    "ConfigError",
    "DisaggregationConfig",
    "DisaggregationMode",
    "DiscoveryConfig",
    "EndpointConfig",
    "EndpointRole",
    "FailureMode",
    "FleetConfig",
    "HashAlgoName",
    "IdentitySource",
    "KubernetesDiscoveryConfig",
    "KvEventsConfig",
    "LimitsBackend",
    "PrefixConfig",
    "PrefixIndexMode",
    "RedisFailureMode",
    "RoutingConfig",
    "SchedulingConfig",
    "ServerConfig",
    "StalePolicy",
    "TenancyConfig",
    "TenantConfig",
    "build",
    "file_fingerprint",
    "host_port",
    "is_key_digest",
    "load_config",
    "reference_markdown",
]
