"""A fleet of simulated vLLM servers in one asyncio process: the library entry point.

    async with SimFleet(SimConfig(pods=4, speed=50)) as fleet:
        fleet.urls                     # ["http://127.0.0.1:41873", ...]
        fleet.servers[0].stats()       # counters and gauges
        fleet.servers[0].cached_block_ids()
        await fleet.servers[1].kill(down_for=30)

One tokenizer and one ZMQ context are built at start-up and shared by every server. An optional
control server (`control_port`) exposes each server's faults, kill and revive over HTTP, since a
killed server cannot answer on its own port.

Every server of a fleet counts simulated time from one origin, so records of different servers
compare (a disaggregated request's prefill and decode halves), and finds the others by host and
port (`SimFleet._peer`) to pull KV blocks from them. `profiles` gives servers different GPU
profiles (a mixed fleet); each server then sizes its engine from its own profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import zmq.asyncio
from aiohttp import web

from extproc.prefix.hashing import DEFAULT_NONE_HASH_SEED, BlockHasher, HashAlgo
from extproc.prefix.tokenizers import Tokenizer, load_tokenizer, resolve_spec
from extproc.sim.engine import EngineConfig, EngineStats
from extproc.sim.events import EventFormat, KVEventsSettings
from extproc.sim.profiles import get_profile
from extproc.sim.request import FinishedRequest
from extproc.sim.server import ServerConfig, SimServer

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# The line `extproc sim` (and the benchmarks' fleet host) prints once every server listens,
# followed by the servers' URLs: what parents wait for.
READY_LINE = "extproc sim ready"
_FILLER_TEXT = " The quick brown fox jumps over the lazy dog."


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything a fleet needs. `None` means "the profile's or vLLM's default"."""

    pods: int = 1
    host: str = "127.0.0.1"
    port: int = 0  # first server's port, the others follow; 0 picks free ports
    model: str = DEFAULT_MODEL
    profile: str = "h100-8b"
    # One profile name per server (a mixed fleet; `profiles.parse_profile_spec` reads
    # "a100-8b:4,h100-8b:4"); empty: `profile` for every server.
    profiles: tuple[str, ...] = ()
    speed: float = 1.0
    # `auto`: the model's own tokenizer files, found as the picker's `auto` finds them (models
    # directories, the Hugging Face cache; never the hub), else cl100k_base. A spec otherwise.
    tokenizer: str = "auto"
    models_dirs: tuple[str, ...] = ()
    block_size: int = 16
    hash_algo: HashAlgo = "sha256"
    hash_seed: str = DEFAULT_NONE_HASH_SEED
    enable_prefix_caching: bool = True
    num_gpu_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    step_overhead_ms: float | None = None
    default_max_tokens: int = 128
    enable_lora: bool = False
    max_loras: int = 1
    max_cpu_loras: int | None = None
    lora_modules: tuple[tuple[str, str], ...] = ()
    lora_load_seconds: float = 0.5
    lora_swap_ms: float = 2.0
    kv_events: bool = False
    kv_events_port: int = 0  # server i publishes on port+i, replays on port+pods+i; 0: free
    kv_events_host: str = "127.0.0.1"
    kv_events_topic: str = "kv-events"
    kv_events_replay: bool = True
    kv_events_legacy_arrays: bool = False
    kv_events_int_hashes: bool = True
    # Disaggregation: a decode server's link for KV pulls (assumptions: one 200 Gb/s RDMA NIC
    # and 1 ms per pull), and how long a prefill server holds blocks no decode pulls (vLLM's
    # VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    kv_transfer_bandwidth: float = 25e9  # bytes per second
    kv_transfer_latency_seconds: float = 0.001
    kv_transfer_timeout_seconds: float = 480.0
    control_port: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pods < 1:
            raise ValueError("pods must be at least 1")
        if self.speed <= 0:
            raise ValueError("speed must be positive")
        if self.max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        if self.profiles and len(self.profiles) != self.pods:
            raise ValueError(f"profiles names {len(self.profiles)} servers but pods is {self.pods}")
        for name in {self.profile, *self.profiles}:
            get_profile(name)
        if self.kv_transfer_bandwidth <= 0:
            raise ValueError("kv_transfer_bandwidth must be positive")
        if self.kv_transfer_latency_seconds < 0 or self.kv_transfer_timeout_seconds < 0:
            raise ValueError("kv_transfer latency and timeout must not be negative")

    def server_profile(self, index: int) -> str:
        return self.profiles[index] if self.profiles else self.profile

    def engine_config(self, tokenizer: Tokenizer, profile_name: str | None = None) -> EngineConfig:
        """The engine of a server running `profile_name` (default: `profile`)."""
        profile = get_profile(profile_name or self.profile)
        if self.step_overhead_ms is not None:
            profile = replace(profile, overhead_ms=self.step_overhead_ms)
        return EngineConfig(
            profile=profile,
            num_gpu_blocks=self.num_gpu_blocks or profile.num_gpu_blocks(self.block_size),
            max_num_seqs=self.max_num_seqs or profile.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or profile.max_num_batched_tokens,
            max_model_len=self.max_model_len or profile.max_model_len,
            hasher=BlockHasher(
                algo=self.hash_algo, block_size=self.block_size, seed=self.hash_seed
            ),
            enable_prefix_caching=self.enable_prefix_caching,
            max_loras=self.max_loras,
            lora_swap_ms=self.lora_swap_ms,
            filler_token_ids=tuple(tokenizer.encode(_FILLER_TEXT)) or (0,),
            kv_transfer_bandwidth=self.kv_transfer_bandwidth,
            kv_transfer_latency_seconds=self.kv_transfer_latency_seconds,
            kv_transfer_timeout_seconds=self.kv_transfer_timeout_seconds,
        )

    def server_config(self, index: int, engine: EngineConfig) -> ServerConfig:
        kv: KVEventsSettings | None = None
        if self.kv_events:
            base = self.kv_events_port
            host = f"tcp://{self.kv_events_host}"
            kv = KVEventsSettings(
                endpoint=f"{host}:{base + index if base else 0}",
                replay_endpoint=(
                    f"{host}:{base + self.pods + index if base else 0}"
                    if self.kv_events_replay
                    else None
                ),
                topic=self.kv_events_topic,
                fmt=EventFormat(
                    legacy_arrays=self.kv_events_legacy_arrays,
                    int_hashes=self.kv_events_int_hashes,
                    block_size=self.block_size,
                ),
            )
        return ServerConfig(
            index=index,
            host=self.host,
            port=self.port + index if self.port else 0,
            model=self.model,
            engine=engine,
            speed=self.speed,
            enable_lora=self.enable_lora,
            max_cpu_loras=max(self.max_cpu_loras or self.max_loras, self.max_loras),
            lora_modules=self.lora_modules,
            lora_load_seconds=self.lora_load_seconds,
            default_max_tokens=self.default_max_tokens,
            kv_events=kv,
            seed=self.seed,
        )


