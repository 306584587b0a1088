"""The cost model: predict each endpoint's time to first token, pick the lowest.

Three pieces, kept apart so the request path stays pure:

- `CostLearner` (mutable, state side): fed every new snapshot, it learns per endpoint how fast
  the engine computes tokens, how long a step takes and how often its prefix cache hits, from
  the deltas of vLLM's counters between scrapes.
- `CostModel` (frozen): the learner's current estimates plus the fixed parameters. Requests read
  it through a zero-argument callable (`learner.current`), never the learner itself.
- `CostScorer`: scores `fastest TTFT / this TTFT`, with a hot-spot guard that falls back to
  load when the pool is badly imbalanced (the model can be wrong; a pile-up must not last).

The equations are in docs/scheduling.md ("The cost model").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from extproc.scheduling.scorers import (
    LORA_ACTIVE,
    LORA_FREE_SLOT,
    lora_affinity,
    spread,
)
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.state.snapshot import Snapshot
from extproc.state.stats import EndpointStats

# Priors, used until an endpoint's own metrics say otherwise. An 8B model on one H100 computes
# about 50k tokens/s when saturated, and a light decode step takes ~6 ms of linear layers plus
# attention and CPU overhead (docs/reference vllm-interfaces.md, Vidur profiles).
PRIOR_TOKENS_PER_SECOND = 50_000.0
PRIOR_STEP_SECONDS = 0.008


@dataclass(frozen=True, slots=True)
class EndpointCost:
    """What the learner believes about one endpoint."""

    # Tokens (prompt and decode alike) the engine computes per second when it has work queued.
    tokens_per_second: float = PRIOR_TOKENS_PER_SECOND
    # One engine step with a small batch: the floor under any token's latency.
    step_seconds: float = PRIOR_STEP_SECONDS
    # Share of prompt tokens its prefix cache served (d hits / d queries).
    hit_rate: float = 0.0
    # Windows learned from; 0 means these are the priors.
    samples: int = 0


@dataclass(frozen=True, slots=True)
class CostParameters:
    """Fixed knobs of the model (config: the cost scorer's `parameters`)."""

    # Tokens per engine step (vLLM `max_num_batched_tokens`; 8192 on H100-class defaults).
    chunk_tokens: int = 8192
    # Prompt tokens of a typical queued request, until `CostLearner.observe_usage` learns it.
    mean_prompt_tokens: float = 1024.0
    # Output tokens of a typical request, until `CostLearner.observe_usage` learns it: the KV
    # blocks a request grows into, and how long it holds them.
    mean_output_tokens: float = 256.0
    # Moving an adapter into the batch (free slot), and waiting for a slot when the batch holds
    # `max_loras` other adapters: neither is in vLLM's metrics, so these are settings.
    lora_load_seconds: float = 0.1
    lora_slot_wait_seconds: float = 1.0
    # Hot-spot guard, as SGLang's cache-aware router: when max load - min load exceeds
    # `hot_spot_absolute` and max load > `hot_spot_ratio` x min load, rank by load instead.
    hot_spot_absolute: float = 64.0
    hot_spot_ratio: float = 1.5
    # What the scorer minimises is TTFT + `work_weight` x the engine time our prompt takes
    # there: that time delays every request queued behind us at that endpoint, and an uncached
    # copy of a prefix takes blocks later requests of its group would have hit. 0 is greedy
    # TTFT, which spreads a group whenever the endpoint holding its prefix has a short queue.
    work_weight: float = 1.0
    # Costs within this fraction of the lowest are a tie (the model is not more precise than
    # that), broken by the most free KV cache: see `CostScorer`.
    tie_tolerance: float = 0.1


@dataclass(frozen=True, slots=True)
class Prediction:
    """One endpoint's predicted time to first token, in seconds, by term."""

    queue_seconds: float
    prefill_seconds: float
    interference_seconds: float
    lora_seconds: float
    # Waiting for KV blocks: the request does not fit in the endpoint's free blocks until
    # running requests finish.
    kv_seconds: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.queue_seconds
            + self.kv_seconds
            + self.prefill_seconds
            + self.interference_seconds
            + self.lora_seconds
        )


