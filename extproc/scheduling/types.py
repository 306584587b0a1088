"""The scheduler's vocabulary: what a plugin is given and what it must return.

Filters, scorers and pickers are synchronous and pure over their inputs (a picker may keep a
cursor, as round-robin must); all I/O happened before, when the snapshot was built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extproc.state.inflight import Load
from extproc.state.snapshot import Endpoint
from extproc.state.stats import EndpointStats


@dataclass(frozen=True, slots=True)
class Candidate:
    """An endpoint as one decision sees it: the snapshot entry plus the picker's own load."""

    endpoint: Endpoint
    load: Load
    # Requests this picker sent it since its metrics were read (the scrape cannot show them yet).
    picked_since_scrape: int = 0
    # Its metrics are stale (or missing while the collector runs): treat it as saturated.
    saturated: bool = False
    # Leading blocks of the request's prompt this endpoint holds in its KV cache (precise index
    # from KV events, or the approximate one learned from our own routing).
    prefix_blocks: int = 0
    # Blocks of any prompt the same index credits this endpoint with: how full its cache is.
    cached_blocks: int = 0
    # Seconds of prompt work this picker sent it that is predicted not to be done yet
    # (`InFlight.backlog`): the queue inside vLLM's running batch that no metric shows.
    prefill_backlog: float = 0.0
    # Of the waiting requests its metrics show, those predicted to be ours (picked before the
    # scrape, not yet admitted then: `InFlight.waiting_at`); `prefill_backlog` counts them.
    waiting_ours: int = 0

    @property
    def stats(self) -> EndpointStats | None:
        return self.endpoint.stats

    @property
    def queue(self) -> float:
        """Requests waiting at the endpoint, including what we sent since the last scrape."""
        waiting = self.stats.waiting if self.stats is not None else 0.0
        return waiting + self.picked_since_scrape

    @property
    def address(self) -> str:
        return self.endpoint.address


@dataclass(frozen=True, slots=True)
class SchedulingRequest:
    model: str | None
    # Tokens in the prompt (exact when tokenized, else an estimate from its size).
    prompt_tokens: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    # vLLM-exact chained block hashes (64-bit event ids) of the prompt's full blocks, in order;
    # empty when the prompt was not tokenized.
    block_hashes: tuple[int, ...] = ()
    block_size: int = 16
    max_tokens: int | None = None
    # The LoRA adapter the request names (its `model`), when that is an adapter.
    lora: str | None = None
    session_id: str | None = None
    # Negative: sheddable under saturation (the field's InferenceObjective priority).
    priority: int = 0

    @property
    def prompt_blocks(self) -> int:
        """Full blocks in the prompt (0 when it was not tokenized). More than the hashes when
        the prompt was probed only as far as some endpoint holds it: its token count then
        estimates the rest (`PromptBlocks.probe`)."""
        if not self.block_hashes:
            return 0
        return max(len(self.block_hashes), self.prompt_tokens // self.block_size)


@dataclass(frozen=True, slots=True)
class Ranked:
    """The outcome of one profile: endpoints best first, and each one's total score."""

    order: tuple[Candidate, ...]
    scores: Mapping[str, float]
    # Per scorer (its label in the profile), each endpoint's unweighted score in [0, 1]: what
    # `explain.py` shows. Empty for profiles without scorers.
    breakdown: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


class Filter(Protocol):
    name: str

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]: ...


class Scorer(Protocol):
    name: str

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Sequence[float]:
        """One score in [0, 1] per candidate, in the same order; higher is better."""
        ...


class Picker(Protocol):
    name: str

    def rank(self, candidates: Sequence[Candidate], scores: Sequence[float]) -> Sequence[Candidate]:
        """All candidates, best first; the first is the pick, the rest are fallbacks."""
        ...
