"""A small real HTTP server that answers like vLLM's OpenAI API, for picker tests.

Real sockets on 127.0.0.1 and a real aiohttp server; only the model is fake. It records each
request it gets (path, headers, raw body) and tags responses with `x-backend: <port>` so a test
can tell which endpoint served it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web


def vllm_metrics(model: str, *, running: int = 0, waiting: int = 0) -> str:
    """A minimal vLLM /metrics page with the series the picker's collector reads."""
    labels = f'engine="0",model_name="{model}"'
    return (
        f"vllm:num_requests_running{{{labels}}} {running}.0\n"
        f"vllm:num_requests_waiting{{{labels}}} {waiting}.0\n"
        f"vllm:kv_cache_usage_perc{{{labels}}} 0.0\n"
        f"vllm:prefix_cache_queries_total{{{labels}}} 0.0\n"
        f"vllm:prefix_cache_hits_total{{{labels}}} 0.0\n"
    )


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ModelServer:
    model: str
    adapters: tuple[str, ...] = ()
    received: list[Received] = field(default_factory=list)
    # Streaming responses wait on this between their first and second chunk when it is set.
    hold_stream: asyncio.Event | None = None
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/embeddings", self._embed)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        sockets = site._server.sockets if site._server else ()
        self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _tag(self) -> dict[str, str]:
        return {"x-backend": str(self.port)}

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": self.model, "object": "model", "owned_by": "vllm"}]
        data += [
            {"id": a, "object": "model", "owned_by": "vllm", "parent": self.model}
            for a in self.adapters
        ]
        return web.json_response({"object": "list", "data": data}, headers=self._tag())

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=vllm_metrics(self.model), content_type="text/plain")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(headers=self._tag())

    async def _record(self, request: web.Request) -> dict[str, object]:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        parsed = json.loads(body)
        assert isinstance(parsed, dict)
        return parsed

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        payload = await self._record(request)
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 2},
        }
        if not payload.get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "model": payload["model"],
                    "choices": [{"index": 0, "text": "a b c", "finish_reason": "length"}],
                    "usage": usage,
                },
                headers=self._tag(),
            )
        response = web.StreamResponse(headers={**self._tag(), "content-type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(["a", "b", "c"]):
            chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": word}], "usage": None}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if i == 0 and self.hold_stream is not None:
                await self.hold_stream.wait()
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await response.write(
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _embed(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "usage": {"prompt_tokens": 2, "total_tokens": 2},
            },
            headers=self._tag(),
        )
