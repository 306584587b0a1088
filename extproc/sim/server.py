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

Prefill/decode disaggregation, as vLLM with the NixlConnector and the llm-d routing sidecar:
- a body with `kv_transfer_params.do_remote_decode` is a prefill request: its blocks are held
  after it finishes and its JSON answer carries the `kv_transfer_params` that locate them;
- a body with `kv_transfer_params.do_remote_prefill` is a decode request: its engine pulls the
  blocks from the server at `remote_host:remote_port`, found in-process through the injected
  `PeerLookup` (the fleet's), by engine id and `remote_request_id`;
- a request with the `x-prefiller-host-port` header and no `kv_transfer_params` is first sent
  to that server as a prefill request (what the sidecar in front of vLLM does), then served
  here as the decode request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any, Final, TypeGuard

import aiohttp
import zmq.asyncio
from aiohttp import web

from extproc.prefix.hashing import cache_salt_error
from extproc.prefix.tokenizers import Tokenizer
from extproc.sim.engine import (
    Engine,
    EngineConfig,
    EngineRequest,
    FinishedRequest,
    KVSource,
    LoraAdapter,
    RequestRejected,
)
from extproc.sim.events import EventFormat, KVEventPublisher
from extproc.sim.faults import Faults
from extproc.sim.metrics import ServerMetrics

logger = logging.getLogger(__name__)

VLLM_VERSION: Final = "0.33.0"
_JSON: Final = "application/json"
_LONG_TEXT: Final = 20_000  # characters: tokenize longer prompts off the event loop
# The llm-d routing sidecar's header: "prefill this request on host:port first".
PREFILLER_HEADER: Final = "x-prefiller-host-port"
# What the sidecar sends its prefiller (llm-d's nixlv2 connector): "keep the KV for a decode".
_PREFILL_PARAMS: Final[Mapping[str, Any]] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# Finds a server of the same fleet by the host and port it listens on.
PeerLookup = Callable[[str, int], "SimServer | None"]


@dataclass(frozen=True, slots=True)
class KVEventsSettings:
    endpoint: str  # e.g. tcp://127.0.0.1:5557 or tcp://127.0.0.1:0
    replay_endpoint: str | None
    topic: str = "kv-events"
    fmt: EventFormat = field(default_factory=EventFormat)
    buffer_steps: int = 10_000


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


class HTTPError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.err_type, self.param)


def error_response(
    status: int, message: str, err_type: str, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, text=json.dumps(body), content_type=_JSON)


