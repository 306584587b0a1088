"""One simulated vLLM server: the HTTP surface a router touches, over one `Engine`.

Routes (vLLM's paths, bodies, status codes and error envelope
`{"error": {"message", "type", "param", "code"}}`):
  inference  POST /v1/completions, /v1/chat/completions (JSON or SSE)
  rendering  POST /tokenize, /detokenize, /v1/completions/render, /v1/chat/completions/render
  models     GET /v1/models; POST /v1/load_lora_adapter, /v1/unload_lora_adapter
  state      GET /health, /ping, /version, /load, /metrics, /kv_event_sources
  probes     GET /server_info, /model_info, /get_model_info, /get_server_info (other routers')
  control    GET|POST /sim/faults, POST /sim/kill, GET /sim/state (the simulator's own)

Faults (`faults.Faults`) act here: a hung server never answers, an error rate turns inference
requests into 500s, frozen metrics repeat the last text, and `kill` closes the listener and every
connection, wipes the engine as a restart would, and `revive` brings it back on the same port.

Over 500 lines on purpose: the handlers stay methods of one class because they share the
server's engine, adapters and lifecycle (a kill swaps the engine id, metrics and faults under
them), and each is a few lines; what they compute lives in `api` (request checks, answers,
vLLM's error envelope), `disagg` (prefill/decode disaggregation: `kv_transfer_params` in and
out, the llm-d sidecar's prefill call), `metrics` and `events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import aiohttp
import zmq.asyncio
from aiohttp import web

from extproc.prefix.tokenizers import Tokenizer
from extproc.sim import api
from extproc.sim.api import (
    VLLM_VERSION,
    HTTPError,
    Prepared,
    bad_request,
    error_response,
    json_body,
)
from extproc.sim.disagg import (
    KVTransfer,
    PeerLookup,
    kv_transfer,
    kv_transfer_params,
    no_peers,
    prefill_remotely,
)
from extproc.sim.engine import Engine, EngineConfig
from extproc.sim.events import KVEventPublisher, KVEventsSettings, event_sources
from extproc.sim.faults import Faults
from extproc.sim.metrics import ServerMetrics, cache_config_info
from extproc.sim.request import LoraAdapter, RequestRejected

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    index: int
    host: str
    port: int
    model: str
    engine: EngineConfig
    speed: float = 1.0
    enable_lora: bool = False
    max_cpu_loras: int = 1
    lora_modules: tuple[tuple[str, str], ...] = ()
    lora_load_seconds: float = 0.5  # reading an adapter from local disk: an assumption
    lora_unload_seconds: float = 0.01
    default_max_tokens: int = 128
    kv_events: KVEventsSettings | None = None
    seed: int = 0


class SimServer:
    def __init__(
        self,
        config: ServerConfig,
        tokenizer: Tokenizer,
        zmq_ctx: zmq.asyncio.Context | None,
        *,
        peers: PeerLookup = no_peers,
        clock_origin: float | None = None,
    ) -> None:
        """`peers` finds the fleet's other servers (for KV pulls); `clock_origin` is the event
        loop time that is simulated time 0, shared by a fleet's servers so their times compare."""
        self.config = config
        self.tokenizer = tokenizer
        self._zmq_ctx = zmq_ctx
        self._peers = peers
        self.faults = Faults()
        self._rng = random.Random(config.seed * 7919 + config.index)
        self._ids = itertools.count()
        self._adapters: dict[str, LoraAdapter] = {}
        self._next_lora_id = itertools.count(1)
        self._in_flight = 0
        self._alive = False
        self._port = config.port
        self._runner: web.AppRunner | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._revive_task: asyncio.Task[None] | None = None
        self._kill_task: asyncio.Task[None] | None = None
        self._loop_time = asyncio.get_running_loop().time
        self._t0 = self._loop_time() if clock_origin is None else clock_origin
        self._speed = config.speed
        self._generation = 0
        self.engine_id = self._new_engine_id()
        self._http: aiohttp.ClientSession | None = None
        self.engine = Engine(config.engine, wall=self._wall_sim, sleep=self._sim_sleep)
        self.metrics = self._new_metrics()
        self.engine.observer = self.metrics
        self.publisher: KVEventPublisher | None = None
        for name, path in config.lora_modules:
            self._add_adapter(name, path)

    # -- simulated time ------------------------------------------------------------------------

    def _wall_sim(self) -> float:
        """Wall time since start times `speed`; the engine keeps its own virtual clock."""
        return (self._loop_time() - self._t0) * self._speed

    def sim_now(self) -> float:
        return self.engine.now()

    async def _sim_sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds / self._speed)

    def _new_engine_id(self) -> str:
        """A uuid as vLLM's engine ids are, new for every (re)start, reproducible from the seed."""
        rng = random.Random(f"{self.config.seed}-{self.config.index}-{self._generation}")
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    @property
    def profile(self) -> str:
        return self.config.engine.profile.name

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def alive(self) -> bool:
        return self._alive

    async def start(self) -> None:
        await self._start_publisher()
        self._engine_task = asyncio.get_running_loop().create_task(
            self.engine.run(on_step_end=self._after_step), name=f"sim-engine-{self.config.index}"
        )
        await self._listen()

    async def stop(self) -> None:
        if self._revive_task is not None:
            self._revive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revive_task
        self.faults.unhang()
        await self._close_listener()
        self.engine.close()
        if self._engine_task is not None:
            await self._engine_task
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def kill(self, down_for: float | None = None) -> None:
        """Die as a crashed process does; with `down_for` (simulated seconds) come back after."""
        if not self._alive:
            return
        await self._close_listener()
        self.engine.pause()
        self.engine.reset()
        self.engine.take_cache_events()  # a dead process publishes nothing
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        if down_for is not None:
            self._revive_task = asyncio.get_running_loop().create_task(self._revive_after(down_for))

    async def _revive_after(self, down_for: float) -> None:
        await self._sim_sleep(down_for)
        self._revive_task = None
        await self.revive()

    async def revive(self) -> None:
        """Come back as a fresh process: empty cache, counters from zero, event seq from 0."""
        if self._alive:
            return
        self._generation += 1
        self.engine_id = self._new_engine_id()
        self.metrics = self._new_metrics()
        self.engine.observer = self.metrics
        self.faults = Faults()
        await self._start_publisher()
        self.engine.resume()
        await self._listen()

    def _new_metrics(self) -> ServerMetrics:
        cfg = self.config
        eng = cfg.engine
        return ServerMetrics(
            model_name=cfg.model,
            stats=self.engine.stats,
            cache_info=cache_config_info(eng),
            max_model_len=eng.max_model_len,
            max_lora=eng.max_loras if cfg.enable_lora else None,
            time_scale=1.0 / self._speed,
        )

    async def _start_publisher(self) -> None:
        settings = self.config.kv_events
        if settings is None or self._zmq_ctx is None:
            return
        self.publisher = KVEventPublisher(
            self._zmq_ctx,
            endpoint=settings.endpoint,
            replay_endpoint=settings.replay_endpoint,
            topic=settings.topic,
            fmt=replace(settings.fmt, block_size=self.config.engine.block_size),
            buffer_steps=settings.buffer_steps,
        )
        # A port-0 endpoint resolves once; a restart re-binds the same port, as vLLM's would.
        self.config = replace(
            self.config,
            kv_events=replace(
                settings,
                endpoint=self.publisher.endpoint,
                replay_endpoint=self.publisher.replay_endpoint,
            ),
        )

    def _after_step(self) -> None:
        if self.publisher is not None:
            self.publisher.publish(self.engine.take_cache_events())
        else:
            self.engine.pool.events.clear()

    async def _listen(self) -> None:
        app = web.Application(middlewares=[self._fault_middleware], client_max_size=64 << 20)
        self._add_routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self._port, reuse_address=True)
        await site.start()
        self._runner = runner
        if self._port == 0:
            self._port = int(runner.addresses[0][1])
        self._alive = True

    async def _close_listener(self) -> None:
        self._alive = False
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- routes --------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat_completions)
        r.add_post("/tokenize", self._tokenize)
        r.add_post("/detokenize", self._detokenize)
        r.add_post("/v1/completions/render", self._render_completion)
        r.add_post("/v1/chat/completions/render", self._render_chat)
        r.add_get("/v1/models", self._models)
        r.add_get("/health", self._health)
        r.add_get("/ping", self._health)
        r.add_post("/ping", self._health)
        r.add_get("/version", self._version)
        r.add_get("/load", self._load)
        r.add_get("/metrics", self._metrics)
        r.add_get("/kv_event_sources", self._kv_event_sources)
        r.add_get("/server_info", self._server_info)
        r.add_get("/get_server_info", self._server_info)
        r.add_get("/model_info", self._model_info)
        r.add_get("/get_model_info", self._model_info)
        if self.config.enable_lora:
            r.add_post("/v1/load_lora_adapter", self._load_lora)
            r.add_post("/v1/unload_lora_adapter", self._unload_lora)
        r.add_get("/sim/faults", self._get_faults)
        r.add_post("/sim/faults", self._set_faults)
        r.add_post("/sim/kill", self._kill)
        r.add_get("/sim/state", self._state)

    @web.middleware
    async def _fault_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/sim/"):
            return await handler(request)
        faults = self.faults
        if faults.hung:
            await faults.wait_unhung()
        if (
            faults.error_rate > 0
            and request.method == "POST"
            and request.path in ("/v1/completions", "/v1/chat/completions")
            and self._rng.random() < faults.error_rate
        ):
            return error_response(500, "simulated engine failure", "InternalServerError")
        try:
            return await handler(request)
        except HTTPError as exc:
            return exc.response()

    # -- inference -----------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, chat=True)

    async def _inference(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await prefill_remotely(
            self._client, headers=request.headers, path=request.path, body=await json_body(request)
        )
        prepared = await self._prepare(body, chat=chat)
        return await self._generate(request, prepared, kv_transfer(body, self._peers), chat=chat)

    async def _prepare(self, body: Mapping[str, Any], *, chat: bool) -> Prepared:
        return await api.prepare(
            body,
            chat=chat,
            tokenizer=self.tokenizer,
            resolve_model=self._resolve_model,
            max_model_len=self.config.engine.max_model_len,
            default_max_tokens=self.config.default_max_tokens,
        )

    def _client(self) -> aiohttp.ClientSession:
        """The session the llm-d sidecar's prefill calls leave on (`disagg.prefill_remotely`)."""
        if self._http is None:
            # No connection cap: the sidecar opens as many prefill calls as it has requests.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._http

    def _resolve_model(self, body: Mapping[str, Any]) -> tuple[str, LoraAdapter | None]:
        model = body.get("model")
        base = self.config.model
        if model is None or model == base:
            return base, None
        if isinstance(model, str) and model in self._adapters:
            return model, self._adapters[model]
        raise HTTPError(
            HTTPStatus.NOT_FOUND,
            f"The model `{model}` does not exist. Valid aliases: {base}.",
            "NotFoundError",
            "model",
        )

    async def _generate(
        self, request: web.Request, p: Prepared, kv: KVTransfer, *, chat: bool
    ) -> web.StreamResponse:
        prefix = "chatcmpl" if chat else "cmpl"
        request_id = f"{prefix}-{self.config.index}-{next(self._ids)}"
        try:
            req = self.engine.submit(
                request_id,
                p.prompt_ids,
                max_tokens=p.max_tokens,
                lora=p.lora,
                cache_salt=p.cache_salt,
                stream=p.stream,
                remote_decode=kv.remote_decode,
                kv_source=kv.kv_source,
                prefill_seconds=kv.prefill_seconds,
            )
        except RequestRejected as exc:
            raise bad_request(str(exc)) from None
        self._in_flight += 1
        try:
            if p.stream:
                return await api.stream(request, req, p, chat=chat, decode=self.tokenizer.decode)
            record = await req.done
            if record.finish_reason == "abort":
                return error_response(500, "The request was aborted.", "InternalServerError")
            text = self.tokenizer.decode(req.output_ids)
            payload = api.completion(request_id, p.model, text, record, chat=chat)
            if req.held_block_ids is not None:
                payload["kv_transfer_params"] = kv_transfer_params(
                    req, record, engine_id=self.engine_id, host=self.config.host, port=self.port
                )
            return web.Response(text=json.dumps(payload), content_type=api.JSON)
        finally:
            self._in_flight -= 1
            self.engine.abort(req)  # no-op when finished; frees blocks if the client left

    # -- rendering -----------------------------------------------------------------------------

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        self._resolve_model(body)
        chat = "messages" in body
        ids = await api.prompt_ids(self.tokenizer, body, chat=chat)
        payload = {
            "count": len(ids),
            "max_model_len": self.config.engine.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }
        return web.json_response(payload)

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        self._resolve_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise bad_request("Field 'tokens' must be a list of token ids.", "tokens")
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    async def _render(self, request: web.Request, *, chat: bool) -> dict[str, Any]:
        body = await json_body(request)
        p = await self._prepare(body, chat=chat)
        return api.render(body, p, f"render-{self.config.index}-{next(self._ids)}")

    async def _render_completion(self, request: web.Request) -> web.Response:
        return web.json_response([await self._render(request, chat=False)])

    async def _render_chat(self, request: web.Request) -> web.Response:
        return web.json_response(await self._render(request, chat=True))

    # -- models and LoRA -----------------------------------------------------------------------

    def _add_adapter(self, name: str, path: str) -> LoraAdapter:
        adapter = LoraAdapter(name, path, next(self._next_lora_id))
        self._adapters[name] = adapter
        return adapter

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    async def _models(self, request: web.Request) -> web.Response:
        models = api.model_list(
            self.config.model,
            self._adapters.values(),
            max_model_len=self.config.engine.max_model_len,
        )
        return web.json_response(models)

    async def _load_lora(self, request: web.Request) -> web.Response:
        name, path = api.lora_to_load(
            await json_body(request),
            base=self.config.model,
            loaded=self._adapters.keys(),
            max_cpu_loras=self.config.max_cpu_loras,
        )
        await self._sim_sleep(self.config.lora_load_seconds)
        self._add_adapter(name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        name = api.lora_to_unload(await json_body(request), loaded=self._adapters.keys())
        await self._sim_sleep(self.config.lora_unload_seconds)
        del self._adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # -- state ---------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def _load(self, request: web.Request) -> web.Response:
        return web.json_response({"server_load": self._in_flight})

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.faults.metrics_frozen and not self.metrics.frozen:
            self.metrics.freeze()
        elif not self.faults.metrics_frozen and self.metrics.frozen:
            self.metrics.unfreeze()
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    def kv_event_sources(self) -> dict[str, Any]:
        settings = self.config.kv_events
        return {} if settings is None else event_sources(settings)

    async def _kv_event_sources(self, request: web.Request) -> web.Response:
        return web.json_response(self.kv_event_sources())

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response(api.server_info(self.config.model, self.config.engine))

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response(api.model_info(self.config.model, self.config.engine))

    # -- control -------------------------------------------------------------------------------

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.describe())

    async def _set_faults(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            self.faults.update(body)
        except (TypeError, ValueError) as exc:
            return error_response(400, str(exc), "BadRequestError")
        return web.json_response(self.faults.describe())

    async def _kill(self, request: web.Request) -> web.Response:
        body = await json_body(request) if request.can_read_body else {}
        down_for = body.get("down_for")
        if down_for is not None and (not isinstance(down_for, (int, float)) or down_for < 0):
            return error_response(
                400, "'down_for' must be a non-negative number", "BadRequestError"
            )
        # Answer first, then die: the caller learns the command was taken.
        self._kill_task = asyncio.get_running_loop().create_task(
            self.kill(None if down_for is None else float(down_for))
        )
        return web.json_response({"killed": True, "down_for": down_for})

    async def _state(self, request: web.Request) -> web.Response:
        s = self.engine.stats()
        return web.json_response(
            {
                "running": s.running,
                "waiting": s.waiting,
                "kv_usage": s.kv_usage,
                "cached_blocks": len(self.engine.pool.cached_event_ids()),
                "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits,
                "steps": s.steps,
                "sim_time": self.sim_now(),
                "busy_seconds": s.busy_seconds,
                "kv_held_blocks": s.kv_held_blocks,
                "profile": self.profile,
                "engine_id": self.engine_id,
            }
        )
