"""Requests and tokens the picker has sent to each endpoint and not yet seen finish.

Counted from the pick to the end of the response (streams included), so least-request decisions
are fresh even between metric scrapes. One event loop owns an instance: no locks needed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Load:
    requests: int = 0
    tokens: int = 0


_IDLE = Load()


class InFlight:
    def __init__(self) -> None:
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def start(self, address: str, tokens: int = 0) -> None:
        self._requests[address] = self._requests.get(address, 0) + 1
        self._tokens[address] = self._tokens.get(address, 0) + tokens

    def finish(self, address: str, tokens: int = 0) -> None:
        left = self._requests.get(address, 0) - 1
        if left > 0:
            self._requests[address] = left
            self._tokens[address] = max(0, self._tokens.get(address, 0) - tokens)
        else:
            self._requests.pop(address, None)
            self._tokens.pop(address, None)

    def load(self, address: str) -> Load:
        requests = self._requests.get(address)
        if requests is None:
            return _IDLE
        return Load(requests, self._tokens.get(address, 0))

    def total(self) -> int:
        return sum(self._requests.values())
