"""The picker's configuration: typed, frozen, read once from YAML and flags.

The schema is the dataclasses below; `load_config` walks them, so a wrong key or value is reported
with its dotted path ("routing.fallbacks: expected an integer >= 0, got 'two'") and the same
classes generate the configuration reference in `docs/`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import hashlib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

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


def _key(default: Any, doc: str, *, minimum: float | None = None) -> Any:
    """A config key: its default, the sentence the reference prints, and a lower bound."""
    metadata = {"doc": doc, "min": minimum}
    if isinstance(default, Mapping):
        # Mappings are unhashable, so dataclasses want a factory; every instance gets its own.
        frozen = dict(default)
        return field(default_factory=lambda: MappingProxyType(frozen), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """One model server."""

    address: str = field(metadata={"doc": "`ip:port` of the model server, as Envoy reaches it."})
    models: tuple[str, ...] = _key(
        (), "Models it serves (base and adapters); learned from its `/v1/models` as well."
    )
    kv_events: str = _key(
        "", "Its vLLM KV-cache event publisher (`tcp://ip:port`); empty: ask `/kv_event_sources`."
    )
    role: EndpointRole = _key(
        "both",
        "`prefill`, `decode` or `both` (serves whole requests), for `disaggregation`; from the "
        "pod label `fleet.role_label` under Kubernetes.",
    )
    accelerator: str = _key(
        "", "Its GPU type (`a100`, `h100`, ...): endpoints of one type share speed estimates."
    )
    cost_per_hour: float = _key(
        0.0,
        "What its GPU costs per hour (any currency); 0: `fleet.prices` for its accelerator.",
        minimum=0,
    )

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("address", f"expected host:port, got {self.address!r}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The picker's listeners and limits."""

    host: str = _key("0.0.0.0", "Address all listeners bind to.")
    grpc_port: int = _key(9002, "ext_proc gRPC port (0 picks a free one).", minimum=0)
    health_port: int = _key(9003, "gRPC health port.", minimum=0)
    metrics_port: int = _key(9090, "Prometheus `/metrics` port.", minimum=0)
    max_body_bytes: int = _key(
        8 * 1024 * 1024, "Request bodies above this are refused with 413.", minimum=1
    )
    default_body_mode: BodyMode = _key(
        "streamed",
        "Body mode assumed when Envoy does not announce one in `protocol_config` (Envoy < 1.34).",
    )
    shutdown_grace_seconds: float = _key(
        5.0, "On SIGTERM, how long open streams may take to finish.", minimum=0
    )
    drain_delay_seconds: float = _key(
        2.0,
        "On SIGTERM, how long the picker still takes new streams while its health says not "
        "serving, so that proxies move to other replicas first (then the grace period runs).",
        minimum=0,
    )
    response_observer_timeout_seconds: float = _key(
        900.0,
        "With Envoy's response observer filter: how long a routed request may wait for its "
        "response before its in-flight count is released anyway.",
        minimum=1,
    )
    secure_serving: bool = _key(
        False,
        "Serve the ext_proc port (and `extproc collector`'s stream) over TLS, as gateways that "
        "resolve an InferencePool's endpoint picker themselves expect. Without `cert_path` a "
        "self-signed certificate is made at start.",
    )
    cert_path: str = _key(
        "",
        "Directory holding `tls.crt` and `tls.key` (a Kubernetes TLS Secret mounted as a "
        "volume) for `secure_serving`; read again when they change.",
    )


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How endpoints are chosen."""

    strategy: str = _key(
        "cost",
        "Default strategy (docs/scheduling.md): `cost` (the lowest predicted time to first "
        "token plus prefill work: the best on `extproc bench routing`), `prefix-cache` "
        "(prefix 3, queue 2, KV cache 2), `least-request`, `round-robin`, `random`, ... or a "
        "blend like `prefix-cache:3,least-kv-cache:2,least-request:2`.",
    )
    fallbacks: int = _key(
        2,
        "Endpoints after the pick in the list Envoy walks on retries (0: one address).",
        minimum=0,
    )
    strategy_headers: tuple[str, ...] = _key(
        ("x-routing-strategy", "routing-strategy"),
        "Request headers that override the strategy per request, first match wins.",
    )
    retry_after_seconds: int = _key(1, "`Retry-After` sent with 503 answers.", minimum=0)
    destination_metadata_namespace: str = _key(
        "envoy.lb",
        "Dynamic-metadata namespace of the decision (`--destination-endpoint-hint-metadata-"
        "namespace`, as the field's picker called it); the protocol's is `envoy.lb`, which "
        "Envoy's override_host policy reads.",
    )
    destination_key: str = _key(
        "x-gateway-destination-endpoint",
        "Header and metadata key of the decision (`--destination-endpoint-hint-key`).",
    )
    emit_endpoint_scores: bool = _key(
        False,
        "Put the scheduler's score for each endpoint it scored in the decision's metadata, "
        "under `x-gateway-destination-endpoint-scores` (`--emit-endpoint-scores`, as llm-d's).",
    )

    def __post_init__(self) -> None:
        # Envoy reads metadata by namespace and the header by name: neither may be empty, and
        # a header name is lower-case token characters (HTTP/2 refuses upper case).
        if not self.destination_metadata_namespace.strip():
            raise ConfigError("destination_metadata_namespace", "must not be empty")
        if not _HEADER_NAME.fullmatch(self.destination_key):
            raise ConfigError(
                "destination_key",
                f"expected a lower-case header name, got {self.destination_key!r}",
            )


_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """Endpoints from `InferencePool`s (inference.networking.k8s.io/v1) and the Ready pods they
    select (docs/discovery.md)."""

    namespace: str = _key(
        "",
        "Namespace of the pool (`--pool-namespace`); empty: the pod's own namespace in a "
        "cluster, else `default`.",
    )
    pool_name: str = _key(
        "",
        "The InferencePool this picker serves (`--pool-name`), as the field's picker serves "
        "one; only that pool is watched. One of `pool_name`, `pools` or `all_pools` is needed.",
    )
    pools: tuple[str, ...] = _key(
        (), "Several InferencePools by name, for one picker that serves them all."
    )
    all_pools: bool = _key(
        False, "Serve every InferencePool of the namespace (`--all-pools`): an explicit choice."
    )
    kubeconfig: str = _key("", "Kubeconfig file; empty: in-cluster config, else the default.")
    context: str = _key("", "Kubeconfig context; empty: the current one.")
    watch_timeout_seconds: int = _key(
        300, "The server ends each watch after this long and it is resumed.", minimum=1
    )
    request_timeout_seconds: float = _key(30.0, "Connect and list timeout.", minimum=0.1)
    backoff_initial_seconds: float = _key(0.5, "First retry delay after an error.", minimum=0.01)
    backoff_max_seconds: float = _key(30.0, "Longest retry delay.", minimum=0.01)
    objectives: bool = _key(
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

    models_refresh_seconds: float = _key(
        5.0, "How often each endpoint's `/v1/models` is read.", minimum=0.05
    )
    request_timeout_seconds: float = _key(
        2.0,
        "Timeout of one `/v1/models` read; a failure marks the endpoint not ready.",
        minimum=0.01,
    )
    kubernetes: KubernetesDiscoveryConfig | None = _key(
        None, "Set to watch InferencePools instead of a static `endpoints` list (see below)."
    )


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """Live load from every endpoint's vLLM `/metrics` (docs/collector.md)."""

    enabled: bool = _key(True, "Scrape the endpoints' metrics (off: only in-flight counts).")
    interval_seconds: float = _key(0.05, "Time between scrape rounds.", minimum=0.005)
    timeout_seconds: float = _key(
        0.25,
        "Timeout of one scrape. It may exceed the interval (a slow scrape lands in a later "
        "round); a tight one turns the picker's own busy moments into endpoint failures.",
        minimum=0.001,
    )
    staleness_seconds: float = _key(
        2.0, "A last good scrape older than this makes an endpoint's load stale.", minimum=0.01
    )
    unready_after_failures: int = _key(
        3, "Consecutive failed scrapes after which an endpoint is not ready.", minimum=1
    )
    source: str = _key(
        "",
        "`host:port` of a shared `extproc collector` to follow instead of scraping; while its "
        "stream is down the picker scrapes by itself.",
    )
    source_tls: bool = _key(
        False, "Follow `source` over TLS (the collector runs with `--secure-serving`)."
    )
    source_ca_file: str = _key(
        "",
        "PEM file of the CA that signed the collector's certificate, for `source_tls`. Empty: "
        "trust the certificate the collector presents (its self-signed one) on each connect.",
    )
    stale_policy: StalePolicy = _key(
        "saturated",
        "What a stale endpoint is to the scheduler: `saturated` (used only if nothing fresher "
        "can serve) or `drop` (not used).",
    )


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    """vLLM KV-cache events: the precise prefix index (docs/kv_events.md)."""

    enabled: bool = _key(
        False,
        "Follow every endpoint's KV-cache events (`endpoints[].kv_events`, a pod annotation, "
        "or the server's `/kv_event_sources`).",
    )
    max_entries: int = _key(4_000_000, "Cap on (block, endpoint) entries in the index.", minimum=1)


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    """Prompt tokens and vLLM's block hashes, for prefix-aware scheduling (docs/prefix.md)."""

    tokenizers: Mapping[str, str] = _key(
        MappingProxyType({}),
        "Model name -> tokenizer: `cl100k_base`, `tiktoken:PATH`, `hf:PATH` (tokenizer.json or "
        "its directory, with tokenizer_config.json's chat template), `remote` (the endpoint's "
        "/tokenize), `bytes:N` (an estimate).",
    )
    default_tokenizer: str = _key(
        "auto",
        "Tokenizer for models not listed above. `auto`: each model's own tokenizer.json and "
        "chat template, found in `models_dirs`, the Hugging Face cache (HF_HOME, HF_HUB_CACHE) "
        "or the hub (`tokenizer_hub`); the endpoint's /tokenize while looking and when none is "
        "found. Or any spec above for every such model (`cl100k_base` is an estimate: its hashes "
        "match no Llama, Qwen or Mistral server).",
    )
    models_dirs: tuple[str, ...] = _key(
        (),
        "Directories `auto` looks in first: DIR/<org>/<name>/, DIR/<name>/ (holding "
        "tokenizer.json), or DIR as a Hugging Face cache.",
    )
    tokenizer_hub: bool = _key(
        True,
        "`auto` may download a model's tokenizer files from the Hugging Face hub (HF_ENDPOINT, "
        "HF_TOKEN; off with HF_HUB_OFFLINE=1) into the Hugging Face cache.",
    )
    mismatch_window_blocks: int = _key(
        256,
        "With KV events: stored blocks per endpoint after which the picker judges whether its "
        "block hashes are the server's (docs/prefix.md, mismatch detection).",
        minimum=1,
    )
    block_size: int = _key(16, "vLLM's --block-size on the fleet.", minimum=1)
    hash_algo: HashAlgoName = _key("sha256", "vLLM's --prefix-caching-hash-algo on the fleet.")
    hash_seed: str = _key(
        "vllm-none-hash", "The fleet's PYTHONHASHSEED, or vLLM's fixed default seed."
    )
    index: PrefixIndexMode = _key(
        "auto",
        "`precise` (KV events), `approximate` (learned from our own routing) or `auto` "
        "(precise when kv_events.enabled).",
    )


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    """Admission, explanations and configured profiles (docs/scheduling.md)."""

    explain: bool = _key(
        False,
        "Log each decision's per-endpoint scores and send them upstream in `x-extproc-scores`.",
    )
    saturation_queue: float = _key(
        5.0, "An endpoint with this many waiting requests is saturated.", minimum=0.01
    )
    saturation_kv: float = _key(
        0.8, "An endpoint with this KV-cache usage is saturated.", minimum=0.01
    )
    saturation_requests: float = _key(
        0.0,
        "An endpoint with this many requests (running + waiting, with our picks since its last "
        "scrape) is saturated; 0: not a criterion. The fair queue holds requests while every "
        "endpoint is saturated, so this caps what each server is given at once.",
        minimum=0,
    )
    endpoint_picker_config: Mapping[str, Any] = _key(
        MappingProxyType({}),
        "An EndpointPickerConfig (plugins, schedulingProfiles): each profile becomes a strategy.",
    )
    ttft_target_seconds: float = _key(
        0.5,
        "The `cheapest` strategy's latency target: among endpoints predicted to give the first "
        "token within it, the cheapest per request wins; when none is, the fastest.",
        minimum=0.001,
    )


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What the endpoints are: GPU types, prices, roles (docs/disaggregation.md)."""

    prices: Mapping[str, float] = _key(
        MappingProxyType({}),
        "Accelerator -> cost per hour, for endpoints that do not state their own "
        "(`cost_per_hour`); the `cheapest` strategy ranks by it.",
    )
    speeds: Mapping[str, float] = _key(
        MappingProxyType({}),
        "Accelerator -> prefill tokens per second: the cost model's starting estimate for "
        "endpoints of that type (it learns each endpoint's own from its metrics).",
    )
    role_label: str = _key(
        "llm-d.ai/role",
        "Pod label naming an endpoint's role (`prefill`, `decode`, `both`; llm-d's "
        "`prefill-decode` reads as `both`).",
    )
    accelerator_label: str = _key(
        "extproc.io/accelerator", "Pod label naming its accelerator (GPU type)."
    )
    cost_label: str = _key(
        "extproc.io/cost-per-hour", "Pod label with its cost per hour (a number)."
    )


@dataclass(frozen=True, slots=True)
class DisaggregationConfig:
    """Prefill/decode disaggregation (docs/disaggregation.md): the prompt is computed on a
    prefill endpoint and its KV cache moved to the decode endpoint that generates."""

    mode: DisaggregationMode = _key(
        "off",
        "`off`; `p2p`: route to the decode endpoint and name the prefill endpoint in "
        "`prefiller_header` (the llm-d routing sidecar pulls the KV cache); `centralized`: the "
        "picker runs the prefill (`max_tokens` 1, vLLM `kv_transfer_params`) and sends the "
        "decode endpoint the returned `kv_transfer_params`.",
    )
    threshold_tokens: int = _key(
        256,
        "Prompt tokens the chosen decode endpoint does not hold cached below which it prefills "
        "them itself: moving a short prompt's KV costs more than computing it.",
        minimum=0,
    )
    prefill_strategy: str = _key(
        "cost", "Strategy choosing the prefill endpoint (prefix-cache aware: `cost`)."
    )
    decode_strategy: str = _key(
        "prefix-cache:2,least-kv-cache:1,least-request:1",
        "Strategy choosing the decode endpoint: free KV cache and load, and the prefix it holds "
        "(a conversation's next turn is then short enough to prefill there).",
    )
    prefiller_header: str = _key(
        "x-prefiller-host-port", "Header naming the prefill endpoint in `p2p` mode."
    )
    prefill_timeout_seconds: float = _key(
        30.0,
        "`centralized`: how long the picker waits for the prefill; after that (or an error) "
        "the decode endpoint computes the whole prompt.",
        minimum=0.01,
    )


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """One tenant: how it is recognised and what it may do. A limit of 0 is no limit."""

    api_keys: tuple[str, ...] = _key(
        (),
        'SHA-256 hex digests of its API keys (`printf %s "$KEY" | sha256sum`), never the '
        "keys themselves.",
    )
    models: tuple[str, ...] = _key((), "Models (bases or adapters) it may use; empty: all.")
    requests_per_minute: int = _key(0, "Requests per minute.", minimum=0)
    tokens_per_minute: int = _key(
        0,
        "Tokens per minute: prompt tokens counted at the pick, completion tokens from the "
        "response's usage.",
        minimum=0,
    )
    max_concurrency: int = _key(0, "Requests in flight at once.", minimum=0)
    priority: int = _key(
        0, "Higher is served first from the fair queue; negative: shed when saturated."
    )
    weight: float = _key(
        1.0, "Share of the pool under saturation, relative to others.", minimum=0.01
    )
    cache_isolation: bool = _key(
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

    enabled: bool = _key(False, "Identify a tenant for every request and apply its policy.")
    identity: tuple[IdentitySource, ...] = _key(
        ("api-key", "default"),
        "Where the tenant comes from, first match wins: `api-key` (Authorization: Bearer), "
        "`header` (opt-in: the `header` below, trusted as is, so it must be set by an "
        "authenticator in front, e.g. Envoy's JWT filter, and removed from clients' requests; "
        "the bundled Envoy configs remove `x-tenant-id`), `default`.",
    )
    header: str = _key(
        "x-tenant-id", "Header naming the tenant, for the `header` source (when listed)."
    )
    default_tenant: str = _key(
        "", "Tenant of requests that name none; empty: such requests are refused with 401."
    )
    tenants: Mapping[str, TenantConfig] = _key(MappingProxyType({}), "Tenant name -> policy.")
    api_keys_file: str = _key(
        "",
        "YAML file of tenant name -> list of API key SHA-256 digests, e.g. a mounted Kubernetes "
        "Secret; added to `tenants[].api_keys` and reloaded when it changes.",
    )
    limits_backend: LimitsBackend = _key(
        "memory",
        "`memory` (this replica's own counts) or `redis` (one limit shared by every replica).",
    )
    redis_url: str = _key("redis://127.0.0.1:6379/0", "Redis for `limits_backend: redis`.")
    redis_timeout_seconds: float = _key(
        0.05, "Timeout of one Redis call; the picker waits on it per request.", minimum=0.001
    )
    redis_failure_mode: RedisFailureMode = _key(
        "open",
        "When Redis cannot be reached: `open` (enforce this replica's own limits) or `closed` "
        "(refuse with 503).",
    )
    redis_retry_seconds: float = _key(
        1.0,
        "After a Redis failure, how long to use the failure mode before trying again.",
        minimum=0.01,
    )
    lease_seconds: float = _key(
        30.0,
        "A concurrency slot held in Redis expires this long after its replica last renewed it "
        "(each replica renews its slots every third of this), so a replica that dies frees "
        "its slots within this time.",
        minimum=1,
    )
    fair_sharing: bool = _key(
        True,
        "While every endpoint is saturated, hold requests in per-tenant queues served by "
        "weighted fair queuing on tokens (priority first).",
    )
    queue_timeout_seconds: float = _key(
        30.0, "A request held longer than this is refused with 429.", minimum=0.001
    )
    max_queued_per_tenant: int = _key(
        1000, "Requests one tenant may have waiting; more are refused with 429.", minimum=1
    )
    headroom_requests: int = _key(
        0,
        "Request slots per endpoint kept free for tenants under their weighted share of the "
        "pool: a tenant at or over its share finds the pool saturated this many requests "
        "early (needs `scheduling.saturation_requests`). Trades a flood's throughput for the "
        "other tenants' latency; 0 keeps no headroom.",
        minimum=0,
    )
    cache_salt_key: str = _key(
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


def reference_markdown() -> str:
    """The configuration reference, generated from the schema above (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `extproc/config.py` by `extproc.config.reference_markdown()`; a test "
        "keeps this file equal to it. Pass the file with `extproc serve --config FILE`; flags "
        "override it.",
    ]
    for f in dataclasses.fields(Config):
        hint = typing.get_type_hints(Config)[f.name]
        if typing.get_origin(hint) is tuple:
            _section(lines, f.name, typing.get_args(hint)[0], f.metadata["doc"], " (a list)")
        else:
            _section(lines, f.name, hint, "")
    return "\n".join(lines) + "\n"


def _section(lines: list[str], name: str, section: Any, doc: str, suffix: str = "") -> None:
    lines += ["", f"## `{name}`{suffix}", ""]
    lines += [doc or (section.__doc__ or "").strip()]
    lines += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(section)
    nested = []
    for key in dataclasses.fields(section):
        hint = hints[key.name]
        if key.default is not dataclasses.MISSING:
            default = f"`{key.default!r}`"
        elif key.default_factory is not dataclasses.MISSING:
            default = f"`{dict(key.default_factory())!r}`"
        else:
            default = "required"
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if inner:
            nested.append((f"{name}.{key.name}", inner[0]))
            kind = "section"
        else:
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        lines.append(f"| `{key.name}` | `{kind}` | {default} | {key.metadata.get('doc', '')} |")
    for nested_name, nested_section in nested:
        _section(lines, nested_name, nested_section, "")


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
