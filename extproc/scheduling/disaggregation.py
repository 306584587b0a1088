"""Prefill/decode disaggregation: which endpoints may do which half, when to split at all, where
the prompt is computed, and the bodies the two halves get.

A pool is split when its endpoints carry roles (`prefill`, `decode`; `both` serves either
half and whole requests). The decode endpoint is chosen first, among those that generate: it
holds the request for its whole life, so load and free KV cache decide. Then, if the prompt's
part that endpoint does not hold cached is long enough (`threshold_tokens`), a prefill endpoint
is chosen among those that prefill, where the cached prefix saves work. A short remainder is
cheaper to compute where it will be decoded than to move (llm-d's `pd-profile-handler` rule).

The bodies are vLLM's `kv_transfer_params` (NixlConnector) protocol, as its disaggregated-serving
proxy and the llm-d routing sidecar send them: the prefill endpoint gets the request with
`do_remote_decode` set, one output token and no stream; it answers with the `kv_transfer_params`
that locate the KV blocks it holds (engine, block ids, host, port), and the decode endpoint gets
the original request with those parameters, pulls the blocks and generates. Both ends are
vLLM's; the picker only carries the parameters across, without reading them.

Everything here is pure but `count_work` (the in-flight counts) and `centralized_prefill`, whose
I/O is the `Prefiller` handed in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.scheduling.candidates import PrefixLookup, with_prefix_matches
from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.framework import Profile
from extproc.scheduling.types import Candidate, SchedulingRequest
from extproc.state.inflight import InFlight

# What a prefill request carries: "compute the prompt, keep its KV for a remote decode".
PREFILL_PARAMS: Mapping[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


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


def matched(split: Roles, hashes: Sequence[int], index: PrefixLookup | None) -> Roles:
    """Both halves' candidates with the leading blocks of the prompt each holds."""
    if index is None or not hashes:
        return split
    prefill = with_prefix_matches(split.prefill, hashes, index) if split.prefill else ()
    return Roles(with_prefix_matches(split.decode, hashes, index), prefill)


def uncached_tokens(request: SchedulingRequest, candidate: Candidate) -> int:
    """Prompt tokens `candidate` would have to compute (or receive): those past its cached
    prefix."""
    return max(0, request.prompt_tokens - candidate.prefix_blocks * request.block_size)


def worth_splitting(request: SchedulingRequest, decode: Candidate, threshold_tokens: int) -> bool:
    """Whether the prompt's remainder at the decode endpoint is long enough to prefill
    elsewhere and move."""
    return uncached_tokens(request, decode) >= max(1, threshold_tokens)


def prefill_endpoint(
    request: SchedulingRequest,
    decode: Candidate,
    prefill: Sequence[Candidate],
    profile: Profile,
    *,
    threshold_tokens: int,
) -> Candidate | None:
    """Where the prompt is computed, chosen by the prefill strategy's `profile` among `prefill`;
    None when it is computed at the decode endpoint (`decode`): the remainder is too short to
    move, or the prefill strategy's choice is that endpoint itself."""
    if not worth_splitting(request, decode, threshold_tokens):
        return None
    ranked = profile.schedule(request, prefill)
    if not ranked.order or ranked.order[0].address == decode.address:
        return None
    return ranked.order[0]


def count_work(
    inflight: InFlight,
    request: SchedulingRequest,
    decode: Candidate,
    prefill: Candidate | None,
    cost_model: CostModel | None,
) -> None:
    """The request is in flight at its decode endpoint until its response ends; its prompt is
    predicted work at whichever endpoint computes it (the prefill endpoint's ends unseen, so it
    is only predicted backlog there)."""
    computes = decode if prefill is None else prefill
    work, waits = cost_model.work(request, computes) if cost_model is not None else (0.0, 0.0)
    if prefill is None:
        inflight.start(
            decode.address, request.prompt_tokens, prefill_seconds=work, waits_seconds=waits
        )
    else:
        inflight.start(decode.address, request.prompt_tokens)
        inflight.prefill(prefill.address, work, waits_seconds=waits)


def prefill_body(payload: Mapping[str, Any]) -> bytes:
    """The request as its prefill endpoint gets it: one token, no stream, KV kept."""
    body = {**payload, "kv_transfer_params": dict(PREFILL_PARAMS), "stream": False}
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    return json.dumps(body, ensure_ascii=False).encode()


def decode_body(payload: Mapping[str, Any], params: Mapping[str, Any]) -> bytes:
    """The request as its decode endpoint gets it: as sent, plus where its KV is."""
    return json.dumps({**payload, "kv_transfer_params": dict(params)}, ensure_ascii=False).encode()


def returned_params(body: bytes) -> Mapping[str, Any] | None:
    """The `kv_transfer_params` of a prefill endpoint's answer, or None when it has none (an
    engine without a KV connector answers the request as an ordinary one)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    return params if isinstance(params, dict) and params else None


class Prefiller(Protocol):
    """Runs a disaggregated request's prefill on `address` (the `centralized` mode), within
    `disaggregation.prefill_timeout_seconds`."""

    async def prefill(
        self, address: str, path: str, body: bytes, *, request_id: str
    ) -> Mapping[str, Any] | str:
        """The `kv_transfer_params` the endpoint answered with, or why there are none."""
        ...


async def centralized_prefill(
    prefiller: Prefiller,
    address: str,
    path: str,
    payload: Mapping[str, Any],
    *,
    request_id: str,
) -> bytes | str:
    """`centralized`: compute the prompt on `address` now. The decode endpoint's body (the
    client's `payload` plus where that KV cache is), or why the prefill failed: then the decode
    endpoint computes the prompt itself, so a failed prefill costs time, never the request."""
    outcome = await prefiller.prefill(address, path, prefill_body(payload), request_id=request_id)
    if isinstance(outcome, str):
        return outcome
    return decode_body(payload, outcome)
