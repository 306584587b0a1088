"""Requests and tokens the picker has sent to each endpoint and not yet seen finish.

Counted from the pick to the end of the response (streams included), so least-request decisions
are fresh even between metric scrapes. One event loop owns an instance: no locks needed.

Beside the counts, each endpoint's *prefill backlog*: the time at which the prompt work we sent
it is predicted to be done (a virtual finish time, advanced by each pick's predicted prefill).
vLLM (V1) admits a waiting request into the running batch while a step's token budget and free KV
blocks last, and then computes its prompt chunk by chunk inside the batch, where the waiting
count no longer shows it; a non-streamed response cannot show when its first token came. The
prediction drains with time, so a wrong one fades instead of accumulating.

Each pick also keeps the time its prompt is predicted to leave vLLM's waiting queue: the scraped
waiting count holds our own picks that a step's token budget could not take yet, which the
backlog already counts (`waiting_at`), so the cost model takes only the rest as others' queue.

With several picker processes on one port (`extproc serve --workers N`), each posts its figures
to a `LoadBoard` and adds the others' to its own, so every decision sees the pod's traffic.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from extproc.state.load_board import LoadBoard


@dataclass(frozen=True, slots=True)
class Load:
    requests: int = 0
    tokens: int = 0


_IDLE = Load()


# Picks are remembered this long: far longer than a scrape interval, so "picked since the last
# scrape" is exact whenever the metrics are fresh enough to be trusted at all.
_PICK_MEMORY_SECONDS = 5.0


class InFlight:
    def __init__(self, board: LoadBoard | None = None) -> None:
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._picks: dict[str, deque[float]] = {}
        # Beside each pick time: when that prompt is predicted to leave the waiting queue.
        self._admits: dict[str, deque[float]] = {}
        self._busy_until: dict[str, float] = {}
        self._board = board

    def start(
        self,
        address: str,
        tokens: int = 0,
        *,
        prefill_seconds: float = 0.0,
        waits_seconds: float = 0.0,
        now: float | None = None,
    ) -> None:
        """A request was sent to `address`: `tokens` prompt tokens, whose uncached part the
        endpoint is predicted to compute in `prefill_seconds` once the work ahead is done, and
        to keep waiting (not admitted into the running batch) for `waits_seconds`."""
        self._requests[address] = self._requests.get(address, 0) + 1
        self._tokens[address] = self._tokens.get(address, 0) + tokens
        self.prefill(address, prefill_seconds, waits_seconds=waits_seconds, now=now)

    def prefill(
        self,
        address: str,
        prefill_seconds: float,
        *,
        waits_seconds: float = 0.0,
        now: float | None = None,
    ) -> None:
        """`address` was given a prompt to compute (a whole request's, or only the prefill of a
        disaggregated one, which no response of ours will show ending: it is counted in the
        backlog and the picks since the scrape, not in the in-flight requests)."""
        now = time.monotonic() if now is None else now
        if prefill_seconds > 0:
            self._busy_until[address] = max(now, self._busy_until.get(address, now)) + (
                prefill_seconds
            )
        picks = self._picks.setdefault(address, deque())
        admits = self._admits.setdefault(address, deque())
        picks.append(now)
        admits.append(now + waits_seconds)
        # Forgotten once old and predicted admitted: a pick still waiting is kept past the
        # memory, so a long queue is not mistaken for others' requests.
        while picks[0] < now - _PICK_MEMORY_SECONDS and admits[0] <= now:
            picks.popleft()
            admits.popleft()
        self._post(address, picked_at=now, admitted_at=now + waits_seconds)

    def started_since(self, address: str, since: float) -> int:
        """Requests picked for `address` at or after monotonic time `since` (up to 5 s back):
        what its scraped queue cannot show yet."""
        others = 0 if self._board is None else self._board.started_since(address, since)
        picks = self._picks.get(address)
        if not picks or picks[-1] < since:
            return others
        return others + len(picks) - bisect.bisect_left(picks, since)

    def waiting_at(self, address: str, at: float) -> int:
        """Our picks of `address` made by monotonic time `at` and predicted to be still waiting
        then (not yet admitted into vLLM's running batch): those a scrape read at `at` counts in
        its waiting queue."""
        others = 0 if self._board is None else self._board.waiting_at(address, at)
        picks = self._picks.get(address)
        if not picks or picks[0] > at:
            return others
        admits = self._admits[address]
        # Admission times mostly follow the pick order (each prompt waits behind the backlog of
        # the ones before it), so this counts back from the last pick before `at` to the first
        # predicted admitted, at the cost of the answer only. Where a later pick's scraped or
        # KV share of the wait was shorter, the picks before it are missed: the count then errs
        # low, toward taking the scrape's waiting for others' requests, as before it existed.
        index = bisect.bisect_right(picks, at)
        count = 0
        while index > 0 and admits[index - 1] > at:
            index -= 1
            count += 1
        return others + count

    def backlog(self, address: str, now: float) -> float:
        """Seconds of predicted prefill work we sent `address` that is not done yet."""
        others = 0.0 if self._board is None else self._board.backlog(address, now)
        busy_until = self._busy_until.get(address)
        if busy_until is None:
            return others
        if busy_until <= now:
            del self._busy_until[address]
            return others
        return others + busy_until - now

    def finish(self, address: str, tokens: int = 0) -> None:
        left = self._requests.get(address, 0) - 1
        if left > 0:
            self._requests[address] = left
            self._tokens[address] = max(0, self._tokens.get(address, 0) - tokens)
        else:
            self._requests.pop(address, None)
            self._tokens.pop(address, None)
        self._post(address)

    def load(self, address: str) -> Load:
        """Requests and prompt tokens in flight to `address`, this process's and its peers'."""
        requests = self._requests.get(address, 0)
        tokens = self._tokens.get(address, 0)
        if self._board is not None:
            others = self._board.others(address)
            requests += others.requests
            tokens += others.tokens
        if not requests:
            return _IDLE
        return Load(requests, tokens)

    def total(self) -> int:
        """This process's requests in flight (what it must drain before it stops)."""
        return sum(self._requests.values())

    def _post(
        self, address: str, *, picked_at: float | None = None, admitted_at: float = 0.0
    ) -> None:
        if self._board is not None:
            self._board.post(
                address,
                requests=self._requests.get(address, 0),
                tokens=self._tokens.get(address, 0),
                busy_until=self._busy_until.get(address, 0.0),
                picked_at=picked_at,
                admitted_at=admitted_at,
            )
