"""The simulated engine: one discrete step loop per server, shaped like vLLM V1's engine core.

Each step the scheduler (`scheduler`) plans which requests compute how many tokens, caching
the blocks they fill as it schedules them (as vLLM does); the loop then sleeps the profile's
step time divided by `speed` and applies the step: computed tokens, one sampled token per
request that finished its prompt. Work per step is O(scheduled requests); idle servers wait on
an event. Time is virtual: a step advances it by exactly its modelled duration.

Output tokens are a fixed filler sequence; a request always produces `max_tokens` tokens and
finishes with reason "length" (no EOS model).

Prefill/decode disaggregation (blocks held for remote decodes, pulls on the engine's link) is
in `transfer`; a request's bookkeeping and its finished record in `request`. What is left (about
520 lines) is the step loop and the state every step reads and writes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extproc.prefix.hashing import BlockHasher, block_extra_keys, event_extra_keys
from extproc.sim.cache import BlockPool, CacheEvent
from extproc.sim.profiles import StepProfile
from extproc.sim.request import (
    FINISHED,
    RUNNING,
    TRANSFERRING,
    WAITING,
    EngineRequest,
    FinishedRequest,
    KVSource,
    LoraAdapter,
    RequestRejected,
    finished_record,
)
from extproc.sim.scheduler import Plan, Scheduler
from extproc.sim.transfer import HeldBlocks, KVLink, pull_failed


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
    # KV pulls: one 200 Gb/s RDMA link per engine and a fixed per-pull latency (assumptions), and
    # how long a prefill keeps blocks nobody pulls (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    kv_transfer_bandwidth: float = 25e9  # bytes per second
    kv_transfer_latency_seconds: float = 0.001
    kv_transfer_timeout_seconds: float = 480.0

    @property
    def block_size(self) -> int:
        return self.hasher.block_size


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
    # Simulated seconds spent executing steps (what a GPU is billed for).
    busy_seconds: float = 0.0
    # Pulls from remote prefills: blocks and prompt tokens received, pulls that found the
    # remote blocks gone (then prefilled locally); blocks held for remote decodes now.
    kv_transfer_blocks: int = 0
    kv_transfer_tokens: int = 0
    kv_transfer_failures: int = 0
    kv_held_blocks: int = 0


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


@dataclass(slots=True)
class _Counters:
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generation_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0
    kv_transfer_blocks: int = 0
    kv_transfer_tokens: int = 0
    kv_transfer_failures: int = 0
    finished: dict[str, int] = field(default_factory=dict)


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
        self._counters = _Counters()
        self._link = KVLink(
            bandwidth=config.kv_transfer_bandwidth,
            latency=config.kv_transfer_latency_seconds,
            block_size=config.block_size,
            kv_bytes_per_token=config.profile.kv_bytes_per_token,
        )
        self._held = HeldBlocks(
            self.pool, timeout=config.kv_transfer_timeout_seconds, on_free=self._wake_up
        )
        self._scheduler = Scheduler(config, self.pool, self._link, now=self.now)
        # The last finished requests, for tests and benchmarks that want exact timings.
        self.recent: deque[FinishedRequest] = deque(maxlen=4096)
        self._wake = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._closed = False
        self._filler_pos = 0
        # Requests handed over since the last step began: their CPU set-up (the profile's
        # `per_request_ms`) is serialized with the engine loop, so the next step pays it.
        self._unadded = 0

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
        remote_decode: bool = False,
        kv_source: KVSource | None = None,
        prefill_seconds: float | None = None,
    ) -> EngineRequest:
        """Queue a request. `remote_decode`: a prefill request, whose blocks are held when it
        finishes; `kv_source`: a decode request, whose prompt KV is pulled from there;
        `prefill_seconds`: how long its prefill took on the prefill server (its record then
        starts that long before its arrival here)."""
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
            remote_decode=remote_decode,
            kv_source=kv_source,
        )
        self._extend_hashes(req)
        if self._idle:
            # One reading of the clock: the step that admits it starts at its arrival, not before.
            self._v = max(self._v, self._wall())
            req.arrival = self._v
        else:
            req.arrival = self.now()
        if prefill_seconds is not None:
            req.prefill_arrival = req.arrival - prefill_seconds
        self._scheduler.waiting.append(req)
        self._unadded += 1
        self._wake.set()
        return req

    def abort(self, req: EngineRequest) -> None:
        """Drop a request whose client went away (vLLM aborts on disconnect)."""
        if req.state == FINISHED:
            return
        if req.state == WAITING:
            self._scheduler.waiting.remove(req)
        elif req.state == TRANSFERRING:
            # vLLM frees a pulling request's blocks once the read ends; here at once. The
            # prefill side is not told, and keeps its blocks until they expire, as in vLLM.
            self._link.pulling.remove(req)
        self._finish(req, "abort")

    def reset(self) -> None:
        """Abort everything and empty the cache, as a restarted server starts."""
        sched = self._scheduler
        for req in [*sched.running, *sched.waiting, *self._link.pulling]:
            self._finish(req, "abort")
        sched.clear()
        self._link.clear()
        self._unadded = 0
        self._held.clear()
        self.pool.clear()
        self._counters = _Counters()

    # -- blocks held for remote decodes, pulls from remote prefills ----------------------------

    def held_block_ids(self, request_id: str) -> tuple[int, ...] | None:
        return self._held.ids(request_id)

    def find_held(self, request_id: str | None, block_ids: Sequence[int]) -> str | None:
        """The held request a pull names (`HeldBlocks.find`)."""
        return self._held.find(request_id, block_ids)

    def release_held(self, request_id: str) -> bool:
        """A decode engine pulled these blocks: free them. False if they were already gone."""
        return self._held.release(request_id)

    def _wake_up(self) -> None:
        self._wake.set()  # blocks were freed: a waiting request may fit now

    def _land_pulls(self) -> None:
        """Pulls that completed by now go back to the front of the queue, KV in place."""
        cfg = self.config
        landed = self._link.landed(self.now())
        for req in landed:
            # Nothing runs it before its KV is in (keeps virtual time <= the wall-derived clock:
            # it landed because one of them reached its ready time).
            self._v = max(self._v, req.kv_ready_at)
            source, req.kv_source = req.kv_source, None
            if source is not None and source.release():
                c = self._counters
                c.kv_transfer_blocks += req.transferred_blocks
                c.kv_transfer_tokens += req.transferred_tokens
                # vLLM's _update_waiting_for_remote_kv: every prompt token is computed but the
                # last, which is recomputed to get logits; the received full blocks are cached.
                req.num_computed = min(len(req.blocks) * cfg.block_size, req.prompt_len)
                if req.num_computed == req.prompt_len:
                    req.num_computed -= 1
                req.cached_tokens = req.num_computed
                self._scheduler.register(req, req.num_computed // cfg.block_size)
            else:
                pull_failed(req, "the remote blocks were freed during the transfer")
                self._counters.kv_transfer_failures += 1
                self.pool.free(req.blocks)
                req.blocks = []
                req.num_computed = 0
                req.num_registered = 0
            req.state = WAITING
        self._scheduler.waiting.extendleft(reversed(landed))

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
        sched = self._scheduler
        waiting_loras = {r.lora.name for r in sched.waiting if r.lora is not None}
        # vLLM counts requests waiting for remote KV as waiting, for reason "deferred".
        pulling = len(self._link.pulling)
        return EngineStats(
            running=len(sched.running),
            waiting=len(sched.waiting) + pulling,
            waiting_deferred=sched.deferred + pulling,
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
            running_loras=tuple(sched.running_loras),
            waiting_loras=tuple(sorted(waiting_loras)),
            busy_seconds=c.busy_seconds,
            kv_transfer_blocks=c.kv_transfer_blocks,
            kv_transfer_tokens=c.kv_transfer_tokens,
            kv_transfer_failures=c.kv_transfer_failures,
            kv_held_blocks=self._held.blocks,
        )

    def take_cache_events(self) -> list[CacheEvent]:
        return self.pool.take_events()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, on_step_end: Callable[[], None] | None = None) -> None:
        while not self._closed:
            await self._resumed.wait()
            self._held.expire(self.now())
            self._land_pulls()
            if not self._scheduler.running and not self._scheduler.waiting:
                await self._wait_for_news()
                continue
            self._idle = False
            plan = self._scheduler.schedule()
            self._count(plan)
            if not plan.items:
                # Nothing fits now (blocks held elsewhere), or only pulls started: wait for news.
                await self._wait_for_news()
                continue
            cfg = self.config
            seconds = cfg.profile.step_seconds(
                tokens=plan.tokens,
                decode_context_tokens=plan.decode_context,
                prefill_attention_units=plan.prefill_units,
                sequences=len(plan.items),
                new_requests=self._unadded,
            )
            self._unadded = 0
            seconds += plan.lora_swaps * cfg.lora_swap_ms / 1000.0
            self._step_start_v = self._v
            self._step_len = seconds
            self._step_start_wall = self._wall()
            await self._sleep(seconds)
            self._step_start_wall = None
            self._v += seconds
            if self._closed:
                return
            self._counters.busy_seconds += seconds
            self._apply(plan)
            if on_step_end is not None:
                on_step_end()

    async def _wait_for_news(self) -> None:
        """Idle until woken (a request, freed blocks) or the next timed event: a pull landing
        or held blocks expiring."""
        self._idle = True
        self._wake.clear()
        times = [t for t in (self._link.next_ready(), self._held.next_expiry()) if t is not None]
        if not times:
            await self._wake.wait()
            return
        due = min(times)
        woken = asyncio.ensure_future(self._wake.wait())
        timer = asyncio.ensure_future(self._sleep(max(due - self.now(), 0.0)))
        try:
            done, _ = await asyncio.wait((woken, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()
        if timer in done:
            # The event is due: virtual time moves to it exactly, not to the event loop's late
            # wake-up (which `speed` would amplify), as a step's end does.
            self._v = max(self._v, due)

    def _count(self, plan: Plan) -> None:
        c = self._counters
        c.prefix_queries += plan.prefix_queries
        c.prefix_hits += plan.prefix_hits
        c.preemptions += plan.preemptions
        c.kv_transfer_failures += plan.pull_failures

    def _apply(self, plan: Plan) -> None:
        now = self.now()
        itls: list[float] = []
        self._counters.steps += 1
        for req, num_new in plan.items:
            if req.state != RUNNING:
                continue  # aborted while the step ran
            req.num_computed += num_new
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
        if req.state == RUNNING:
            self._scheduler.leave_running(req)
        if req.blocks:
            if req.remote_decode and reason == "length":
                # vLLM's delayed free: a finished prefill keeps its KV for the decode's pull.
                req.held_block_ids = self._held.hold(req.request_id, req.blocks, self.now())
            else:
                self.pool.free(req.blocks)
            req.blocks = []
        req.state = FINISHED
        req.finish_reason = reason
        c = self._counters
        c.finished[reason] = c.finished.get(reason, 0) + 1
        record = finished_record(req, reason, self.now())
        self.recent.append(record)
        if reason != "abort":
            self.observer.on_finished(record)
        if req.tokens is not None:
            req.tokens.put_nowait(None)
        if not req.done.done():
            req.done.set_result(record)
        self._wake.set()
