"""The fast vLLM metrics parser against prometheus-client's parser and hand-written answers."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest

from extproc.sim import SimConfig, SimFleet
from extproc.state.metrics_text import (
    MetricsFormatError,
    parse_vllm_metrics,
    parse_vllm_metrics_reference,
)
from extproc.state.stats import EndpointStats, LoraState

M = 'model_name="m"'

SIMPLE = f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",{M}}} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",{M}}} 2.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{{engine="0",{M},reason="capacity"}} 7.0
vllm:num_requests_waiting_by_reason{{engine="0",{M},reason="deferred"}} 9.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",{M}}} 0.42
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{{engine="0",{M}}} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{{engine="0",{M}}} 250.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{{engine="0",{M}}} 1200.0
vllm:prompt_tokens_created{{engine="0",{M}}} 1.7e+09
# TYPE vllm:prompt_tokens_cached counter
vllm:prompt_tokens_cached_total{{engine="0",{M}}} 99.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{engine="0",{M}}} 64.0
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{engine="0",le="1.0",{M}}} 5.0
vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf",{M}}} 6.0
vllm:iteration_tokens_total_count{{engine="0",{M}}} 6.0
vllm:iteration_tokens_total_sum{{engine="0",{M}}} 99.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",engine="0",num_cpu_blocks="None",\
num_gpu_blocks="29001",num_gpu_blocks_override="None"}} 1.0
"""

SIMPLE_STATS = EndpointStats(
    read_at=5.0,
    running=3.0,
    waiting=2.0,
    kv_usage=0.42,
    prefix_cache_queries=1000.0,
    prefix_cache_hits=250.0,
    prompt_tokens=1200.0,
    generation_tokens=64.0,
    step_tokens=99.0,  # the iteration-tokens histogram's sum and count
    steps=6.0,
    block_size=16,
    num_gpu_blocks=29001,
)


def _engines(*ranks: tuple[str, float, float, float, float]) -> str:
    """Rank lines grouped per family, as prometheus-client writes them."""
    lines = ["# TYPE vllm:num_requests_running gauge"]
    lines += [f'vllm:num_requests_running{{engine="{e}",{M}}} {r}' for e, r, _, _, _ in ranks]
    lines += ["# TYPE vllm:num_requests_waiting gauge"]
    lines += [f'vllm:num_requests_waiting{{engine="{e}",{M}}} {w}' for e, _, w, _, _ in ranks]
    lines += ["# TYPE vllm:kv_cache_usage_perc gauge"]
    lines += [f'vllm:kv_cache_usage_perc{{engine="{e}",{M}}} {k}' for e, _, _, k, _ in ranks]
    lines += ["# TYPE vllm:prompt_tokens counter"]
    lines += [f'vllm:prompt_tokens_total{{engine="{e}",{M}}} {p}' for e, _, _, _, p in ranks]
    lines += ["# TYPE vllm:cache_config_info gauge"]
    lines += [
        f'vllm:cache_config_info{{block_size="16",engine="{e}",num_gpu_blocks="1000"}} 1.0'
        for e, *_ in ranks
    ]
    return "\n".join(lines) + "\n"


LORA_SERIES = """\
vllm:num_requests_running 1
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql-lora,chat-lora",\
waiting_lora_adapters="x"} 1.8e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="older",waiting_lora_adapters=""} 1.6e+09
"""

ESCAPED = (
    "vllm:num_requests_waiting 4\n"
    r'vllm:lora_requests_info{waiting_lora_adapters="a\"b,c\\d",max_lora="3",'
    r'running_lora_adapters="x}y {z=\"1\"},new\nline"} 1.9e+09'
    "\n"
)

