"""`extproc bench soak`: growth after the warm-up, and a 20-second run against real processes,
probed with tracemalloc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.bench.soak import (
    Reading,
    SoakOptions,
    growth_after,
    render_markdown,
    run_soak,
    slope_per_minute,
    to_json,
)


def test_slope_is_per_minute() -> None:
    assert slope_per_minute([(0, 100), (60, 101), (120, 102)]) == pytest.approx(1.0)
    assert slope_per_minute([(0, 5)]) == 0.0


def test_growth_counts_only_after_the_warm_up() -> None:
    readings = [
        Reading(0, 100, 20),
        Reading(30, 150, 25),  # warm-up: caches filling
        Reading(60, 150, 25),
        Reading(90, 151, 26),
        Reading(120, 152, 27),
    ]
    growth = growth_after(readings, 60)
    assert growth is not None
    assert growth.since_seconds == 60
    assert growth.rss_mb == pytest.approx(2)
    assert growth.fds == 2
    assert growth.rss_mb_per_minute == pytest.approx(2.0)
    assert growth_after(readings, 200) is None


def test_warm_up_is_at_most_half_the_run() -> None:
    assert SoakOptions(minutes=4, warmup_minutes=5).warmup_seconds == 120
    with pytest.raises(ValueError, match="positive"):
        SoakOptions(minutes=0)


@pytest.mark.e2e
@pytest.mark.slow
def test_twenty_second_soak_with_tracemalloc(tmp_path: Path) -> None:
    options = SoakOptions(
        minutes=1 / 3,
        rate=10,
        interval=4,
        warmup_minutes=0.1,
        pods=2,
        tracemalloc=True,
        output=tmp_path,
    )
    report = run_soak(options)
    assert report.sent == 200
    assert report.failed == 0, report.failures
    assert len(report.readings) >= 5
    assert all(r.rss_mb > 10 and r.fds > 3 for r in report.readings)
    assert report.growth is not None
    assert report.top_allocations, "the probe's snapshots were not diffed"
    assert report.object_growth
    assert "| minute | picker RSS MB | open fds |" in render_markdown(report)
    json.dumps(to_json(report))
