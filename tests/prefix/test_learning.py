"""When a probed prompt is learned whole (extproc.prefix.learning): after its decision's reply
has had time to go out, or before a later decision on a prompt that opens the same way; never
after the picker has closed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from extproc.prefix.learning import Learning
from extproc.prefix.walk import PromptProbe, PromptTokens

PROBED = (1, 2)
WHOLE = (1, 2, 3, 4, 5)


class _Index:
    def __init__(self) -> None:
        self.held: dict[str, set[int]] = {}

    def record(self, endpoint: str, hashes: Iterable[int]) -> None:
        self.held.setdefault(endpoint, set()).update(hashes)


class _Probe(PromptProbe):
    """A probed prompt whose rest takes as long as `release` says."""

    def __init__(self) -> None:
        super().__init__(PromptTokens(2, PROBED, exact=True, source="test", complete=False))
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def finish(self) -> PromptTokens:
        self.started.set()
        await self.release.wait()
        self.tokens = PromptTokens(5, WHOLE, exact=True, source="test")
        return self.tokens


async def test_the_rest_waits_for_the_reply_then_is_learned() -> None:
    index = _Index()
    learning = Learning(index, probing=True, delay_seconds=0.3)
    probe = _Probe()
    probe.release.set()
    learning.learn(probe, "a")
    assert index.held["a"] == set(PROBED)
    await asyncio.sleep(0.01)
    assert not probe.started.is_set()  # the reply's turn: nothing started yet
    await asyncio.wait_for(probe.started.wait(), 1.0)
    await asyncio.sleep(0)
    assert index.held["a"] == set(WHOLE)
    await learning.aclose()


async def test_the_next_decision_finishes_what_waits_first() -> None:
    index = _Index()
    learning = Learning(index, probing=True, delay_seconds=10.0)
    probe = _Probe()
    learning.learn(probe, "a")
    deciding = asyncio.create_task(learning.before_decision())
    await asyncio.wait_for(probe.started.wait(), 1.0)
    assert not deciding.done()  # the decision waits for the prompt decided before it
    probe.release.set()
    await asyncio.wait_for(deciding, 1.0)
    assert index.held["a"] == set(WHOLE)
    await learning.before_decision()  # nothing waits now: returns at once
    await learning.aclose()


async def test_an_unrelated_decision_starts_what_waits_but_does_not_wait_for_it() -> None:
    index = _Index()
    learning = Learning(index, probing=True, delay_seconds=10.0)
    burst, other = _Probe(), _Probe()
    learning.learn(burst, "a", opening="You are a planner. Task 7")
    learning.learn(other, "b", opening="Summarize this contract")
    deciding = asyncio.create_task(learning.before_decision("Summarize this contract"))
    await asyncio.wait_for(burst.started.wait(), 1.0)  # started, not awaited
    other.release.set()
    await asyncio.wait_for(deciding, 1.0)  # waited for its own kind only
    assert index.held["b"] == set(WHOLE)
    assert index.held["a"] == set(PROBED)
    burst.release.set()
    await asyncio.sleep(0.01)
    assert index.held["a"] == set(WHOLE)
    await learning.aclose()


async def test_closing_cancels_running_finishes_and_drops_waiting_ones() -> None:
    index = _Index()
    learning = Learning(index, probing=True, delay_seconds=0.01)
    running, waiting = _Probe(), _Probe()
    learning.learn(running, "a")
    await asyncio.wait_for(running.started.wait(), 1.0)
    learning.learn(waiting, "b")
    tasks = set(learning.pending)
    assert tasks
    await learning.aclose()
    assert all(task.cancelled() for task in tasks)
    await asyncio.sleep(0.03)  # past the delay: the waiting one never starts
    assert not waiting.started.is_set()
    assert index.held == {"a": set(PROBED), "b": set(PROBED)}


async def test_a_whole_prompt_or_no_probing_index_leaves_nothing_to_finish() -> None:
    index = _Index()
    learning = Learning(index, probing=False, delay_seconds=0.0)
    probe = _Probe()
    learning.learn(probe, "a")
    await asyncio.sleep(0.01)
    assert not probe.started.is_set()
    whole = PromptProbe(PromptTokens(5, WHOLE, exact=True, source="test"))
    Learning(index, probing=True, delay_seconds=0.0).learn(whole, "b")
    await asyncio.sleep(0.01)
    assert index.held["b"] == set(WHOLE)
    await learning.aclose()
