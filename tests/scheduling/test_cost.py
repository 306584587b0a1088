"""The cost model: its equations, the scorer with its hot-spot guard, and the online learner
on synthetic metric sequences."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest

from extproc.scheduling.cost import CostScorer, cache_pressure, hot_spot
from extproc.scheduling.cost_learner import CostLearner
from extproc.scheduling.cost_model import (
    PRIOR_STEP_SECONDS,
    PRIOR_TOKENS_PER_SECOND,
    CostModel,
    CostParameters,
    EndpointCost,
)
from extproc.scheduling.strategies import Strategies
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.state.inflight import Load
from extproc.state.snapshot import Endpoint, Snapshot
from extproc.state.stats import EndpointStats, LoraState
from tests.scheduling.build import addr, cand

MODEL = CostModel()
RATE = PRIOR_TOKENS_PER_SECOND
STEP = PRIOR_STEP_SECONDS
PER_QUEUED = 1024 / RATE + STEP  # a typical queued request, uncached


def _req(tokens: int = 0, *, blocks: int = 0, lora: str | None = None) -> SchedulingRequest:
    return SchedulingRequest(
        model="m", prompt_tokens=tokens, block_hashes=tuple(range(blocks)), lora=lora
    )


@pytest.mark.parametrize(
    ("request_", "candidate", "expected"),
    [
        pytest.param(_req(), cand(0), STEP, id="idle-empty-prompt-one-step"),
        pytest.param(_req(5000), cand(0), 5000 / RATE + STEP, id="idle-uncached"),
        pytest.param(
            _req(5000, blocks=100),
            cand(0, prefix=100),
            3400 / RATE + STEP,
            id="prefix-cached-1600-tokens",
        ),
        pytest.param(
            _req(1000, blocks=100),
            cand(0, prefix=100),
            STEP,
            id="fully-cached-still-one-step",
        ),
        pytest.param(
            _req(5000, blocks=100),
            cand(0, waiting=2, running=10, prefix=100),
            2 * PER_QUEUED + 3400 / RATE + STEP + 10 / RATE,
            id="queue-prefill-interference",
        ),
        pytest.param(
            # The scrape's 3 waiting requests hold 2 of ours that the backlog already counts.
            _req(),
            cand(0, waiting=3, backlog=0.2, ours=2),
            0.2 + PER_QUEUED + STEP,
            id="queue-our-waiting-prompts-count-once",
        ),
        pytest.param(
            # More of ours predicted waiting than the scrape shows: the backlog alone.
            _req(),
            cand(0, waiting=1, backlog=0.2, ours=3),
            0.2 + STEP,
            id="queue-never-below-our-backlog",
        ),
        pytest.param(
            _req(20000),
            cand(0, running=192),
            20000 / RATE + 3 * STEP + 3 * 192 / RATE,
            id="chunked-three-steps",
        ),
        pytest.param(
            _req(0),
            cand(0, waiting=1, picked=2, backlog=0.05),
            0.05 + PER_QUEUED + STEP,
            id="our-prefill-backlog-then-the-scraped-queue",
        ),
        pytest.param(
            _req(0),
            cand(0, requests=4, stats=False, backlog=0.03),
            0.03 + STEP,
            id="no-stats-our-backlog-only",
        ),
        pytest.param(
            _req(5000),
            cand(0, kv=0.9, gpu_blocks=100),
            5000 / RATE + STEP + 256 * STEP,
            id="kv-full-waits-a-whole-decode",
        ),
        pytest.param(
            _req(10_000),
            cand(0, kv=0.5, gpu_blocks=1000),
            10_000 / RATE + 2 * STEP + (10_000 / 16 - 500) / 500 * 256 * STEP,
            id="kv-short-waits-for-its-share",
        ),
        pytest.param(
            # 493.75 new blocks fit into 500 free: the blocks its answer grows into are not
            # needed before its first token (vLLM allocates them a step at a time).
            _req(7_900),
            cand(0, kv=0.5, gpu_blocks=1000),
            7_900 / RATE + STEP,
            id="kv-the-prompt-fits-its-output-is-not-reserved",
        ),
        pytest.param(
            _req(7_000),
            cand(0, kv=0.5, gpu_blocks=1000, running=10),
            7_000 / RATE
            + STEP
            + 10 / RATE
            # 437.5 new blocks, and 10 running requests grow by 128 tokens (8 blocks) each,
            # into 500 free: 17.5 blocks short.
            + (7_000 / 16 + 10 * 8 - 500) / 500 * 256 * STEP,
            id="kv-running-requests-grow-into-the-free-blocks",
        ),
        pytest.param(
            _req(10_000, blocks=500),
            cand(0, kv=0.5, gpu_blocks=1000, prefix=500),
            2000 / RATE + STEP,
            id="kv-cached-prefix-fits",
        ),
        pytest.param(
            # One of ours sent since the scrape, computed already (no backlog left): it needs no
            # blocks we do not see, so our 100 new blocks fit into the 100 free.
            _req(11_600, blocks=625),
            cand(0, kv=0.9, gpu_blocks=1000, prefix=625, picked=1),
            1600 / RATE + STEP,
            id="kv-ours-sent-since-the-scrape-are-our-backlog",
        ),
        pytest.param(
            # 20 ms of ours still to compute (1,000 tokens, 62.5 blocks) and one waiting request
            # not ours (a typical 1,024-token prompt, 64 blocks) are ahead of our 100 new blocks:
            # 126.5 short of 900 held.
            _req(11_600, blocks=625),
            cand(0, kv=0.9, gpu_blocks=1000, prefix=625, picked=1, backlog=0.02, waiting=1),
            0.02 + PER_QUEUED + 1600 / RATE + STEP + (62.5 + 64 + 100 - 100) / 900 * 256 * STEP,
            id="kv-our-backlog-and-others-waiting-are-ahead",
        ),
        pytest.param(
            _req(0, lora="sql"),
            cand(0, lora=LoraState(2, frozenset({"sql"}))),
            STEP,
            id="lora-active",
        ),
        pytest.param(
            _req(0, lora="sql"),
            cand(0, lora=LoraState(2, frozenset({"x"}))),
            STEP + 0.1,
            id="lora-free-slot-loads",
        ),
        pytest.param(
            _req(0, lora="sql"),
            cand(0, lora=LoraState(1, frozenset({"x"}), frozenset({"sql"}))),
            STEP + 1.1,
            id="lora-waiting-for-slot",
        ),
        pytest.param(
            _req(0, lora="sql"),
            cand(0, lora=LoraState(1, frozenset({"x"}))),
            STEP + 1.1,
            id="lora-full-must-load",
        ),
    ],
)
def test_predicted_ttft(request_: SchedulingRequest, candidate: Candidate, expected: float) -> None:
    assert MODEL.predict(request_, candidate).total == pytest.approx(expected)


@pytest.mark.parametrize(
    ("candidate", "waits"),
    [
        pytest.param(cand(0), 0.0, id="idle-admitted-at-once"),
        # Work ahead that fits in one step's token budget (8192 tokens) shares the step.
        pytest.param(cand(0, backlog=0.1), 0.0, id="inside-the-step-budget"),
        pytest.param(cand(0, backlog=0.5), 0.5 - 8192 / RATE, id="behind-a-step-of-work"),
        pytest.param(
            cand(0, kv=0.9, gpu_blocks=1000),
            (5000 / 16 - 100) / 900 * 256 * STEP,
            id="waits-for-kv-blocks",
        ),
    ],
)
def test_work_and_the_wait_before_admission(candidate: Candidate, waits: float) -> None:
    request = _req(5000)
    work, predicted = MODEL.work(request, candidate)
    prediction = MODEL.predict(request, candidate)
    assert work == pytest.approx(prediction.prefill_seconds + prediction.interference_seconds)
    assert predicted == pytest.approx(waits)


def test_learned_estimates_and_hit_rate_change_the_prediction() -> None:
    model = CostModel({addr(0): EndpointCost(10_000.0, 0.02, 0.5, samples=3)})
    got = model.predict(_req(1000), cand(0, waiting=1)).total
    assert got == pytest.approx((512 / 10_000 + 0.02) + (1000 / 10_000 + 0.02))
    # Other endpoints keep the prior.
    assert model.estimate(addr(1)) == EndpointCost()


@pytest.mark.parametrize(
    ("candidates", "winner"),
    [
        pytest.param([cand(0, waiting=3), cand(1)], 1, id="shorter-queue"),
        pytest.param(
            [cand(0, prefix=500), cand(1, waiting=1)], 0, id="long-prefix-beats-one-queued"
        ),
        pytest.param([cand(0, prefix=500, waiting=20), cand(1)], 1, id="long-queue-beats-prefix"),
        pytest.param(
            [
                cand(0, lora=LoraState(1, frozenset({"x"}))),
                cand(1, waiting=5, lora=LoraState(1, frozenset({"sql"}))),
            ],
            1,
            id="adapter-active-with-queue-beats-must-load",
        ),
    ],
)
def test_cost_strategy_picks_lowest_ttft(candidates: list[Candidate], winner: int) -> None:
    lora = "sql" if any(c.stats and c.stats.lora for c in candidates) else None
    request = _req(8000, blocks=500, lora=lora)
    ranked = Strategies().get("cost").schedule(request, candidates)
    assert ranked.order[0].address == addr(winner)
    assert max(ranked.scores.values()) == pytest.approx(1.0)


def test_cost_scores_are_ratios_of_cost() -> None:
    # An empty prompt: TTFT one step (plus the queue), work one step, weighted 1 by default.
    scores = CostScorer().score(_req(0), [cand(0), cand(1, waiting=1)])
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx(2 * STEP / (PER_QUEUED + 2 * STEP))


@pytest.mark.parametrize(
    ("work_weight", "backlog", "winner"),
    [
        # Endpoint 0 holds the group's 4,000-token prefix but has 90 ms of backlog; endpoint
        # 1 is idle and would compute the whole prompt (80 ms). Greedy TTFT moves the request
        # (and copies the prefix); counting the engine time it takes keeps it where it hits.
        pytest.param(0.0, 0.090, 1, id="greedy-ttft-copies-the-prefix"),
        pytest.param(1.0, 0.090, 0, id="weighted-work-keeps-it-on-the-prefix"),
        # A long enough backlog is worth leaving, weighted or not.
        pytest.param(1.0, 0.200, 1, id="weighted-work-still-leaves-a-long-backlog"),
    ],
)
def test_work_weight_trades_ttft_for_engine_time(
    work_weight: float, backlog: float, winner: int
) -> None:
    request = _req(4000, blocks=250)
    candidates = [cand(0, prefix=250, backlog=backlog), cand(1)]
    scorer = CostScorer(parameters=CostParameters(work_weight=work_weight))
    scores = scorer.score(request, candidates)
    assert scores[winner] == 1.0
    assert scores[1 - winner] < 1.0


@pytest.mark.parametrize(
    ("tolerance", "winner"),
    [
        # Endpoint 0 is learned 5% faster but its KV cache is 60% busy; endpoint 1's is 10%.
        pytest.param(0.1, 1, id="near-tie-goes-to-free-kv-cache"),
        pytest.param(0.0, 0, id="no-tolerance-strict-cost"),
        pytest.param(0.01, 0, id="outside-a-tight-tolerance"),
    ],
)
def test_near_ties_go_to_the_freest_kv_cache(tolerance: float, winner: int) -> None:
    model = CostModel(
        {addr(0): EndpointCost(tokens_per_second=52_500.0), addr(1): EndpointCost()},
        parameters=CostParameters(tie_tolerance=tolerance),
    )
    candidates = [cand(0, kv=0.6), cand(1, kv=0.1), cand(2, waiting=3)]
    scores = CostScorer(lambda: model).score(_req(4000), candidates)
    assert max(range(2), key=lambda i: scores[i]) == winner
    # A tie never ranks below an endpoint outside it (endpoint 2 has a queue).
    assert min(scores[:2]) > scores[2]


@pytest.mark.parametrize(
    ("candidates", "winner"),
    [
        # Endpoint 0 holds the one block of chat template every prompt starts with, and another
        # group's system prompt; endpoint 1 is empty. A cold prompt belongs on the empty one.
        pytest.param(
            [cand(0, gpu_blocks=1000, cached=120, prefix=1), cand(1, gpu_blocks=1000)],
            1,
            id="cold-prompt-to-the-empty-cache",
        ),
        pytest.param(
            [cand(0, gpu_blocks=1000, cached=900, prefix=1), cand(1, gpu_blocks=1000, cached=600)],
            1,
            id="to-the-less-filled-cache",
        ),
        pytest.param(
            [
                cand(0, kv=0.2, gpu_blocks=1000, cached=1000),
                cand(1, kv=0.6, gpu_blocks=1000, cached=1000),
            ],
            0,
            id="every-cache-full-running-requests-decide",
        ),
        # Caches half full, one a little more: the less taken wins however close the two are.
        pytest.param(
            [
                cand(0, kv=0.55, gpu_blocks=1000, cached=600),
                cand(1, kv=0.5, gpu_blocks=1000, cached=560),
            ],
            1,
            id="to-the-less-filled-of-two-half-full-caches",
        ),
        # Outside the tie (endpoint 0 holds 100 of the prompt's blocks), a full cache still wins.
        pytest.param(
            [cand(0, gpu_blocks=1000, cached=900, prefix=100), cand(1, gpu_blocks=1000)],
            0,
            id="a-real-prefix-is-no-tie",
        ),
    ],
)
def test_near_ties_go_to_the_least_taken_cache(candidates: list[Candidate], winner: int) -> None:
    scores = CostScorer(lambda: MODEL).score(_req(2_000, blocks=125), candidates)
    assert max(range(len(candidates)), key=lambda i: scores[i]) == winner


def test_a_slightly_cheaper_endpoint_in_a_tie_does_not_outweigh_a_fuller_cache() -> None:
    """Endpoint 0 is learned 2 % faster, and its cache a little fuller (pressure 0.575 against
    0.53): the tie goes to the emptier cache, where the new group's later requests will fit."""
    model = CostModel({addr(0): EndpointCost(tokens_per_second=51_000.0), addr(1): EndpointCost()})
    candidates = [
        cand(0, kv=0.55, gpu_blocks=1000, cached=600),
        cand(1, kv=0.5, gpu_blocks=1000, cached=560),
    ]
    scores = CostScorer(lambda: model).score(_req(2_000, blocks=125), candidates)
    assert scores[1] > scores[0]


