"""The prefix index learns from the picker's own decisions: a prompt routed to an endpoint will
be cached there (the approximate index, or the speculative entries over the precise one).

A probed prompt (extproc.prefix.blocks) has only the blocks the pick needed; the index learns
those at once, and the rest once a background task has computed them. That task also fills the
token and hash caches, which the conversation's next turn will probe. Tasks still running when
the picker stops are cancelled.

When the task runs is a trade-off between two requests. Started with the decision, it ran before
grpc.aio had sent the decision's reply (a reply goes out in a later turn of the event loop): on
Envoy's clock, 10 KB cold prompts with `cost`, 0.2 ms more held with buffered bodies and 1 ms
with the modes whose answer is two messages. Started 5 ms later and nothing else, a burst's next
request (agent fan-out) was decided before the first's prompt was learned whole, and
agent-fan-out's hit rate fell in each of four seeds (71 % -> 62-69 %, `benchmarks/routing_ab.py`,
docs/benchmarks.md). So the task waits `delay_seconds` for the reply to go, but the next
decision does not wait for it: a decision first finishes every prompt still waiting
(`before_decision`), so a burst's later requests see its first prompt whole.
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
    whether any index probes prompts past their first chunk (else finishing one is wasted);
    `delay_seconds`: how long a finish waits for its decision's reply to go out."""

    def __init__(
        self, learned: RoutedPrompts | None, *, probing: bool, delay_seconds: float = 0.005
    ) -> None:
        self._learned = learned
        self._probing = probing
        self._delay = delay_seconds
        self._waiting: list[tuple[PromptProbe, str]] = []  # decided, not started
        self._timer: asyncio.TimerHandle | None = None
        self.pending: set[asyncio.Task[None]] = set()  # held until done, cancelled on close

    def learn(self, probe: PromptProbe, target: str) -> None:
        """`target` will hold the prompt: its probed blocks now, the rest after the reply."""
        if self._learned is not None and probe.tokens.block_hashes:
            self._learned.record(target, probe.tokens.block_hashes)
        if probe.tokens.complete or not self._probing:
            return
        self._waiting.append((probe, target))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._start)

    async def before_decision(self) -> None:
        """Finish the prompts still waiting now: the decision about to be made sees the prompts
        decided before it whole (a burst on one prompt). Only those decided within
        `delay_seconds` wait here; the others started when it passed."""
        if self._waiting:
            started = self._start()
            await asyncio.gather(*started, return_exceptions=True)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()
        for task in self.pending:
            task.cancel()
        await asyncio.gather(*self.pending, return_exceptions=True)

    def _start(self) -> list[asyncio.Task[None]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        started = [asyncio.create_task(self._finish(probe, target)) for probe, target in waiting]
        for task in started:
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        return started

    async def _finish(self, probe: PromptProbe, target: str) -> None:
        try:
            tokens = await probe.finish()
        except Exception:  # background work: a failure must not end the picker
            log.exception("could not finish the prompt's block hashes")
            return
        if self._learned is not None and tokens.block_hashes:
            self._learned.record(target, tokens.block_hashes)
