"""The cost model's learner: mutable, fed every new snapshot on the state side.

`CostLearner` learns per endpoint how fast the engine computes tokens, how long a step takes and
how often its prefix cache hits, from the deltas of vLLM's counters and histograms between
scrapes, and publishes a frozen `CostModel` (`extproc.scheduling.cost_model`) after each update.
Requests read only that model (`current`), never the learner.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from extproc.scheduling.cost_model import (
    PRIOR_STEP_SECONDS,
    PRIOR_TOKENS_PER_SECOND,
    CostModel,
    CostParameters,
    EndpointCost,
)
from extproc.state.snapshot import Snapshot
from extproc.state.stats import EndpointStats

# A window shorter than this is too noisy to learn from (scrapes come every 50 ms).
_MIN_WINDOW_SECONDS = 0.5
# Weight of a new window in the moving averages.
_ALPHA = 0.2
# Samples outside prior / 100 .. prior x 50 are counter glitches, not a GPU.
_RATE_BOUNDS = (PRIOR_TOKENS_PER_SECOND / 100, PRIOR_TOKENS_PER_SECOND * 50)
_STEP_BOUNDS = (0.0005, 1.0)
# No window moves an estimate more than this many single samples would (0.8^3: half the way).
_MAX_WEIGHT = 3.0
# A prefill whose time was below this share tokens (the rest steps' fixed part) is skipped.
_MIN_BUSY_SHARE = 0.25


@dataclass(slots=True)
class _Window:
    """Counters at the start of a window, and what held at every scrape inside it."""

    start: EndpointStats
    last_read_at: float
    always_queued: bool
    never_queued: bool
    always_decoding: bool
    running_sum: float
    scrapes: int


def _window(stats: EndpointStats) -> _Window:
    return _Window(
        start=stats,
        last_read_at=stats.read_at,
        always_queued=stats.waiting > 0,
        never_queued=stats.waiting == 0,
        always_decoding=stats.running > 0 and stats.waiting == 0,
        running_sum=stats.running,
        scrapes=1,
    )


def _ewma(old: float, sample: float, *, weight: float = 1.0, seen: float = math.inf) -> float:
    """Move `old` toward `sample` by `_ALPHA` per unit of evidence (a window, or each request
    finished in it, up to `_MAX_WEIGHT`): never all the way, since one window can mislead.

    `seen`: the units of evidence `old` rests on. While they are few, `old` moves to the mean of
    them and the sample instead (so the first sample replaces a prior, which may be ten times
    wrong); a moving average alone would take a dozen requests to forget it, and on a slow GPU,
    where a request finishes its prefill every few seconds, that is most of a minute."""
    units = max(weight, 1.0)
    alpha: float = 1.0 - math.pow(1.0 - _ALPHA, min(units, _MAX_WEIGHT))
    alpha = max(alpha, units / (seen + units))
    return old + alpha * (sample - old)


class CostLearner:
    """Learns `EndpointCost` per endpoint from successive snapshots. Call `update` from the
    state side whenever a new snapshot is stored; requests read `current()`.

    Per window of at least 0.5 s of one endpoint's scrapes:
    - prefill speed from the requests that finished in it, as vLLM's histograms report them
      (`request_prefill_time_seconds`, `request_prefill_kv_computed_tokens`): their mean
      computed tokens, plus the running decodes each of their steps carried, over their mean
      prefill time less the steps' fixed part. Light traffic teaches it as well as a queue does,
      in either direction, from whatever prior (`_speed`). Before the first request finishes
      (those histograms are observed at the end), windows where nothing waited teach it from
      `time_to_first_token_seconds` and the prompt counters the same way;
    - step time from `inter_token_latency_seconds`: the mean gap between a request's tokens,
      less the mean step's tokens (`iteration_tokens_total`) at the rate, is the step's fixed
      part (`_step_sample`);
    - where those histograms are missing (older servers) the counters stand in: computed tokens
      = d prompt_tokens - d prefix_cache_hits + d generation_tokens; with requests waiting at
      every scrape, computed tokens / dt is the engine's throughput, in any other window only a
      lower bound that can raise the estimate; with requests running and none waiting at every
      scrape, and decode tokens dominating, step = dt x mean running / d generated;
    - d hits / d queries is the prefix cache's hit rate.
    A counter that goes down (a restarted server) starts a new window and keeps the estimates.
    """

    def __init__(
        self,
        parameters: CostParameters | None = None,
        *,
        speeds: Mapping[str, float] | None = None,
    ) -> None:
        """`speeds`: accelerator -> prefill tokens per second, an optional starting estimate
        for endpoints of that type (config `fleet.speeds`): it only shortens the first seconds,
        since each endpoint's histograms correct it."""
        self._parameters = parameters or CostParameters()
        self._speeds = dict(speeds or {})
        self._accelerators: dict[str, str] = {}
        self._windows: dict[str, _Window] = {}
        self._estimates: dict[str, EndpointCost] = {}
        self._mean_prompt: float | None = None
        self._mean_output: float | None = None
        self._model = CostModel(parameters=self._parameters)

    def current(self) -> CostModel:
        """The latest frozen model (cheap: rebuilt on update, not per call)."""
        return self._model

    def observe_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Optional: a finished request's usage, to learn the typical prompt of queued requests
        and the typical output of running ones. Not needed on the decision path."""
        if prompt_tokens > 0:
            old = self._mean_prompt or self._parameters.mean_prompt_tokens
            self._mean_prompt = _ewma(old, float(prompt_tokens))
        if completion_tokens > 0:
            old = self._mean_output or self._parameters.mean_output_tokens
            self._mean_output = _ewma(old, float(completion_tokens))
        self._model = replace(
            self._model,
            mean_prompt_tokens=self._mean_prompt,
            mean_output_tokens=self._mean_output,
        )

    def update(self, snapshot: Snapshot) -> None:
        accelerators: dict[str, str] = {}
        for endpoint in snapshot.endpoints:
            accelerators[endpoint.address] = endpoint.accelerator
        self._accelerators = accelerators
        for endpoint in snapshot.endpoints:
            if endpoint.stats is not None:
                self._observe(endpoint.address, endpoint.stats)
        for gone in self._windows.keys() - accelerators.keys():
            del self._windows[gone]
            self._estimates.pop(gone, None)
        # Endpoints of no declared type form one group of their own: most fleets are one GPU
        # type, and an endpoint's own finished prefills correct the rest within seconds.
        by_type: dict[str, list[EndpointCost]] = {}
        for address, estimate in self._estimates.items():
            by_type.setdefault(accelerators.get(address, ""), []).append(estimate)
        priors = {kind: self._type_prior(kind) for kind in self._speeds}
        for kind, group in by_type.items():
            if any(_rated(e) for e in group):
                priors[kind] = _fleet_prior(group)
        fleet = _fleet_prior(self._estimates.values())

        def rated(address: str, estimate: EndpointCost) -> EndpointCost:
            """An endpoint no finished prefill has been measured at yet (its step and hit rate
            may be learned, and first tokens may have given it a rough speed) is taken to
            compute as fast as its group: its first requests are predicted from its peers'
            speed, not from a prior that may be ten times wrong. Its own rough speed counts only
            in the group's mean: alone, it left endpoints that had not finished a request yet
            looking several times faster than one that had (measured: the l4 multi-turn cell
            sent prompts away from the endpoint holding their prefix, docs/benchmarks.md)."""
            if estimate.rate_samples > 0:
                return estimate
            prior = priors.get(accelerators.get(address, ""), fleet)
            return replace(estimate, tokens_per_second=prior.tokens_per_second)

        estimates = {address: rated(address, e) for address, e in self._estimates.items()}
        self._model = CostModel(
            estimates=estimates,
            parameters=self._parameters,
            mean_prompt_tokens=self._mean_prompt,
            mean_output_tokens=self._mean_output,
            prior=fleet,
            accelerators=accelerators,
            priors=priors,
        )

    def _type_prior(self, kind: str) -> EndpointCost:
        """What an endpoint of GPU type `kind` is taken for before it has been learned."""
        speed = self._speeds.get(kind)
        return EndpointCost() if speed is None else EndpointCost(tokens_per_second=speed)

    def _observe(self, address: str, stats: EndpointStats) -> None:
        window = self._windows.get(address)
        if window is None or stats.read_at < window.last_read_at or _reset(window.start, stats):
            self._windows[address] = _window(stats)
            return
        if stats.read_at == window.last_read_at:
            return  # the same scrape again (the snapshot changed for another reason)
        window.last_read_at = stats.read_at
        window.always_queued &= stats.waiting > 0
        window.never_queued &= stats.waiting == 0
        window.always_decoding &= stats.running > 0 and stats.waiting == 0
        window.running_sum += stats.running
        window.scrapes += 1
        dt = stats.read_at - window.start.read_at
        if dt < _MIN_WINDOW_SECONDS:
            return
        # What requests read now: for an endpoint not learned yet, its type's (or the fleet's).
        old = self._model.estimate(address)
        self._estimates[address] = self._learn(old, window, stats, dt)
        self._windows[address] = _window(stats)

    def _learn(
        self, est: EndpointCost, window: _Window, end: EndpointStats, dt: float
    ) -> EndpointCost:
        start = window.start
        hits = end.prefix_cache_hits - start.prefix_cache_hits
        queries = end.prefix_cache_queries - start.prefix_cache_queries
        generated = end.generation_tokens - start.generation_tokens
        prefilled = max(0.0, end.prompt_tokens - start.prompt_tokens - hits)
        computed = prefilled + generated

        mean_running = window.running_sum / window.scrapes
        step, step_learned = _step_sample(est, start, end)
        decode_only = window.always_decoding and generated > 0 and prefilled <= 0.1 * generated
        if not step_learned and decode_only:
            # No step histogram: with only decodes running, each step made one token apiece.
            sample = dt * mean_running / generated
            if _STEP_BOUNDS[0] <= sample <= _STEP_BOUNDS[1]:
                step = _ewma(step, sample)
                step_learned = True
        learned = step_learned

        rate = est.tokens_per_second
        rate_samples, rough_samples = est.rate_samples, est.rough_samples
        first_tokens = end.first_tokens - start.first_tokens
        if end.prefill_requests > 0 and end.prefill_computed_requests > 0:
            # The server reports its prefills: learn from them alone, saturated or not.
            finished = end.prefill_requests - start.prefill_requests
            speed = self._speed(
                _per(end.prefill_computed_tokens - start.prefill_computed_tokens, finished),
                _per(end.prefill_seconds - start.prefill_seconds, finished),
                step=step,
                running=mean_running,
            )
            if speed is not None:
                rate = _ewma(rate, speed, weight=finished, seen=rate_samples)
                rate_samples += finished
                learned = True
        elif window.never_queued and first_tokens > 0:
            # Until a request has finished (the prefill histograms are observed then), or on a
            # server without them: nothing waited, so a first token's time was its prefill. Only
            # roughly: it also holds the rest of the step under way when the request came, which
            # on a fast GPU with mostly cached prompts is most of it. So these samples move the
            # estimate as a moving average does, and the first finished prefill replaces them
            # (measured: taken as first samples, they cost the h100 multi-turn cell its hit
            # rate, 74 % -> 68 %; docs/benchmarks.md).
            speed = self._speed(
                _per(prefilled, first_tokens),
                _per(end.first_token_seconds - start.first_token_seconds, first_tokens),
                step=step,
                running=mean_running,
            )
            if speed is not None:
                rate = _ewma(rate, speed, weight=first_tokens)
                rough_samples += first_tokens
                learned = True
        elif (
            computed > 0
            and _RATE_BOUNDS[0] <= computed / dt <= _RATE_BOUNDS[1]
            and (window.always_queued or computed / dt > rate)
        ):
            # Saturated: the engine's throughput; otherwise at least this fast (so moving all
            # the way to it, as to a first sample, can only bring a prior too low closer).
            rate = _ewma(rate, computed / dt, seen=rate_samples)
            rate_samples += 1
            learned = True

        hit_rate = est.hit_rate
        if queries > 0:
            hit_rate = _ewma(hit_rate, min(1.0, max(0.0, hits / queries)))
            learned = True

        if not learned:
            return est
        return EndpointCost(rate, step, hit_rate, est.samples + 1, rate_samples, rough_samples)

    def _speed(self, tokens: float, seconds: float, *, step: float, running: float) -> float | None:
        """Prefill tokens per second of requests that computed `tokens` new tokens each in
        `seconds` each (means over the requests a window saw finish their prefill).

        A prefill of n new tokens takes `ceil(n / chunk)` steps, each computing its chunk and
        one token per running decode, and each paying the step's fixed part: time = (n + steps
        x running) / rate + steps x step, the cost model's own prefill and interference terms,
        solved for the rate. Prefills that were mostly fixed part (nearly all cached, or a
        step estimate still far too high) say little about the rate: skipped."""
        if tokens < 1 or seconds <= 0:
            return None
        steps = math.ceil(tokens / max(1, self._parameters.chunk_tokens))
        busy = seconds - steps * step
        if busy < _MIN_BUSY_SHARE * seconds:
            return None
        sample = (tokens + steps * running) / busy
        return sample if _RATE_BOUNDS[0] <= sample <= _RATE_BOUNDS[1] else None


def _per(total: float, count: float) -> float:
    return total / count if count > 0 else 0.0


def _step_sample(est: EndpointCost, start: EndpointStats, end: EndpointStats) -> tuple[float, bool]:
    """The step's fixed part moved toward what the window's inter-token gaps say, when it has
    any: a gap is one step, `s + tokens in the step / R` in the model's terms, so the mean gap
    less the mean step's tokens over the rate (`iteration_tokens_total`) is `s`. Without that
    correction the prompt chunks other requests ran in the same steps would count as fixed
    time (and the rate solved with it come out too high)."""
    gaps = end.inter_tokens - start.inter_tokens
    if gaps <= 0:
        return est.step_seconds, False
    gap = (end.inter_token_seconds - start.inter_token_seconds) / gaps
    steps = end.steps - start.steps
    if steps > 0:
        # Never below a quarter of the gap: a rate still far too low must not erase the step.
        tokens = (end.step_tokens - start.step_tokens) / steps
        gap = max(gap - tokens / est.tokens_per_second, gap / 4)
    if not _STEP_BOUNDS[0] <= gap <= _STEP_BOUNDS[1]:
        return est.step_seconds, False
    return _ewma(est.step_seconds, gap, weight=min(gaps, _MAX_WEIGHT)), True


def _fleet_prior(estimates: Iterable[EndpointCost]) -> EndpointCost:
    """What an endpoint we have not learned yet is taken for: the mean speed of those we have
    learned it for (of its own GPU type when it has one and some of that type are learned), and
    the mean step of those we have learned a step for.

    With the fixed prior instead, a fleet splits into the endpoints that have served (their
    learned speed, a little above or below the prior) and the idle ones (the prior), and when
    the learned ones look faster they win every tie, so the idle ones stay idle and the busy
    ones evict each other's prefixes. Its hit rate stays 0: an endpoint's cache starts empty.
    """
    estimates = list(estimates)
    # Measured speeds when there are any: a rough one is biased by the step under way.
    rated = [e.tokens_per_second for e in estimates if e.rate_samples > 0] or [
        e.tokens_per_second for e in estimates if _rated(e)
    ]
    stepped = [e.step_seconds for e in estimates if e.samples > 0]
    return EndpointCost(
        tokens_per_second=sum(rated) / len(rated) if rated else PRIOR_TOKENS_PER_SECOND,
        step_seconds=sum(stepped) / len(stepped) if stepped else PRIOR_STEP_SECONDS,
    )


def _rated(estimate: EndpointCost) -> bool:
    """Its prefill speed was learned from its own requests, roughly or not."""
    return estimate.rate_samples > 0 or estimate.rough_samples > 0


def _reset(start: EndpointStats, now: EndpointStats) -> bool:
    """A counter went down: the server restarted (or its series were reset)."""
    return (
        now.prompt_tokens < start.prompt_tokens
        or now.generation_tokens < start.generation_tokens
        or now.prefix_cache_hits < start.prefix_cache_hits
        or now.prefix_cache_queries < start.prefix_cache_queries
    )
