"""Filters: narrow the candidates before scoring. Each keeps the request servable if it can:
when no candidate passes, a filter returns them all (the least-bad endpoint beats a refusal;
refusing is admission's job, in `admission.py`)."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.scheduling.scorers import LORA_ACTIVE, LORA_FREE_SLOT, lora_affinity
from extproc.scheduling.types import Candidate, SchedulingRequest


class PreferUnsaturated:
    """Drops saturated endpoints (stale metrics) while any other can serve; if all are
    saturated, keeps them all: the least-bad endpoint beats refusing the request."""

    name = "prefer-unsaturated-filter"

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        fresh = [c for c in candidates if not c.saturated]
        return fresh or candidates


class LoraAffinityFilter:
    """For an adapter request: keep endpoints running the adapter; failing that, endpoints with
    a free adapter slot; failing that, everyone. Loading an adapter into a full batch defers
    the request until a slot frees, which costs more than most queues."""

    name = "lora-affinity-filter"

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        adapter = request.lora
        if adapter is None:
            return candidates
        affinity = [lora_affinity(c, adapter) for c in candidates]
        for wanted in (LORA_ACTIVE, LORA_FREE_SLOT):
            kept = [c for c, a in zip(candidates, affinity, strict=True) if a >= wanted]
            if kept:
                return kept
        return candidates


class LowQueueFilter:
    """Keeps endpoints whose queue (scraped waiting + sent since) is at most `threshold`."""

    name = "low-queue-filter"

    def __init__(self, threshold: float = 5.0) -> None:
        self.threshold = threshold

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        kept = [c for c in candidates if c.queue <= self.threshold]
        return kept or candidates


class LowKvCacheFilter:
    """Keeps endpoints whose KV-cache usage is at most `threshold` (0..1); endpoints without
    stats pass, as they do everywhere else."""

    name = "low-kv-cache-filter"

    def __init__(self, threshold: float = 0.8) -> None:
        self.threshold = threshold

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        kept = [c for c in candidates if c.stats is None or c.stats.kv_usage <= self.threshold]
        return kept or candidates


class PrefillFilter:
    """Keeps endpoints that take prefills (role `prefill` or `both`), llm-d's `prefill-filter`.
    Unlike the others it may leave none: a role is a deployment's decision, not a preference."""

    name = "prefill-filter"

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        return [c for c in candidates if c.endpoint.prefills]


class DecodeFilter:
    """Keeps endpoints that generate (role `decode` or `both`), llm-d's `decode-filter`."""

    name = "decode-filter"

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        return [c for c in candidates if c.endpoint.decodes]
