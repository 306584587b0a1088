"""The ext_proc exchange on Envoy's own clock: where a request's routing milliseconds go.

Envoy times each request's exchange with its ext_proc server itself, and its access log can
print those times (`%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:...)%`, and
`%COMMON_DURATION(...)%` between two of the request's moments). Per request:

- `headers`: the round trip of the request headers message, which also opens the gRPC stream
  (in the bundled buffered body mode Envoy sends the body only once the headers are answered);
- `body`: the round trip of the body message, whose reply carries the decision;
- `held`: from the request's last byte in (DS_RX_END) to its first byte out to the model server
  (US_TX_BEG): what routing added to the request's path, as Envoy saw it;
- `client TTFT`: at the client, to the first token's event of a streamed answer (every stream is
  checked whole: all its tokens, the usage chunk and `[DONE]`, else it counts as an error).

Listeners on the same instant backends (`extproc.bench.backend`), driven in turn, in two
rounds: Envoy alone (no ext_proc), a minimal ext_proc servicer (grpc.aio on uvloop, as the
picker; it answers the headers and routes round robin on the body, and does nothing else: the
floor of any Python ext_proc server), and the picker (`extproc serve`: its defaults, but the
routing benchmark's tokenizer, `cl100k_base`, since these backends have no /tokenize) with
round-robin and with `cost`, both named per request (`x-routing-strategy`). Open loop at
`--rate` requests per second, `--kb` KB completion prompts that share nothing (so `cost` probes
each cold), answers streamed (20 tokens). `--body-modes buffered,streamed` adds the three ext_proc
variants again with the request body in FULL_DUPLEX_STREAMED mode, where Envoy sends the body
without waiting for the headers' answer (`-streamed`).

    .venv/bin/python benchmarks/exchange_timing.py [--requests 200] [--rate 10] [--kb 10]
        [--body-modes buffered] [--rounds 2] [--output DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast, get_args

import aiohttp
import grpc
import yaml
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from extproc.bench.envoy import running_envoy
from extproc.bench.loadgen import quantile
from extproc.bench.overhead import (
    MODEL,
    bootstrap_with_direct_listener,
    request_body,
    send_streamed,
)
from extproc.bench.processes import (
    PICKER_PREFIX,
    free_ports,
    picker_argv,
    process,
    wait_picker,
)
from extproc.config import BodyMode
from extproc.server import reply

SERVERS = ("minimal", "round-robin", "cost")
TOKENS = 20  # each answer's length, streamed
# The access log line: Envoy's times for the exchange (microseconds), one JSON object a request.
_TIMING_FORMAT = {
    "status": "%RESPONSE_CODE%",
    "strategy": "%REQ(x-routing-strategy)%",
    "held": "%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%",
    "headers": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)%",
    "body": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_body_total_latency_us)%",
}
_TIMES = ("held", "headers", "body")
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


def _suffix(mode: BodyMode) -> str:
    """What names a body mode in variant, listener and log names: nothing for the bundled one."""
    return "" if mode == "buffered" else f"-{mode}"


def variants(body_modes: Sequence[BodyMode]) -> list[str]:
    """Envoy alone, then each ext_proc server in each body mode (`-streamed` when streamed)."""
    return ["envoy"] + [server + _suffix(mode) for mode in body_modes for server in SERVERS]


class _Minimal(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers the bundled `ended` path's messages, routing round robin: nothing else. In
    FULL_DUPLEX_STREAMED mode, as the picker does, it holds the headers' answer until the body
    has ended and sends the body back."""

    def __init__(self, targets: Sequence[str]) -> None:
        self._turn = itertools.cycle(targets)
        self._names = itertools.count()

    async def Process(
        self, messages: AsyncIterator[ProcessingRequest], context: Any
    ) -> AsyncIterator[ProcessingResponse]:
        streamed = False
        parts: list[bytes] = []
        async for message in messages:
            if message.HasField("protocol_config"):
                streamed = message.protocol_config.request_body_mode == _FULL_DUPLEX
            kind = message.WhichOneof("request")
            if kind == "request_headers" and not streamed:
                yield reply.CONTINUE_REQUEST_HEADERS
            elif kind == "request_body" and streamed:
                parts.append(message.request_body.body)
                if message.request_body.end_of_stream:
                    target, name = next(self._turn), f"m-{next(self._names)}"
                    yield reply.route_in_headers(target, request_id=name)
                    for response in reply.streamed_request_body(
                        b"".join(parts), end_of_stream=True
                    ):
                        yield response
            elif kind == "request_body" and message.request_body.end_of_stream:
                yield reply.route_in_body(next(self._turn), request_id=f"m-{next(self._names)}")
            elif kind == "request_body":
                yield reply.CONTINUE_REQUEST_BODY
            elif kind == "response_trailers":
                yield reply.RESPONSE_TRAILERS


