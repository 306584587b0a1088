"""The prefix index learns from the picker's own decisions: a prompt routed to an endpoint will
be cached there (the approximate index, or the speculative entries over the precise one).

A probed prompt (extproc.prefix.blocks) has only the blocks the pick needed; the index learns
those at once, and the rest once a background task has computed them. That task also fills the
token and hash caches, which the conversation's next turn will probe. Tasks still running when
the picker stops are cancelled.

When the task runs is a trade-off between two requests. Started with the decision, it ran
before grpc.aio had sent the decision's reply (a reply goes out in a later turn of the event
loop): on Envoy's clock, 10 KB cold prompts with `cost`, 0.2 ms more held with buffered bodies
and 1 ms with streamed ones, whose answer is two messages. Started 5 ms later and nothing else,
a burst's next request (agent fan-out) was decided before the first's prompt was learned whole,
and agent-fan-out's hit rate fell in each of four seeds (71 % -> 62-69 %,
`benchmarks/routing_ab.py`, docs/benchmarks.md). So the task waits `delay_seconds` for the
reply to go, but the next decision does not wait for it: a decision first starts every finish
still waiting, and waits for those of prompts that open as its own does (`before_decision`), so
a burst's later requests see its first prompt whole, and an unrelated request does not pay for
it.
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
        self._waiting: list[tuple[PromptProbe, str, str]] = []  # decided, not started
        self._timer: asyncio.TimerHandle | None = None
        self.pending: set[asyncio.Task[None]] = set()  # held until done, cancelled on close

    def learn(self, probe: PromptProbe, target: str, *, opening: str = "") -> None:
        """`target` will hold the prompt: its probed blocks now, the rest after the reply.
        `opening`: the prompt's start, as `before_decision` compares it."""
        if self._learned is not None and probe.tokens.block_hashes:
            self._learned.record(target, probe.tokens.block_hashes)
        if probe.tokens.complete or not self._probing:
            return
        self._waiting.append((probe, target, opening))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._start)

    async def before_decision(self, opening: str = "") -> None:
        """Start the finishes still waiting (decided within `delay_seconds`) and wait for
        those of prompts that open as this one does (`opening`): the decision about to be
        made sees a burst's earlier prompts whole."""
        if self._waiting:
            related = [task for task, start in self._start() if start == opening]
            if related:
                await asyncio.gather(*related, return_exceptions=True)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()
        for task in self.pending:
            task.cancel()
        await asyncio.gather(*self.pending, return_exceptions=True)

    def _start(self) -> list[tuple[asyncio.Task[None], str]]:
        """Start every waiting finish: (its task, its prompt's opening)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        started = []
        for probe, target, opening in waiting:
            task = asyncio.create_task(self._finish(probe, target))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
            started.append((task, opening))
        return started

    async def _finish(self, probe: PromptProbe, target: str) -> None:
        try:
            tokens = await probe.finish()
        except Exception:  # background work: a failure must not end the picker
            log.exception("could not finish the prompt's block hashes")
            return
        if self._learned is not None and tokens.block_hashes:
            self._learned.record(target, tokens.block_hashes)