def _bad_request(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(HTTPStatus.BAD_REQUEST, message, "BadRequestError", param)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A validated inference request, ready for the engine."""

    prompt_ids: list[int]
    max_tokens: int
    lora: LoraAdapter | None
    model: str
    cache_salt: str | None
    stream: bool
    include_usage: bool
    kv: _KVTransfer


@dataclass(frozen=True, slots=True)
class _KVTransfer:
    """What a request's `kv_transfer_params` ask of the engine."""

    remote_decode: bool = False  # a prefill request: hold the KV for a remote decode
    kv_source: KVSource | None = None  # a decode request: pull the prompt's KV from there
    prefill_seconds: float | None = None  # the simulator's `sim_prefill_seconds`


@dataclass(frozen=True, slots=True)
class _RemoteBlocks:
    """One decode request's view of the blocks a prefill server holds (a `KVSource`).

    vLLM's decode worker handshakes with `remote_host:remote_port` and reads from the engine it
    finds there; here the peer is looked up in the fleet, and must still be up and run the
    engine the parameters name (a restarted server has a new engine id).
    """

    peers: PeerLookup
    host: str | None
    port: int | None
    engine_id: str | None
    request_id: str | None
    block_ids: tuple[int, ...]

    def _engine(self) -> Engine | None:
        if self.host is None or self.port is None:
            return None
        peer = self.peers(self.host, self.port)
        if peer is None or not peer.alive or peer.engine_id != self.engine_id:
            return None
        return peer.engine

    def available(self) -> bool:
        engine = self._engine()
        return engine is not None and engine.find_held(self.request_id, self.block_ids) is not None

    def release(self) -> bool:
        engine = self._engine()
        if engine is None:
            return False
        held = engine.find_held(self.request_id, self.block_ids)
        return held is not None and engine.release_held(held)


def _no_peers(host: str, port: int) -> SimServer | None:
    return None


class SimServer:
    def __init__(
        self,
        config: ServerConfig,
        tokenizer: Tokenizer,
        zmq_ctx: zmq.asyncio.Context | None,
        *,
        peers: PeerLookup = _no_peers,
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
        cache_info = {
            "block_size": str(eng.block_size),
            "cache_dtype": "auto",
            "calculate_kv_scales": "False",
            "cpu_offload_gb": "0",
            "enable_prefix_caching": str(eng.enable_prefix_caching),
            "gpu_memory_utilization": str(eng.profile.gpu_memory_utilization),
            "is_attention_free": "False",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(eng.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": eng.hasher.algo,
            "sliding_window": "None",
            "swap_space": "4",
        }
        return ServerMetrics(
            model_name=cfg.model,
            stats=self.engine.stats,
            cache_info=cache_info,
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

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad_request(f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise _bad_request("The request body must be a JSON object.")
        return body

    # -- inference -----------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._prefill_remotely(request, await self._json_body(request))
        prepared = await self._prepare(body, chat=False)
        return await self._generate(request, prepared, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._prefill_remotely(request, await self._json_body(request))
        prepared = await self._prepare(body, chat=True)
        return await self._generate(request, prepared, chat=True)

    # -- disaggregation ------------------------------------------------------------------------

    async def _prefill_remotely(self, request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
        """The llm-d routing sidecar in front of this server (its nixlv2 connector): with the
        prefiller header and no `kv_transfer_params`, send the request to the prefiller as a
        one-token, non-streamed prefill request, and return the body to serve here with the
        `kv_transfer_params` it answered. If the prefill fails, the body as it came (served
        here in full)."""
        target = request.headers.get(PREFILLER_HEADER)
        if not target or body.get("kv_transfer_params") is not None:
            return body
        prefill = {k: v for k, v in body.items() if k != "stream_options"}
        prefill["kv_transfer_params"] = dict(_PREFILL_PARAMS)
        prefill["stream"] = False
        prefill["max_tokens"] = 1
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        headers = {"x-request-id": request.headers.get("x-request-id") or str(uuid.uuid4())}
        url = f"http://{target}{request.path}"
        try:
            async with self._client().post(url, json=prefill, headers=headers) as resp:
                status = resp.status
                answer = await resp.json(content_type=None) if status == HTTPStatus.OK else None
        except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
            logger.warning("prefill on %s failed (%r); serving the request in full", target, exc)
            return body
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict):
            logger.warning(
                "prefill on %s answered %d without kv_transfer_params; serving the request in full",
                target,
                status,
            )
            return body
        return {**body, "kv_transfer_params": params}

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            # No connection cap: the sidecar opens as many prefill calls as it has requests.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._http

    def _kv_transfer(self, body: Mapping[str, Any]) -> _KVTransfer:
        params = body.get("kv_transfer_params")
        if not isinstance(params, dict):
            return _KVTransfer()
        source: KVSource | None = None
        if params.get("do_remote_prefill") is True:
            # Unusable parameters still make a source: the engine then finds nothing to pull,
            # logs it and prefills locally, as vLLM's "recompute" failure policy does.
            host, port = params.get("remote_host"), params.get("remote_port")
            engine_id, request_id = params.get("remote_engine_id"), params.get("remote_request_id")
            source = _RemoteBlocks(
                peers=self._peers,
                host=host if isinstance(host, str) else None,
                port=port if isinstance(port, int) and not isinstance(port, bool) else None,
                engine_id=engine_id if isinstance(engine_id, str) else None,
                request_id=request_id if isinstance(request_id, str) else None,
                block_ids=_block_ids(params.get("remote_block_ids")),
            )
        # The prefill's duration, placed back from the arrival here on this server's clock:
        # engines' virtual clocks drift apart under load (a busy one falls behind the wall),
        # durations do not. The hand-off between the two (HTTP, a router) is left out, as a
        # router's own time is left out of every request's TTFT here.
        took = params.get("sim_prefill_seconds")
        return _KVTransfer(
            remote_decode=params.get("do_remote_decode") is True,
            kv_source=source,
            prefill_seconds=float(took) if _is_number(took) else None,
        )

    def _kv_transfer_params(self, req: EngineRequest, record: FinishedRequest) -> dict[str, Any]:
        """vLLM NixlConnector's `request_finished` answer for a prefill request whose blocks are
        held, plus `sim_prefill_seconds` (how long the prefill took, for the decode side's
        record of when the request began)."""
        held = list(req.held_block_ids or ())
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            # One list per KV-cache group (vLLM 0.33); a full-attention model has one group.
            "remote_block_ids": [held],
            "remote_engine_id": self.engine_id,
            "remote_request_id": req.request_id,
            "remote_host": self.config.host,
            "remote_port": self.port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": record.prompt_tokens if held else 0,
            "remote_blocks_expiry_time": None,  # set by vLLM only for blocks pinned on a decode
            "remote_registration_generation": 0,
            "transfer_mode": "pull",
            "sim_prefill_seconds": record.finished - record.first_arrival,
        }

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

    async def _prompt_ids(self, body: Mapping[str, Any], *, chat: bool) -> list[int]:
        tok = self.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _bad_request("Field 'messages' must be a non-empty list.", "messages")
            add_gen = bool(body.get("add_generation_prompt", True))
            try:
                size = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
                if size > _LONG_TEXT:
                    return await asyncio.to_thread(
                        tok.apply_chat_template, messages, add_generation_prompt=add_gen
                    )
                return tok.apply_chat_template(messages, add_generation_prompt=add_gen)
            except (ValueError, AttributeError) as exc:
                raise _bad_request(f"Invalid messages: {exc}", "messages") from None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise _bad_request("Prompt cannot be empty.", "prompt")
            if len(prompt) > _LONG_TEXT:
                return await asyncio.to_thread(tok.encode, prompt)
            return tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if any(t < 0 for t in prompt):
                raise _bad_request("Token ids must be non-negative.", "prompt")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise _bad_request("Batched prompts are not supported by the simulator.", "prompt")
        raise _bad_request(
            "Field 'prompt' must be a string, a list of token ids, or a one-element list.",
            "prompt",
        )

    async def _prepare(self, body: Mapping[str, Any], *, chat: bool) -> _Prepared:
        model, lora = self._resolve_model(body)
        salt = body.get("cache_salt")
        salt_error = cache_salt_error(salt)
        if salt_error is not None:
            raise _bad_request(salt_error, "cache_salt")
        n = body.get("n", 1)
        if n != 1:
            raise _bad_request("The simulator supports only n=1.", "n")
        prompt_ids = await self._prompt_ids(body, chat=chat)
        max_len = self.config.engine.max_model_len
        raw = body.get("max_completion_tokens") if chat else None
        if raw is None:
            raw = body.get("max_tokens")
        if raw is None:
            max_tokens = max(1, min(self.config.default_max_tokens, max_len - len(prompt_ids)))
        elif isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            raise _bad_request(f"max_tokens must be at least 1, got {raw}.", "max_tokens")
        else:
            max_tokens = raw
        if len(prompt_ids) + max_tokens > max_len:
            raise _bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                "max_tokens",
            )
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        include_usage = bool(
            stream and isinstance(options, dict) and options.get("include_usage", False)
        )
        return _Prepared(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            lora=lora,
            model=model,
            cache_salt=salt if isinstance(salt, str) else None,
            stream=stream,
            include_usage=include_usage,
            kv=self._kv_transfer(body),
        )

    async def _generate(
        self, request: web.Request, p: _Prepared, *, chat: bool
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
                remote_decode=p.kv.remote_decode,
                kv_source=p.kv.kv_source,
                prefill_seconds=p.kv.prefill_seconds,
            )
        except RequestRejected as exc:
            raise _bad_request(str(exc)) from None
        self._in_flight += 1
        try:
            if p.stream:
                return await self._stream(request, req, p, chat=chat)
            record = await req.done
            if record.finish_reason == "abort":
                return error_response(500, "The request was aborted.", "InternalServerError")
            text = self.tokenizer.decode(req.output_ids)
            usage = _usage(record.prompt_tokens, record.output_tokens, record.cached_tokens)
            created = int(time.time())
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": record.finish_reason,
                    "stop_reason": None,
                }
                obj = "chat.completion"
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": record.finish_reason,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
                obj = "text_completion"
            payload = {
                "id": request_id,
                "object": obj,
                "created": created,
                "model": p.model,
                "choices": [choice],
                "usage": usage,
            }
            if req.held_block_ids is not None:
                payload["kv_transfer_params"] = self._kv_transfer_params(req, record)
            return web.Response(text=json.dumps(payload), content_type=_JSON)
        finally:
            self._in_flight -= 1
            self.engine.abort(req)  # no-op when finished; frees blocks if the client left

    async def _stream(
        self, request: web.Request, req: EngineRequest, p: _Prepared, *, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": req.request_id, "object": obj, "created": created, "model": p.model}
        if chat:
            first = {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            await resp.write(_sse(first))
        assert req.tokens is not None
        while True:
            ids = await req.tokens.get()
            if ids is None:
                break
            # The engine queues the end marker right after the last tokens: seeing only it left
            # means this chunk is the last one and carries the finish reason, as vLLM's does.
            finished = req.finish_reason is not None and req.tokens.qsize() == 1
            reason = req.finish_reason if finished and req.finish_reason != "abort" else None
            text = self.tokenizer.decode(ids)
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            if reason is not None:
                choice["stop_reason"] = None
            await resp.write(_sse({**head, "choices": [choice]}))
        record = await req.done
        if p.include_usage:
            usage = _usage(record.prompt_tokens, record.output_tokens, record.cached_tokens)
            await resp.write(_sse({**head, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # -- rendering -----------------------------------------------------------------------------

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        self._resolve_model(body)
        chat = "messages" in body
        ids = await self._prompt_ids(body, chat=chat)
        payload = {
            "count": len(ids),
            "max_model_len": self.config.engine.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }
        return web.json_response(payload)

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        self._resolve_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise _bad_request("Field 'tokens' must be a list of token ids.", "tokens")
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    async def _render(self, request: web.Request, *, chat: bool) -> dict[str, Any]:
        body = await self._json_body(request)
        p = await self._prepare(body, chat=chat)
        sampling = {
            "max_tokens": p.max_tokens,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "n": 1,
        }
        return {
            "request_id": f"render-{self.config.index}-{next(self._ids)}",
            "token_ids": p.prompt_ids,
            "features": None,
            "sampling_params": sampling,
            "model": p.model,
            "stream": p.stream,
            "stream_options": body.get("stream_options"),
            "cache_salt": p.cache_salt,
        }

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
        created = int(time.time())
        base = self.config.model
        max_len = self.config.engine.max_model_len

        def card(model_id: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": max_len,
                "permission": [],
            }

        data = [card(base, base, None)]
        data += [card(a.name, a.path, base) for a in self._adapters.values()]
        return web.json_response({"object": "list", "data": data})

    async def _load_lora(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise HTTPError(
                400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        if name == self.config.model:
            raise HTTPError(
                400,
                f"The lora adapter '{name}' conflicts with a base model name.",
                "InvalidUserInput",
            )
        if name in self._adapters and not body.get("load_inplace", False):
            raise HTTPError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        if len(self._adapters) >= self.config.max_cpu_loras and name not in self._adapters:
            # vLLM keeps the registration and evicts from its CPU LRU; the simulator has no
            # reload path, so it refuses instead and says so.
            raise HTTPError(
                400,
                f"The simulator holds at most max_cpu_loras={self.config.max_cpu_loras} adapters.",
                "InvalidUserInput",
            )
        await self._sim_sleep(self.config.lora_load_seconds)
        self._add_adapter(name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise HTTPError(
                400,
                "'lora_name' needs to be provided to unload a LoRA adapter.",
                "InvalidUserInput",
            )
        if name not in self._adapters:
            raise HTTPError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
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
        if settings is None:
            return {}
        return {
            "0": {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": settings.endpoint,
                "replay_endpoint": settings.replay_endpoint,
                "buffer_steps": settings.buffer_steps,
                "hwm": 100_000,
                "max_queue_size": 100_000,
                "topic": settings.topic,
            }
        }

    async def _kv_event_sources(self, request: web.Request) -> web.Response:
        return web.json_response(self.kv_event_sources())

    async def _server_info(self, request: web.Request) -> web.Response:
        eng = self.config.engine
        return web.json_response(
            {
                "model_path": self.config.model,
                "served_model_name": self.config.model,
                "tokenizer_path": self.config.model,
                "version": VLLM_VERSION,
                "max_model_len": eng.max_model_len,
                "max_num_seqs": eng.max_num_seqs,
                "max_num_batched_tokens": eng.max_num_batched_tokens,
                "block_size": eng.block_size,
                "num_gpu_blocks": eng.num_gpu_blocks,
                "dp_size": 1,
                "tp_size": 1,
                # The simulator's own: which step-time profile (GPU type) this server runs.
                "sim_profile": eng.profile.name,
            }
        )

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.config.model,
                "tokenizer_path": self.config.model,
                "is_generation": True,
                "served_model_name": self.config.model,
                "max_model_len": self.config.engine.max_model_len,
            }
        )

    # -- control -------------------------------------------------------------------------------

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.describe())

    async def _set_faults(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            self.faults.update(body)
        except (TypeError, ValueError) as exc:
            return error_response(400, str(exc), "BadRequestError")
        return web.json_response(self.faults.describe())

    async def _kill(self, request: web.Request) -> web.Response:
        body = await self._json_body(request) if request.can_read_body else {}
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


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _block_ids(value: object) -> tuple[int, ...]:
    """`remote_block_ids`: one list per KV-cache group (vLLM 0.33; the first group is the
    full-attention one here) or, as older vLLM sent it, one flat list."""
    if isinstance(value, Sequence) and value and isinstance(value[0], Sequence):
        return _int_tuple(value[0])
    return _int_tuple(value)


def _int_tuple(value: object) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        return ()
    return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
