"""A model server that answers at once, for measuring what the routing path itself costs.

It reads the whole request body (as a real server must) and returns a small completion, so the
time a request takes is Envoy, the picker and the sockets, not a model, unless the client asks
for a service time with `x-bench-delay-ms`. A request with `"stream": true` is answered the way
vLLM streams: one server-sent event per token (`max_tokens` of them) spaced by the inter-token
gap (`x-bench-token-gap-ms`, default 10 ms), then the usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`. Several ports in one process; run
it in its own process so it does not share a core with the load generator.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

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

# 100 tokens/s per stream: the decode speed of a mid-sized model on one GPU under a moderate batch
# (vLLM's inter-token latency is typically 10-30 ms). The gap matters beyond realism: it makes
# each token its own write, so Envoy forwards (and the inline path sends the picker) one body
# chunk per token, as with a real server; back-to-back writes would coalesce.
DEFAULT_TOKEN_GAP_MS = 10.0
# Cheap stand-in for a tokenizer (about 4 characters a token in English prose): the bench
# only needs a plausible, deterministic prompt_tokens.
_CHARS_PER_TOKEN = 4


def _stream_chunk(model: str, *, created: int, chat: bool, last: bool) -> bytes:
    """One token's event, in vLLM's shape (it serializes `usage: null` and `stop_reason` on
    every chunk when usage is asked for; the Lua usage filter must skip those)."""
    choice: dict[str, Any] = (
        {"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"}
    )
    choice |= {"logprobs": None, "finish_reason": "length" if last else None, "stop_reason": None}
    chunk: dict[str, Any] = {
        "id": "cmpl-bench",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": None,
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _usage_chunk(model: str, *, created: int, chat: bool, prompt: int, completion: int) -> bytes:
    chunk: dict[str, Any] = {
        "id": "cmpl-bench",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _stream(
    request: web.Request, model: str, body: dict[str, Any], *, raw_length: int
) -> web.StreamResponse:
    tokens = max(1, int(body.get("max_tokens") or 16))
    gap = float(request.headers.get("x-bench-token-gap-ms", DEFAULT_TOKEN_GAP_MS)) / 1000
    options = body.get("stream_options") or {}
    chat = request.path.endswith("/chat/completions")
    created = int(time.time())
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = time.perf_counter()
    for i in range(tokens):
        if i and gap > 0:
            # Against a schedule, not sleep-per-token: sleeps overrun, and the rate must hold.
            await asyncio.sleep(max(0.0, start + i * gap - time.perf_counter()))
        await response.write(_stream_chunk(model, created=created, chat=chat, last=i == tokens - 1))
    if options.get("include_usage"):
        prompt = max(1, raw_length // _CHARS_PER_TOKEN)
        await response.write(
            _usage_chunk(model, created=created, chat=chat, prompt=prompt, completion=tokens)
        )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _app(model: str) -> web.Application:
    models = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()

    async def list_models(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    async def complete(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        # The load generator may ask for a service time, standing in for a model's prefill.
        delay_ms = request.headers.get("x-bench-delay-ms")
        if delay_ms:
            await asyncio.sleep(float(delay_ms) / 1000)
        # Parse only what may stream: the one-chunk scenarios send 220 KB bodies, and their
        # backend cost must stay a read and a fixed answer.
        if b'"stream"' in raw:
            body = json.loads(raw)
            if body.get("stream") is True:
                return await _stream(request, model, body, raw_length=len(raw))
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
