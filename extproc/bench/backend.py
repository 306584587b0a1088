"""A model server that answers at once, for measuring what the routing path itself costs.

It reads the whole request body (as a real server must) and returns a small completion, so the
time a request takes is Envoy, the picker and the sockets, not a model, unless the client asks
for a service time with `x-bench-delay-ms`. Several ports in one
process; run it in its own process so it does not share a core with the load generator.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

_COMPLETION = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "model": "bench-model",
        "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


def _app(model: str) -> web.Application:
    models = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()

    async def list_models(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        # The load generator may ask for a service time, standing in for a model's prefill.
        delay_ms = request.headers.get("x-bench-delay-ms")
        if delay_ms:
            await asyncio.sleep(float(delay_ms) / 1000)
        return web.Response(body=_COMPLETION, content_type="application/json")

    # The picker's collector reads vLLM's metrics; an idle server's page is all it needs here.
    labels = f'engine="0",model_name="{model}"'
    page = "".join(
        f"vllm:{name}{{{labels}}} 0.0\n"
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/plain")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    return app


async def serve(ports: list[int], model: str) -> None:
    runners = []
    for port in ports:
        runner = web.AppRunner(_app(model), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        runners.append(runner)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    model = sys.argv[1]
    ports = [int(p) for p in sys.argv[2:]]
    try:
        import uvloop

        uvloop.run(serve(ports, model))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
