"""`extproc sim`: run a simulated vLLM fleet until interrupted (SIGINT or SIGTERM).

`extproc sim calibrate` replays the published vLLM runs instead (`extproc.sim.calibrate`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from extproc.prefix.hashing import HASH_ALGOS, resolve_seed
from extproc.sim import calibrate as calibrate_cli
from extproc.sim.fleet import DEFAULT_MODEL, READY_LINE, SimConfig, SimFleet
from extproc.sim.profiles import PROFILES, parse_profile_spec

logger = logging.getLogger("extproc.sim")


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("expected NAME=PATH")
    return name, path


def _profile_spec(text: str) -> tuple[str, ...]:
    try:
        return parse_profile_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument(
        "--pods",
        type=int,
        default=None,
        help="number of simulated servers (default: 1, or as many as --profiles names)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="first port; server i uses port+i")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--profile", default="h100-8b", choices=sorted(PROFILES))
    p.add_argument(
        "--profiles",
        type=_profile_spec,
        default=(),
        metavar="NAME:N,...",
        help="a mixed fleet, e.g. a100-8b:4,h100-8b:4 (server i runs the i-th; sets --pods)",
    )
    p.add_argument("--speed", type=float, default=1.0, help="divide every simulated duration")
    p.add_argument(
        "--tokenizer",
        default="auto",
        help="auto (the model's tokenizer.json from --models-dir or the Hugging Face cache, else "
        "cl100k_base) | cl100k_base | tiktoken:PATH | hf:PATH (tokenizer.json or its "
        "directory, with its chat template) | bytes[:N]",
    )
    p.add_argument(
        "--models-dir",
        action="append",
        default=[],
        help="where --tokenizer auto looks first (as the picker's prefix.models_dirs); repeatable",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefix-caching-hash-algo", default="sha256", choices=HASH_ALGOS)
    p.add_argument("--no-enable-prefix-caching", action="store_true")
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="override the profile's")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--step-overhead-ms", type=float, default=None)
    p.add_argument("--default-max-tokens", type=int, default=128)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-cpu-loras", type=int, default=None)
    p.add_argument("--lora-modules", type=_lora_module, nargs="*", default=[], metavar="NAME=PATH")
    p.add_argument("--lora-load-seconds", type=float, default=0.5)
    p.add_argument("--kv-events", action="store_true", help="publish KV-cache events over ZMQ")
    p.add_argument(
        "--kv-events-port",
        type=int,
        default=5557,
        help="server i publishes on port+i and replays on port+pods+i (0: free ports)",
    )
    p.add_argument("--kv-events-host", default="127.0.0.1")
    p.add_argument("--kv-events-topic", default="kv-events")
    p.add_argument("--kv-events-legacy-arrays", action="store_true")
    p.add_argument("--kv-events-bytes-hashes", action="store_true", help="raw digests, not ints")
    p.add_argument("--no-kv-events-replay", action="store_true")
    p.add_argument(
        "--kv-transfer-bandwidth",
        type=float,
        default=25e9,
        help="bytes/s of a decode server's link for KV pulls (assumption: 200 Gb/s RDMA)",
    )
    p.add_argument("--kv-transfer-latency-seconds", type=float, default=0.001)
    p.add_argument(
        "--kv-transfer-timeout-seconds",
        type=float,
        default=480.0,
        help="held prefill blocks are freed after this (vLLM: VLLM_NIXL_ABORT_REQUEST_TIMEOUT)",
    )
    p.add_argument("--control-port", type=int, default=None, help="fleet fault-control HTTP port")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="sim_command", metavar="{calibrate}")
    calibrate = sub.add_parser(
        "calibrate",
        help="replay published vLLM runs on the simulated engine; simulated vs published",
        description="Replay every calibration case (extproc/sim/calibration/*.json) in virtual "
        "time and print simulated vs published metrics with their ratios; exit 1 when a ratio "
        "leaves its band.",
    )
    calibrate_cli.add_arguments(calibrate)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    profiles: tuple[str, ...] = args.profiles
    return SimConfig(
        pods=args.pods or len(profiles) or 1,
        host=args.host,
        port=args.port,
        model=args.model,
        profile=args.profile,
        profiles=profiles,
        speed=args.speed,
        tokenizer=args.tokenizer,
        models_dirs=tuple(args.models_dir),
        block_size=args.block_size,
        hash_algo=args.prefix_caching_hash_algo,
        # vLLM's rule: PYTHONHASHSEED, when set, seeds NONE_HASH.
        hash_seed=resolve_seed(os.environ, algo=args.prefix_caching_hash_algo),
        enable_prefix_caching=not args.no_enable_prefix_caching,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        step_overhead_ms=args.step_overhead_ms,
        default_max_tokens=args.default_max_tokens,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        lora_modules=tuple(args.lora_modules),
        lora_load_seconds=args.lora_load_seconds,
        kv_events=args.kv_events,
        kv_events_port=args.kv_events_port,
        kv_events_host=args.kv_events_host,
        kv_events_topic=args.kv_events_topic,
        kv_events_replay=not args.no_kv_events_replay,
        kv_events_legacy_arrays=args.kv_events_legacy_arrays,
        kv_events_int_hashes=not args.kv_events_bytes_hashes,
        kv_transfer_bandwidth=args.kv_transfer_bandwidth,
        kv_transfer_latency_seconds=args.kv_transfer_latency_seconds,
        kv_transfer_timeout_seconds=args.kv_transfer_timeout_seconds,
        control_port=args.control_port,
        seed=args.seed,
    )


async def serve(config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimFleet(config) as fleet:
        for handle in fleet.servers:
            logger.info(
                "server %d: %s profile=%s kv-events=%s replay=%s",
                handle.index,
                handle.url,
                handle.profile,
                handle.kv_events_endpoint,
                handle.kv_replay_endpoint,
            )
        if fleet.control_url:
            logger.info("control: %s", fleet.control_url)
        # A line on stdout that scripts can wait for.
        print(f"{READY_LINE}: {' '.join(fleet.urls)}", flush=True)
        await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "sim_command", None) == "calibrate":
        return calibrate_cli.run(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"extproc sim: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(config))
    return 0
