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

Prefill/decode disaggregation follows vLLM's NixlConnector. A request submitted with
`remote_decode` (a prefill request) keeps its KV blocks when it finishes, until a decode engine
has pulled them (`release_held`) or `kv_transfer_timeout_seconds` pass. A request submitted with
a `KVSource` (a decode request) uses its local prefix cache, allocates blocks for the whole
prompt, then waits off the batch (vLLM's WAITING_FOR_REMOTE_KVS) while the rest of the prompt's
blocks cross the link; it then recomputes only the last prompt token. If the remote blocks are
gone it prefills locally, as vLLM's default `kv_load_failure_policy` "recompute" does.
"""

from __future__ import annotations

import asyncio
import logging
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

logger = logging.getLogger(__name__)

_WAITING: Final = 0
_RUNNING: Final = 1
_FINISHED: Final = 2
_TRANSFERRING: Final = 3  # waiting for its prompt's KV from a remote engine


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
    # KV pulls: one 200 Gb/s RDMA link per engine and a fixed per-pull latency (assumptions), and
    # how long a prefill keeps blocks nobody pulls (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    kv_transfer_bandwidth: float = 25e9  # bytes per second
    kv_transfer_latency_seconds: float = 0.001
    kv_transfer_timeout_seconds: float = 480.0

    @property
    def block_size(self) -> int:
        return self.hasher.block_size


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """Timings of one finished request, in simulated seconds, for the latency histograms.

    Times are on the fleet's shared simulated clock, so records of different servers compare.
    `cached_tokens` is what vLLM reports in `usage.prompt_tokens_details.cached_tokens`: for a
    decode request whose KV was pulled that is local hits plus pulled tokens (the prompt less
    its last token); `transferred_tokens` is the pulled part.

    Disaggregated requests: `prefill_arrival` is when the request first arrived at its prefill
    server, placed on this server's clock by the prefill's duration (None when the request was
    not disaggregated), `transfer_seconds` how long it waited
    for its KV (link queue, latency and bytes), `transferred_blocks` how many blocks it pulled (0
    when the remote blocks were gone and it prefilled locally). Its time to first token as a
    client sees it is `first_token - min(arrival, prefill_arrival)` (`first_arrival`); `ttft`
    is vLLM's, from this server's arrival. `itl_mean` is the mean gap between this request's
    output tokens (None with fewer than two).
    """

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
    prefill_arrival: float | None = None
    transfer_seconds: float = 0.0
    transferred_blocks: int = 0
    transferred_tokens: int = 0
    itl_mean: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def first_arrival(self) -> float:
        """When the request first reached a server: its prefill server's arrival if earlier."""
        if self.prefill_arrival is None:
            return self.arrival
        return min(self.arrival, self.prefill_arrival)


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


class RequestRejected(ValueError):
    """The engine cannot ever run this request (it needs more KV blocks than exist)."""


class KVSource(Protocol):
    """The blocks a remote prefill engine holds for one request, as a decode-side pull sees them.

    The server implements it over its fleet's peers; the engine asks before it pulls and
    releases when the pull is done (vLLM's decode worker notifies the prefill worker).
    """

    def available(self) -> bool:
        """The remote engine (the same one, still up) still holds the blocks."""
        ...

    def release(self) -> bool:
        """The pull is done: the remote frees the blocks. False if they were already gone."""
        ...


@dataclass(frozen=True, slots=True)
class _Held:
    """A finished prefill's blocks, kept for a remote decode until `expires`."""

    blocks: tuple[Block, ...]
    expires: float


class EngineRequest:
    """One request inside the engine, and the HTTP handler's handle on it.

    `tokens` (streaming only) receives each step's new token ids and then None at the end;
    `done` resolves with the `FinishedRequest` record. A prefill request (`remote_decode`) that
    finished with its blocks held has their ids in `held_block_ids`.
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
        "held_block_ids",
        "kv_ready_at",
        "kv_source",
        "last_token",
        "lora",
        "max_tokens",
        "num_computed",
        "num_registered",
        "output_ids",
        "preemptions",
        "prefill_arrival",
        "prompt_len",
        "queried",
        "remote_decode",
        "request_id",
        "salt",
        "scheduled",
        "state",
        "tokens",
        "transfer_seconds",
        "transferred_blocks",
        "transferred_tokens",
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
        remote_decode: bool = False,
        kv_source: KVSource | None = None,
        prefill_arrival: float | None = None,
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
        self.queried = False  # counted in the prefix-cache queries (once, as vLLM does)
        self.remote_decode = remote_decode
        self.held_block_ids: tuple[int, ...] | None = None
        self.kv_source = kv_source
        self.prefill_arrival = prefill_arrival
        self.kv_ready_at = 0.0
        self.transfer_seconds = 0.0
        self.transferred_blocks = 0
        self.transferred_tokens = 0


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
        # Decode requests waiting for their KV, in completion order (the link is a FIFO).
        self._transferring: deque[EngineRequest] = deque()
        self._link_free_at = 0.0
        # Finished prefills' blocks kept for remote decodes, in expiry order (one timeout).
        self._held: dict[str, _Held] = {}
        self._held_blocks = 0
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
        self._waiting.append(req)
        self._unadded += 1
        self._wake.set()
        return req

    def abort(self, req: EngineRequest) -> None:
        """Drop a request whose client went away (vLLM aborts on disconnect)."""
        if req.state == _FINISHED:
            return
        if req.state == _WAITING:
            self._waiting.remove(req)
        elif req.state == _TRANSFERRING:
            # vLLM frees a pulling request's blocks once the read ends; here at once. The
            # prefill side is not told, and keeps its blocks until they expire, as in vLLM.
            self._transferring.remove(req)
        self._finish(req, "abort")

    def reset(self) -> None:
        """Abort everything and empty the cache, as a restarted server starts."""
        for req in [*self._running, *self._waiting, *self._transferring]:
            self._finish(req, "abort")
        self._waiting.clear()
        self._transferring.clear()
        self._unadded = 0
        self._link_free_at = 0.0
        for held in self._held.values():
            self.pool.free(held.blocks)
        self._held.clear()
        self._held_blocks = 0
        self.pool.clear()
        self._gpu_loras.clear()
        self._counters = _Counters()

    # -- blocks held for remote decodes ----------------------------------------------------------

    def held_block_ids(self, request_id: str) -> tuple[int, ...] | None:
        held = self._held.get(request_id)
        return None if held is None else tuple(b.block_id for b in held.blocks)

    def find_held(self, request_id: str | None, block_ids: Sequence[int]) -> str | None:
        """The held request a pull names: by its request id, else by its exact block ids (what
        parameters without vLLM's newer `remote_request_id` identify it by)."""
        if request_id is not None:
            return request_id if request_id in self._held else None
        wanted = tuple(block_ids)
        for held_id, held in self._held.items():
            if wanted and tuple(b.block_id for b in held.blocks) == wanted:
                return held_id
        return None

    def release_held(self, request_id: str) -> bool:
        """A decode engine pulled these blocks: free them. False if they were already gone."""
        held = self._held.pop(request_id, None)
        if held is None:
            return False
        self._free_held(held)
        return True

    def _free_held(self, held: _Held) -> None:
        self.pool.free(held.blocks)
        self._held_blocks -= len(held.blocks)
        self._wake.set()  # a waiting request may fit now

    def _expire_held(self) -> None:
        held = self._held
        now = self.now()
        while held:
            request_id, first = next(iter(held.items()))
            if first.expires > now:
                return
            del held[request_id]
            logger.warning(
                "releasing the %d KV blocks of request %s: no decode pulled them within %s s",
                len(first.blocks),
                request_id,
                self.config.kv_transfer_timeout_seconds,
            )
            self._free_held(first)

    # -- pulls from remote prefills --------------------------------------------------------------

    def _start_pull(self, req: EngineRequest, hit_blocks: int) -> None:
        """Queue the uncached blocks' transfer on this engine's link (one at a time, FIFO)."""
        cfg = self.config
        now = self.now()
        blocks = len(req.blocks) - hit_blocks
        size = blocks * cfg.block_size * cfg.profile.kv_bytes_per_token
        self._link_free_at = max(now, self._link_free_at) + size / cfg.kv_transfer_bandwidth
        req.kv_ready_at = self._link_free_at + cfg.kv_transfer_latency_seconds
        req.transfer_seconds = req.kv_ready_at - now
        req.transferred_blocks = blocks
        req.transferred_tokens = req.prompt_len - hit_blocks * cfg.block_size
        req.state = _TRANSFERRING
        self._transferring.append(req)

    def _land_pulls(self) -> None:
        """Pulls that completed by now go back to the front of the queue, KV in place."""
        cfg = self.config
        now = self.now()
        landed: list[EngineRequest] = []
        while self._transferring and self._transferring[0].kv_ready_at <= now:
            req = self._transferring.popleft()
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
                self._register(req, req.num_computed // cfg.block_size)
            else:
                self._pull_failed(req, "the remote blocks were freed during the transfer")
                self.pool.free(req.blocks)
                req.blocks = []
                req.num_computed = 0
                req.num_registered = 0
            req.state = _WAITING
            landed.append(req)
        self._waiting.extendleft(reversed(landed))

    def _pull_failed(self, req: EngineRequest, why: str) -> None:
        logger.warning("request %s: KV pull failed (%s); prefilling locally", req.request_id, why)
        self._counters.kv_transfer_failures += 1
        req.kv_source = None
        req.transferred_blocks = 0
        req.transferred_tokens = 0

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
        # vLLM counts requests waiting for remote KV as waiting, for reason "deferred".
        pulling = len(self._transferring)
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting) + pulling,
            waiting_deferred=self._deferred + pulling,
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
            busy_seconds=c.busy_seconds,
            kv_transfer_blocks=c.kv_transfer_blocks,
            kv_transfer_tokens=c.kv_transfer_tokens,
            kv_transfer_failures=c.kv_transfer_failures,
            kv_held_blocks=self._held_blocks,
        )

    def take_cache_events(self) -> list[CacheEvent]:
        return self.pool.take_events()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, on_step_end: Callable[[], None] | None = None) -> None:
        while not self._closed:
            await self._resumed.wait()
            self._expire_held()
            self._land_pulls()
            if not self._running and not self._waiting:
                await self._wait_for_news()
                continue
            self._idle = False
            plan = self._schedule()
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
        times: list[float] = []
        if self._transferring:
            times.append(self._transferring[0].kv_ready_at)
        if self._held:
            times.append(next(iter(self._held.values())).expires)
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

    def _schedule(self) -> _Plan:
        cfg = self.config
        plan = _Plan()
        budget = cfg.max_num_batched_tokens
        self._deferred = 0
        if not cfg.profile.mixed_prefill:
            # vLLM V0 without chunked prefill: a step of whole waiting prompts if any fits,
            # else a decode step of the running requests (which admits nothing).
            self._admit(plan, budget, whole_prompts=True)
            if not plan.items:
                self._schedule_running(plan, budget)
            return plan
        budget, preempted = self._schedule_running(plan, budget)
        if not preempted:
            self._admit(plan, budget, whole_prompts=False)
        return plan

    def _schedule_running(self, plan: _Plan, budget: int) -> tuple[int, bool]:
        """Give running requests their next tokens; (budget left, whether one was preempted)."""
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
        return budget, preempted

    def _admit(self, plan: _Plan, budget: int, *, whole_prompts: bool) -> None:
        """Admit waiting requests FCFS within the budget, `max_num_seqs` and free blocks.

        `whole_prompts` (V0): a prompt is admitted only if all of its uncached tokens fit.
        """
        cfg = self.config
        running = self._running
        skipped: list[EngineRequest] = []
        waiting = self._waiting
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = waiting[0]
            if req.lora is not None and not self._lora_fits(req.lora.name):
                skipped.append(waiting.popleft())
                continue
            if req.blocks:
                # Its KV arrived from a remote prefill: only the last prompt token is left.
                num_new = min(len(req.all_ids) - req.num_computed, budget)
                if not self._allocate(req, req.num_computed + num_new):
                    break
                waiting.popleft()
            else:
                hit_blocks: list[Block] = []
                if cfg.enable_prefix_caching:
                    # The last token is always recomputed to get logits (vLLM: num_tokens - 1).
                    max_blocks = (len(req.all_ids) - 1) // cfg.block_size
                    hit_blocks = self.pool.longest_prefix(req.hashes, max_blocks)
                num_cached = len(hit_blocks) * cfg.block_size
                if req.kv_source is not None and not req.kv_source.available():
                    self._pull_failed(req, "the remote engine holds no such blocks")
                pulling = req.kv_source is not None
                # A pull allocates the whole prompt now and computes nothing in this step.
                num_new = 0 if pulling else min(len(req.all_ids) - num_cached, budget)
                if whole_prompts and not pulling and num_new < len(req.all_ids) - num_cached:
                    break
                self.pool.touch(hit_blocks)
                req.blocks = list(hit_blocks)
                if not self._allocate(req, req.prompt_len if pulling else num_cached + num_new):
                    self.pool.free(req.blocks)
                    req.blocks = []
                    break
                waiting.popleft()
                if not req.queried:
                    # Local hits only: pulled tokens are not prefix-cache hits (as in vLLM).
                    req.queried = True
                    self._counters.prefix_queries += len(req.all_ids)
                    self._counters.prefix_hits += num_cached
                    req.cached_tokens = num_cached
                req.num_computed = num_cached
                req.num_registered = len(hit_blocks)
                if pulling:
                    self._start_pull(req, len(hit_blocks))
                    continue
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
        # A preempted request recomputes locally, pulled KV included (as vLLM's would).
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
            self._register(req, req.num_computed // cfg.block_size)
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

    def _register(self, req: EngineRequest, full_blocks: int) -> None:
        """Register the request's first `full_blocks` blocks in the prefix cache."""
        cfg = self.config
        if not cfg.enable_prefix_caching:
            return
        full = min(full_blocks, len(req.hashes))
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
            if req.remote_decode and reason == "length":
                # vLLM's delayed free: a finished prefill keeps its KV for the decode's pull.
                held = _Held(
                    tuple(req.blocks), self.now() + self.config.kv_transfer_timeout_seconds
                )
                self._held[req.request_id] = held
                self._held_blocks += len(held.blocks)
                req.held_block_ids = tuple(b.block_id for b in held.blocks)
            else:
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
            prefill_arrival=req.prefill_arrival,
            transfer_seconds=req.transfer_seconds,
            transferred_blocks=req.transferred_blocks,
            transferred_tokens=req.transferred_tokens,
            itl_mean=_itl_mean(req),
        )
        self.recent.append(record)
        if reason != "abort":
            self.observer.on_finished(record)
        if req.tokens is not None:
            req.tokens.put_nowait(None)
        if not req.done.done():
            req.done.set_result(record)
        self._wake.set()


def _itl_mean(req: EngineRequest) -> float | None:
    gaps = len(req.output_ids) - 1
    if gaps < 1 or req.first_token is None or req.last_token is None:
        return None
    return (req.last_token - req.first_token) / gaps
