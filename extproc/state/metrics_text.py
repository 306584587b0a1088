"""Read the few series a router needs from a vLLM `/metrics` page, fast.

A vLLM page is about 400 lines and 40 KB, nearly all histogram buckets the router never reads.
`parse_vllm_metrics` finds each wanted family with `str.find("\\n" + name)` (a line-prefix test
done in C over the whole page), so unwanted lines are never split, let alone parsed; then it
reads the consecutive lines of that family. That relies on the exposition format's rule that
all lines of a metric family form one group, which prometheus-client (vLLM's exporter) always
follows. `parse_vllm_metrics_reference` computes the same `EndpointStats` with
prometheus-client's full parser (no grouping assumption); tests hold the two in agreement.

How several series of one name combine (data-parallel ranks carry different `engine` labels):
- request counts and token counters are summed: the server's load is the sum over its ranks;
- `vllm:kv_cache_usage_perc` is the mean: ranks have equal KV pools, so the mean is the share
  of the server's whole KV capacity in use, on the same footing as the summed counts (the max
  would describe the fullest rank, which the server's own load balancer already steers around);
- `vllm:cache_config_info`: `block_size` from the first series, `num_gpu_blocks` summed;
- `vllm:lora_requests_info`: the series with the largest value (a unix time) wins, the first one
  on a tie; vLLM keeps older series, so only the newest describes the present.
NaN samples are ignored (a NaN counter or gauge says "no value", not "zero"). A missing series
reads as the `EndpointStats` default. A page with neither `vllm:num_requests_running` nor
`vllm:num_requests_waiting` is not a vLLM page: `MetricsFormatError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from extproc.state.stats import EndpointStats, LoraState

RUNNING: Final = "vllm:num_requests_running"
WAITING: Final = "vllm:num_requests_waiting"
KV_USAGE: Final = "vllm:kv_cache_usage_perc"
PREFIX_QUERIES: Final = "vllm:prefix_cache_queries_total"
PREFIX_HITS: Final = "vllm:prefix_cache_hits_total"
PROMPT_TOKENS: Final = "vllm:prompt_tokens_total"
GENERATION_TOKENS: Final = "vllm:generation_tokens_total"
LORA_INFO: Final = "vllm:lora_requests_info"
CACHE_INFO: Final = "vllm:cache_config_info"
PREFILL_SECONDS: Final = "vllm:request_prefill_time_seconds"
PREFILL_COMPUTED: Final = "vllm:request_prefill_kv_computed_tokens"
INTER_TOKEN: Final = "vllm:inter_token_latency_seconds"
FIRST_TOKEN: Final = "vllm:time_to_first_token_seconds"
STEP_TOKENS: Final = "vllm:iteration_tokens_total"

# Series summed over engines, by the EndpointStats field they fill.
_SUMMED: Final[Mapping[str, str]] = {
    RUNNING: "running",
    WAITING: "waiting",
    PREFIX_QUERIES: "prefix_cache_queries",
    PREFIX_HITS: "prefix_cache_hits",
    PROMPT_TOKENS: "prompt_tokens",
    GENERATION_TOKENS: "generation_tokens",
    PREFILL_SECONDS + "_sum": "prefill_seconds",
    PREFILL_SECONDS + "_count": "prefill_requests",
    PREFILL_COMPUTED + "_sum": "prefill_computed_tokens",
    PREFILL_COMPUTED + "_count": "prefill_computed_requests",
    STEP_TOKENS + "_sum": "step_tokens",
    STEP_TOKENS + "_count": "steps",
    FIRST_TOKEN + "_sum": "first_token_seconds",
    FIRST_TOKEN + "_count": "first_tokens",
    INTER_TOKEN + "_sum": "inter_token_seconds",
    INTER_TOKEN + "_count": "inter_tokens",
}
# A histogram's samples are grouped by label set (buckets, count, sum of one engine, then the
# next engine's), so its `_sum` lines of several engines are not consecutive.
_SCATTERED: Final = frozenset(name for name in _SUMMED if name.endswith(("_sum", "_count")))
# Families whose labels matter; the others only need their values.
_LABELLED: Final = (LORA_INFO, CACHE_INFO)
WANTED: Final = (*_SUMMED, KV_USAGE, *_LABELLED)

# name="value" with backslash escapes; the value part is the unrolled form of (?:[^"\\]|\\.)*,
# three times faster on vLLM's 14-label cache_config_info line.
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED: Final = {"n": "\n", '"': '"', "\\": "\\"}
_AFTER_NAME: Final = ("{", " ", "\t")


class MetricsFormatError(ValueError):
    """The page is not a vLLM metrics page, or a wanted line is malformed."""


@dataclass(slots=True)
class _Accumulator:
    """What one page adds up to; both parsers feed one so they combine series identically."""

    read_at: float
    sums: dict[str, float] = field(default_factory=dict)
    kv_total: float = 0.0
    kv_count: int = 0
    lora_at: float = -math.inf
    lora: LoraState | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    saw_cache_info: bool = False
    saw_load: bool = False  # a running or waiting line, NaN or not

    def add(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        if name in (RUNNING, WAITING):
            self.saw_load = True
        if math.isnan(value):
            return
        target = _SUMMED.get(name)
        if target is not None:
            self.sums[target] = self.sums.get(target, 0.0) + value
        elif name == KV_USAGE:
            self.kv_total += value
            self.kv_count += 1
        elif name == LORA_INFO:
            if value > self.lora_at:
                self.lora_at = value
                self.lora = LoraState(
                    max_loras=_int_or_none(labels.get("max_lora")) or 0,
                    running=_names(labels.get("running_lora_adapters", "")),
                    waiting=_names(labels.get("waiting_lora_adapters", "")),
                )
        elif name == CACHE_INFO:
            blocks = _int_or_none(labels.get("num_gpu_blocks"))
            if not self.saw_cache_info:
                self.saw_cache_info = True
                self.block_size = _int_or_none(labels.get("block_size"))
                self.num_gpu_blocks = blocks
            elif blocks is not None:
                self.num_gpu_blocks = (self.num_gpu_blocks or 0) + blocks

    def stats(self) -> EndpointStats:
        if not self.saw_load:
            raise MetricsFormatError(f"no {RUNNING} or {WAITING}: not a vLLM metrics page")
        return EndpointStats(
            read_at=self.read_at,
            kv_usage=self.kv_total / self.kv_count if self.kv_count else 0.0,
            lora=self.lora,
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            **self.sums,
        )


def parse_vllm_metrics(text: str | bytes, *, read_at: float) -> EndpointStats:
    """The fast parser: only the wanted families' lines are ever looked at."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    # A leading newline makes the first line findable like the others (one 40 KB copy, ~2 us).
    text = "\n" + text
    acc = _Accumulator(read_at)
    end_of_text = len(text)
    for name in WANTED:
        size = len(name)
        needle = "\n" + name
        start = text.find(needle)
        while start != -1:
            start += 1  # the line itself begins after its newline
            end = text.find("\n", start)
            if end == -1:
                end = end_of_text
            if text[start + size : start + size + 1] not in _AFTER_NAME:
                # A longer name sharing the prefix (`..._waiting_by_reason`): look further.
                start = text.find(needle, end)
                continue
            _read_line(acc, name, text[start:end], size)
            # A family's lines are consecutive (one group per family, as the text format
            # requires), so a line of another family ends the search for this one.
            if name in _SCATTERED:
                start = text.find(needle, end)
                continue
            if not text.startswith(name, end + 1):
                break
            start = end
    return acc.stats()


