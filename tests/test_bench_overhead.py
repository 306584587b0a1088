"""`extproc bench overhead`: the backends' vLLM-shaped streams, the one Envoy config with a
listener per path, the report's arithmetic, and the streamed scenario end to end (real Envoy,
picker and backends, a few seconds)."""

from __future__ import annotations

import json
import math
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.bench.loadgen import Summary
from extproc.bench.overhead import (
    ENVOY,
    PICKER_PATHS,
    CpuUse,
    OverheadOptions,
    OverheadReport,
    PathResult,
    StreamResult,
    StreamSample,
    bootstrap_with_direct_listener,
    path_modes,
    picker_path,
    request_body,
    run_overhead,
    write_report,
)
from extproc.bench.processes import free_ports, process

_CHUNK_KEYS = {"id", "object", "created", "model", "choices", "usage"}
_CHOICE_KEYS = {"index", "text", "logprobs", "finish_reason", "stop_reason"}


def _post(port: int, body: bytes, gap_ms: float = 1) -> tuple[str, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body,
        headers={"content-type": "application/json", "x-bench-token-gap-ms": f"{gap_ms:g}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.headers["content-type"]), bytes(response.read())


def _events(raw: bytes) -> list[str]:
    assert raw.endswith(b"\n\n")
    events = raw.decode().split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


@pytest.mark.e2e
def test_the_backend_streams_one_vllm_event_per_token() -> None:
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "extproc.bench.backend", "bench-model", str(port)]
    with process(argv, ready_line="ready"):
        body = request_body(1024, tokens=5, stream=True)
        content_type, raw = _post(port, body)
        assert content_type.startswith("text/event-stream")
        events = _events(raw)
        assert events[-1] == "[DONE]"
        chunks: list[dict[str, Any]] = [json.loads(e) for e in events[:-1]]
        tokens, usage = chunks[:-1], chunks[-1]
        assert len(tokens) == 5
        for i, chunk in enumerate(tokens):
            assert set(chunk) == _CHUNK_KEYS
            assert chunk["object"] == "text_completion"
            assert chunk["model"] == "bench-model"
            assert chunk["usage"] is None
            (choice,) = chunk["choices"]
            assert set(choice) == _CHOICE_KEYS
            assert choice["text"] == "x"
            assert choice["finish_reason"] == (None if i < 4 else "length")
        assert usage["choices"] == []
        counts = usage["usage"]
        assert counts["completion_tokens"] == 5
        assert counts["prompt_tokens"] > 100  # a 1 KB prompt
        assert counts["total_tokens"] == counts["prompt_tokens"] + 5

        # No usage chunk unless asked for.
        plain = json.loads(body) | {"stream_options": {"include_usage": False}}
        events = _events(_post(port, json.dumps(plain).encode())[1])
        assert len(events) == 5 + 1
        assert all(json.loads(e)["choices"] for e in events[:-1])

        # Not streamed: one JSON body with usage, as before.
        content_type, raw = _post(port, request_body(1024, tokens=5))
        assert content_type.startswith("application/json")
        assert json.loads(raw)["usage"]["completion_tokens"] == 1


def test_one_envoy_config_has_a_listener_per_path_and_envoy_alone_has_no_picker() -> None:
    options = OverheadOptions()
    ports = dict(zip(options.paths, range(20001, 20001 + len(options.paths)), strict=True))
    config = yaml.safe_load(
        bootstrap_with_direct_listener(
            ports=ports, extproc="127.0.0.1:20000", endpoints=["127.0.0.1:20010"], admin_port=20011
        )
    )
    listeners = {item["name"]: item for item in config["static_resources"]["listeners"]}
    assert set(listeners) == {ENVOY, *(picker_path(p) for p in PICKER_PATHS)}
    assert {"inline", "observer", "ended-streamed"} <= set(PICKER_PATHS)

    def shape(name: str) -> tuple[str, set[str], set[str]]:
        hcm = listeners[name]["filter_chains"][0]["filters"][0]["typed_config"]
        port = listeners[name]["address"]["socket_address"]["port_value"]
        assert port == ports[name]
        loggers = {entry["name"] for entry in hcm.get("access_log", [])}
        return hcm["stat_prefix"], {f["name"] for f in hcm["http_filters"]}, loggers

    _, filters, loggers = shape(ENVOY)
    # Envoy alone: no ext_proc, no usage filter, nothing sent to the picker.
    assert not any("ext_proc" in f or "extproc" in f for f in filters)
    assert "envoy.access_loggers.http_grpc" not in loggers
    _, filters, _ = shape(picker_path("inline"))
    assert "envoy.filters.http.ext_proc" in filters
    _, filters, _ = shape(picker_path("observer"))
    assert "extproc.response_observer" in filters
    if "ended" in PICKER_PATHS:
        _, filters, loggers = shape(picker_path("ended"))
        assert "extproc.usage" in filters
        assert "envoy.access_loggers.http_grpc" in loggers

    def request_body_mode(name: str) -> str:
        hcm = listeners[name]["filter_chains"][0]["filters"][0]["typed_config"]
        routing = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
        return str(routing["typed_config"]["processing_mode"]["request_body_mode"])

    assert request_body_mode(picker_path("ended")) == "BUFFERED"  # the bundled files' mode
    assert request_body_mode(picker_path("ended-streamed")) == "FULL_DUPLEX_STREAMED"
    assert path_modes(picker_path("ended-buffered")) == ("ended", "buffered")
    with pytest.raises(ValueError, match="unknown picker path"):
        path_modes(picker_path("ended-chunked"))


def _stream(tokens: int, path: str, *, picker: float, requests: int = 10) -> StreamResult:
    samples = [StreamSample(0.01, 0.02, 200, tokens)] * requests
    return StreamResult.of(tokens, path, samples, CpuUse(picker=picker, envoy=0.01, seconds=5))


def test_picker_cpu_is_net_of_its_idle_use_and_the_targets_are_judged() -> None:
    report = OverheadReport(options={"token_gap_ms": 10.0, "stream_rate": 4.0})
    inline = picker_path("inline")
    # Idle: 0.02 CPU s over the 10 s of Envoy-alone phases, 2 ms/s: 0.01 s of each 5 s phase.
    report.streamed = [
        _stream(1, ENVOY, picker=0.01),
        _stream(1, inline, picker=0.01 + 0.03),  # 3 ms per request once idle is off
        _stream(1000, ENVOY, picker=0.01),
        _stream(1000, inline, picker=0.01 + 1.01),  # 101 ms per request
    ]
    assert report.picker_idle() == pytest.approx(0.002)
    assert report.stream_cpu_ms(report.streamed[1])[0] == pytest.approx(3.0)
    assert report.stream_cpu_ms(report.streamed[3])[0] == pytest.approx(101.0)
    assert report.stream_cpu_ratio(inline) == pytest.approx(101 / 3)
    assert report.streamed[3].tokens_received == 10 * 1000
    table = report.table()
    assert "| 1000 | picker-inline | 10 | 0 | +0.0 |" in table
    assert "33.67x (not met)" in table
    assert math.isnan(report.stream_cpu_ratio(picker_path("observer")))


def test_the_one_chunk_table_has_a_column_per_response_path() -> None:
    options = OverheadOptions()
    report = OverheadReport(options={"rate": 200.0, "large_service_ms": 100.0})
    summary = Summary(count=100, errors=0, p50_ms=1, p90_ms=2, p99_ms=3, rate=100)
    for scenario in ("1KB open", "220KB c20", "220KB c20 instant", "1KB peak"):
        report.results += [PathResult(scenario, path, summary) for path in options.paths]
    report.open_cpu = dict.fromkeys(options.paths, CpuUse(picker=0.1, envoy=0.05, seconds=5))
    report.open_requests = dict.fromkeys(options.paths, 1000)
    table = report.table()
    header = next(line for line in table.splitlines() if line.startswith("| added by"))
    assert header.count("|") == len(PICKER_PATHS) + 3
    assert "(default)" in header
    # Idle equals the picker paths' use here, so nothing is charged to their requests.
    assert "0.000 ms (met)" in table


@pytest.mark.e2e
@pytest.mark.slow
def test_the_streamed_scenario_runs_end_to_end(tmp_path: Path) -> None:
    options = OverheadOptions(
        scenarios="streamed",
        stream_tokens=(1, 20),
        stream_rate=30.0,
        stream_seconds=1.0,
        stream_rounds=1,
        token_gap_ms=2.0,
        backends=2,
        output=tmp_path,
    )
    report = run_overhead(options)
    assert not report.results  # the one-chunk scenarios were not asked for
    assert {(r.tokens, r.path) for r in report.streamed} == {
        (tokens, path) for tokens in (1, 20) for path in options.paths
    }
    for r in report.streamed:
        assert r.requests == 30, r  # 30 per second for 1 s
        assert r.errors == 0, r.error_statuses
        assert r.tokens_received == r.requests * r.tokens
        assert 0 < r.ttft_p50_ms <= r.total_p50_ms
        picker_ms, envoy_ms = report.stream_cpu_ms(r)
        assert envoy_ms > 0
        if r.path != ENVOY:
            assert picker_ms > 0, r
            # 20 tokens 2 ms apart: the stream lasts at least 38 ms.
            assert r.tokens == 1 or r.total_p50_ms >= 38
    table = report.table()
    assert "Streamed responses" in table
    assert "20-token stream / 1-token stream" in table
    written = json.loads((write_report(report, tmp_path).parent / "overhead.json").read_text())
    assert len(written["streamed"]) == 2 * len(options.paths)
    assert set(written["stream_cpu_ratio"]) == {picker_path(p) for p in PICKER_PATHS}
