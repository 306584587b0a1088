"""Scorers: each turns one signal into a score in [0, 1] per candidate (higher is better).

All are pure over the request and the candidates. Load-like signals are scaled across the pool
(`_spread`: the best gets 1, the worst 0), as the reference picker's queue scorer does, so a
weight means the same whatever the pool's absolute load. The cost scorer lives in `cost.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from extproc.scheduling.types import Candidate, SchedulingRequest

SESSION_HEADER = "x-session-id"


def spread(values: Sequence[float]) -> list[float]:
    """Lower value -> higher score, scaled so the best gets 1 and the worst 0."""
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    return [(high - v) / (high - low) for v in values]


class LeastRequestScorer:
    """Prefers endpoints with fewer requests in flight from this picker (streams included)."""

    name = "least-request-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        return spread([c.load.requests for c in candidates])


class QueueScorer:
    """Prefers shorter waiting queues: the scraped queue plus what we sent since that scrape."""

    name = "queue-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        return spread([c.queue for c in candidates])


class KvCacheUtilizationScorer:
    """1 - KV-cache usage: free KV blocks are where a new request's prefill can land.
    An endpoint without stats (collector off, or not scraped yet) counts as empty."""

    name = "kv-cache-utilization-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        return [
            1.0 - min(1.0, max(0.0, c.stats.kv_usage)) if c.stats is not None else 1.0
            for c in candidates
        ]


class RunningRequestsScorer:
    """Prefers smaller running batches (the scraped `num_requests_running`)."""

    name = "running-requests-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        return spread([c.stats.running if c.stats is not None else 0.0 for c in candidates])


class InFlightTokensScorer:
    """Prefers endpoints with fewer prompt tokens in flight from this picker: a long prompt
    weighs more than a short one, which request counts cannot see."""

    name = "in-flight-tokens-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        return spread([c.load.tokens for c in candidates])


class PrefixCacheScorer:
    """The share of the prompt's full blocks the endpoint already holds (`prefix_blocks`, filled
    in from the precise or approximate index before scheduling). No blocks: all score 0, so the
    scorer is neutral for untokenized or short prompts."""

    name = "prefix-cache-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        total = request.prompt_blocks  # the whole prompt's, also when probed
        if total == 0:
            return [0.0] * len(candidates)
        return [min(1.0, c.prefix_blocks / total) for c in candidates]


# The reference picker's LoRA affinity values: no load, a cheap load, a deferred request.
LORA_ACTIVE = 1.0
LORA_FREE_SLOT = 0.8
LORA_WAITING = 0.6


def lora_affinity(candidate: Candidate, adapter: str) -> float:
    """How ready `candidate` is to run `adapter` now, from its `vllm:lora_requests_info`."""
    stats = candidate.stats
    lora = stats.lora if stats is not None else None
    if lora is None:
        return 0.0
    if adapter in lora.running:
        return LORA_ACTIVE
    # A free slot beats "already waiting": a waiting adapter is waiting for a slot too.
    if len(lora.running) < lora.max_loras:
        return LORA_FREE_SLOT
    if adapter in lora.waiting:
        return LORA_WAITING
    return 0.0


class LoraAffinityScorer:
    """Adapter in the running batch 1.0, a free adapter slot 0.8, adapter already waiting 0.6,
    else 0 (it must wait for a slot). Requests for a base model score 1 everywhere."""

    name = "lora-affinity-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        adapter = request.lora
        if adapter is None:
            return [1.0] * len(candidates)
        return [lora_affinity(c, adapter) for c in candidates]


def session_of(request: SchedulingRequest) -> str | None:
    """The request's session: the field the pipeline filled, else the `x-session-id` header."""
    return request.session_id or request.headers.get(SESSION_HEADER) or None


def rendezvous_weight(session: str, address: str) -> int:
    """Highest-random-weight hash of (session, endpoint). blake2b, not `hash()`: it must agree
    across processes and restarts, so every picker replica sends a session to the same place."""
    digest = hashlib.blake2b(f"{session}\x00{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SessionAffinityScorer:
    """1 for the session's endpoint, 0 for the others; 1 everywhere without a session.

    The session's endpoint is the candidate with the highest rendezvous weight, so a session
    stays put while its endpoint remains a candidate, and when the set changes only sessions
    whose endpoint left (or whose new top is a newcomer) move. No table, nothing to expire.
    """

    name = "session-affinity-scorer"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        session = session_of(request)
        if session is None:
            return [1.0] * len(candidates)
        weights = [rendezvous_weight(session, c.address) for c in candidates]
        top = max(weights)
        return [1.0 if w == top else 0.0 for w in weights]
