"""The whole configuration: one field per section, the root that `load_config` builds and
`reference_markdown` walks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extproc.config.discovery import (
    CollectorConfig,
    DiscoveryConfig,
    EndpointConfig,
    KvEventsConfig,
)
from extproc.config.scheduling import (
    DisaggregationConfig,
    FleetConfig,
    PrefixConfig,
    SchedulingConfig,
)
from extproc.config.server import RoutingConfig, ServerConfig
from extproc.config.tenancy import TenancyConfig


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    kv_events: KvEventsConfig = field(default_factory=KvEventsConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    tenancy: TenancyConfig = field(default_factory=TenancyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    endpoints: tuple[EndpointConfig, ...] = field(
        default=(), metadata={"doc": "Static list of model servers (or `--endpoints`)."}
    )
