"""The prefix index learns from the picker's own decisions: a prompt routed to an endpoint will
be cached there (the approximate index, or the speculative entries over the precise one).

A probed prompt (extproc.prefix.blocks) has only the blocks the pick needed; the index learns
those at once, and the rest once a background task, started with the decision, has computed
them. That task also fills the token and hash caches, which the conversation's next turn
will probe. Tasks still running when the picker stops are cancelled.

The task starts at once, so it runs before the next request's decision: a burst of requests on
one prompt (agent fan-out) then sees it whole. The price is paid by the request that made it:
grpc.aio sends the reply in a later turn of the event loop, after the task's hashing (on
Envoy's clock, 10 KB cold prompts with `cost`: 0.2 ms more held buffered, 1 ms more streamed,
where the reply is two messages). Started 5 ms later instead, agent-fan-out's hit rate fell in
each of four seeds (71 % -> 62-69 %, `benchmarks/routing_ab.py`, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from extproc.prefix.blocks import PromptProbe

log = logging.getLogger(__name__)


class RoutedPrompts(Protocol):
    """An index that learns from our picks: `ApproxPrefixIndex`, `SpeculativeIndex`."""

    def record(self, endpoint: str, hashes: Iterable[int]) -> None: ...


class Learning:
    """One per pipeline. `learned`: the index that learns from our picks, if one; `probing`:
    whether any index probes prompts past their first chunk (else finishing one is wasted)."""

    def __init__(self, learned: RoutedPrompts | None, *, probing: bool) -> None:
        self._learned = learned
        self._probing = probing
        self.pending: set[asyncio.Task[None]] = set()  # held until done, cancelled on close

    def learn(self, probe: PromptProbe, target: str) -> None:
        """`target` will hold the prompt: its probed blocks now, the rest in a task."""
        if self._learned is not None and probe.tokens.block_hashes:
            self._learned.record(target, probe.tokens.block_hashes)
        if probe.tokens.complete or not self._probing:
            return
        task = asyncio.create_task(self._finish(probe, target))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def aclose(self) -> None:
        for task in self.pending:
            task.cancel()
        await asyncio.gather(*self.pending, return_exceptions=True)

    async def _finish(self, probe: PromptProbe, target: str) -> None:
        try:
            tokens = await probe.finish()
        except Exception:  # background work: a failure must not end the picker
            log.exception("could not finish the prompt's block hashes")
            return
        if self._learned is not None and tokens.block_hashes:
            self._learned.record(target, tokens.block_hashes)