def test_cache_pressure_is_running_and_held_blocks() -> None:
    assert cache_pressure(cand(0, kv=0.4, gpu_blocks=1000, cached=800)) == pytest.approx(0.6)
    # Without the block count (no prefix index), running requests alone, halved.
    assert cache_pressure(cand(0, kv=0.4)) == pytest.approx(0.2)
    assert cache_pressure(cand(0, stats=False)) == 0.0


@pytest.mark.parametrize(
    ("loads", "hot"),
    [
        pytest.param([0, 64], False, id="difference-at-threshold"),
        pytest.param([0, 65], True, id="difference-over-threshold"),
        pytest.param([100, 170], True, id="over-ratio"),
        pytest.param([100, 149], False, id="under-ratio"),
        pytest.param([200, 280], False, id="big-but-balanced"),
    ],
)
def test_hot_spot_guard(loads: list[int], hot: bool) -> None:
    candidates = [cand(i, waiting=n / 2, running=n / 2) for i, n in enumerate(loads)]
    assert hot_spot(candidates, CostParameters()) is hot


def test_hot_spot_falls_back_to_load() -> None:
    # Endpoint 0 holds the whole prompt but 100 requests more than endpoint 1: the model would
    # keep it (a huge prompt), the guard ranks by load instead.
    request = _req(200_000, blocks=12_500)
    candidates = [cand(0, prefix=12_500, running=100), cand(1)]
    assert CostScorer().score(request, candidates) == [0.0, 1.0]
    relaxed = CostParameters(hot_spot_absolute=1000)
    assert CostScorer(parameters=relaxed).score(request, candidates)[0] == 1.0