class ServerHandle:
    """A test's or benchmark's grip on one simulated server."""

    __slots__ = ("_server",)

    def __init__(self, server: SimServer) -> None:
        self._server = server

    @property
    def index(self) -> int:
        return self._server.config.index

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def alive(self) -> bool:
        return self._server.alive

    @property
    def kv_events_endpoint(self) -> str | None:
        kv = self._server.config.kv_events
        return kv.endpoint if kv else None

    @property
    def kv_replay_endpoint(self) -> str | None:
        kv = self._server.config.kv_events
        return kv.replay_endpoint if kv else None

    @property
    def adapters(self) -> tuple[str, ...]:
        return self._server.adapters

    @property
    def profile(self) -> str:
        """The name of the step-time profile (GPU type) this server runs."""
        return self._server.profile

    @property
    def engine_id(self) -> str:
        """The engine id its prefill answers name (`remote_engine_id`); new on every revive."""
        return self._server.engine_id

    def stats(self) -> EngineStats:
        return self._server.engine.stats()

    def sim_time(self) -> float:
        return self._server.sim_now()

    def cached_block_ids(self) -> set[int]:
        """Event ids (64-bit block hashes) of every block a request could hit right now."""
        return self._server.engine.pool.cached_event_ids()

    # -- KV-event faults and probes, for event-subscriber tests ---------------------------------

    @property
    def kv_events_published(self) -> int:
        """Batches the current publisher has sent (its next seq); 0 without events or while dead."""
        publisher = self._server.publisher
        return publisher.next_seq if publisher else 0

    def drop_kv_event_batches(self, count: int = 1, *, replayable: bool = True) -> None:
        """Lose the next `count` event batches on the wire (and from replay unless `replayable`)."""
        if self._server.publisher is None:
            raise RuntimeError("this server publishes no KV events now")
        self._server.publisher.drop_next(count, replayable=replayable)

    def reset_prefix_cache(self) -> None:
        """vLLM's `/reset_prefix_cache`: forget every cached hash, publish AllBlocksCleared now."""
        self._server.engine.pool.clear()
        if self._server.publisher is not None:
            self._server.publisher.publish(self._server.engine.take_cache_events())

    def finished(self, request_id: str) -> FinishedRequest | None:
        """Exact simulated timings of a recently finished request (its response's `id`)."""
        for record in reversed(self._server.engine.recent):
            if record.request_id == request_id:
                return record
        return None

    def finished_requests(self) -> tuple[FinishedRequest, ...]:
        """The recently finished requests' records, oldest first (the last 4096)."""
        return tuple(self._server.engine.recent)

    def metrics_text(self) -> str:
        return self._server.metrics.render().decode()

    def set_faults(
        self,
        *,
        error_rate: float | None = None,
        hang: bool | None = None,
        freeze_metrics: bool | None = None,
    ) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if error_rate is not None:
            changes["error_rate"] = error_rate
        if hang is not None:
            changes["hang"] = hang
        if freeze_metrics is not None:
            changes["freeze_metrics"] = freeze_metrics
        self._server.faults.update(changes)
        return self._server.faults.describe()

    async def kill(self, down_for: float | None = None) -> None:
        await self._server.kill(down_for)

    async def revive(self) -> None:
        await self._server.revive()


