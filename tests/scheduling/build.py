"""Small builders for scheduling tests: candidates from a few numbers."""

from __future__ import annotations

from extproc.scheduling.types import Candidate
from extproc.state.inflight import Load
from extproc.state.snapshot import Endpoint
from extproc.state.stats import EndpointStats, LoraState


def addr(i: int) -> str:
    return f"10.0.0.{i}:8000"


def cand(
    i: int = 0,
    *,
    waiting: float = 0.0,
    running: float = 0.0,
    kv: float = 0.0,
    requests: int = 0,
    tokens: int = 0,
    prefix: int = 0,
    picked: int = 0,
    saturated: bool = False,
    lora: LoraState | None = None,
    stats: bool = True,
    backlog: float = 0.0,
    gpu_blocks: int | None = None,
    cached: int = 0,
    ours: int = 0,
) -> Candidate:
    endpoint_stats = (
        EndpointStats(
            read_at=0.0,
            waiting=waiting,
            running=running,
            kv_usage=kv,
            lora=lora,
            block_size=16 if gpu_blocks else None,
            num_gpu_blocks=gpu_blocks,
        )
        if stats
        else None
    )
    return Candidate(
        Endpoint(addr(i), frozenset({"m"}), True, stats=endpoint_stats),
        Load(requests, tokens),
        picked_since_scrape=picked,
        saturated=saturated,
        prefix_blocks=prefix,
        prefill_backlog=backlog,
        cached_blocks=cached,
        waiting_ours=ours,
    )
