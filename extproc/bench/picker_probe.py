"""`extproc serve` with a memory probe, for the soak's leak hunt:

    python -m extproc.bench.picker_probe DIR MODE serve --config ...

runs the picker exactly as `python -m extproc.cli serve ...` would, and a thread that answers
requests dropped in DIR: for each new file `DIR/request-NAME`, it writes `DIR/NAME.objects.json`
(live objects per type name after a full collection) and then `DIR/NAME.done`. MODE `trace`
also runs `tracemalloc` (10 frames) and writes `DIR/NAME.tracemalloc` (a snapshot, without
tracemalloc's own frames); MODE `objects` does not (no tracing cost, RSS as without the probe).

A thread and files rather than a signal: the picker's event loop owns SIGTERM/SIGINT, and a file
needs no cooperation from it. tracemalloc costs CPU and memory (its traces), so a probed picker's
RSS is not the unprobed one's; growth between two snapshots is what the probe is for.
"""

from __future__ import annotations

import gc
import json
import runpy
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path


def dump(directory: Path, name: str) -> None:
    gc.collect()
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__),)
        )
        snapshot.dump(str(directory / f"{name}.tracemalloc"))
    counts = Counter(type(o).__qualname__ for o in gc.get_objects())
    traced, peak = tracemalloc.get_traced_memory()
    (directory / f"{name}.objects.json").write_text(
        json.dumps(
            {
                "traced_bytes": traced,
                "traced_peak_bytes": peak,
                "tracemalloc_overhead_bytes": tracemalloc.get_tracemalloc_memory(),
                "objects": dict(counts.most_common(60)),
            }
        )
    )
    (directory / f"{name}.done").touch()


def watch(directory: Path) -> None:
    answered: set[str] = set()
    while True:
        for request in sorted(directory.glob("request-*")):
            name = request.name.removeprefix("request-")
            if name not in answered:
                answered.add(name)
                dump(directory, name)
        time.sleep(0.2)


def request_dump(directory: Path, name: str, *, within: float = 120.0) -> bool:
    """From the soak's side: ask the probed picker for a dump named `name`; True once written."""
    (directory / f"request-{name}").touch()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (directory / f"{name}.done").exists():
            return True
        time.sleep(0.2)
    return False


def main() -> None:
    directory, mode = Path(sys.argv[1]), sys.argv[2]
    directory.mkdir(parents=True, exist_ok=True)
    if mode == "trace":
        tracemalloc.start(10)
    threading.Thread(target=watch, args=(directory,), daemon=True, name="probe").start()
    sys.argv = ["extproc", *sys.argv[3:]]
    runpy.run_module("extproc.cli", run_name="__main__")


if __name__ == "__main__":
    main()