def test_scorer_reads_the_current_model_each_time() -> None:
    models = [CostModel(), CostModel({addr(1): EndpointCost(tokens_per_second=1000.0)})]
    scorer = CostScorer(lambda: models[0])
    candidates = [cand(0), cand(1)]
    assert scorer.score(_req(2000), candidates) == [1.0, 1.0]
    models.reverse()
    assert scorer.score(_req(2000), candidates)[1] < 0.1


# --- the learner on synthetic metric sequences -------------------------------------------


def _engine(
    *,
    seconds: float,
    prefill_per_s: float = 0.0,
    gen_per_s: float = 0.0,
    hits_per_s: float = 0.0,
    waiting: float = 0.0,
    running: float = 0.0,
    start: EndpointStats | None = None,
    every: float = 0.05,
) -> Iterator[EndpointStats]:
    """Scrapes of one endpoint every 50 ms with steady rates (tokens/s)."""
    s = start or EndpointStats(read_at=100.0)
    for _ in range(round(seconds / every)):
        s = EndpointStats(
            read_at=s.read_at + every,
            waiting=waiting,
            running=running,
            prompt_tokens=s.prompt_tokens + (prefill_per_s + hits_per_s) * every,
            prefix_cache_hits=s.prefix_cache_hits + hits_per_s * every,
            prefix_cache_queries=s.prefix_cache_queries + (prefill_per_s + hits_per_s) * every,
            generation_tokens=s.generation_tokens + gen_per_s * every,
        )
        yield s


