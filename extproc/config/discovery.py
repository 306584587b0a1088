"""Where endpoints come from and what is read from them: the static `endpoints` list, Kubernetes
`InferencePool` discovery, the metrics collector and vLLM's KV-cache events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extproc.config.base import ConfigError, EndpointRole, StalePolicy, key


def host_port(host: str, port: int | str) -> str:
    """`host:port` as Envoy writes and expects it: an IPv6 address in brackets (`[::1]:8000`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One model server."""

    address: str = field(metadata={"doc": "`ip:port` of the model server, as Envoy reaches it."})
    models: tuple[str, ...] = key(
        (), "Models it serves (base and adapters); learned from its `/v1/models` as well."
    )
    kv_events: str = key(
        "", "Its vLLM KV-cache event publisher (`tcp://ip:port`); empty: ask `/kv_event_sources`."
    )
    role: EndpointRole = key(
        "both",
        "`prefill`, `decode` or `both` (serves whole requests), for `disaggregation`; from the "
        "pod label `fleet.role_label` under Kubernetes.",
    )
    accelerator: str = key(
        "", "Its GPU type (`a100`, `h100`, ...): endpoints of one type share speed estimates."
    )
    cost_per_hour: float = key(
        0.0,
        "What its GPU costs per hour (any currency); 0: `fleet.prices` for its accelerator.",
        minimum=0,
    )

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("address", f"expected host:port, got {self.address!r}")


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Endpoints from `InferencePool`s (inference.networking.k8s.io/v1) and the Ready pods they
    select (docs/discovery.md)."""

    namespace: str = key(
        "",
        "Namespace of the pool (`--pool-namespace`); empty: the pod's own namespace in a "
        "cluster, else `default`.",
    )
    pool_name: str = key(
        "",
        "The InferencePool this picker serves (`--pool-name`), as the field's picker serves "
        "one; only that pool is watched. One of `pool_name`, `pools` or `all_pools` is needed.",
    )
    pools: tuple[str, ...] = key(
        (), "Several InferencePools by name, for one picker that serves them all."
    )
    all_pools: bool = key(
        False, "Serve every InferencePool of the namespace (`--all-pools`): an explicit choice."
    )
    kubeconfig: str = key("", "Kubeconfig file; empty: in-cluster config, else the default.")
    context: str = key("", "Kubeconfig context; empty: the current one.")
    watch_timeout_seconds: int = key(
        300, "The server ends each watch after this long and it is resumed.", minimum=1
    )
    request_timeout_seconds: float = key(30.0, "Connect and list timeout.", minimum=0.1)
    backoff_initial_seconds: float = key(0.5, "First retry delay after an error.", minimum=0.01)
    backoff_max_seconds: float = key(30.0, "Longest retry delay.", minimum=0.01)
    objectives: bool = key(
        True,
        "Watch the InferenceObjectives and InferenceModelRewrites that reference the served "
        "pools (`llm-d.ai/v1alpha2`, else `inference.networking.x-k8s.io/v1alpha2`): request "
        "priorities and model rewrites (docs/migration.md). Turn off where neither CRD is "
        "installed, or the picker retries (and logs) every `backoff_max_seconds`.",
    )

    def __post_init__(self) -> None:
        # Serving every pool of a namespace used to be what an empty section meant; a picker
        # that silently took pools meant for another picker is worse than a start-up error.
        chosen = [k for k in ("pool_name", "pools", "all_pools") if getattr(self, k)]
        if not chosen:
            raise ConfigError(
                "pool_name",
                "name the InferencePool this picker serves (--pool-name, EXTPROC_POOL_NAME), "
                "or set all_pools: true (--all-pools) to serve every pool of the namespace",
            )
        if len(chosen) > 1:
            raise ConfigError(chosen[1], f"give only one of {', '.join(chosen)}")

    @property
    def selected_pools(self) -> tuple[str, ...]:
        """The pool names to serve; empty means every pool (`all_pools`)."""
        return (self.pool_name,) if self.pool_name else self.pools


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """How the picker learns its endpoints and what each serves."""

    models_refresh_seconds: float = key(
        5.0, "How often each endpoint's `/v1/models` is read.", minimum=0.05
    )
    request_timeout_seconds: float = key(
        2.0,
        "Timeout of one `/v1/models` read; a failure marks the endpoint not ready.",
        minimum=0.01,
    )
    kubernetes: KubernetesDiscoveryConfig | None = key(
        None, "Set to watch InferencePools instead of a static `endpoints` list (see below)."
    )


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """Live load from every endpoint's vLLM `/metrics` (docs/collector.md)."""

    enabled: bool = key(True, "Scrape the endpoints' metrics (off: only in-flight counts).")
    interval_seconds: float = key(0.05, "Time between scrape rounds.", minimum=0.005)
    timeout_seconds: float = key(
        0.25,
        "Timeout of one scrape. It may exceed the interval (a slow scrape lands in a later "
        "round); a tight one turns the picker's own busy moments into endpoint failures.",
        minimum=0.001,
    )
    staleness_seconds: float = key(
        2.0, "A last good scrape older than this makes an endpoint's load stale.", minimum=0.01
    )
    unready_after_failures: int = key(
        3, "Consecutive failed scrapes after which an endpoint is not ready.", minimum=1
    )
    source: str = key(
        "",
        "`host:port` of a shared `extproc collector` to follow instead of scraping; while its "
        "stream is down the picker scrapes by itself.",
    )
    source_tls: bool = key(
        False, "Follow `source` over TLS (the collector runs with `--secure-serving`)."
    )
    source_ca_file: str = key(
        "",
        "PEM file of the CA that signed the collector's certificate, for `source_tls`. Empty: "
        "trust the certificate the collector presents (its self-signed one) on each connect.",
    )
    stale_policy: StalePolicy = key(
        "saturated",
        "What a stale endpoint is to the scheduler: `saturated` (used only if nothing fresher "
        "can serve) or `drop` (not used).",
    )


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    """vLLM KV-cache events: the precise prefix index (docs/kv_events.md)."""

    enabled: bool = key(
        False,
        "Follow every endpoint's KV-cache events (`endpoints[].kv_events`, a pod annotation, "
        "or the server's `/kv_event_sources`).",
    )
    max_entries: int = key(4_000_000, "Cap on (block, endpoint) entries in the index.", minimum=1)
