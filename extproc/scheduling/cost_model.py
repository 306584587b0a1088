"""The cost model: each endpoint's predicted time to first token, as a pure function.

`CostModel` is frozen: the learner's current estimates (`EndpointCost` per endpoint) plus the
fixed parameters. Requests read it through a zero-argument callable (`CostLearner.current`,
`extproc.scheduling.cost_learner`), never the learner itself; the scorer that ranks endpoints by
it is `extproc.scheduling.cost.CostScorer`. The equations are in docs/scheduling.md ("The cost
model").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.scheduling.scorers import LORA_ACTIVE, LORA_FREE_SLOT, lora_affinity
from extproc.scheduling.types import Candidate, SchedulingRequest

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
    # Requests whose prefill `tokens_per_second` was learned from; while there are none and no
    # rough samples either, it is the mean of the learned endpoints of its GPU type (else the
    # prior).
    rate_samples: float = 0.0
    # First tokens it was learned from before any request finished: rough samples, which move
    # it as a moving average and which the first real sample replaces (`CostLearner`).
    rough_samples: float = 0.0


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

        # The prompts we sent and predict unfinished (most sit in the running batch, where no
        # metric shows them), then what the scrape shows waiting beyond those of ours it was
        # predicted to hold (others' requests, or ours held back longer than predicted, as when
        # KV blocks ran out): each of those needs the uncached share of a typical prompt and a
        # step.
        per_request = mean_prompt * (1.0 - est.hit_rate) / rate + est.step_seconds
        others = max(0.0, waiting - candidate.waiting_ours)
        queue_seconds = candidate.prefill_backlog + others * per_request

        cached = candidate.prefix_blocks * request.block_size
        uncached = max(0, request.prompt_tokens - cached)
        # Chunked prefill: running requests' decode tokens take their share of every step's
        # token budget, so our prompt needs this many steps...
        steps = max(1, math.ceil(uncached / max(1.0, p.chunk_tokens - running)))
        prefill_seconds = uncached / rate + steps * est.step_seconds
        # ...and each of those steps also computes one token per running request.
        interference_seconds = steps * running / rate

        kv_seconds = self._kv_wait(request, candidate, uncached, others, est)

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
        self,
        request: SchedulingRequest,
        candidate: Candidate,
        uncached: int,
        others: float,
        est: EndpointCost,
    ) -> float:
        """How long the request waits for KV blocks at `candidate`.

        vLLM admits a request (FCFS) only when its blocks fit among the free ones; cached blocks
        it shares with running requests cost nothing, which is why a group of requests on one
        prefix fits where the same requests spread thin do not. The shortfall (our new blocks,
        plus those of the requests ahead of us, beyond the free ones) is freed as running
        requests finish: it takes that share of the running blocks' lifetime, a typical
        request's decode. The running requests also grow while we wait, by half a typical
        output each on average: blocks that are free now but will not be for us.

        Only prompts count, ours and those ahead: vLLM allocates a request's blocks as its tokens
        are scheduled (the scheduler's `allocate_slots`), so the blocks its answer grows into are
        not needed before its first token. Counting them made a group's endpoint look full
        while it held the group's prefix, and the group was copied to a second endpoint.

        Ahead of us are our own prompts not computed yet, whose uncached tokens we know (the
        prefill backlog at the learned speed), and the scraped waiting requests that are not
        ours (`others`, as the queue term counts them), each a typical prompt's uncached share.
        Taking every request sent since the scrape for a typical prompt did the same harm: the
        last of a group's requests, a prefix hit needing a few blocks, stood for a whole typical
        prompt's worth of blocks ahead of the next one, which then moved."""
        stats = candidate.stats
        if stats is None or not stats.num_gpu_blocks:
            return 0.0
        p = self.parameters
        block = stats.block_size or request.block_size
        output = self.mean_output_tokens or p.mean_output_tokens
        mean_prompt = self.mean_prompt_tokens or p.mean_prompt_tokens
        ours = uncached / block
        ahead = (
            candidate.prefill_backlog * est.tokens_per_second
            + others * mean_prompt * (1.0 - est.hit_rate)
        ) / block
        free = stats.num_gpu_blocks * (1.0 - stats.kv_usage)
        growth = stats.running * output / 2 / block
        short = ours + ahead + growth - free
        if short <= 0:
            return 0.0
        held = max(1.0, stats.num_gpu_blocks * stats.kv_usage)
        return min(1.0, short / held) * output * est.step_seconds

    def work(self, request: SchedulingRequest, candidate: Candidate) -> tuple[float, float]:
        """Seconds of engine time the request's prompt takes at `candidate` (what the picker
        adds to its prefill backlog once it is sent there), and seconds it is predicted to wait
        before vLLM admits it into the running batch: V1 admits a prompt once the work ahead of
        it fits in a step's token budget, or its KV blocks come free."""
        prediction = self.predict(request, candidate)
        rate = self.estimate(candidate.address).tokens_per_second
        budget_seconds = self.parameters.chunk_tokens / rate
        waits = max(0.0, prediction.queue_seconds - budget_seconds) + prediction.kv_seconds
        return prediction.prefill_seconds + prediction.interference_seconds, waits

    def cost(self, request: SchedulingRequest, candidate: Candidate) -> float:
        """What the scorer minimises: our TTFT plus the delay our prefill imposes on those
        queued behind it (`CostParameters.work_weight`)."""
        prediction = self.predict(request, candidate)
        return prediction.total + self.parameters.work_weight * prediction.prefill_seconds