def _feed(learner: CostLearner, scrapes: Iterator[EndpointStats], address: str = addr(0)) -> None:
    for stats in scrapes:
        learner.update(Snapshot.of([Endpoint(address, frozenset({"m"}), True, stats=stats)]))


def test_learns_a_saturated_engines_throughput() -> None:
    learner = CostLearner()
    # An A100-class engine: 15k prefill + 5k decode tokens/s, always with a queue.
    _feed(
        learner, _engine(seconds=20, prefill_per_s=15_000, gen_per_s=5_000, waiting=8, running=64)
    )
    est = learner.current().estimate(addr(0))
    assert est.tokens_per_second == pytest.approx(20_000, rel=0.02)
    assert est.samples > 10


def test_learns_step_time_from_decode_only_windows() -> None:
    learner = CostLearner()
    # 32 running, a 12 ms step: 32 / 0.012 tokens/s, no queue, no prefill.
    _feed(learner, _engine(seconds=20, gen_per_s=32 / 0.012, running=32))
    est = learner.current().estimate(addr(0))
    assert est.step_seconds == pytest.approx(0.012, rel=0.02)
    # Unsaturated and slower than the prior: throughput is not learned from it.
    assert est.tokens_per_second == PRIOR_TOKENS_PER_SECOND


def test_unsaturated_throughput_only_raises_the_estimate() -> None:
    learner = CostLearner()
    _feed(learner, _engine(seconds=20, prefill_per_s=90_000, running=4))
    assert learner.current().estimate(addr(0)).tokens_per_second == pytest.approx(90_000, rel=0.02)


