"""The bundled Envoy bootstraps, rendered: `render_bootstrap` loads one from the repository's
`envoy/` folder (valid Envoy configs as they stand: listener :10000, picker 127.0.0.1:9002, pool
127.0.0.1:8001 and :8002, admin :9901, response path "ended"), finds its objects by name (listener
`ingress`, clusters `extproc` and `pool`, the ext_proc filter, the `extproc.usage` Lua filter, the
gRPC access log) and sets addresses, failure mode, body mode and response path on them, so the
shipped file and the rendered one never drift apart. `extproc.bench.envoy` runs Envoy on the
result. Nothing here imports the picker: Envoy and the picker only meet over gRPC. `docs/envoy.md`
says why the config looks the way it does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from extproc.config import BodyMode, FailureMode

# override-host: the picker's "ip:port,ip:port" list, walked on retries (envoy/envoy.yaml).
# original-dst: one address from the x-gateway-destination-endpoint header
# (envoy/envoy-original-dst.yaml).
Variant = Literal["override-host", "original-dst"]
# How the picker learns about a response (docs/envoy.md, "The response path"):
# ended: nothing of the response on the routing stream, whose end is the request's end (the
#   config says so to the picker in gRPC metadata). Token counts and the endpoint that served
#   come from the `extproc.usage` Lua filter via the gRPC access log. No per-chunk cost in the
#   picker, and Envoy does not wait for it on the response path.
# headers: `ended` with the response headers sent to the picker too (the bundled shape until
#   2026-12-05): the endpoint that served comes with them, at the cost of a message and of
#   Envoy holding the response's first bytes for the picker's reply.
# inline: the response body streams through the picker on the routing stream, as the
#   endpoint-picker protocol describes (one message per chunk).
# observer: responses go to a second ext_proc filter in observability mode (no added latency,
#   still one message per chunk; a hang-up is seen only after Envoy's 5 s deferred close).
ResponsePath = Literal["ended", "headers", "inline", "observer"]

# extproc/bench/envoy_config.py -> the repository root's envoy/ folder.
ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
TEMPLATES: dict[Variant, str] = {
    "override-host": "envoy.yaml",
    "original-dst": "envoy-original-dst.yaml",
}

_EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
_OBSERVER_FILTER = "extproc.response_observer"
# The shipped ("ended") shape's usage reporting: a Lua filter that reads token counts into
# dynamic metadata, and the gRPC access log that carries them to the picker.
_USAGE_FILTER = "extproc.usage"
_USAGE_LOGGER = "envoy.access_loggers.http_grpc"
_STDOUT_LOGGER = "envoy.access_loggers.stdout"
# The gRPC metadata by which the config declares the `ended` shape to the picker.
_ENDED_METADATA = [{"key": "x-extproc-response-path", "value": "ended"}]
# The routing filter's response phases when the stream's end is the signal: no headers, no
# body, and trailers SEND, without which Envoy closes the stream once the request phase is over
# (measured, Envoy 1.40) instead of when the response ends.
_ENDED = {
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SEND",
}
# The routing filter's response phases when the observer takes the response.
_OBSERVED = {
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}


def _observer_filter() -> dict[str, Any]:
    """The response observer: the same picker, told about each response without Envoy waiting
    for it (observability mode), so reading usage and releasing the in-flight count add no
    latency on the response path. The routing filter names the request in dynamic metadata
    (extproc/request-id); this filter forwards that name back with the response."""
    return {
        "name": _OBSERVER_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
            "ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}},
            "observability_mode": True,
            "failure_mode_allow": True,  # observing never fails a request
            "processing_mode": {
                "request_header_mode": "SKIP",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "STREAMED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "response_attributes": ["upstream.address"],
            "metadata_options": {"forwarding_namespaces": {"untyped": ["extproc", "envoy.lb"]}},
        },
    }


_HCM_FILTER = "envoy.filters.network.http_connection_manager"


def _disable_observer_where_ext_proc_is_off(hcm: dict[str, Any]) -> None:
    """Routes that never ask the picker (the allow-list's 404) must not report their responses
    to it either: the observer would tell it about requests it never saw."""
    for host in hcm.get("route_config", {}).get("virtual_hosts", []):
        for route in host.get("routes", []):
            per_filter = route.get("typed_per_filter_config", {})
            if per_filter.get(_EXT_PROC_FILTER, {}).get("disabled"):
                per_filter[_OBSERVER_FILTER] = dict(per_filter[_EXT_PROC_FILTER])


def _drop_usage_reporting(hcm: dict[str, Any]) -> None:
    """inline and observer read usage from the body themselves: no Lua filter, no access log
    to the picker (it would count every request twice)."""
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f.get("name") != _USAGE_FILTER]
    for host in hcm.get("route_config", {}).get("virtual_hosts", []):
        for route in host.get("routes", []):
            route.get("typed_per_filter_config", {}).pop(_USAGE_FILTER, None)
    _drop_loggers(hcm, _USAGE_LOGGER)


def _drop_loggers(hcm: dict[str, Any], name: str) -> None:
    kept = [entry for entry in hcm.get("access_log", []) if entry.get("name") != name]
    if kept:
        hcm["access_log"] = kept
    else:
        hcm.pop("access_log", None)


def _check_usage_reporting(hcm: dict[str, Any]) -> None:
    """The "ended" path has no usage without both halves; a template lacking them is refused
    rather than rendered into a config that silently never charges tokens."""
    filters = hcm["http_filters"]
    usage = filters.index(_named(filters, _USAGE_FILTER))
    # After ext_proc, so that (encoders run in reverse) it reads the response first.
    if usage < filters.index(_named(filters, _EXT_PROC_FILTER)):
        raise EnvoyError(f"Envoy template: {_USAGE_FILTER} must come after {_EXT_PROC_FILTER}")
    _named(hcm.get("access_log", []), _USAGE_LOGGER)


# ext_proc processing modes per body mode. Buffered (the bundled files' mode) sends the whole body
# in one message and takes the pick with the reply, so the body crosses gRPC once; streamed
# (FULL_DUPLEX_STREAMED, the mode the endpoint-picker protocol describes; trailers must be SEND)
# sends it back as well (docs/envoy.md, "Body modes"). These are the inline response path's
# modes; ended (_ENDED) and observer (_OBSERVED) replace the response phases.
_PROCESSING_MODES: dict[BodyMode, dict[str, str]] = {
    "streamed": {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    },
    "buffered": {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    },
}


class EnvoyError(RuntimeError):
    """Envoy could not be configured, started, or did not become ready."""


def render_bootstrap(
    *,
    port: int = 10000,
    extproc: str = "127.0.0.1:9002",
    endpoints: Sequence[str] = ("127.0.0.1:8001", "127.0.0.1:8002"),
    admin_port: int = 9901,
    listen_host: str = "0.0.0.0",
    failure_mode: FailureMode = "FailClose",
    body_mode: BodyMode = "buffered",
    message_timeout_ms: int = 35_000,
    request_timeout_ms: int = 60_000,
    variant: Variant = "override-host",
    response_path: ResponsePath = "ended",
    access_log: bool = True,
    template: Path | None = None,
    extproc_tls: bool = False,
    extproc_ca: Path | None = None,
) -> str:
    """Return the Envoy bootstrap (YAML) for these settings.

    `endpoints` are the pool's `ip:port` addresses (override-host only: ORIGINAL_DST reaches
    whatever the picker names). `extproc` may be `host:port` with a DNS name.
    `request_timeout_ms` is the HTTP connection manager's request_timeout: it bounds upload plus
    pick (plus any fair-queue wait) in every body mode; `message_timeout_ms` only applies outside
    FULL_DUPLEX_STREAMED (docs/envoy.md, "Timeouts"). 0 disables either. `response_path` is
    how the picker learns about responses (see `ResponsePath`); `access_log` is the stdout line
    per request only, not the usage log the "ended" path needs.
    """
    config = _load(template or ENVOY_DIR / TEMPLATES[variant])
    _check_choice("failure_mode", failure_mode, FailureMode)
    _check_choice("body_mode", body_mode, BodyMode)
    if message_timeout_ms < 0:
        raise ValueError(f"message_timeout_ms: expected >= 0, got {message_timeout_ms}")
    if request_timeout_ms < 0:
        raise ValueError(f"request_timeout_ms: expected >= 0, got {request_timeout_ms}")

    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": _port(admin_port, "admin_port"),
    }

    listener = _named(config["static_resources"]["listeners"], "ingress")
    listener["address"]["socket_address"] = {"address": listen_host, "port_value": _port(port)}
    hcm = _named(listener["filter_chains"][0]["filters"], _HCM_FILTER)["typed_config"]
    if not access_log:
        _drop_loggers(hcm, _STDOUT_LOGGER)
    hcm["request_timeout"] = f"{request_timeout_ms / 1000:g}s"
    ext_proc = _named(hcm["http_filters"], _EXT_PROC_FILTER)["typed_config"]
    ext_proc["failure_mode_allow"] = failure_mode == "FailOpen"
    ext_proc["processing_mode"] = dict(_PROCESSING_MODES[body_mode])
    _check_choice("response_path", response_path, ResponsePath)
    ext_proc["grpc_service"].pop("initial_metadata", None)
    if response_path in ("ended", "headers"):
        ext_proc["processing_mode"].update(_ENDED)
        _check_usage_reporting(hcm)
    else:
        _drop_usage_reporting(hcm)
    if response_path == "ended":
        ext_proc["grpc_service"]["initial_metadata"] = list(_ENDED_METADATA)
    else:
        ext_proc["processing_mode"]["response_header_mode"] = "SEND"
    if response_path in ("headers", "inline"):
        # The endpoint that served (after retries), with the response headers: Envoy 1.40 has
        # no data-plane writer for envoy.lb/x-gateway-destination-endpoint-served.
        ext_proc["response_attributes"] = ["upstream.address"]
    if response_path == "observer":
        ext_proc["processing_mode"].update(_OBSERVED)  # its headers SKIP
        filters = hcm["http_filters"]
        filters.insert(filters.index(_named(filters, _EXT_PROC_FILTER)), _observer_filter())
        _disable_observer_where_ext_proc_is_off(hcm)
    ext_proc["message_timeout"] = f"{message_timeout_ms / 1000:g}s"

    clusters = config["static_resources"]["clusters"]
    picker = _named(clusters, "extproc")
    host, picker_port = _split(extproc, "extproc")
    picker["type"] = "STATIC" if _is_ip(host) else "STRICT_DNS"
    picker["load_assignment"]["endpoints"] = [{"lb_endpoints": [_lb_endpoint(host, picker_port)]}]
    if extproc_tls or extproc_ca is not None:
        picker["transport_socket"] = _upstream_tls(extproc_ca)

    pool = _named(clusters, "pool")
    if "load_assignment" in pool:  # override-host: the pool is a fixed list of hosts
        if not endpoints:
            raise ValueError("endpoints: at least one ip:port is needed")
        hosts = [_split(endpoint, "endpoints") for endpoint in endpoints]
        for endpoint, (ip, _) in zip(endpoints, hosts, strict=True):
            if not _is_ip(ip):
                # override_host matches the picker's answer against host addresses, so names
                # would never match.
                raise ValueError(f"endpoints: expected ip:port, got {endpoint!r}")
        pool["load_assignment"]["endpoints"] = [
            {"lb_endpoints": [_lb_endpoint(ip, p) for ip, p in hosts]}
        ]
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=1000)


def _upstream_tls(ca: Path | None) -> dict[str, Any]:
    """TLS to the picker (`extproc serve --secure-serving`). Without `ca` the certificate is
    not checked, as the field's gateways treat the picker's self-signed one; with `ca` it must
    chain to that CA (the picker's name is not checked: it is reached by address)."""
    context: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if ca is not None:
        context["validation_context"] = {"trusted_ca": {"filename": str(ca)}}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "common_tls_context": context,
        },
    }


# --- helpers ---------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the Lua source) as `|` blocks, as the shipped files have them,
    so `--print-config` stays readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if value.count("\n") > 1 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _load(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise EnvoyError(
            f"Envoy template {path} not found (extproc envoy runs from a source checkout)"
        ) from exc
    if not isinstance(loaded, dict):
        raise EnvoyError(f"{path}: not an Envoy bootstrap")
    return loaded


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise EnvoyError(f"Envoy template has no object named {name!r}")


def _check_choice(key: str, value: str, choices: Any) -> None:
    if value not in get_args(choices):
        raise ValueError(f"{key}: expected one of {', '.join(get_args(choices))}, got {value!r}")


def _split(address: str, key: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{key}: expected host:port, got {address!r}")
    return host, _port(int(port), key)


def _port(port: int, key: str = "port") -> int:
    if not 0 <= port < 65536:
        raise ValueError(f"{key}: port out of range: {port}")
    return port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _lb_endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
