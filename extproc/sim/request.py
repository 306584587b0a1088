"""A request inside a simulated engine, and the record it leaves when it finishes.

`EngineRequest` is both the engine's bookkeeping (tokens computed, blocks, hashes, state) and the
HTTP handler's handle on the request (its token queue and `done` future); `FinishedRequest` is
the timing record the metrics, tests and benchmarks read. The engine (`engine`) and its
scheduler (`scheduler`) move requests between the states below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from extproc.prefix.hashing import BlockHash, LoraKey
from extproc.sim.cache import Block

WAITING: Final = 0
RUNNING: Final = 1
FINISHED: Final = 2
TRANSFERRING: Final = 3  # waiting for its prompt's KV from a remote engine


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    name: str
    path: str
    lora_id: int

    @property
    def key(self) -> LoraKey:
        return LoraKey(self.name, self.path)


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
        self.state = WAITING
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


def finished_record(req: EngineRequest, reason: str, finished: float) -> FinishedRequest:
    """The record a request leaves when it finishes (or is aborted) at `finished`."""
    return FinishedRequest(
        request_id=req.request_id,
        prompt_tokens=req.prompt_len,
        output_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens,
        finish_reason=reason,
        arrival=req.arrival,
        scheduled=req.scheduled,
        first_token=req.first_token,
        finished=finished,
        preemptions=req.preemptions,
        max_tokens=req.max_tokens,
        prefill_arrival=req.prefill_arrival,
        transfer_seconds=req.transfer_seconds,
        transferred_blocks=req.transferred_blocks,
        transferred_tokens=req.transferred_tokens,
        itl_mean=_itl_mean(req),
    )


def _itl_mean(req: EngineRequest) -> float | None:
    gaps = len(req.output_ids) - 1
    if gaps < 1 or req.first_token is None or req.last_token is None:
        return None
    return (req.last_token - req.first_token) / gaps
