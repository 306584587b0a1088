"""vLLM's Prometheus metrics for one simulated server (vLLM 0.33 `v1/metrics/loggers.py`).

Names, help texts, labels (`model_name`, `engine`) and histogram buckets are vLLM's. Gauges and
counters are read from the engine's counters when scraped (no per-request work); histograms are
observed when vLLM observes them, and each one's text is rendered again only after something was
observed in it. Each server has its own `CollectorRegistry`s: no global state.

`vllm:lora_requests_info` follows vLLM's quirk: a new series per distinct (running, waiting)
adapter set, its value the unix time it was last current; older series stay, newest wins.

Families named `sim:...` are the simulator's own, not vLLM's (busy time, KV pulls and held
blocks): benchmarks read them; a router should not expect them from a real server.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from extproc.sim.engine import EngineConfig, EngineStats
from extproc.sim.request import FinishedRequest

TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS: Final = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS: Final = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip
REQUEST_NUM_PREEMPTIONS_BUCKETS: Final = (1, 2, 3, 4, 5, 10, 20)


def cache_config_info(eng: EngineConfig) -> dict[str, str]:
    """The labels of `vllm:cache_config_info`, as vLLM's `CacheConfig` renders them."""
    return {
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


def request_tokens_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 series capped at max_model_len."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return out
            out.append(value)
        exponent += 1


_LABELS: Final = ["model_name", "engine"]


class _StatsCollector(Collector):
    """Gauges and counters computed from `EngineStats` at scrape time."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        labels: Sequence[str],
        cache_info: dict[str, str],
        max_lora: int | None,
    ) -> None:
        self._stats = stats
        self._labels = list(labels)
        self._cache_info = cache_info
        self._max_lora = max_lora
        self._lora_series: dict[tuple[str, str], float] = {}

    def note_lora_sets(self, running: Iterable[str], waiting: Iterable[str]) -> None:
        key = (",".join(running), ",".join(waiting))
        self._lora_series[key] = time.time()

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        lv = self._labels

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(lv, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            family.add_metric(lv, value)
            return family

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", s.running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting
        )
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
            "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
            labels=[*_LABELS, "reason"],
        )
        deferred = min(s.waiting_deferred, s.waiting)
        by_reason.add_metric([*lv, "capacity"], s.waiting - deferred)
        by_reason.add_metric([*lv, "deferred"], deferred)
        yield by_reason
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            s.preemptions,
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            s.prompt_tokens_cached,
        )
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*_LABELS, "finished_reason"],
        )
        for reason in ("stop", "length", "abort", "error"):
            success.add_metric([*lv, reason], s.finished_by_reason.get(reason, 0))
        yield success
        yield counter(
            "sim:busy_seconds",
            "Simulator only: simulated seconds the engine spent executing steps.",
            s.busy_seconds,
        )
        yield counter(
            "sim:kv_transfer_blocks",
            "Simulator only: KV blocks pulled from remote prefill engines.",
            s.kv_transfer_blocks,
        )
        yield counter(
            "sim:kv_transfer_tokens",
            "Simulator only: prompt tokens whose KV was pulled from remote prefill engines.",
            s.kv_transfer_tokens,
        )
        yield counter(
            "sim:kv_transfer_failures",
            "Simulator only: KV pulls that found the remote blocks gone (prefilled locally).",
            s.kv_transfer_failures,
        )
        yield gauge(
            "sim:kv_held_blocks",
            "Simulator only: KV blocks of finished prefills held for remote decodes.",
            s.kv_held_blocks,
        )
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=list(self._cache_info),
        )
        info.add_metric(list(self._cache_info.values()), 1.0)
        yield info
        if self._max_lora is not None:
            self.note_lora_sets(s.running_loras, s.waiting_loras)
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            for (running, waiting), stamp in self._lora_series.items():
                lora.add_metric([str(self._max_lora), waiting, running], stamp)
            yield lora


def _number(value: float) -> str:
    """A sample's value as prometheus_client writes it."""
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


class _Histogram:
    """One histogram's counts, and its text, kept until the next observation.

    A server's histograms change at different paces (the step and inter-token ones at every
    step, the time to first token at each first token, the rest when a request finishes), so a
    scrape renders only those observed since the last: eight servers in one process rendering
    all a dozen (~25 buckets each) for every scrape took a third of the simulator's CPU. Each
    scrape still shows every observation so far, as vLLM's does: a router pairs the histograms
    with the counters of the same scrape (the prompt tokens that reached their first token with
    the times to first token).

    The text is prometheus_client's, filled in here: the library writes it once for the empty
    histogram, and a render puts the counts into its bucket, count and sum lines with the
    library's own number format. `generate_latest` on the moved histograms took 1.25 ms per
    render of a server after a step, 3.9 ms after a request finished (0.38 and 0.57 ms now:
    benchmarks/sim_metrics_render.py), inside the fleet's one event loop, which then sent tokens
    late in picker runs only (the picker scrapes, the peers do not): the client's TTFT p90 on
    h100 multi-turn was 0.89 of the earlier code's (docs/benchmarks.md, "The simulator's scrape
    cost"). tests/sim/test_metrics.py holds the two texts equal."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float], labels: list[str]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        Histogram(name, doc, _LABELS, buckets=buckets, registry=registry).labels(*labels)
        empty = generate_latest(registry).decode()
        # Each line of the empty text, its number cut off where it is one we fill in.
        self._lines: list[str] = []
        self._slots: list[tuple[int, str]] = []  # (line, "bucket" | "count" | "sum")
        for line in empty.splitlines(keepends=True):
            kind = next(
                (k for k in ("bucket", "count", "sum") if line.startswith(f"{name}_{k}{{")), None
            )
            if kind is not None:
                self._slots.append((len(self._lines), kind))
            self._lines.append(line if kind is None else line.rsplit(" ", 1)[0] + " ")
        self._bounds = (*(float(b) for b in buckets), math.inf)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._text: bytes | None = None

    def observe(self, value: float) -> None:
        # prometheus_client's rule: the first bucket whose bound is >= the value.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value
        self._text = None

    def text(self) -> bytes:
        if self._text is None:
            cumulative = iter(itertools.accumulate(self._counts))
            values = {"count": float(sum(self._counts)), "sum": self._sum}
            lines = list(self._lines)
            for at, kind in self._slots:
                value = float(next(cumulative)) if kind == "bucket" else values[kind]
                lines[at] += _number(value) + "\n"
            self._text = "".join(lines).encode()
        return self._text


class ServerMetrics:
    """The metrics of one server: an `EngineObserver` plus the `/metrics` text."""

    def __init__(
        self,
        *,
        model_name: str,
        stats: Callable[[], EngineStats],
        cache_info: dict[str, str],
        max_model_len: int,
        max_lora: int | None,
        engine: str = "0",
        time_scale: float = 1.0,
    ) -> None:
        """`time_scale`: wall seconds per simulated second (1 / the simulator's `speed`). Every
        duration is observed in wall seconds, the clock the client and the router read, so a
        router that divides a histogram's sum by a counter's rate gets the same speed as one
        that times requests itself (token counts are not scaled: they are not durations)."""
        self._scale = time_scale
        self._live = CollectorRegistry(auto_describe=False)
        labels = [model_name, engine]
        self._collector = _StatsCollector(stats, labels, {**cache_info, "engine": engine}, max_lora)
        self._live.register(self._collector)
        self._histograms: list[_Histogram] = []

        def hist(name: str, doc: str, buckets: Sequence[float]) -> _Histogram:
            histogram = _Histogram(name, doc, buckets, labels)
            self._histograms.append(histogram)
            return histogram

        tokens = request_tokens_buckets(max_model_len)
        self._ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self._itl = hist(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self._tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self._e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._inference = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._decode = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens
        )
        self._prefill_computed = hist(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            tokens,
        )
        self._generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", tokens
        )
        self._max_tokens = hist(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            tokens,
        )
        self._iteration_tokens = hist(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self._num_preemptions = hist(
            "vllm:request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            REQUEST_NUM_PREEMPTIONS_BUCKETS,
        )
        self._frozen: bytes | None = None

    # EngineObserver
    def on_step(self, tokens: int, inter_token_latencies: Sequence[float]) -> None:
        self._iteration_tokens.observe(tokens)
        for value in inter_token_latencies:
            self._itl.observe(value * self._scale)

    def on_first_token(self, ttft: float) -> None:
        self._ttft.observe(ttft * self._scale)

    def on_finished(self, request: FinishedRequest) -> None:
        r = request
        wall = self._scale
        self._e2e.observe((r.finished - r.arrival) * wall)
        self._prompt_tokens.observe(r.prompt_tokens)
        self._prefill_computed.observe(max(0, r.prompt_tokens - r.cached_tokens))
        self._generation_tokens.observe(r.output_tokens)
        self._max_tokens.observe(r.max_tokens)
        self._num_preemptions.observe(r.preemptions)
        if r.scheduled is not None:
            self._queue.observe((r.scheduled - r.arrival) * wall)
            self._inference.observe((r.finished - r.scheduled) * wall)
            if r.first_token is not None:
                self._prefill.observe((r.first_token - r.scheduled) * wall)
        if r.first_token is not None:
            decode = (r.finished - r.first_token) * wall
            self._decode.observe(decode)
            if r.output_tokens > 1:
                self._tpot.observe(decode / (r.output_tokens - 1))

    # exposition
    def note_lora_sets(self, running: Iterable[str], waiting: Iterable[str]) -> None:
        self._collector.note_lora_sets(running, waiting)

    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    def freeze(self) -> None:
        """Fault: keep answering the current text (a stuck metrics exporter)."""
        self._frozen = self.render()

    def unfreeze(self) -> None:
        self._frozen = None

    def render(self) -> bytes:
        if self._frozen is not None:
            return self._frozen
        return generate_latest(self._live) + b"".join(h.text() for h in self._histograms)