def test_learns_the_hit_rate() -> None:
    learner = CostLearner()
    _feed(learner, _engine(seconds=20, prefill_per_s=1000, hits_per_s=3000, running=2))
    assert learner.current().estimate(addr(0)).hit_rate == pytest.approx(0.75, rel=0.02)


def test_idle_endpoint_keeps_the_prior() -> None:
    learner = CostLearner()
    _feed(learner, _engine(seconds=5))
    assert learner.current().estimate(addr(0)) == EndpointCost()


def test_unlearned_endpoints_take_the_fleets_mean_speed() -> None:
    # Endpoint 0 served and was learned (20k tokens/s, a 25% hit rate); endpoint 1 never
    # served. It is taken to be as fast as the fleet, with an empty cache, so a cold prompt
    # costs the same on both and the idle endpoint is not starved by a pessimistic prior.
    learner = CostLearner()
    _feed(learner, _engine(seconds=10, prefill_per_s=15_000, hits_per_s=5_000, waiting=3))
    learned = learner.current().estimate(addr(0))
    assert learned.samples > 0 and learned.hit_rate > 0.1
    unknown = learner.current().estimate(addr(1))
    assert unknown.tokens_per_second == learned.tokens_per_second
    assert unknown.step_seconds == learned.step_seconds
    assert (unknown.hit_rate, unknown.samples) == (0.0, 0)
    scores = CostScorer(learner.current).score(_req(4000), [cand(0), cand(1)])
    assert scores == [1.0, 1.0]


def _prefills(
    start: EndpointStats, *, tokens: float, seconds: float, at: float, queries: float = 0.0
) -> EndpointStats:
    """`start` plus one finished request that computed `tokens` in `seconds` of prefill."""
    return dataclasses.replace(
        start,
        read_at=start.read_at + at,
        prefill_requests=start.prefill_requests + 1,
        prefill_seconds=start.prefill_seconds + seconds,
        prefill_computed_requests=start.prefill_computed_requests + 1,
        prefill_computed_tokens=start.prefill_computed_tokens + tokens,
        prefix_cache_queries=start.prefix_cache_queries + queries,
    )


