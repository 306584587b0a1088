"""What a simulated fleet costs: CPU of an `extproc sim` process under a steady request rate.

    .venv/bin/python benchmarks/sim_cost.py --pods 8 --rate 300 --seconds 20

Starts `extproc sim` as its own process, sends short completions open-loop at `--rate` requests a
second (round-robin over the servers, from this process), and reads the simulator's CPU time from
/proc before and after. Prints one JSON line: achieved rate, errors, latency, and the CPU the
fleet used in cores (1.0 = one core busy all the time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import aiohttp


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=18400)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc.cli", "sim", "--pods", str(args.pods),
        "--port", str(args.port), "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        urls = line.split(": ", 1)[1].split()
        latencies: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(i: int) -> None:
                nonlocal errors
                body = {
                    "prompt": f"Request {i}: summarise the weather in one short line, please.",
                    "max_tokens": args.max_tokens,
                    "stream": args.stream,
                }
                start = time.perf_counter()
                try:
                    async with http.post(f"{urls[i % len(urls)]}/v1/completions", json=body) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            return
                except aiohttp.ClientError:
                    errors += 1
                    return
                latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(one(i) for i in range(50)))  # warm up
            latencies.clear()
            cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
            tasks: list[asyncio.Task[None]] = []
            total = int(args.rate * args.seconds)
            for i in range(total):
                due = t0 + i / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            cpu1, t1 = _cpu_seconds(proc.pid), time.perf_counter()
        result = {
            "pods": args.pods,
            "target_rate": args.rate,
            "achieved_rate": round(total / (t1 - t0), 1),
            "requests": total,
            "errors": errors,
            "max_tokens": args.max_tokens,
            "stream": args.stream,
            "latency_p50_s": round(statistics.median(latencies), 4),
            "latency_p99_s": round(statistics.quantiles(latencies, n=100)[98], 4),
            "sim_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        }
        print(json.dumps(result))
    finally:
        proc.terminate()
        await proc.wait()
    return 0


async def ttft_under_load(
    rate: float, *, profile: str, prompt_tokens: int, seconds: float
) -> dict[str, float]:
    """Simulated TTFT of one server under a steady rate (library use, `speed` 10)."""
    from extproc.sim import SimConfig, SimFleet

    speed = 10.0
    config = SimConfig(speed=speed, profile=profile, tokenizer="bytes:4")
    async with SimFleet(config) as fleet, aiohttp.ClientSession() as http:
        server = fleet.servers[0]
        ids: list[str] = []

        async def one(i: int) -> None:
            # Unique prompts (no cache hits): token ids from the byte estimator, 4 bytes each.
            body = {"prompt": [i * 100_000 + t for t in range(prompt_tokens)], "max_tokens": 128}
            async with http.post(f"{server.url}/v1/completions", json=body) as r:
                ids.append((await r.json())["id"])

        tasks = []
        total = int(rate * seconds)
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate / speed - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        ttfts = sorted(r.ttft for r in map(server.finished, ids) if r and r.ttft is not None)
    return {
        "rate": rate,
        "ttft_mean_s": round(statistics.fmean(ttfts), 4),
        "ttft_p90_s": round(ttfts[int(0.9 * len(ttfts))], 4),
    }


if __name__ == "__main__" and "--ttft" in sys.argv:
    # python benchmarks/sim_cost.py --ttft: the TTFT-under-load figures in docs/simulator.md.
    for profile in ("h100-8b", "a100-8b"):
        for r in (1.0, 5.0, 10.0, 20.0):
            row = asyncio.run(ttft_under_load(r, profile=profile, prompt_tokens=1000, seconds=30))
            print(json.dumps({"profile": profile, **row}))
elif __name__ == "__main__":
    sys.exit(asyncio.run(main()))
