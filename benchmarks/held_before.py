"""What each server held when one request arrived, and which of the next requests it served,
from an `extproc bench routing` output's per-request records.

    .venv/bin/python benchmarks/held_before.py reports/routing \\
        l4-8b-shared-prefix-20-cost 29 --next 3

For the run `<run>` (`logs/<run>.requests.jsonl`; its workload's block ids are in
`logs/<workload>.workload.jsonl`) it prints, per server, the prompt tokens held there when
request `<index>` arrived: the distinct blocks of the prompts it had been sent before, in
simulated time, counted in 16-token blocks. Eviction is not in the records, so this is what
each server was given, an upper bound on what it held. Then the request and the `--next`
requests after it: when each arrived (simulated seconds after it), the server holding the most
of its prompt by that count, the server that served it, the tokens it found cached there and
its TTFT. A cold prompt that lands on the server where the next request's prefix lives, just
before that request comes, shows as that request's long TTFT on its own holder (the l4
shared-prefix seed 0 collision in docs/benchmarks.md, "Since").
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extproc.bench.routing import read_lines, workload_file

BLOCK_TOKENS = 16  # the simulator's block size, as vLLM's default


def held_when(
    answers: Sequence[Mapping[str, Any]], blocks: Mapping[int, Sequence[int]], at: float
) -> dict[int, set[int]]:
    """Per server, the blocks of every prompt it was sent that arrived before `at`."""
    held: dict[int, set[int]] = {}
    for answer in answers:
        sim = answer["sim"]
        if sim is not None and sim["arrival"] < at:
            held.setdefault(int(sim["server"]), set()).update(blocks[int(answer["index"])])
    return held


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="an `extproc bench routing --output` directory")
    parser.add_argument("run", help="a run's name: logs/<run>.requests.jsonl")
    parser.add_argument("index", type=int, help="the request, by its index in the workload")
    parser.add_argument("--next", type=int, default=3, help="requests after it to show (3)")
    options = parser.parse_args(argv)
    logs = options.output / "logs"
    workload = workload_file(logs, options.run)
    if workload is None:
        parser.error(f"no workload file in {logs} names run {options.run}")
    blocks = {int(spec["index"]): spec["blocks"] for spec in read_lines(workload)}
    answers = [a for a in read_lines(logs / f"{options.run}.requests.jsonl") if a["sim"]]
    answers.sort(key=lambda a: float(a["sim"]["arrival"]))
    position = next((i for i, a in enumerate(answers) if a["index"] == options.index), None)
    if position is None:
        parser.error(f"request {options.index} has no simulator record in run {options.run}")
    at = float(answers[position]["sim"]["arrival"])
    held = held_when(answers, blocks, at)
    servers = sorted({int(a["sim"]["server"]) for a in answers})
    print(f"request {options.index} arrived at {at:.2f} simulated s; prompt tokens held then:")
    for server in servers:
        print(f"  server {server}: {len(held.get(server, ())) * BLOCK_TOKENS:7,d}")
    print("  request  after s  prompt  most held at      served by  cached  TTFT ms")
    for answer in answers[position : position + 1 + options.next]:
        sim, index = answer["sim"], int(answer["index"])
        # Each later request against what was sent before it, this request included.
        before = held_when(answers, blocks, float(sim["arrival"]))
        mine = set(blocks[index])
        holder = max(servers, key=lambda s: len(mine & before.get(s, set())))
        most = len(mine & before.get(holder, set())) * BLOCK_TOKENS
        where = f"{holder} ({most:,d})" if most else "none"
        first = sim["first_token"]
        ttft = float("nan") if first is None else 1000 * (first - sim["arrival"])
        print(
            f"  {index:7d}  {sim['arrival'] - at:7.2f}  {sim['prompt_tokens']:6d}  {where:<16}"
            f"  {sim['server']:9d}  {sim['cached_tokens']:6d}  {ttft:7.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
