"""`extproc bench tenants`: the summaries, the report, and one tiny run of all three scenarios.

Nothing here asserts on wall-clock performance: the machine is shared, so only the report's
structure and what the picker must do whatever the timing (refuse the flood with fair sharing on)
are checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from extproc.bench.tenants import (
    NOISY,
    SCENARIOS,
    Outcome,
    ScenarioResult,
    TenantsOptions,
    picker_config,
    ratios,
    render_markdown,
    run_tenants,
    steady_p90_ms,
    summarize_tenant,
    tenant_key,
    write_report,
)
from extproc.config import load_config
from extproc.tenancy.policy import key_digest


def _ok(tenant: str, ttft: float, tokens: int = 10) -> Outcome:
    return Outcome(tenant, 200, "", 0.0, ttft, ttft + 1, tokens)


def test_summarize_tenant_counts_refusals_apart_from_failures() -> None:
    outcomes = [
        _ok("a", 0.1),
        _ok("a", 0.3),
        _ok("a", 2.0),
        Outcome("a", 429, "queue_full", 0.0, None, 0.0, 0),
        Outcome("a", 429, "queue_timeout", 0.0, None, 5.0, 0),
        Outcome("a", 0, "unfinished", 0.0, None, 9.0, 0),
        _ok("b", 9.0),
    ]
    result = summarize_tenant("a", outcomes, rate=2.0, span=10.0, slo_ms=1000)
    assert (result.sent, result.ok, result.refused, result.failed) == (6, 3, 2, 1)
    assert result.refusals == {"queue_full": 1, "queue_timeout": 1}
    assert result.failures == {"unfinished": 1}
    assert result.ttft_p50_ms == pytest.approx(300)
    assert result.ttft_p90_ms == pytest.approx(2000)
    assert result.output_tokens_per_s == pytest.approx(3.0)
    assert result.slo_requests_per_s == pytest.approx(0.2)  # two of three within 1 s
    assert math.isnan(result.queue_wait_mean_ms)


def test_ratios_compare_well_behaved_tenants_with_no_flood() -> None:
    def scenario(key: str, flood: bool, steady_ttft: float) -> ScenarioResult:
        outcomes = [_ok(NOISY, 5.0), *(_ok("s", steady_ttft) for _ in range(10))]
        tenants = tuple(
            summarize_tenant(name, outcomes, rate=1.0, span=1.0, slo_ms=1000)
            for name in (NOISY, "s")
        )
        return ScenarioResult(
            key, key, flood, True, tenants, steady_p90_ms(outcomes), 1.0, 0.0, 0.0
        )

    together, worst = ratios(
        [scenario("a", False, 0.2), scenario("b", True, 2.0), scenario("c", True, 0.25)]
    )
    assert together == pytest.approx({"b": 10.0, "c": 1.25})
    assert worst == pytest.approx({"b": 10.0, "c": 1.25})


def test_picker_config_is_valid(tmp_path: Path) -> None:
    options = TenantsOptions(tenants=3)
    path = tmp_path / "picker.yaml"
    path.write_text(yaml.safe_dump(picker_config(options, fair_sharing=False)))
    config = load_config(path)
    assert config.tenancy.enabled and not config.tenancy.fair_sharing
    assert config.tenancy.identity == ("api-key",)
    assert set(config.tenancy.tenants) == {NOISY, "steady-1", "steady-2"}
    digests = {t.api_keys[0] for t in config.tenancy.tenants.values()}
    assert digests == {key_digest(tenant_key(n)) for n in config.tenancy.tenants}
    assert config.scheduling.saturation_requests == options.saturation_requests


@pytest.mark.slow
def test_tiny_run(tmp_path: Path) -> None:
    """Every scenario end to end on one simulated server: a few seconds of load each."""
    options = TenantsOptions(
        pods=1,
        saturation_requests=2,
        tenants=3,
        seconds=4.0,
        max_requests=200,
        prompt_tokens=(100, 200),
        output_tokens=(4, 8),
        queue_timeout_seconds=0.5,
        max_queued_per_tenant=4,
        calibrate_seconds=2.0,
        drain_seconds=20.0,
        output=tmp_path,
    )
    report = run_tenants(options)

    assert [s.key for s in report.scenarios] == [s.key for s in SCENARIOS]
    assert report.capacity > 0
    for s in report.scenarios:
        assert [t.tenant for t in s.tenants] == list(options.names)
        for t in s.tenants:
            assert t.sent == t.ok + t.refused + t.failed
    for key in ("c", "d"):
        flooded = report.scenario(key).tenants[0]
        assert flooded.tenant == NOISY
        # The flood overloads one server with two slots, so the fair queue must turn some away.
        assert flooded.refused > 0
        assert set(flooded.refusals) <= {"queue_full", "queue_timeout"}
    headroom = yaml.safe_load((tmp_path / "picker-d.yaml").read_text())["tenancy"]
    assert headroom["headroom_requests"] == options.headroom_requests > 0
    # Fair sharing off: nothing is queued in the picker, so nothing is refused for it.
    assert report.scenario("b").tenants[0].refused == 0
    assert set(report.ratio) == {"b", "c", "d"}

    paths = write_report(report)
    data = json.loads(paths[0].read_text())
    assert [s["key"] for s in data["scenarios"]] == ["a", "b", "c", "d"]
    assert {"capacity", "ratio", "worst_tenant_ratio", "target_met"} <= set(data)
    table = render_markdown(report)
    assert "| (c) flood, fair sharing on | noisy |" in table
    assert paths[1].read_text().endswith(table)