@dataclass(frozen=True, slots=True)
class CostModel:
    """A frozen view of the learner: per-endpoint estimates, with the prior for the rest."""

    estimates: Mapping[str, EndpointCost] = field(default_factory=dict)
    parameters: CostParameters = CostParameters()
    mean_prompt_tokens: float | None = None  # learned; None: parameters.mean_prompt_tokens
    mean_output_tokens: float | None = None  # learned; None: parameters.mean_output_tokens
    prior: EndpointCost = EndpointCost()
    # Endpoints not learned yet are taken for the mean of their own GPU type when some of that
    # type have been learned (`accelerators`: address -> type; `priors`: type -> estimate).
    accelerators: Mapping[str, str] = field(default_factory=dict)
    priors: Mapping[str, EndpointCost] = field(default_factory=dict)

    def estimate(self, address: str) -> EndpointCost:
        learned = self.estimates.get(address)
        if learned is not None:
            return learned
        return self.priors.get(self.accelerators.get(address, ""), self.prior)

    def output_tokens(self, request: SchedulingRequest) -> float:
        """Tokens the request is expected to generate: its `max_tokens`, else the typical."""
        return float(
            request.max_tokens or self.mean_output_tokens or self.parameters.mean_output_tokens
        )

    def predict(self, request: SchedulingRequest, candidate: Candidate) -> Prediction:
        """TTFT = queue wait + our prefill + decode interference + adapter load."""
        est = self.estimate(candidate.address)
        p = self.parameters
        rate = est.tokens_per_second
        stats = candidate.stats
        waiting = stats.waiting if stats is not None else 0.0
        running = stats.running if stats is not None else 0.0
        mean_prompt = self.mean_prompt_tokens or p.mean_prompt_tokens

        # The prompts we sent and predict unfinished (they sit in the running batch, where no
        # metric shows them), then what the scrape shows waiting (others' requests, or ours held
        # back when KV blocks ran out): each of those needs the uncached share of a typical
        # prompt and a step.
        per_request = mean_prompt * (1.0 - est.hit_rate) / rate + est.step_seconds
        queue_seconds = candidate.prefill_backlog + waiting * per_request

        cached = candidate.prefix_blocks * request.block_size
        uncached = max(0, request.prompt_tokens - cached)
        # Chunked prefill: running requests' decode tokens take their share of every step's
        # token budget, so our prompt needs this many steps...
        steps = max(1, math.ceil(uncached / max(1.0, p.chunk_tokens - running)))
        prefill_seconds = uncached / rate + steps * est.step_seconds
        # ...and each of those steps also computes one token per running request.
        interference_seconds = steps * running / rate

        kv_seconds = self._kv_wait(request, candidate, uncached, est)

        lora_seconds = 0.0
        if request.lora is not None:
            affinity = lora_affinity(candidate, request.lora)
            if affinity < LORA_ACTIVE:
                lora_seconds = p.lora_load_seconds
            if affinity < LORA_FREE_SLOT:
                # No free slot (or the adapter is already deferred for one): wait for a slot.
                lora_seconds += p.lora_slot_wait_seconds
        return Prediction(
            queue_seconds, prefill_seconds, interference_seconds, lora_seconds, kv_seconds
        )

    def _kv_wait(
        self, request: SchedulingRequest, candidate: Candidate, uncached: int, est: EndpointCost
    ) -> float:
        """How long the request waits for KV blocks at `candidate`.

        vLLM admits a request (FCFS) only when its blocks fit among the free ones; cached blocks
        it shares with running requests cost nothing, which is why a group of requests on one
        prefix fits where the same requests spread thin do not. The shortfall (our new blocks,
        plus those of the requests ahead of us, beyond the free ones) is freed as running
        requests finish: it takes that share of the running blocks' lifetime, a typical
        request's decode. The running requests also grow while we wait, by half a typical
        output each on average: blocks that are free now but will not be for us."""
        stats = candidate.stats
        if stats is None or not stats.num_gpu_blocks:
            return 0.0
        p = self.parameters
        block = stats.block_size or request.block_size
        output = self.mean_output_tokens or p.mean_output_tokens
        mean_prompt = self.mean_prompt_tokens or p.mean_prompt_tokens
        ours = (uncached + (request.max_tokens or output)) / block
        ahead = candidate.queue * (mean_prompt * (1.0 - est.hit_rate) + output) / block
        free = stats.num_gpu_blocks * (1.0 - stats.kv_usage)
        growth = stats.running * output / 2 / block
        short = ours + ahead + growth - free
        if short <= 0:
            return 0.0
        held = max(1.0, stats.num_gpu_blocks * stats.kv_usage)
        return min(1.0, short / held) * output * est.step_seconds

    def work(self, request: SchedulingRequest, candidate: Candidate) -> float:
        """Seconds of engine time the request's prompt takes at `candidate` (what the picker
        adds to its prefill backlog once it is sent there)."""
        prediction = self.predict(request, candidate)
        return prediction.prefill_seconds + prediction.interference_seconds

    def cost(self, request: SchedulingRequest, candidate: Candidate) -> float:
        """What the scorer minimises: our TTFT plus the delay our prefill imposes on those
        queued behind it (`CostParameters.work_weight`)."""
        prediction = self.predict(request, candidate)
        return prediction.total + self.parameters.work_weight * prediction.prefill_seconds


