"""Prefill/decode disaggregation: which endpoints may do which half, and when to split at all.

A pool is split when its endpoints carry roles (`prefill`, `decode`; `both` serves either
half and whole requests). The decode endpoint is chosen first, among those that generate: it
holds the request for its whole life, so load and free KV cache decide. Then, if the prompt's
part that endpoint does not hold cached is long enough (`threshold_tokens`), a prefill endpoint
is chosen among those that prefill, where the cached prefix saves work. A short remainder is
cheaper to compute where it will be decoded than to move (llm-d's `pd-profile-handler` rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.scheduling.types import Candidate, SchedulingRequest


@dataclass(frozen=True, slots=True)
class Roles:
    """A model's candidates by half: `decode` serve the request, `prefill` may compute its
    prompt first. `prefill` is empty when the pool is not split."""

    decode: Sequence[Candidate]
    prefill: Sequence[Candidate] = ()


def roles(candidates: Sequence[Candidate]) -> Roles:
    """Split the candidates by role. A pool with no dedicated prefill endpoint is not split; nor
    is one with no endpoint that generates (vLLM serves whole requests on any of them)."""
    decode = [c for c in candidates if c.endpoint.decodes]
    if not decode or all(c.endpoint.role != "prefill" for c in candidates):
        return Roles(candidates)
    return Roles(decode, [c for c in candidates if c.endpoint.prefills])


def uncached_tokens(request: SchedulingRequest, candidate: Candidate) -> int:
    """Prompt tokens `candidate` would have to compute (or receive): those past its cached
    prefix."""
    return max(0, request.prompt_tokens - candidate.prefix_blocks * request.block_size)


def worth_splitting(request: SchedulingRequest, decode: Candidate, threshold_tokens: int) -> bool:
    """Whether the prompt's remainder at the decode endpoint is long enough to prefill
    elsewhere and move."""
    return uncached_tokens(request, decode) >= max(1, threshold_tokens)
