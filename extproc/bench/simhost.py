"""A simulated fleet in its own process, plus a small HTTP side door for the routing benchmark.

    python -m extproc.bench.simhost '{"pods": 8, "port": 41000, "speed": 2, ...}' RECORDS_PORT

runs `SimFleet(SimConfig(**json))` exactly as `extproc sim` would, prints the same
`extproc sim ready: URL...` line, and serves on 127.0.0.1:RECORDS_PORT:

- `POST /records {"ids": [...]}`: for each response id, the simulator's exact record of the
  request (`ServerHandle.finished`: arrival, first token and finish in simulated seconds, cached
  tokens, preemptions), or null when unknown. Response ids name their server
  (`chatcmpl-{index}-{n}`), which is how a record is found without searching every server.
- `GET /stats`: every server's counters (`ServerHandle.stats`, `busy_seconds` included), its
  simulated clock and its profile name.

All servers count simulated time from one origin, so a disaggregated request's records on its
prefill and decode servers compare: its TTFT is the decode record's
`first_token - min(arrival, prefill_arrival)`. A mixed fleet's `profiles` may be given as a
list or as a spec string ("a100-8b:4,h100-8b:4"), which also sets `pods` when that is absent.

Why not `extproc sim` and its `/metrics`: TTFT histograms have vLLM's coarse buckets, so p90 and
p99 read from them would be bucket edges; the records give every request's simulated TTFT
exactly, free of the load generator's and the routers' scheduling jitter (which `--speed` would
multiply). Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict
from typing import Any

from aiohttp import web

from extproc.prefix.hashing import resolve_seed
from extproc.sim.fleet import READY_LINE, ServerHandle, SimConfig, SimFleet
from extproc.sim.profiles import parse_profile_spec


def _server_of(request_id: str, servers: list[ServerHandle]) -> ServerHandle | None:
    # "chatcmpl-3-17" / "cmpl-3-17": the middle part is the server's index.
    parts = request_id.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    index = int(parts[1])
    return servers[index] if index < len(servers) else None


def _app(fleet: SimFleet) -> web.Application:
    async def records(request: web.Request) -> web.Response:
        body = await request.json()
        servers = fleet.servers
        out: list[dict[str, Any] | None] = []
        for request_id in body.get("ids", []):
            server = _server_of(str(request_id), servers)
            if server is None or (record := server.finished(str(request_id))) is None:
                out.append(None)
            else:
                out.append({**asdict(record), "server": server.index})
        return web.json_response({"records": out})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "servers": [
                    {
                        "index": s.index,
                        "sim_time": s.sim_time(),
                        "profile": s.profile,
                        **asdict(s.stats()),
                    }
                    for s in fleet.servers
                ]
            }
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/records", records)
    app.router.add_get("/stats", stats)
    return app


async def serve(config: SimConfig, records_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimFleet(config) as fleet:
        runner = web.AppRunner(_app(fleet), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", records_port).start()
        try:
            print(f"{READY_LINE}: {' '.join(fleet.urls)}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()


def config_from_json(text: str) -> SimConfig:
    fields = json.loads(text)
    # As `extproc sim` does (vLLM's rule): PYTHONHASHSEED, when set, seeds NONE_HASH.
    fields.setdefault("hash_seed", resolve_seed(os.environ, algo=fields.get("hash_algo", "sha256")))
    profiles = fields.get("profiles")
    if isinstance(profiles, str):
        profiles = parse_profile_spec(profiles)
    if profiles:
        fields["profiles"] = tuple(profiles)
        fields.setdefault("pods", len(profiles))
    return SimConfig(**fields)


def main() -> None:
    config = config_from_json(sys.argv[1])
    records_port = int(sys.argv[2])
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(config, records_port))


if __name__ == "__main__":
    main()
