"""The engine's side of prefill/decode disaggregation, as vLLM's NixlConnector does it.

A request submitted with `remote_decode` (a prefill request) keeps its KV blocks when it
finishes, until a decode engine has pulled them (`HeldBlocks.release`) or
`kv_transfer_timeout_seconds` pass. A request submitted with a `KVSource` (a decode request) uses
its local prefix cache, allocates blocks for the whole prompt, then waits off the batch (vLLM's
WAITING_FOR_REMOTE_KVS) on the engine's `KVLink` while the rest of the prompt's blocks cross
it; it then recomputes only the last prompt token. If the remote blocks are gone it prefills
locally, as vLLM's default `kv_load_failure_policy` "recompute" does. The server's side (the
`kv_transfer_params`, the peers) is in `disagg`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from extproc.sim.cache import Block, BlockPool
from extproc.sim.request import TRANSFERRING, EngineRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Held:
    """A finished prefill's blocks, kept for a remote decode until `expires`."""

    blocks: tuple[Block, ...]
    expires: float


class HeldBlocks:
    """Finished prefills' blocks kept for remote decodes, in expiry order (one timeout)."""

    def __init__(self, pool: BlockPool, *, timeout: float, on_free: Callable[[], None]) -> None:
        """`on_free` is called whenever blocks go back to the pool (a waiting request may fit)."""
        self._pool = pool
        self._timeout = timeout
        self._on_free = on_free
        self._held: dict[str, _Held] = {}
        self.blocks = 0

    def hold(self, request_id: str, blocks: Sequence[Block], now: float) -> tuple[int, ...]:
        """vLLM's delayed free: keep a finished prefill's blocks; their ids."""
        held = _Held(tuple(blocks), now + self._timeout)
        self._held[request_id] = held
        self.blocks += len(held.blocks)
        return tuple(b.block_id for b in held.blocks)

    def ids(self, request_id: str) -> tuple[int, ...] | None:
        held = self._held.get(request_id)
        return None if held is None else tuple(b.block_id for b in held.blocks)

    def find(self, request_id: str | None, block_ids: Sequence[int]) -> str | None:
        """The held request a pull names: by its request id, else by its exact block ids (what
        parameters without vLLM's newer `remote_request_id` identify it by)."""
        if request_id is not None:
            return request_id if request_id in self._held else None
        wanted = tuple(block_ids)
        for held_id, held in self._held.items():
            if wanted and tuple(b.block_id for b in held.blocks) == wanted:
                return held_id
        return None

    def release(self, request_id: str) -> bool:
        """A decode engine pulled these blocks: free them. False if they were already gone."""
        held = self._held.pop(request_id, None)
        if held is None:
            return False
        self._free(held)
        return True

    def expire(self, now: float) -> None:
        held = self._held
        while held:
            request_id, first = next(iter(held.items()))
            if first.expires > now:
                return
            del held[request_id]
            logger.warning(
                "releasing the %d KV blocks of request %s: no decode pulled them within %s s",
                len(first.blocks),
                request_id,
                self._timeout,
            )
            self._free(first)

    def next_expiry(self) -> float | None:
        return next(iter(self._held.values())).expires if self._held else None

    def clear(self) -> None:
        for held in self._held.values():
            self._pool.free(held.blocks)
        self._held.clear()
        self.blocks = 0

    def _free(self, held: _Held) -> None:
        self._pool.free(held.blocks)
        self.blocks -= len(held.blocks)
        self._on_free()


class KVLink:
    """Decode requests waiting for their KV, in completion order: the engine's one link is a
    FIFO, so a pull starts when the one before it has crossed."""

    def __init__(
        self, *, bandwidth: float, latency: float, block_size: int, kv_bytes_per_token: int
    ) -> None:
        self._bandwidth = bandwidth
        self._latency = latency
        self._block_size = block_size
        self._kv_bytes_per_token = kv_bytes_per_token
        self.pulling: deque[EngineRequest] = deque()
        self._free_at = 0.0

    def start(self, req: EngineRequest, hit_blocks: int, now: float) -> None:
        """Queue the uncached blocks' transfer (one at a time, FIFO)."""
        blocks = len(req.blocks) - hit_blocks
        size = blocks * self._block_size * self._kv_bytes_per_token
        self._free_at = max(now, self._free_at) + size / self._bandwidth
        req.kv_ready_at = self._free_at + self._latency
        req.transfer_seconds = req.kv_ready_at - now
        req.transferred_blocks = blocks
        req.transferred_tokens = req.prompt_len - hit_blocks * self._block_size
        req.state = TRANSFERRING
        self.pulling.append(req)

    def landed(self, now: float) -> list[EngineRequest]:
        """The pulls whose KV is in by `now`, in order, taken off the link."""
        done: list[EngineRequest] = []
        while self.pulling and self.pulling[0].kv_ready_at <= now:
            done.append(self.pulling.popleft())
        return done

    def next_ready(self) -> float | None:
        return self.pulling[0].kv_ready_at if self.pulling else None

    def clear(self) -> None:
        self.pulling.clear()
        self._free_at = 0.0


def pull_failed(req: EngineRequest, why: str) -> None:
    """The remote blocks are gone: the request prefills locally (the caller counts it)."""
    logger.warning("request %s: KV pull failed (%s); prefilling locally", req.request_id, why)
    req.kv_source = None
    req.transferred_blocks = 0
    req.transferred_tokens = 0
