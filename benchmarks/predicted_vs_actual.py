"""The cost model's predicted TTFT against the simulator's, request by request, for the picker
runs of an `extproc bench routing --explain` output.

    .venv/bin/extproc bench routing --quick --pods 4 --profiles a100-8b \\
        --workloads agent-fan-out --strategies cost --others none --seed 0 --explain \\
        --output reports/explain-a100-afo
    .venv/bin/python benchmarks/predicted_vs_actual.py reports/explain-a100-afo

Each picker log's decision lines (`scheduling.explain`) are matched to the run's requests
(`logs/<run>.requests.jsonl`) in the order they were sent; the match is checked, since a
request overtaken on its way to the picker would pair with another's decision, by counting the
picks that name the server the simulator says served the request. Per run it prints the actual
/ predicted TTFT of the picked endpoint for prompts with a cached prefix and for cold ones (no
cached token, nothing predicted ahead), and each cold prompt's line: its pick's learned speed
against every endpoint's, predicted and actual TTFT, and the simulator's queue and prefill.
The picker predicts in wall time; the simulator runs `--speed` times faster (the run's
`routing.json` says how much), so predictions are multiplied by it.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extproc.bench.routing import read_lines, workload_file

Line = Mapping[str, Any]


def decisions(log: Path) -> list[Line]:
    return [
        json.loads(text[text.index("{") :])
        for text in log.read_text().splitlines()
        if "decision " in text
    ]


def quantiles(ratios: Sequence[float]) -> str:
    r = sorted(ratios)
    if not r:
        return "none"
    return (
        f"p10 {r[len(r) // 10]:.2f} median {statistics.median(r):.2f} "
        f"p90 {r[int(0.9 * len(r))]:.2f} (n={len(r)})"
    )


def one_run(log: Path, requests: Path, prompts: Mapping[int, int], speed: float) -> None:
    decided = decisions(log)
    answers = sorted(read_lines(requests), key=lambda line: float(line["sent"]))
    ports = [int(e["address"].rsplit(":", 1)[1]) for e in decided[0]["endpoints"]]
    first_port = min(ports)
    matched = 0
    cached: list[float] = []
    cold: list[float] = []
    rows = []
    for decision, answer in zip(decided, answers, strict=False):
        sim = answer["sim"]
        if sim is None or sim["first_token"] is None:
            continue
        pick = next(e for e in decision["endpoints"] if e["address"] == decision["pick"])
        server = int(pick["address"].rsplit(":", 1)[1]) - first_port
        matched += server == sim["server"]
        predicted = speed * float(pick["ttft_ms"])
        actual = 1000 * (sim["first_token"] - sim["arrival"])
        if sim["cached_tokens"] > 0:
            cached.append(actual / predicted)
        elif pick["backlog_ms"] == 0:
            cold.append(actual / predicted)
        if sim["cached_tokens"] == 0:
            speeds = sorted(round(float(e["tokens_per_s"])) for e in decision["endpoints"])
            queue = 1000 * (sim["scheduled"] - sim["arrival"])
            tokens = prompts[int(answer["index"])]
            rate = tokens / (actual - queue) * 1000 if actual > queue else 0.0
            rows.append(
                f"  {answer['index']:4d}  pick {round(float(pick['tokens_per_s'])):6d} tok/s of "
                f"{speeds}  predicted {predicted:5.0f} ms  actual {actual:5.0f} "
                f"(queue {queue:.0f}, prefill {actual - queue:.0f}: {tokens} tokens at "
                f"{rate:.0f} simulated tok/s)"
            )
    print(f"{log.name}: {len(decided)} decisions, {len(answers)} requests, {matched} picks name")
    print("  the server that served the request (matched in send order)")
    print(f"  actual / predicted, cached prefix: {quantiles(cached)}")
    print(f"  actual / predicted, cold, nothing ahead: {quantiles(cold)}")
    print("  cold prompts (learned speeds are wall tokens/s; TTFTs simulated ms):")
    print("\n".join(rows))


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    output = Path(argv[0])
    speed = float(json.loads((output / "routing.json").read_text())["options"]["speed"])
    logs = output / "logs"
    for log in sorted(logs.glob("*.picker.log")):
        requests = logs / log.name.replace(".picker.log", ".requests.jsonl")
        workload = workload_file(logs, log.name.removesuffix(".picker.log"))
        if requests.exists() and workload is not None:
            prompts = {int(s["index"]): int(s["prompt_tokens"]) for s in read_lines(workload)}
            one_run(log, requests, prompts, speed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