def cache_pressure(candidate: Candidate) -> float:
    """How taken an endpoint's KV cache is, in [0, 1]: the mean of the share its running
    requests use (`kv_usage`) and the share holding any cached blocks at all (the prefix
    index's count). The second says what traffic the endpoint already draws, the prefixes its
    groups will come back for; the first is all there is once every cache is full."""
    stats = candidate.stats
    if stats is None:
        return 0.0
    held = candidate.cached_blocks / stats.num_gpu_blocks if stats.num_gpu_blocks else 0.0
    return (stats.kv_usage + min(1.0, held)) / 2


def load_of(candidate: Candidate) -> float:
    """Requests at the endpoint (waiting, sent since the scrape, running); without stats, our
    own in-flight count."""
    stats = candidate.stats
    if stats is None:
        return float(candidate.load.requests)
    return candidate.queue + stats.running


def hot_spot(candidates: Sequence[Candidate], parameters: CostParameters) -> bool:
    """The pool is imbalanced enough that the cost model must not be trusted alone."""
    loads = [load_of(c) for c in candidates]
    low, high = min(loads), max(loads)
    return high - low > parameters.hot_spot_absolute and high > parameters.hot_spot_ratio * low


class CostScorer:
    """Scores `lowest cost / this endpoint's cost` (`CostModel.cost`: predicted TTFT plus the
    weighted prefill work): the cheapest gets 1, one twice as dear 0.5. A ratio, not a spread,
    so 100 ms vs 101 ms stays a near tie in blends. Costs within `tie_tolerance` of the lowest
    are scored again, by free KV cache and cost (`score`), still above every other endpoint."""

    name = "cost-scorer"

    def __init__(
        self,
        model: Callable[[], CostModel] | None = None,
        parameters: CostParameters | None = None,
    ) -> None:
        self._model = model or CostModel
        # Config may set parameters on the scorer; they override the model's.
        self._parameters = parameters

    def current(self) -> CostModel:
        model = self._model()
        if self._parameters is not None and model.parameters != self._parameters:
            model = replace(model, parameters=self._parameters)
        return model

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        model = self.current()
        if hot_spot(candidates, model.parameters):
            return spread([load_of(c) for c in candidates])
        costs = [model.cost(request, c) for c in candidates]
        best = min(costs)
        # Every prediction holds at least one step (> 0); guard anyway against a zero prior.
        scores = [best / t if t > 0 else 1.0 for t in costs]
        tolerance = model.parameters.tie_tolerance
        tied = [t <= best * (1.0 + tolerance) for t in costs]
        if tolerance <= 0 or sum(tied) < 2:
            return scores
        # Near-ties go to the endpoint whose KV cache is least taken (`cache_pressure`). The
        # prompts that land on an endpoint bring their group's later requests with them (that
        # is where the prefix will be), and its cache says how much such traffic it already
        # draws: breaking ties by learned speed, or by a block of chat template every prompt
        # shares, piles every new prefix onto one endpoint, where they evict each other.
        # Pressure counts relative to the most taken tied endpoint, so an empty cache beats
        # one holding another group's prompt however small that is. Inside the tie, pressure
        # and the cost's own ranking count half each; tied scores stay above every untied one.
        pressures = [
            cache_pressure(c) if tie else 0.0 for c, tie in zip(candidates, tied, strict=True)
        ]
        most = max(pressures)
        floor = 1.0 / (1.0 + tolerance)
        width = 1.0 - floor
        return [
            1.0 - width * ((p / most if most > 0 else 0.0) + (1.0 - score) / width) / 2
            if tie
            else score
            for p, tie, score in zip(pressures, tied, scores, strict=True)
        ]


