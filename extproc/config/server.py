"""The picker's own listeners and how a decision is handed to Envoy."""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.config.base import BodyMode, ConfigError, key


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The picker's listeners and limits."""

    host: str = key("0.0.0.0", "Address all listeners bind to.")
    grpc_port: int = key(9002, "ext_proc gRPC port (0 picks a free one).", minimum=0)
    health_port: int = key(9003, "gRPC health port.", minimum=0)
    metrics_port: int = key(9090, "Prometheus `/metrics` port.", minimum=0)
    workers: int = key(
        1,
        "Picker processes sharing the ext_proc and health ports (`SO_REUSEPORT`); they share "
        "their in-flight counts through shared memory. Worker i serves Prometheus on "
        '`metrics_port` + i. Needs fixed ports (docs/envoy.md, "Several picker processes").',
        minimum=1,
    )
    max_body_bytes: int = key(
        8 * 1024 * 1024, "Request bodies above this are refused with 413.", minimum=1
    )
    default_body_mode: BodyMode = key(
        "streamed",
        "Body mode assumed when Envoy does not announce one in `protocol_config` (Envoy < 1.34).",
    )
    shutdown_grace_seconds: float = key(
        5.0, "On SIGTERM, how long open streams may take to finish.", minimum=0
    )
    drain_delay_seconds: float = key(
        2.0,
        "On SIGTERM, how long the picker still takes new streams while its health says not "
        "serving, so that proxies move to other replicas first (then the grace period runs).",
        minimum=0,
    )
    response_observer_timeout_seconds: float = key(
        900.0,
        "With Envoy's response observer filter: how long a routed request may wait for its "
        "response before its in-flight count is released anyway.",
        minimum=1,
    )
    secure_serving: bool = key(
        False,
        "Serve the ext_proc port (and `extproc collector`'s stream) over TLS, as gateways that "
        "resolve an InferencePool's endpoint picker themselves expect. Without `cert_path` a "
        "self-signed certificate is made at start.",
    )
    cert_path: str = key(
        "",
        "Directory holding `tls.crt` and `tls.key` (a Kubernetes TLS Secret mounted as a "
        "volume) for `secure_serving`; read again when they change.",
    )

    def __post_init__(self) -> None:
        # Ports picked by the kernel would differ per worker: Envoy could reach only one.
        if self.workers > 1 and 0 in (self.grpc_port, self.health_port):
            raise ConfigError("workers", "several workers need fixed grpc_port and health_port")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How endpoints are chosen."""

    strategy: str = key(
        "cost",
        "Default strategy (docs/scheduling.md): `cost` (the lowest predicted time to first "
        "token plus prefill work: the best on `extproc bench routing`), `prefix-cache` "
        "(prefix 3, queue 2, KV cache 2), `least-request`, `round-robin`, `random`, ... or a "
        "blend like `prefix-cache:3,least-kv-cache:2,least-request:2`.",
    )
    fallbacks: int = key(
        2,
        "Endpoints after the pick in the list Envoy walks on retries (0: one address).",
        minimum=0,
    )
    strategy_headers: tuple[str, ...] = key(
        ("x-routing-strategy", "routing-strategy"),
        "Request headers that override the strategy per request, first match wins.",
    )
    retry_after_seconds: int = key(1, "`Retry-After` sent with 503 answers.", minimum=0)
    destination_metadata_namespace: str = key(
        "envoy.lb",
        "Dynamic-metadata namespace of the decision (`--destination-endpoint-hint-metadata-"
        "namespace`, as the field's picker called it); the protocol's is `envoy.lb`, which "
        "Envoy's override_host policy reads.",
    )
    destination_key: str = key(
        "x-gateway-destination-endpoint",
        "Header and metadata key of the decision (`--destination-endpoint-hint-key`).",
    )
    emit_endpoint_scores: bool = key(
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
