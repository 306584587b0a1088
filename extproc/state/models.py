"""Learn what each endpoint serves from its `/v1/models`, and whether it answers at all.

A vLLM server lists its base model and every loaded LoRA adapter (with `parent` = the base).
An endpoint whose `/v1/models` fails is marked not ready until it answers again; models declared
in the config are served even before the first answer arrives, but readiness still needs one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelsReading:
    address: str
    models: frozenset[str]
    problem: str = ""  # empty when the endpoint answered
    # LoRA adapters among `models`: name -> (base model, adapter path). vLLM lists them with
    # `parent` and `root`; the path enters the adapter's KV block hashes.
    adapters: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problem


async def read_models(
    session: aiohttp.ClientSession, address: str, *, timeout_s: float
) -> ModelsReading:
    url = f"http://{address}/v1/models"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                return ModelsReading(address, frozenset(), f"/v1/models answered {response.status}")
            document = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return ModelsReading(address, frozenset(), f"/v1/models failed: {type(exc).__name__}")
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return ModelsReading(address, frozenset(), "/v1/models has no 'data' list")
    cards = [item for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]
    adapters = {
        card["id"]: (card["parent"], card["root"] if isinstance(card.get("root"), str) else "")
        for card in cards
        if isinstance(card.get("parent"), str) and card["parent"]
    }
    return ModelsReading(address, frozenset(c["id"] for c in cards), adapters=adapters)


class ModelDiscovery:
    """Reads every endpoint's /v1/models concurrently; hands the readings to `on_readings`."""

    def __init__(
        self,
        on_readings: Callable[[Sequence[ModelsReading]], None],
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self._on_readings = on_readings
        self._addresses: tuple[str, ...] = ()
        self._interval = interval
        self._timeout = timeout
        self._ready: dict[str, bool] = {}

    def set_endpoints(self, addresses: Iterable[str]) -> None:
        self._addresses = tuple(addresses)

    async def refresh(self, session: aiohttp.ClientSession) -> list[ModelsReading]:
        readings = list(
            await asyncio.gather(
                *(read_models(session, a, timeout_s=self._timeout) for a in self._addresses)
            )
        )
        for reading in readings:
            if self._ready.get(reading.address) != reading.ok:
                log.info(
                    "endpoint %s is %s%s",
                    reading.address,
                    "ready" if reading.ok else "not ready",
                    f" ({reading.problem})" if reading.problem else "",
                )
                self._ready[reading.address] = reading.ok
        self._on_readings(readings)
        return readings

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Rounds every `interval` until cancelled (the first round is the caller's)."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh(session)
            except Exception:  # a bug here must not end discovery for good
                log.exception("model discovery round failed")
