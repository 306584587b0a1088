"""Faults a reliability test can switch on for one simulated server.

- `error_rate`: the share of inference requests answered with vLLM's 500 error envelope.
- `hung`: every request (probes included) waits without an answer until unhung, as a wedged
  process would; the engine keeps its state.
- `metrics_frozen`: `/metrics` keeps returning the text of the moment it froze.
Dying and coming back is a server action (`SimServer.kill` / `revive`), not a flag here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any


class Faults:
    """The live fault switches of one server (mutable by design: tests flip them)."""

    def __init__(self) -> None:
        self.error_rate = 0.0
        self.metrics_frozen = False
        self._unhung = asyncio.Event()
        self._unhung.set()

    @property
    def hung(self) -> bool:
        return not self._unhung.is_set()

    def hang(self) -> None:
        self._unhung.clear()

    def unhang(self) -> None:
        self._unhung.set()

    async def wait_unhung(self) -> None:
        await self._unhung.wait()

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a JSON body like `{"error_rate": 0.1, "hang": true, "freeze_metrics": false}`."""
        unknown = set(changes) - {"error_rate", "hang", "freeze_metrics"}
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        if "error_rate" in changes:
            rate = changes["error_rate"]
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise ValueError("'error_rate' must be a number between 0 and 1")
            self.error_rate = float(rate)
        if "hang" in changes:
            self.hang() if bool(changes["hang"]) else self.unhang()
        if "freeze_metrics" in changes:
            self.metrics_frozen = bool(changes["freeze_metrics"])

    def describe(self) -> dict[str, Any]:
        return {
            "error_rate": self.error_rate,
            "hang": self.hung,
            "freeze_metrics": self.metrics_frozen,
        }
