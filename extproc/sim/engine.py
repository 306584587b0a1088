"""The simulated engine: one discrete step loop per server, shaped like vLLM V1's scheduler.

Each step the scheduler (FCFS, like vLLM's default policy):
1. gives every running request its next tokens: one for a decoding request, the rest of its
   prompt (up to the token budget: chunked prefill) for a prefilling one, allocating KV blocks as
   it goes and preempting the newest running request when blocks run out (its blocks are freed,
   it goes back to the front of the queue and is recomputed later, minus what is still cached);
2. if nothing was preempted, admits waiting requests while the token budget, `max_num_seqs` and
   free blocks allow. A request first looks up its longest cached prefix (cached tokens cost no
   prefill); a request whose LoRA adapter is not in the batch while `max_loras` adapters already
   are is skipped ("deferred") and keeps its place.
The loop then sleeps the profile's step time divided by `speed` and applies the step: computed
tokens, newly full blocks registered in the prefix cache, one sampled token per request that
finished its prompt. Work per step is O(scheduled requests); idle servers wait on an event.

Output tokens are a fixed filler sequence; a request always produces `max_tokens` tokens and
finishes with reason "length" (no EOS model).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from extproc.prefix.hashing import (
    BlockHash,
    BlockHasher,
    LoraKey,
    block_extra_keys,
    event_extra_keys,
)
from extproc.sim.cache import Block, BlockPool, CacheEvent
from extproc.sim.profiles import StepProfile

_WAITING: Final = 0
_RUNNING: Final = 1
_FINISHED: Final = 2


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    name: str
    path: str
    lora_id: int

    @property
    def key(self) -> LoraKey:
        return LoraKey(self.name, self.path)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    profile: StepProfile
    num_gpu_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    hasher: BlockHasher = field(default_factory=BlockHasher)
    enable_prefix_caching: bool = True
    max_loras: int = 1
    lora_swap_ms: float = 2.0  # copying an adapter into a GPU slot: an assumption
    filler_token_ids: tuple[int, ...] = (1820,)  # cl100k " the"

    @property
    def block_size(self) -> int:
        return self.hasher.block_size


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """Timings of one finished request, in simulated seconds, for the latency histograms."""

    request_id: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    finish_reason: str
    arrival: float
    scheduled: float | None
    first_token: float | None
    finished: float
    preemptions: int
    max_tokens: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters and gauges at one instant (what /metrics and tests read)."""

    running: int
    waiting: int
    waiting_deferred: int
    kv_usage: float
    num_gpu_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    preemptions: int
    prompt_tokens: int
    prompt_tokens_cached: int
    generation_tokens: int
    finished_by_reason: dict[str, int]
    steps: int
    running_loras: tuple[str, ...]
    waiting_loras: tuple[str, ...]


class EngineObserver(Protocol):
    """Receives what the engine measures; the metrics module implements it."""

    def on_step(self, tokens: int, inter_token_latencies: Sequence[float]) -> None: ...

    def on_first_token(self, ttft: float) -> None: ...

    def on_finished(self, request: FinishedRequest) -> None: ...


class NullObserver:
    def on_step(self, tokens: int, inter_token_latencies: Sequence[float]) -> None:
        return None

    def on_first_token(self, ttft: float) -> None:
        return None

    def on_finished(self, request: FinishedRequest) -> None:
        return None


class RequestRejected(ValueError):
    """The engine cannot ever run this request (it needs more KV blocks than exist)."""


