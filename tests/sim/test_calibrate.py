"""The simulator against published vLLM runs (extproc/sim/calibration/*.json), in virtual time."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.sim import calibrate
from extproc.sim.calibrate import Case, replay
from extproc.sim.profiles import PROFILES

CASES = calibrate.load_cases()


def test_cases_are_stored_with_their_sources() -> None:
    assert len(CASES) >= 7
    for case in CASES:
        assert case.source.get("url", "").startswith("https://")
        assert case.engine and case.hardware and case.model and case.published
        assert PROFILES[case.profile].generation == case.generation


@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_simulated_metrics_within_band_of_published(case: Case) -> None:
    comparison = calibrate.Comparison(case, replay(case))
    assert comparison.failures() == []


def test_replay_is_deterministic() -> None:
    case = next(c for c in CASES if c.case_id == "lambda-v054-h100-8b-n80")
    assert replay(case) == replay(case)


def _case(**changes: object) -> Case:
    base = Case.from_json(
        {
            "id": "t",
            "title": "t",
            "source": {"url": "https://example.invalid"},
            "engine": "e",
            "generation": "v0.5",
            "hardware": "h",
            "model": "m",
            "profile": "h100-8b-v05",
            "requests": {"count": 10, "input_len": 1000, "output_len": 2},
            "published": {"ttft_mean_ms": 1.0},
        }
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_per_request_cost_delays_a_burst() -> None:
    # Ten prompts at once: every first token waits for the ten requests' set-up.
    with_cost = replay(_case()).ttft_mean_ms
    without = replay(_case(profile_overrides={"per_request_ms": 0.0})).ttft_mean_ms
    per_request = PROFILES["h100-8b-v05"].per_request_ms
    assert with_cost - without == pytest.approx(10 * per_request, rel=1e-6)


def test_per_sequence_cost_slows_big_batches() -> None:
    small = _case(input_lens=(10,) * 4, output_lens=(200,) * 4)
    big = _case(input_lens=(10,) * 256, output_lens=(200,) * 256)
    zero = {"per_seq_us": 0.0}

    def gap(case: Case) -> float:
        return (
            replay(case).tpot_median_ms
            - replay(dataclasses.replace(case, profile_overrides=zero)).tpot_median_ms
        )

    per_seq_ms = PROFILES["h100-8b-v05"].per_seq_us / 1000
    assert gap(small) == pytest.approx(4 * per_seq_ms, rel=0.05)
    assert gap(big) == pytest.approx(256 * per_seq_ms, rel=0.05)


def test_v0_scheduler_runs_prefill_only_steps() -> None:
    # A long decode and a burst of prompts arriving later: with V0 (no chunked prefill) the
    # decode stalls for whole prefill steps, so its TPOT grows; V1 mixes them into one step.
    lens = {"input_lens": (100, 2000, 2000, 2000), "output_lens": (400, 2, 2, 2)}
    v0 = _case(**lens, profile="h100-8b-v05")
    v1 = _case(
        **lens,
        profile="h100-8b-v05",
        profile_overrides={"mixed_prefill": True},
    )
    # All arrive at once; the V0 step admits whole prompts within 2048 tokens, so the three
    # 2000-token prompts take three prefill-only steps (the first also holds the 100 one).
    v0_ttft = replay(v0).ttft_p99_ms
    v1_ttft = replay(v1).ttft_p99_ms
    assert v0_ttft != v1_ttft
    prefill_step = 1000 * PROFILES["h100-8b-v05"].linear_seconds(2000)
    assert v0_ttft > 3 * prefill_step