def test_the_first_prefill_replaces_a_ten_times_wrong_prior_and_sets_its_types_speed() -> None:
    """An L4 computes ~10k tokens/s, a fifth of the H100 prior: its first finished prefill
    moves its estimate all the way (a moving average would keep 4x the truth for a dozen
    requests), and an L4 that has computed no prompt yet is taken for as fast as that one."""
    learner = CostLearner()
    s = EndpointCost().step_seconds
    start = EndpointStats(read_at=100.0, prefill_requests=1, prefill_computed_requests=1)
    # Endpoint 1 has answered queries (its hit rate and step are learned) but no prefill.
    idle = dataclasses.replace(start, prefix_cache_queries=10.0)
    scrapes = [
        (start, idle),
        (
            _prefills(start, tokens=2000, seconds=0.2 + s, at=1.0),
            _prefills(idle, tokens=0, seconds=0.0, at=1.0, queries=10.0),
        ),
    ]
    for first, second in scrapes:
        learner.update(
            Snapshot.of(
                [
                    Endpoint(addr(0), frozenset({"m"}), True, stats=first, accelerator="l4"),
                    Endpoint(addr(1), frozenset({"m"}), True, stats=second, accelerator="l4"),
                ]
            )
        )
    model = learner.current()
    assert model.estimate(addr(0)).tokens_per_second == pytest.approx(10_000, rel=0.01)
    assert model.estimate(addr(0)).rate_samples == 1
    unrated = model.estimate(addr(1))
    assert unrated.samples == 1 and unrated.rate_samples == 0
    assert unrated.tokens_per_second == pytest.approx(10_000, rel=0.01)
    # The second sample takes half the way.
    later = _prefills(scrapes[1][0], tokens=2000, seconds=0.1 + s, at=1.0)
    learner.update(
        Snapshot.of([Endpoint(addr(0), frozenset({"m"}), True, stats=later, accelerator="l4")])
    )
    assert learner.current().estimate(addr(0)).tokens_per_second == pytest.approx(15_000, rel=0.01)


def test_first_token_samples_are_rough_and_the_first_finished_prefill_replaces_them() -> None:
    """Before any request finishes, a first token's time stands in for its prefill, but it also
    holds the rest of a step under way: such samples move the estimate 20 % of the way, and
    the first finished prefill replaces what they taught."""
    learner = CostLearner()
    s = EndpointCost().step_seconds
    start = EndpointStats(read_at=100.0)
    # 2,000 prompt tokens reached their first token in 0.1 s + a step: 20k tokens/s, roughly.
    rough = dataclasses.replace(
        start, read_at=101.0, prompt_tokens=2000, first_tokens=1, first_token_seconds=0.1 + s
    )
    _feed(learner, iter([start, rough]))
    estimate = learner.current().estimate(addr(0))
    assert (estimate.rough_samples, estimate.rate_samples) == (1, 0)
    assert estimate.tokens_per_second == pytest.approx(50_000 + 0.2 * (20_000 - 50_000))
    finished = _prefills(rough, tokens=2000, seconds=0.2 + s, at=1.0)
    _feed(learner, iter([finished]))
    assert learner.current().estimate(addr(0)).tokens_per_second == pytest.approx(10_000, rel=0.01)


def test_an_endpoint_with_only_rough_samples_takes_its_measured_peers_speed() -> None:
    """Endpoint 0 finished a prefill (10k tokens/s, measured); endpoint 1 has only first-token
    samples, which move a 50k prior a fifth of the way: alone, they would leave it looking
    three times faster than endpoint 0, and every prompt would leave endpoint 0's cache for it.
    Neither declares a GPU type: they are one group."""
    learner = CostLearner()
    s = EndpointCost().step_seconds
    start = EndpointStats(read_at=100.0, prefill_requests=1, prefill_computed_requests=1)
    rough_start = EndpointStats(read_at=100.0)
    rough = dataclasses.replace(
        rough_start, read_at=101.0, prompt_tokens=2000, first_tokens=1, first_token_seconds=0.2 + s
    )
    for first, second in (
        (start, rough_start),
        (_prefills(start, tokens=2000, seconds=0.2 + s, at=1.0), rough),
    ):
        learner.update(
            Snapshot.of(
                [
                    Endpoint(addr(0), frozenset({"m"}), True, stats=first),
                    Endpoint(addr(1), frozenset({"m"}), True, stats=second),
                ]
            )
        )
    model = learner.current()
    assert model.estimate(addr(0)).tokens_per_second == pytest.approx(10_000, rel=0.01)
    assert model.estimate(addr(1)).rough_samples == 1
    assert model.estimate(addr(1)).tokens_per_second == pytest.approx(10_000, rel=0.01)