class EngineRequest:
    """One request inside the engine, and the HTTP handler's handle on it.

    `tokens` (streaming only) receives each step's new token ids and then None at the end;
    `done` resolves with the `FinishedRequest` record.
    """

    __slots__ = (
        "all_ids",
        "arrival",
        "blocks",
        "cached_tokens",
        "done",
        "extra_keys",
        "finish_reason",
        "first_token",
        "hashes",
        "last_token",
        "lora",
        "max_tokens",
        "num_computed",
        "num_registered",
        "output_ids",
        "preemptions",
        "prompt_len",
        "request_id",
        "salt",
        "scheduled",
        "state",
        "tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        lora: LoraAdapter | None,
        cache_salt: str | None,
        stream: bool,
        arrival: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.request_id = request_id
        self.all_ids: list[int] = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.max_tokens = max_tokens
        self.lora = lora
        self.salt = cache_salt
        self.arrival = arrival
        self.hashes: list[BlockHash] = []
        self.extra_keys: list[tuple[str, ...] | None] = []
        self.blocks: list[Block] = []
        self.num_computed = 0
        self.num_registered = 0
        self.cached_tokens = 0
        self.output_ids: list[int] = []
        self.preemptions = 0
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.finish_reason: str | None = None
        self.state = _WAITING
        self.tokens: asyncio.Queue[list[int] | None] | None = asyncio.Queue() if stream else None
        self.done: asyncio.Future[FinishedRequest] = loop.create_future()


@dataclass(slots=True)
class _Counters:
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generation_tokens: int = 0
    steps: int = 0
    finished: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Plan:
    """One step's schedule: (request, tokens to compute) plus the figures that time it."""

    items: list[tuple[EngineRequest, int]] = field(default_factory=list)
    tokens: int = 0
    decode_context: int = 0
    prefill_units: float = 0.0
    lora_swaps: int = 0


class Engine:
    """One simulated vLLM engine. Call `run()` in a task; `submit()` requests; `close()`."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        wall: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        observer: EngineObserver | None = None,
    ) -> None:
        self.config = config
        self._wall = wall
        self._sleep = sleep
        # Virtual time: a step advances it by exactly its modelled duration, so event-loop
        # jitter (amplified by `speed`) never leaks into simulated latencies. It re-joins the
        # wall-derived clock only when the engine is idle.
        self._v = wall()
        self._idle = True
        self._step_start_v = 0.0
        self._step_start_wall: float | None = None
        self._step_len = 0.0
        self.observer: EngineObserver = observer or NullObserver()
        self.pool = BlockPool(config.num_gpu_blocks)
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []
        self._deferred = 0
        self._running_loras: dict[str, int] = {}
        # Adapters resident in the GPU's max_loras slots, least recently used first.
        self._gpu_loras: OrderedDict[str, None] = OrderedDict()
        self._counters = _Counters()
        # The last finished requests, for tests and benchmarks that want exact timings.
        self.recent: deque[FinishedRequest] = deque(maxlen=4096)
        self._wake = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._closed = False
        self._filler_pos = 0

    # -- requests ------------------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        lora: LoraAdapter | None = None,
        cache_salt: str | None = None,
        stream: bool = False,
    ) -> EngineRequest:
        cfg = self.config
        needed = -(-(len(prompt_ids) + max_tokens) // cfg.block_size)
        if needed > cfg.num_gpu_blocks:
            raise RequestRejected(
                f"the request needs {needed} KV blocks but the cache holds {cfg.num_gpu_blocks}"
            )
        req = EngineRequest(
            request_id,
            prompt_ids,
            max_tokens=max_tokens,
            lora=lora,
            cache_salt=cache_salt,
            stream=stream,
            arrival=0.0,
            loop=asyncio.get_running_loop(),
        )
        self._extend_hashes(req)
        if self._idle:
            self._v = max(self._v, self._wall())
        req.arrival = self.now()
        self._waiting.append(req)
        self._wake.set()
        return req

    def abort(self, req: EngineRequest) -> None:
        """Drop a request whose client went away (vLLM aborts on disconnect)."""
        if req.state == _FINISHED:
            return
        if req.state == _WAITING:
            self._waiting.remove(req)
        self._finish(req, "abort")

    def reset(self) -> None:
        """Abort everything and empty the cache, as a restarted server starts."""
        for req in [*self._running, *self._waiting]:
            self._finish(req, "abort")
        self._waiting.clear()
        self.pool.clear()
        self._gpu_loras.clear()
        self._counters = _Counters()

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._resumed.set()

    def now(self) -> float:
        """Simulated seconds. Inside a step, wall time maps onto the step's virtual span."""
        if self._idle:
            return max(self._v, self._wall())
        if self._step_start_wall is None:
            return self._v
        into = self._wall() - self._step_start_wall
        return self._step_start_v + min(max(into, 0.0), self._step_len)

    def stats(self) -> EngineStats:
        c = self._counters
        waiting_loras = {r.lora.name for r in self._waiting if r.lora is not None}
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            waiting_deferred=self._deferred,
            kv_usage=self.pool.usage,
            num_gpu_blocks=self.config.num_gpu_blocks,
            prefix_cache_queries=c.prefix_queries,
            prefix_cache_hits=c.prefix_hits,
            preemptions=c.preemptions,
            prompt_tokens=c.prompt_tokens,
            prompt_tokens_cached=c.prompt_tokens_cached,
            generation_tokens=c.generation_tokens,
            finished_by_reason=dict(c.finished),
            steps=c.steps,
            running_loras=tuple(self._running_loras),
            waiting_loras=tuple(sorted(waiting_loras)),
        )

    def take_cache_events(self) -> list[CacheEvent]:
        return self.pool.take_events()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, on_step_end: Callable[[], None] | None = None) -> None:
        while not self._closed:
            await self._resumed.wait()
            if not self._running and not self._waiting:
                self._idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle = False
            plan = self._schedule()
            if not plan.items:
                # Nothing fits now (only possible while blocks are held elsewhere): wait for news.
                self._idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            cfg = self.config
            seconds = cfg.profile.step_seconds(
                tokens=plan.tokens,
                decode_context_tokens=plan.decode_context,
                prefill_attention_units=plan.prefill_units,
            )
            seconds += plan.lora_swaps * cfg.lora_swap_ms / 1000.0
            self._step_start_v = self._v
            self._step_len = seconds
            self._step_start_wall = self._wall()
            await self._sleep(seconds)
            self._step_start_wall = None
            self._v += seconds
            if self._closed:
                return
            self._apply(plan)
            if on_step_end is not None:
                on_step_end()

    def _schedule(self) -> _Plan:
        cfg = self.config
        plan = _Plan()
        budget = cfg.max_num_batched_tokens
        preempted = False
        i = 0
        running = self._running
        while i < len(running) and budget > 0:
            req = running[i]
            num_new = min(len(req.all_ids) - req.num_computed, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self._allocate(req, req.num_computed + num_new):
                victim = running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                self._add_to_plan(plan, req, num_new)
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: nothing after it can be scheduled

        self._deferred = 0
        if preempted:
            return plan
        skipped: list[EngineRequest] = []
        waiting = self._waiting
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = waiting[0]
            if req.lora is not None and not self._lora_fits(req.lora.name):
                skipped.append(waiting.popleft())
                continue
            hit_blocks: list[Block] = []
            if req.num_computed == 0 and cfg.enable_prefix_caching:
                # The last token is always recomputed to get logits (vLLM: num_tokens - 1).
                max_blocks = (len(req.all_ids) - 1) // cfg.block_size
                hit_blocks = self.pool.longest_prefix(req.hashes, max_blocks)
            num_cached = len(hit_blocks) * cfg.block_size
            num_new = min(len(req.all_ids) - num_cached, budget)
            self.pool.touch(hit_blocks)
            req.blocks = list(hit_blocks)
            if not self._allocate(req, num_cached + num_new):
                self.pool.free(req.blocks)
                req.blocks = []
                break
            waiting.popleft()
            if req.preemptions == 0:
                self._counters.prefix_queries += len(req.all_ids)
                self._counters.prefix_hits += num_cached
                req.cached_tokens = num_cached
            req.num_computed = num_cached
            req.num_registered = len(hit_blocks)
            if req.scheduled is None:
                req.scheduled = self.now()
            req.state = _RUNNING
            running.append(req)
            if req.lora is not None:
                name = req.lora.name
                self._running_loras[name] = self._running_loras.get(name, 0) + 1
                if name in self._gpu_loras:
                    self._gpu_loras.move_to_end(name)
                else:
                    plan.lora_swaps += 1
                    self._gpu_loras[name] = None
                    while len(self._gpu_loras) > cfg.max_loras:
                        self._gpu_loras.popitem(last=False)
            self._add_to_plan(plan, req, num_new)
            budget -= num_new
        self._deferred = len(skipped)
        waiting.extendleft(reversed(skipped))
        return plan

    def _lora_fits(self, name: str) -> bool:
        return name in self._running_loras or len(self._running_loras) < self.config.max_loras

    def _add_to_plan(self, plan: _Plan, req: EngineRequest, num_new: int) -> None:
        plan.items.append((req, num_new))
        plan.tokens += num_new
        if req.num_computed >= req.prompt_len:
            plan.decode_context += req.num_computed + num_new
        else:
            plan.prefill_units += num_new * (req.num_computed + num_new / 2)

    def _allocate(self, req: EngineRequest, num_tokens: int) -> bool:
        needed = -(-num_tokens // self.config.block_size) - len(req.blocks)
        if needed <= 0:
            return True
        new = self.pool.allocate(needed)
        if new is None:
            return False
        req.blocks.extend(new)
        return True

    def _preempt(self, req: EngineRequest) -> None:
        self._running.remove(req)
        self._leave_running(req)
        self.pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_registered = 0
        req.preemptions += 1
        req.state = _WAITING
        self._counters.preemptions += 1
        self._waiting.appendleft(req)

    def _leave_running(self, req: EngineRequest) -> None:
        if req.lora is not None:
            name = req.lora.name
            left = self._running_loras[name] - 1
            if left:
                self._running_loras[name] = left
            else:
                del self._running_loras[name]

    def _apply(self, plan: _Plan) -> None:
        cfg = self.config
        now = self.now()
        itls: list[float] = []
        self._counters.steps += 1
        for req, num_new in plan.items:
            if req.state != _RUNNING:
                continue  # aborted while the step ran
            req.num_computed += num_new
            if cfg.enable_prefix_caching:
                full = min(req.num_computed // cfg.block_size, len(req.hashes))
                if full > req.num_registered:
                    self.pool.cache_full_blocks(
                        req.blocks,
                        req.hashes[:full],
                        start=req.num_registered,
                        token_ids=req.all_ids,
                        block_size=cfg.block_size,
                        lora_id=req.lora.lora_id if req.lora else None,
                        lora_name=req.lora.name if req.lora else None,
                        extra_keys=req.extra_keys if any(req.extra_keys) else None,
                    )
                    req.num_registered = full
            if req.num_computed < len(req.all_ids):
                continue  # still prefilling
            token = self._next_filler()
            req.all_ids.append(token)
            req.output_ids.append(token)
            self._counters.generation_tokens += 1
            if req.first_token is None:
                req.first_token = now
                self._counters.prompt_tokens += req.prompt_len
                self._counters.prompt_tokens_cached += req.cached_tokens
                self.observer.on_first_token(now - req.arrival)
            elif req.last_token is not None:
                itls.append(now - req.last_token)
            req.last_token = now
            self._extend_hashes(req)
            if req.tokens is not None:
                req.tokens.put_nowait([token])
            if len(req.output_ids) >= req.max_tokens:
                self._finish(req, "length")
        self.observer.on_step(plan.tokens, itls)

    def _next_filler(self) -> int:
        filler = self.config.filler_token_ids
        token = filler[self._filler_pos % len(filler)]
        self._filler_pos += 1
        return token

    def _extend_hashes(self, req: EngineRequest) -> None:
        cfg = self.config
        size = cfg.block_size
        have = len(req.hashes)
        if (have + 1) * size > len(req.all_ids):
            return
        key = req.lora.key if req.lora else None
        start = have * size
        stop = len(req.all_ids) // size * size
        new = cfg.hasher.hash_blocks(
            req.all_ids[start:stop],
            lora=key,
            cache_salt=req.salt,
            parent=req.hashes[-1].digest if req.hashes else None,
            start_block=have,
        )
        req.hashes.extend(new)
        for index in range(have, have + len(new)):
            req.extra_keys.append(
                event_extra_keys(block_extra_keys(index, lora=key, cache_salt=req.salt))
            )

    def _finish(self, req: EngineRequest, reason: str) -> None:
        if req.state == _RUNNING:
            self._running.remove(req)
            self._leave_running(req)
        if req.blocks:
            self.pool.free(req.blocks)
            req.blocks = []
        req.state = _FINISHED
        req.finish_reason = reason
        c = self._counters
        c.finished[reason] = c.finished.get(reason, 0) + 1
        record = FinishedRequest(
            request_id=req.request_id,
            prompt_tokens=req.prompt_len,
            output_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            finish_reason=reason,
            arrival=req.arrival,
            scheduled=req.scheduled,
            first_token=req.first_token,
            finished=self.now(),
            preemptions=req.preemptions,
            max_tokens=req.max_tokens,
        )
        self.recent.append(record)
        if reason != "abort":
            self.observer.on_finished(record)
        if req.tokens is not None:
            req.tokens.put_nowait(None)
        if not req.done.done():
            req.done.set_result(record)
        self._wake.set()