# --- learning -----------------------------------------------------------------------------

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


def _ewma(old: float, sample: float, *, weight: float = 1.0) -> float:
    """Move `old` toward `sample` by `_ALPHA` per unit of evidence (a window, or each request
    finished in it, up to `_MAX_WEIGHT`): never all the way, since one window can mislead."""
    alpha: float = 1.0 - math.pow(1.0 - _ALPHA, min(max(weight, 1.0), _MAX_WEIGHT))
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
        by_type: dict[str, list[EndpointCost]] = {}
        for address, estimate in self._estimates.items():
            if (kind := accelerators.get(address, "")) and estimate.samples > 0:
                by_type.setdefault(kind, []).append(estimate)
        self._model = CostModel(
            estimates=dict(self._estimates),
            parameters=self._parameters,
            mean_prompt_tokens=self._mean_prompt,
            mean_output_tokens=self._mean_output,
            prior=_fleet_prior(self._estimates.values()),
            accelerators=accelerators,
            priors={
                **{kind: self._type_prior(kind) for kind in self._speeds},
                **{kind: _fleet_prior(group) for kind, group in by_type.items()},
            },
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
        old = self._estimates.get(address) or self._type_prior(self._accelerators.get(address, ""))
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
                rate = _ewma(rate, speed, weight=finished)
                learned = True
        elif window.never_queued and first_tokens > 0:
            # Until a request has finished (the prefill histograms are observed then), or on a
            # server without them: nothing waited, so a first token's time was its prefill.
            speed = self._speed(
                _per(prefilled, first_tokens),
                _per(end.first_token_seconds - start.first_token_seconds, first_tokens),
                step=step,
                running=mean_running,
            )
            if speed is not None:
                rate = _ewma(rate, speed, weight=first_tokens)
                learned = True
        elif (
            computed > 0
            and _RATE_BOUNDS[0] <= computed / dt <= _RATE_BOUNDS[1]
            and (window.always_queued or computed / dt > rate)
        ):
            # Saturated: the engine's throughput; otherwise at least this fast.
            rate = _ewma(rate, computed / dt)
            learned = True

        hit_rate = est.hit_rate
        if queries > 0:
            hit_rate = _ewma(hit_rate, min(1.0, max(0.0, hits / queries)))
            learned = True

        if not learned:
            return est
        return EndpointCost(rate, step, hit_rate, est.samples + 1)

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
    (of its own GPU type when it has one and some of that type are learned).

    With the fixed prior instead, a fleet splits into the endpoints that have served (their
    learned speed, a little above or below the prior) and the idle ones (the prior), and when
    the learned ones look faster they win every tie, so the idle ones stay idle and the busy
    ones evict each other's prefixes. Its hit rate stays 0: an endpoint's cache starts empty.
    """
    learned = [e for e in estimates if e.samples > 0]
    if not learned:
        return EndpointCost()
    return EndpointCost(
        tokens_per_second=sum(e.tokens_per_second for e in learned) / len(learned),
        step_seconds=sum(e.step_seconds for e in learned) / len(learned),
    )


def _reset(start: EndpointStats, now: EndpointStats) -> bool:
    """A counter went down: the server restarted (or its series were reset)."""
    return (
        now.prompt_tokens < start.prompt_tokens
        or now.generation_tokens < start.generation_tokens
        or now.prefix_cache_hits < start.prefix_cache_hits
        or now.prefix_cache_queries < start.prefix_cache_queries
    )