def test_rough_samples_alone_are_pooled_across_the_group() -> None:
    """Before any prefill has finished, the group's endpoints read the mean of their rough
    speeds: one that happened to be sampled is not set apart from the rest."""
    learner = CostLearner()
    s = EndpointCost().step_seconds
    idle = EndpointStats(read_at=100.0)
    rough = dataclasses.replace(
        idle, read_at=101.0, prompt_tokens=2000, first_tokens=1, first_token_seconds=0.2 + s
    )
    for first, second in ((idle, idle), (rough, dataclasses.replace(idle, read_at=101.0))):
        learner.update(
            Snapshot.of(
                [
                    Endpoint(addr(0), frozenset({"m"}), True, stats=first),
                    Endpoint(addr(1), frozenset({"m"}), True, stats=second),
                ]
            )
        )
    model = learner.current()
    moved = 50_000 + 0.2 * (10_000 - 50_000)
    assert model.estimate(addr(0)).tokens_per_second == pytest.approx(moved)
    assert model.estimate(addr(1)).tokens_per_second == pytest.approx(moved)


def test_a_restart_does_not_poison_the_estimates() -> None:
    learner = CostLearner()
    busy = list(_engine(seconds=10, prefill_per_s=20_000, waiting=3, running=8))
    _feed(learner, iter(busy))
    before = learner.current().estimate(addr(0)).tokens_per_second
    # Counters back to zero (a restarted server), then the same engine again.
    restarted = EndpointStats(read_at=busy[-1].read_at + 0.05)
    _feed(learner, iter([restarted]))
    assert learner.current().estimate(addr(0)).tokens_per_second == before
    _feed(learner, _engine(seconds=10, prefill_per_s=20_000, waiting=3, running=8, start=restarted))
    after = learner.current().estimate(addr(0)).tokens_per_second
    assert after == pytest.approx(20_000, rel=0.02)


def test_repeated_and_out_of_order_scrapes_are_ignored() -> None:
    learner = CostLearner()
    scrapes = list(_engine(seconds=3, prefill_per_s=20_000, waiting=3, running=8))
    for s in scrapes:
        _feed(learner, iter([s, s]))  # the same scrape seen twice (another endpoint changed)
    est = learner.current().estimate(addr(0))
    assert est.samples == 5  # 3 s in 0.5 s windows, after the first scrape opens one
    _feed(learner, iter([scrapes[0]]))  # older than the window: starts a new window
    assert learner.current().estimate(addr(0)) == est


def test_glitch_samples_are_dropped() -> None:
    learner = CostLearner()
    _feed(learner, _engine(seconds=5, prefill_per_s=1e9, waiting=3))
    assert learner.current().estimate(addr(0)).tokens_per_second == PRIOR_TOKENS_PER_SECOND


def test_departed_endpoints_are_forgotten_and_prompts_learned() -> None:
    learner = CostLearner()
    _feed(learner, _engine(seconds=2, prefill_per_s=20_000, waiting=3))
    assert addr(0) in learner.current().estimates
    learner.update(Snapshot.of([]))
    assert learner.current().estimates == {}
    for _ in range(50):
        learner.observe_usage(4000, 200)
    learner.observe_usage(0, 0)  # no usage: ignored
    mean = learner.current().mean_prompt_tokens
    assert mean is not None and math.isclose(mean, 4000, rel_tol=0.01)
    output = learner.current().mean_output_tokens
    assert output is not None and math.isclose(output, 200, rel_tol=0.02)


def test_learner_feeds_the_cost_strategy() -> None:
    learner = CostLearner()
    # Both learned: endpoint 0 a fast engine, endpoint 1 a slow one.
    fast = _engine(seconds=10, prefill_per_s=40_000, waiting=1)
    slow = _engine(seconds=10, prefill_per_s=2_000, waiting=1)
    for a, b in zip(fast, slow, strict=True):
        learner.update(
            Snapshot.of(
                [
                    Endpoint(addr(0), frozenset({"m"}), True, stats=a),
                    Endpoint(addr(1), frozenset({"m"}), True, stats=b),
                ]
            )
        )
    strategies = Strategies(cost_model=learner.current)
    request = _req(4000)
    candidates = [
        Candidate(Endpoint(addr(0), frozenset({"m"}), True), Load(1)),
        Candidate(Endpoint(addr(1), frozenset({"m"}), True), Load(0)),
    ]
    assert strategies.get("cost").schedule(request, candidates).order[0].address == addr(0)
