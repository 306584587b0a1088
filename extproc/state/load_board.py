"""What the other picker processes of this pod have in flight, read from shared memory.

`extproc serve --workers N` runs N picker processes on one port (docs/envoy.md, "Several picker
processes"). Each routes only the streams the kernel hands it, so on its own a worker's
least-request and prefill-backlog signals would see 1/N of the pod's traffic and N workers would
pile requests on the same endpoint. The board is one file in shared memory (`/dev/shm`), a
region per worker: each worker writes only its own region (one writer: no locks) and adds the
others' figures to its own when it decides.

A region holds, per endpoint it has seen: its address, the requests and prompt tokens in flight,
the time its predicted prefill backlog runs out (`time.monotonic()`, which every process of the
machine shares), and the times of its last picks (a ring, for "picked since the last scrape"),
each beside the time that pick is predicted to leave vLLM's waiting queue (for "ours among
the scraped waiting").
Before the regions, the pod's token, which names the workers' requests (`prefix`, `owner`).
Readers may see a region half-updated (requests already counted, tokens not yet); each figure is
an 8-byte aligned word, so none is torn, and the next decision sees the rest.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("extproc")

SLOTS = 512  # endpoints per worker region; more are routed on this worker's own counts
RING = 64  # pick times kept per endpoint: "picked since the scrape" counts up to this many
_NAME_BYTES = 64


@dataclass(frozen=True, slots=True)
class _Layout:
    """Byte offsets of one region's arrays."""

    count: int = 0
    names: int = 8
    requests: int = 8 + SLOTS * _NAME_BYTES
    tokens: int = requests + SLOTS * 8
    busy_until: int = tokens + SLOTS * 8
    ring_at: int = busy_until + SLOTS * 8
    ring: int = ring_at + SLOTS * 8
    admits: int = ring + SLOTS * RING * 8
    size: int = admits + SLOTS * RING * 8


_LAYOUT = _Layout()


class _Region:
    """Typed views of one worker's region of the board (native 8-byte words)."""

    def __init__(self, buffer: mmap.mmap, base: int) -> None:
        def raw(offset: int, count: int) -> memoryview:
            return memoryview(buffer)[base + offset : base + offset + 8 * count]

        self.count = raw(_LAYOUT.count, 1).cast("q")
        self.names = memoryview(buffer)[base + _LAYOUT.names : base + _LAYOUT.requests]
        self.requests = raw(_LAYOUT.requests, SLOTS).cast("q")
        self.tokens = raw(_LAYOUT.tokens, SLOTS).cast("q")
        self.busy_until = raw(_LAYOUT.busy_until, SLOTS).cast("d")
        self.ring_at = raw(_LAYOUT.ring_at, SLOTS).cast("q")
        self.ring = raw(_LAYOUT.ring, SLOTS * RING).cast("d")
        self.admits = raw(_LAYOUT.admits, SLOTS * RING).cast("d")

    def name(self, slot: int) -> str:
        start = slot * _NAME_BYTES
        return bytes(self.names[start : start + _NAME_BYTES]).rstrip(b"\0").decode()

    def picks_since(self, slot: int, since: float) -> int:
        return sum(1 for at in self.ring[slot * RING : (slot + 1) * RING] if at >= since)

    def waiting_at(self, slot: int, at: float) -> int:
        picks = self.ring[slot * RING : (slot + 1) * RING]
        admits = self.admits[slot * RING : (slot + 1) * RING]
        return sum(
            1 for picked, admitted in zip(picks, admits, strict=True) if picked <= at < admitted
        )


# Before the regions: the pod's token, which names its workers' requests (`LoadBoard.prefix`).
_HEADER = 64


def create_board(path: Path, workers: int) -> None:
    """The board file for `workers` processes, zeroed but for a fresh token (written by the
    parent, before they start)."""
    with open(path, "wb") as file:
        file.write(secrets.token_hex(6).encode().ljust(_HEADER, b"\0"))
        file.truncate(_HEADER + _LAYOUT.size * workers)


@dataclass(frozen=True, slots=True)
class Others:
    """The other workers' figures for one endpoint."""

    requests: int = 0
    tokens: int = 0


_NONE = Others()