CASES: list[tuple[str, str, EndpointStats]] = [
    ("vllm-page", SIMPLE, SIMPLE_STATS),
    (
        "two-engines-summed-kv-mean",
        _engines(("0", 3, 1, 0.2, 100), ("1", 5, 2, 0.6, 50)),
        EndpointStats(
            read_at=5.0,
            running=8,
            waiting=3,
            kv_usage=0.4,
            prompt_tokens=150,
            block_size=16,
            num_gpu_blocks=2000,
        ),
    ),
    (
        "nan-ignored",
        _engines(("0", 3, 1, float("nan"), 100), ("1", float("nan"), 2, 0.6, 50)),
        EndpointStats(
            read_at=5.0,
            running=3,
            waiting=3,
            kv_usage=0.6,
            prompt_tokens=150,
            block_size=16,
            num_gpu_blocks=2000,
        ),
    ),
    (
        "newest-lora-series-wins",
        LORA_SERIES,
        EndpointStats(
            read_at=5.0,
            running=1,
            lora=LoraState(
                max_loras=2, running=frozenset({"sql-lora", "chat-lora"}), waiting=frozenset({"x"})
            ),
        ),
    ),
    (
        "escaped-label-values",
        ESCAPED,
        EndpointStats(
            read_at=5.0,
            waiting=4,
            lora=LoraState(
                max_loras=3,
                running=frozenset({'x}y {z="1"}', "new\nline"}),
                waiting=frozenset({'a"b', "c\\d"}),
            ),
        ),
    ),
    (
        # Histogram samples come grouped by label set: each engine's buckets, count and sum,
        # then the next engine's; the cost model's sums and counts add over engines.
        "histograms-of-two-engines",
        'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 1\n'
        + "".join(
            f"""vllm:request_prefill_time_seconds_bucket{{engine="{e}",le="+Inf"}} {2 + e}
vllm:request_prefill_time_seconds_count{{engine="{e}"}} {2 + e}
vllm:request_prefill_time_seconds_sum{{engine="{e}"}} {0.5 + e}
vllm:request_prefill_kv_computed_tokens_count{{engine="{e}"}} {2 + e}
vllm:request_prefill_kv_computed_tokens_sum{{engine="{e}"}} {1000 * (1 + e)}
vllm:inter_token_latency_seconds_count{{engine="{e}"}} {10 * (1 + e)}
vllm:inter_token_latency_seconds_sum{{engine="{e}"}} {0.1 * (1 + e)}
"""
            for e in (0, 1)
        ),
        EndpointStats(
            read_at=5.0,
            running=2,
            prefill_seconds=2.0,
            prefill_requests=5,
            prefill_computed_tokens=3000,
            prefill_computed_requests=5,
            inter_token_seconds=pytest.approx(0.3),
            inter_tokens=30,
        ),
    ),
    (
        "missing-series-read-as-defaults",
        "vllm:num_requests_waiting 0\n",
        EndpointStats(read_at=5.0),
    ),
    (
        "no-labels-timestamps-first-line",
        "vllm:num_requests_running 2 1700000000000\nvllm:kv_cache_usage_perc 0.5 1700000000000\n",
        EndpointStats(read_at=5.0, running=2, kv_usage=0.5),
    ),
    (
        "no-trailing-newline-and-inf",
        '# x\nvllm:num_requests_waiting{a="b"} +Inf',
        EndpointStats(read_at=5.0, waiting=math.inf),
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_both_parsers_give_the_expected_stats(text: str, expected: EndpointStats) -> None:
    assert parse_vllm_metrics(text, read_at=5.0) == expected
    assert parse_vllm_metrics(text.encode(), read_at=5.0) == expected
    assert parse_vllm_metrics_reference(text, read_at=5.0) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html>not metrics</html>\n",
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 1\n',  # a prefix is not a name
        "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n",
    ],
    ids=["empty", "html", "longer-name-only", "comments-only"],
)
def test_a_page_without_vllm_load_is_an_error(text: str) -> None:
    with pytest.raises(MetricsFormatError):
        parse_vllm_metrics(text, read_at=0.0)
    with pytest.raises(MetricsFormatError):
        parse_vllm_metrics_reference(text, read_at=0.0)


def test_a_malformed_value_of_a_wanted_series_is_an_error() -> None:
    with pytest.raises(MetricsFormatError):
        parse_vllm_metrics('vllm:num_requests_running{a="b"} many\n', read_at=0.0)


async def test_both_parsers_agree_on_the_simulators_pages() -> None:
    """Pages with histograms, LoRA series that changed, requests running and waiting."""
    config = SimConfig(
        tokenizer="bytes",
        max_num_seqs=2,
        enable_lora=True,
        max_loras=1,
        lora_modules=(("sql-lora", "/adapters/sql"), ("chat-lora", "/adapters/chat")),
    )
    async with SimFleet(config) as fleet, aiohttp.ClientSession() as http:
        url = fleet.urls[0]

        async def complete(model: str, max_tokens: int) -> None:
            body = {"model": model, "prompt": "hello " * 50, "max_tokens": max_tokens}
            async with http.post(f"{url}/v1/completions", json=body) as response:
                await response.read()

        await asyncio.gather(*(complete(m, 4) for m in ("sql-lora", "chat-lora", config.model)))
        pages = []
        busy = [
            asyncio.create_task(complete(m, 100_000))
            for m in ("sql-lora", "chat-lora", config.model, "sql-lora")
        ]
        try:
            for _ in range(200):
                async with http.get(f"{url}/metrics") as response:
                    pages.append(await response.text())
                if fleet.servers[0].stats().waiting >= 2 and len(pages) >= 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
    last = parse_vllm_metrics(pages[-1], read_at=1.0)
    assert last.waiting >= 2
    assert last.lora is not None
    assert last.lora.running
    assert pages[-1].count("vllm:lora_requests_info{") >= 2  # an older series is still there
    for page in pages:
        assert "_bucket{" in page
        assert parse_vllm_metrics(page, read_at=1.0) == parse_vllm_metrics_reference(
            page, read_at=1.0
        )