class _Logs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """The usage entries Envoy sends on the `ended` path, read and dropped."""

    async def StreamAccessLogs(
        self, entries: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for _ in entries:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def _serve_minimal(port: int, targets: Sequence[str]) -> None:
    server = grpc.aio.server()
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(_Minimal(targets), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(_Logs(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


@dataclass(frozen=True, slots=True)
class VariantResult:
    variant: str
    requests: int
    errors: int
    client_ttft_p50_ms: float
    # Per time (`_TIMES`): p50 and p90 in ms over the requests Envoy logged it for.
    envoy_ms: Mapping[str, tuple[float, float]]


def _p50_p90(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return quantile(ordered, 0.5), quantile(ordered, 0.9)


def _with_timing_log(bootstrap: str, logs: Path, prefix: str) -> str:
    """The config with a JSON access log of `_TIMING_FORMAT` per listener, to
    logs/<prefix>-<listener>.log."""
    config = yaml.safe_load(bootstrap)
    for listener in config["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm.setdefault("access_log", []).append(
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": _FILE_LOG,
                    "path": str(logs / f"{prefix}-{listener['name']}.log"),
                    "log_format": {"json_format": _TIMING_FORMAT},
                },
            }
        )
    return str(yaml.safe_dump(config, sort_keys=False, width=1000))


def _bodies(count: int, kb: float, seed: int) -> list[bytes]:
    """Streamed completion requests of about `kb` KB whose prompts share nothing (each starts
    with its seed and its number), `TOKENS` tokens each."""
    base = json.loads(request_body(int(kb * 1024), tokens=TOKENS, stream=True))
    prompt = base["prompt"]
    bodies = []
    for i in range(count):
        head = f"Request {seed}-{i}. "
        bodies.append(json.dumps(base | {"prompt": head + prompt[len(head) :]}).encode())
    return bodies


async def _drive(
    url: str, bodies: Sequence[bytes], rate: float, headers: Mapping[str, str], seed: int
) -> tuple[list[float], int]:
    """The bodies as streamed requests, Poisson arrivals at `rate`: client TTFTs (ms, to the
    first token's event) and how many failed or came back incomplete."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession(
        headers={"content-type": "application/json"}, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        tasks = []
        for body in bodies:
            sending = send_streamed(session, url, body, tokens=TOKENS, headers=headers)
            tasks.append(asyncio.create_task(sending))
            await asyncio.sleep(rng.expovariate(rate))
        samples = await asyncio.gather(*tasks)
    ttfts = [1000 * s.ttft for s in samples if s.status == 200]
    return ttfts, sum(s.status != 200 for s in samples)


def run(
    requests: int,
    rate: float,
    kb: float,
    *,
    rounds: int = 2,
    body_modes: Sequence[BodyMode] = ("buffered",),
) -> list[VariantResult]:
    backend_ports = free_ports(4)
    grpc_port, health, metrics, minimal_port, admin, admin2, direct = free_ports(7)
    # One listener per body mode on each Envoy: "ended" (buffered), "ended-streamed".
    paths = [f"ended{_suffix(mode)}" for mode in body_modes]
    picker_ports = dict(zip(paths, free_ports(len(paths)), strict=True))
    minimal_ports = dict(zip(paths, free_ports(len(paths)), strict=True))
    endpoints = [f"127.0.0.1:{p}" for p in backend_ports]
    python = sys.executable
    backend_cmd = [python, "-m", "extproc.bench.backend", MODEL, *map(str, backend_ports)]
    minimal_cmd = [python, __file__, "--serve-minimal", str(minimal_port), ",".join(endpoints)]
    names = variants(body_modes)
    urls = {"envoy": direct}
    for mode, path in zip(body_modes, paths, strict=True):
        suffix = _suffix(mode)
        urls |= {f"minimal{suffix}": minimal_ports[path]}
        urls |= {f"{strategy}{suffix}": picker_ports[path] for strategy in SERVERS[1:]}
    ttfts: dict[str, list[float]] = {v: [] for v in names}
    errors = dict.fromkeys(names, 0)
    with tempfile.TemporaryDirectory(prefix="extproc-exchange-") as scratch:
        logs = Path(scratch)
        config = logs / "picker.yaml"
        # The routing benchmark's tokenizer: the backends have no /tokenize to fall back on.
        config.write_text(yaml.safe_dump({"prefix": dict(PICKER_PREFIX)}))
        picker_cmd = picker_argv(config, endpoints, grpc=grpc_port, health=health, metrics=metrics)
        routed = bootstrap_with_direct_listener(
            ports={"envoy": direct, **picker_ports},
            extproc=f"127.0.0.1:{grpc_port}",
            endpoints=endpoints,
            admin_port=admin,
        )
        floor = bootstrap_with_direct_listener(
            ports=minimal_ports,
            extproc=f"127.0.0.1:{minimal_port}",
            endpoints=endpoints,
            admin_port=admin2,
        )
        with (
            process(backend_cmd, ready_line="ready"),
            process(minimal_cmd, ready_line="ready"),
            process(picker_cmd) as picker_process,
        ):
            why = wait_picker(picker_process, grpc=grpc_port, metrics=metrics, endpoints=4)
            if why is not None:
                raise RuntimeError(why)
            with (
                running_envoy(
                    _with_timing_log(routed, logs, "picker"), admin_port=admin, log_level="error"
                ),
                running_envoy(
                    _with_timing_log(floor, logs, "minimal"), admin_port=admin2, log_level="error"
                ),
            ):
                for seed, (_, variant) in enumerate(itertools.product(range(rounds), names)):
                    url = f"http://127.0.0.1:{urls[variant]}/v1/completions"
                    strategy = variant.removesuffix("-streamed")
                    asked = {"x-routing-strategy": strategy} if strategy in SERVERS[1:] else {}
                    # A seed per phase: no phase sends a prompt the picker has seen before.
                    bodies = _bodies(requests, kb, seed=seed)
                    got, failed = asyncio.run(_drive(url, bodies, rate, asked, seed=seed))
                    ttfts[variant] += got
                    errors[variant] += failed
        # Envoy writes its access logs out when it stops: read them only now.
        timings = _read_timings(logs, body_modes)
    return [
        VariantResult(
            variant=variant,
            requests=rounds * requests,
            errors=errors[variant],
            client_ttft_p50_ms=quantile(sorted(ttfts[variant]), 0.5),
            envoy_ms=timings[variant],
        )
        for variant in names
    ]


def _read_timings(
    logs: Path, body_modes: Sequence[BodyMode]
) -> dict[str, dict[str, tuple[float, float]]]:
    """Per variant, per time, p50/p90 in ms, from the access logs Envoy wrote."""

    def entries(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (logs / f"{name}.log").read_text().splitlines()]

    per_variant = {"envoy": entries("picker-envoy")}
    for mode in body_modes:
        suffix = _suffix(mode)
        picker = entries(f"picker-ended{suffix}")
        per_variant[f"minimal{suffix}"] = entries(f"minimal-ended{suffix}")
        for strategy in SERVERS[1:]:
            per_variant[f"{strategy}{suffix}"] = [e for e in picker if e["strategy"] == strategy]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for variant, logged in per_variant.items():
        out[variant] = {}
        for name in _TIMES:
            values = [float(e[name]) / 1000 for e in logged if _number(e.get(name))]
            if values:
                out[variant][name] = _p50_p90(values)
    return out


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def render(results: Sequence[VariantResult]) -> str:
    def cell(result: VariantResult, name: str) -> str:
        if name not in result.envoy_ms:
            return "-"
        p50, p90 = result.envoy_ms[name]
        return f"{p50:.2f} / {p90:.2f}"

    rows = [
        "| variant | requests | errors | client TTFT p50 ms | held p50 / p90 ms "
        "| headers round trip p50 / p90 ms | body round trip p50 / p90 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.variant} | {r.requests} | {r.errors} | {r.client_ttft_p50_ms:.2f} | "
            f"{cell(r, 'held')} | {cell(r, 'headers')} | {cell(r, 'body')} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--serve-minimal"]:
        import uvloop

        uvloop.run(_serve_minimal(int(args_list[1]), args_list[2].split(",")))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="per variant and round")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--kb", type=float, default=10.0, help="request body size (KB)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--body-modes",
        default="buffered",
        help="comma-separated: buffered (the bundled mode), streamed (FULL_DUPLEX_STREAMED)",
    )
    parser.add_argument("--output", type=Path, default=None, help="write exchange.json here")
    args = parser.parse_args(args_list)
    modes = [mode for mode in args.body_modes.split(",") if mode]
    if not modes or set(modes) - set(get_args(BodyMode)):
        parser.error(f"--body-modes: one or more of {', '.join(get_args(BodyMode))}")
    results = run(
        args.requests,
        args.rate,
        args.kb,
        rounds=args.rounds,
        body_modes=cast("list[BodyMode]", modes),
    )
    table = render(results)
    print(table)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        report = {
            "options": vars(args) | {"output": str(args.output)},
            "results": [asdict(r) for r in results],
        }
        (args.output / "exchange.json").write_text(json.dumps(report, indent=2))
        (args.output / "exchange.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