class LoadBoard:
    """One worker's view of the board: it posts its own region and reads the others'."""

    def __init__(self, path: Path, workers: int, index: int) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker {index} of {workers}")
        self.path = path
        self.workers = workers
        self.index = index
        with open(path, "r+b") as file:
            self._buffer = mmap.mmap(file.fileno(), _HEADER + _LAYOUT.size * workers)
        self.token = bytes(self._buffer[:_HEADER]).rstrip(b"\0").decode()
        self._own = _Region(self._buffer, _HEADER + _LAYOUT.size * index)
        self._others = [
            _Region(self._buffer, _HEADER + _LAYOUT.size * i) for i in range(workers) if i != index
        ]
        self._own_slots: dict[str, int] = {}
        # Per other worker: the slots of the addresses it has named so far (names only append).
        self._their_slots: list[dict[str, int]] = [{} for _ in self._others]
        self._full_logged = False

    def post(
        self,
        address: str,
        *,
        requests: int,
        tokens: int,
        busy_until: float,
        picked_at: float | None = None,
        admitted_at: float = 0.0,
    ) -> None:
        """This worker's figures for `address` now (and a pick at `picked_at`, if one,
        predicted to leave the waiting queue at `admitted_at`)."""
        slot = self._slot(address)
        if slot is None:
            return
        own = self._own
        own.requests[slot] = requests
        own.tokens[slot] = tokens
        own.busy_until[slot] = busy_until
        if picked_at is not None:
            at = own.ring_at[slot]
            own.ring[slot * RING + at % RING] = picked_at
            own.admits[slot * RING + at % RING] = admitted_at
            own.ring_at[slot] = at + 1

    def prefix(self, index: int | None = None) -> str:
        """The request-name prefix of worker `index` (this one by default): the pod's token and
        the index, so any worker can tell which of them routed a request."""
        return f"{self.token}w{self.index if index is None else index}"

    def owner(self, request_id: str) -> int | None:
        """The worker of this pod that named `request_id`, or None (another pod's request)."""
        head, _, _ = request_id.rpartition("-")
        token, mark, index = head.rpartition("w")
        if mark and token == self.token and index.isdigit() and int(index) < self.workers:
            return int(index)
        return None

    def others(self, address: str) -> Others:
        requests = tokens = 0
        for region, slot in self._their(address):
            requests += region.requests[slot]
            tokens += region.tokens[slot]
        return Others(requests, tokens) if requests or tokens else _NONE

    def backlog(self, address: str, now: float) -> float:
        """Seconds of predicted prefill the other workers sent `address` that are not done."""
        return sum(max(0.0, r.busy_until[slot] - now) for r, slot in self._their(address))

    def started_since(self, address: str, since: float) -> int:
        """Picks of `address` by the other workers at or after `since` (up to RING each)."""
        return sum(r.picks_since(slot, since) for r, slot in self._their(address))

    def waiting_at(self, address: str, at: float) -> int:
        """The other workers' picks of `address` made by `at` and predicted still waiting then
        (up to RING each)."""
        return sum(r.waiting_at(slot, at) for r, slot in self._their(address))

    def _slot(self, address: str) -> int | None:
        slot = self._own_slots.get(address)
        if slot is not None:
            return slot
        count = self._own.count[0]
        name = address.encode()
        if count >= SLOTS or len(name) > _NAME_BYTES:
            if not self._full_logged:
                log.warning("load board: %s is not shared with the other workers", address)
                self._full_logged = True
            return None
        start = count * _NAME_BYTES
        self._own.names[start : start + len(name)] = name
        # The name is written before the count that makes it visible.
        self._own.count[0] = count + 1
        self._own_slots[address] = count
        return count

    def _their(self, address: str) -> list[tuple[_Region, int]]:
        found = []
        for region, slots in zip(self._others, self._their_slots, strict=True):
            slot = slots.get(address)
            if slot is None and len(slots) < region.count[0]:
                for new in range(len(slots), region.count[0]):
                    slots[region.name(new)] = new
                slot = slots.get(address)
            if slot is not None:
                found.append((region, slot))
        return found


def board_path() -> Path:
    """Where this process's board goes: shared memory when the machine has it. The map lives
    as long as the workers do; the parent removes the file when they have stopped."""
    base = Path("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    return base / f"extproc-board-{os.getpid()}"
