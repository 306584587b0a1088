"""A simulated engine's scheduler, shaped like vLLM V1's (FCFS, vLLM's default policy): which
requests compute how many tokens in the next step.

Each step it:
1. gives every running request its next tokens: one for a decoding request, the rest of its
   prompt (up to the token budget: chunked prefill) for a prefilling one, allocating KV blocks as
   it goes and preempting the newest running request when blocks run out (its blocks are freed,
   it goes back to the front of the queue and is recomputed later, minus what is still cached);
2. if nothing was preempted, admits waiting requests while the token budget, `max_num_seqs` and
   free blocks allow. A request first looks up its longest cached prefix (cached tokens cost no
   prefill); a request whose LoRA adapter is not in the batch while `max_loras` adapters already
   are is skipped ("deferred") and keeps its place.
Profiles without mixed prefill (vLLM V0 without chunked prefill) run a step of whole waiting
prompts if any fits, else a decode step. The plan carries what scheduling counted, for the
engine's counters; the engine (`engine`) times and applies it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from extproc.sim.cache import Block, BlockPool
from extproc.sim.request import RUNNING, WAITING, EngineRequest
from extproc.sim.transfer import KVLink, pull_failed

if TYPE_CHECKING:
    from extproc.sim.engine import EngineConfig


@dataclass(slots=True)
class Plan:
    """One step's schedule: (request, tokens to compute) plus the figures that time it, and what
    scheduling it counted (prefix-cache queries and hits, preemptions, failed pulls)."""

    items: list[tuple[EngineRequest, int]] = field(default_factory=list)
    tokens: int = 0
    decode_context: int = 0
    prefill_units: float = 0.0
    lora_swaps: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    pull_failures: int = 0


class Scheduler:
    """The waiting queue, the running batch and the adapters in the GPU's LoRA slots."""

    def __init__(
        self,
        config: EngineConfig,
        pool: BlockPool,
        link: KVLink,
        *,
        now: Callable[[], float],
    ) -> None:
        self.config = config
        self._pool = pool
        self._link = link
        self._now = now
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.deferred = 0
        self.running_loras: dict[str, int] = {}
        # Adapters resident in the GPU's max_loras slots, least recently used first.
        self._gpu_loras: OrderedDict[str, None] = OrderedDict()

    def schedule(self) -> Plan:
        cfg = self.config
        plan = Plan()
        budget = cfg.max_num_batched_tokens
        self.deferred = 0
        if not cfg.profile.mixed_prefill:
            # vLLM V0 without chunked prefill: a step of whole waiting prompts if any fits,
            # else a decode step of the running requests (which admits nothing).
            self._admit(plan, budget, whole_prompts=True)
            if not plan.items:
                self._schedule_running(plan, budget)
            # V0 marks a batch's blocks computed once the batch is built (its scheduler's
            # `mark_blocks_as_computed`): they are hits from the next step, not in this one.
            for req, num_new in plan.items:
                self.register(req, self._scheduled_blocks(req, num_new))
            return plan
        budget, preempted = self._schedule_running(plan, budget)
        if not preempted:
            self._admit(plan, budget, whole_prompts=False)
        return plan

    def leave_running(self, req: EngineRequest) -> None:
        """Take a request out of the batch (finished, aborted or preempted)."""
        self.running.remove(req)
        if req.lora is not None:
            name = req.lora.name
            left = self.running_loras[name] - 1
            if left:
                self.running_loras[name] = left
            else:
                del self.running_loras[name]

    def clear(self) -> None:
        self.waiting.clear()
        self._gpu_loras.clear()

    def _schedule_running(self, plan: Plan, budget: int) -> tuple[int, bool]:
        """Give running requests their next tokens; (budget left, whether one was preempted)."""
        preempted = False
        i = 0
        running = self.running
        while i < len(running) and budget > 0:
            req = running[i]
            num_new = min(len(req.all_ids) - req.num_computed, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self._allocate(req, req.num_computed + num_new):
                victim = running[-1]
                self._preempt(victim, plan)
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

    def _admit(self, plan: Plan, budget: int, *, whole_prompts: bool) -> None:
        """Admit waiting requests FCFS within the budget, `max_num_seqs` and free blocks.

        `whole_prompts` (V0): a prompt is admitted only if all of its uncached tokens fit.
        """
        cfg = self.config
        running = self.running
        skipped: list[EngineRequest] = []
        waiting = self.waiting
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
                    hit_blocks = self._pool.longest_prefix(req.hashes, max_blocks)
                num_cached = len(hit_blocks) * cfg.block_size
                if req.kv_source is not None and not req.kv_source.available():
                    pull_failed(req, "the remote engine holds no such blocks")
                    plan.pull_failures += 1
                pulling = req.kv_source is not None
                # A pull allocates the whole prompt now and computes nothing in this step.
                num_new = 0 if pulling else min(len(req.all_ids) - num_cached, budget)
                if whole_prompts and not pulling and num_new < len(req.all_ids) - num_cached:
                    break
                self._pool.touch(hit_blocks)
                req.blocks = list(hit_blocks)
                if not self._allocate(req, req.prompt_len if pulling else num_cached + num_new):
                    self._pool.free(req.blocks)
                    req.blocks = []
                    break
                waiting.popleft()
                if not req.queried:
                    # Local hits only: pulled tokens are not prefix-cache hits (as in vLLM).
                    req.queried = True
                    plan.prefix_queries += len(req.all_ids)
                    plan.prefix_hits += num_cached
                    req.cached_tokens = num_cached
                req.num_computed = num_cached
                req.num_registered = len(hit_blocks)
                if pulling:
                    self._link.start(req, len(hit_blocks), self._now())
                    continue
            if req.scheduled is None:
                req.scheduled = self._now()
            req.state = RUNNING
            running.append(req)
            if req.lora is not None:
                name = req.lora.name
                self.running_loras[name] = self.running_loras.get(name, 0) + 1
                if name in self._gpu_loras:
                    self._gpu_loras.move_to_end(name)
                else:
                    plan.lora_swaps += 1
                    self._gpu_loras[name] = None
                    while len(self._gpu_loras) > cfg.max_loras:
                        self._gpu_loras.popitem(last=False)
            self._add_to_plan(plan, req, num_new)
            budget -= num_new
        self.deferred = len(skipped)
        waiting.extendleft(reversed(skipped))

    def _lora_fits(self, name: str) -> bool:
        return name in self.running_loras or len(self.running_loras) < self.config.max_loras

    def register(self, req: EngineRequest, full_blocks: int) -> None:
        """Register the request's first `full_blocks` blocks in the prefix cache."""
        cfg = self.config
        if not cfg.enable_prefix_caching:
            return
        full = min(full_blocks, len(req.hashes))
        if full > req.num_registered:
            self._pool.cache_full_blocks(
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

    def _scheduled_blocks(self, req: EngineRequest, num_new: int) -> int:
        """The request's full blocks once `num_new` more of its tokens are computed."""
        return min(req.num_computed + num_new, len(req.all_ids)) // self.config.block_size

    def _add_to_plan(self, plan: Plan, req: EngineRequest, num_new: int) -> None:
        """Schedule `num_new` of the request's tokens in this step. The blocks they fill are
        cached now, before the step computes them, as vLLM's `allocate_slots` caches every full
        block up to the tokens it schedules (their hashes come from the token ids, not the KV):
        a request scheduled after this one, in this step or the next, hits them. A burst of
        prompts on one prefix computes it once: the first prompt's blocks are in the cache by
        the time the second is looked up, while the first is still computing them. Their KV
        events still go out at the step's end (the server takes them then, as vLLM's
        `update_from_output` does). V0 profiles cache them once the whole batch is planned
        (`schedule`)."""
        if self.config.profile.mixed_prefill:
            self.register(req, self._scheduled_blocks(req, num_new))
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
        new = self._pool.allocate(needed)
        if new is None:
            return False
        req.blocks.extend(new)
        return True

    def _preempt(self, req: EngineRequest, plan: Plan) -> None:
        # A preempted request recomputes locally, pulled KV included (as vLLM's would).
        self.leave_running(req)
        self._pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_registered = 0
        req.preemptions += 1
        req.state = WAITING
        plan.preemptions += 1
        self.waiting.appendleft(req)