def _read_line(acc: _Accumulator, name: str, line: str, size: int) -> None:
    labels: dict[str, str] = {}
    if line[size] == "{":
        # Values and timestamps never contain "}", label values may: the last one closes.
        close = line.rfind("}")
        if close < size:
            raise MetricsFormatError(f"unclosed labels: {line[:200]!r}")
        if name in _LABELLED:
            labels = _parse_labels(line[size + 1 : close])
        rest = line[close + 1 :]
    else:
        rest = line[size:]
    parts = rest.split()
    if not parts:
        raise MetricsFormatError(f"no value: {line[:200]!r}")
    try:
        value = float(parts[0])
    except ValueError:
        raise MetricsFormatError(f"bad value: {line[:200]!r}") from None
    acc.add(name, value, labels)


def _parse_labels(block: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in _LABEL.findall(block):
        labels[key] = _ESCAPE.sub(_unescape, value) if "\\" in value else value
    return labels


def _unescape(match: re.Match[str]) -> str:
    return _UNESCAPED.get(match.group(1), match.group(0))


def parse_vllm_metrics_reference(text: str | bytes, *, read_at: float) -> EndpointStats:
    """The same result through prometheus-client's full parser: slower, assumes nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    acc = _Accumulator(read_at)
    wanted = frozenset(WANTED)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    acc.add(sample.name, sample.value, sample.labels)
    except ValueError as exc:  # prometheus-client rejects any malformed line, wanted or not
        raise MetricsFormatError(str(exc)[:200]) from exc
    return acc.stats()


def _names(joined: str) -> frozenset[str]:
    return frozenset(name for name in joined.split(",") if name)


def _int_or_none(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # vLLM writes "None" for unset config values