class SimFleet:
    def __init__(self, config: SimConfig, *, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self._tokenizer = tokenizer
        self._servers: list[SimServer] = []
        self._zmq: zmq.asyncio.Context | None = None
        self._control: web.AppRunner | None = None
        self.control_url: str | None = None

    @property
    def servers(self) -> list[ServerHandle]:
        return [ServerHandle(s) for s in self._servers]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    async def start(self) -> None:
        cfg = self.config
        tokenizer: Tokenizer
        if self._tokenizer is not None:
            tokenizer = self._tokenizer
        else:
            spec = await asyncio.to_thread(
                resolve_spec, cfg.tokenizer, cfg.model, models_dirs=cfg.models_dirs,
                environ=os.environ,
            )  # fmt: skip
            tokenizer = await asyncio.to_thread(load_tokenizer, spec)
        engines = {
            name: cfg.engine_config(tokenizer, name)
            for name in dict.fromkeys(cfg.server_profile(i) for i in range(cfg.pods))
        }
        if cfg.kv_events:
            self._zmq = zmq.asyncio.Context()
        origin = asyncio.get_running_loop().time()
        try:
            for index in range(cfg.pods):
                server = SimServer(
                    cfg.server_config(index, engines[cfg.server_profile(index)]),
                    tokenizer,
                    self._zmq,
                    peers=self._peer,
                    clock_origin=origin,
                )
                self._servers.append(server)
                await server.start()
            if cfg.control_port is not None:
                await self._start_control(cfg.control_port)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._control is not None:
            await self._control.cleanup()
            self._control = None
        for server in self._servers:
            await server.stop()
        self._servers.clear()
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    def _peer(self, host: str, port: int) -> SimServer | None:
        """The fleet's server listening on host:port (where a decode pulls KV blocks from)."""
        for server in self._servers:
            if server.port == port and server.config.host == host:
                return server
        return None

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the control server --------------------------------------------------------------------

    async def _start_control(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/servers", self._list)
        app.router.add_get("/servers/{index}/faults", self._faults)
        app.router.add_post("/servers/{index}/faults", self._faults)
        app.router.add_post("/servers/{index}/kill", self._kill)
        app.router.add_post("/servers/{index}/revive", self._revive)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, port, reuse_address=True)
        await site.start()
        self._control = runner
        bound = int(runner.addresses[0][1])
        self.control_url = f"http://{self.config.host}:{bound}"

    def _server_at(self, request: web.Request) -> SimServer:
        try:
            return self._servers[int(request.match_info["index"])]
        except (ValueError, IndexError):
            raise web.HTTPNotFound(text="no such server") from None

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "index": s.config.index,
                    "url": s.url,
                    "alive": s.alive,
                    "profile": s.profile,
                    **s.kv_event_sources(),
                }
                for s in self._servers
            ]
        )

    async def _faults(self, request: web.Request) -> web.Response:
        server = self._server_at(request)
        if request.method == "POST":
            try:
                server.faults.update(await request.json())
            except (TypeError, ValueError) as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response(server.faults.describe())

    async def _kill(self, request: web.Request) -> web.Response:
        server = self._server_at(request)
        body: dict[str, Any] = {}
        if request.can_read_body:
            with contextlib.suppress(ValueError):
                body = await request.json()
        down_for = body.get("down_for")
        await server.kill(float(down_for) if down_for is not None else None)
        return web.json_response({"index": server.config.index, "alive": server.alive})

    async def _revive(self, request: web.Request) -> web.Response:
        server = self._server_at(request)
        await server.revive()
        return web.json_response({"index": server.config.index, "alive": server.alive})
