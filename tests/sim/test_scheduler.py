"""The simulated scheduler on its own: preemption of the newest running request when blocks run
out, LoRA deferral that keeps a request's place in the queue, and prefix hits on blocks another
request is still computing (vLLM caches a block when it schedules it)."""

from __future__ import annotations

import asyncio

from extproc.prefix.hashing import BlockHasher
from extproc.sim.cache import BlockPool
from extproc.sim.engine import EngineConfig
from extproc.sim.profiles import get_profile
from extproc.sim.request import RUNNING, WAITING, EngineRequest, LoraAdapter
from extproc.sim.scheduler import Scheduler
from extproc.sim.transfer import KVLink


def _scheduler(blocks: int, profile: str = "a100-8b") -> Scheduler:
    config = EngineConfig(
        profile=get_profile(profile),
        num_gpu_blocks=blocks,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        max_model_len=4096,
    )
    link = KVLink(bandwidth=1e9, latency=0.0, block_size=16, kv_bytes_per_token=1)
    return Scheduler(config, BlockPool(blocks), link, now=lambda: 0.0)


def _request(
    request_id: str,
    prompt_len: int,
    lora: LoraAdapter | None = None,
    *,
    suffix: tuple[int, ...] = (),
) -> EngineRequest:
    """A prompt of ids 0 .. `prompt_len` - 1, then `suffix`."""
    return EngineRequest(
        request_id,
        [*range(prompt_len), *suffix],
        max_tokens=8,
        lora=lora,
        cache_salt=None,
        stream=False,
        arrival=0.0,
        loop=asyncio.get_running_loop(),
    )


async def test_the_newest_running_request_is_preempted_when_blocks_run_out() -> None:
    sched = _scheduler(blocks=4)
    old, new = _request("old", 30), _request("new", 30)
    sched.waiting.extend([old, new])
    plan = sched.schedule()
    assert [(r.request_id, n) for r, n in plan.items] == [("old", 30), ("new", 30)]
    # The step ran: both computed their prompts and the old one grew past its two blocks.
    for req in (old, new):
        req.num_computed = 30
    old.all_ids += [1, 2, 3]
    plan = sched.schedule()
    assert [(r.request_id, n) for r, n in plan.items] == [("old", 3)]
    assert plan.preemptions == 1
    assert (new.state, new.preemptions, new.blocks, new.num_computed) == (WAITING, 1, [], 0)
    assert list(sched.waiting) == [new] and sched.running == [old]
    assert len(old.blocks) == 3


async def test_a_request_whose_adapter_does_not_fit_keeps_its_place() -> None:
    sched = _scheduler(blocks=64)  # max_loras 1
    x, y = LoraAdapter("x", "/x", 1), LoraAdapter("y", "/y", 2)
    first, deferred, plain = _request("x", 20, x), _request("y", 20, y), _request("base", 20)
    sched.waiting.extend([first, deferred, plain])
    plan = sched.schedule()
    assert [r.request_id for r, _ in plan.items] == ["x", "base"]
    assert (plan.lora_swaps, sched.deferred, list(sched.waiting)) == (1, 1, [deferred])
    assert first.state == RUNNING and sched.running_loras == {"x": 1}
    sched.leave_running(first)  # x finished; base is mid-step with nothing new to compute
    plain.num_computed = len(plain.all_ids)
    plan = sched.schedule()
    assert [r.request_id for r, _ in plan.items] == ["y"]
    assert (plan.lora_swaps, sched.deferred, sched.running_loras) == (1, 0, {"y": 1})


def _hashed(req: EngineRequest) -> EngineRequest:
    """With its prompt's block hashes, as the engine gives a request it accepts."""
    req.hashes = BlockHasher().hash_blocks(req.all_ids)
    req.extra_keys = [None] * len(req.hashes)
    return req


async def test_a_prompt_hits_the_blocks_another_is_computing_in_the_same_step() -> None:
    # vLLM's allocate_slots caches every full block up to the tokens it schedules, before the
    # step runs: a second prompt scheduled after the first, in the same step, hits them.
    sched = _scheduler(blocks=64)
    first = _hashed(_request("first", 480))
    second = _hashed(_request("second", 480, suffix=(7,) * 40))
    sched.waiting.extend([first, second])
    plan = sched.schedule()
    assert [(r.request_id, n) for r, n in plan.items] == [("first", 480), ("second", 40)]
    assert (second.cached_tokens, plan.prefix_hits) == (480, 480)


async def test_a_prompt_hits_the_chunks_scheduled_so_far() -> None:
    # A 2,000-token prompt runs in chunks of the 1,024-token budget. A second prompt on the same
    # prefix that arrives during the first chunk is admitted in the step of the last one, after
    # the running prompt: it hits every block scheduled so far, the last chunk's included.
    sched = _scheduler(blocks=256)
    first = _hashed(_request("first", 2000))
    sched.waiting.append(first)
    assert [(r.request_id, n) for r, n in sched.schedule().items] == [("first", 1024)]
    first.num_computed = 1024  # the step ran
    second = _hashed(_request("second", 2000, suffix=(7,) * 20))
    sched.waiting.append(second)
    plan = sched.schedule()
    assert [(r.request_id, n) for r, n in plan.items] == [("first", 976), ("second", 20)]
    assert second.cached_tokens == 2000


async def test_a_v0_batch_shares_no_blocks_until_the_next_step() -> None:
    # vLLM V0 marks a batch's blocks computed once the batch is built: the second prompt of the
    # same batch computes the shared prefix again; one scheduled in the next step hits it.
    sched = _scheduler(blocks=128, profile="a100-8b-v05")
    first = _hashed(_request("first", 480))
    second = _hashed(_request("second", 480, suffix=(7,) * 40))
    sched.waiting.extend([first, second])
    plan = sched.schedule()
    assert [(r.request_id, n) for r, n in plan.items] == [("first", 480), ("second", 520)]
    assert plan.prefix_hits == 0
    for req, n in plan.items:  # the step ran
        req.num_computed += n
    third = _hashed(_request("third", 480, suffix=(9,) * 40))
    sched.waiting.append(third)
    sched.schedule()
    assert third.cached_tokens == 480
