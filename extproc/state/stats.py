"""Live load of one endpoint, as read from its vLLM `/metrics` (and merged with our in-flight).

The collector produces one `EndpointStats` per endpoint per scrape; the snapshot carries the last
good one with the time it was read, so a scheduler can tell a fresh value from a stale one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoraState:
    """From `vllm:lora_requests_info` (the newest series): adapters in the batch and waiting."""

    max_loras: int = 0
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """The series a router needs, each from the same scrape, read at `read_at` (monotonic s)."""

    read_at: float
    waiting: float = 0.0  # vllm:num_requests_waiting
    running: float = 0.0  # vllm:num_requests_running
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, 0..1
    prefix_cache_queries: float = 0.0  # vllm:prefix_cache_queries_total (tokens)
    prefix_cache_hits: float = 0.0  # vllm:prefix_cache_hits_total (tokens)
    prompt_tokens: float = 0.0  # vllm:prompt_tokens_total
    generation_tokens: float = 0.0  # vllm:generation_tokens_total
    # Histogram sums and counts (observed when a request finishes), for the cost model: the
    # engine's prefill speed without saturating it, and its step time.
    prefill_seconds: float = 0.0  # vllm:request_prefill_time_seconds_sum
    prefill_requests: float = 0.0  # vllm:request_prefill_time_seconds_count
    prefill_computed_tokens: float = 0.0  # vllm:request_prefill_kv_computed_tokens_sum
    prefill_computed_requests: float = 0.0  # vllm:request_prefill_kv_computed_tokens_count
    first_token_seconds: float = 0.0  # vllm:time_to_first_token_seconds_sum
    first_tokens: float = 0.0  # vllm:time_to_first_token_seconds_count
    step_tokens: float = 0.0  # vllm:iteration_tokens_total_sum
    steps: float = 0.0  # vllm:iteration_tokens_total_count
    inter_token_seconds: float = 0.0  # vllm:inter_token_latency_seconds_sum
    inter_tokens: float = 0.0  # vllm:inter_token_latency_seconds_count
    lora: LoraState | None = None  # None when the server runs without LoRA
    block_size: int | None = None  # vllm:cache_config_info
    num_gpu_blocks: int | None = None  # vllm:cache_config_info


@dataclass(frozen=True, slots=True)
class ScrapeHealth:
    """How the last scrapes of one endpoint went."""

    last_ok_at: float | None = None  # monotonic time of the last good scrape
    consecutive_failures: int = 0
    last_error: str = ""
