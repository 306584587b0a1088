"""Step-time profiles: how long one engine iteration takes for a given batch.

A step's time is `linear(tokens in the step) + attention + overhead`:
- `linear`: the per-iteration time of a 7-8B model's linear layers at tensor parallel 1, from the
  Vidur simulator's profiles (as tabulated in shared/reference/vllm-interfaces.md), interpolated
  piecewise-linearly between the measured token counts and extrapolated with the last slope.
- `attention`: decode attention is memory-bound, so it reads every context token's KV once:
  `context_tokens * kv_bytes_per_token / hbm_bandwidth`. Prefill attention is compute-bound:
  `4 * layers * hidden * q * (c0 + q/2)` FLOPs for q new tokens after c0 cached ones, at
  `attention_flops` (datasheet dense BF16 peak times an assumed 50% efficiency).
- `overhead_ms`: scheduler and sampling CPU time per step: an assumption (1 ms), not a measurement.
- `per_request_ms`: CPU work for each request newly handed to the engine (its tokenization, input
  processing and sequence set-up), serialized with the engine loop, so the next step pays it.
  Fitted to published runs (docs/simulator.md, `extproc sim calibrate`).
- `per_seq_us`: CPU work per scheduled sequence per step (scheduling, block tables, input
  preparation, sampling and output processing all loop over sequences). Fitted likewise.
- `mixed_prefill`: the scheduler generation. True is vLLM V1 (chunked prefill: prompt chunks
  and decodes share a step under the token budget); False is the V0 default of the 0.5 era
  (prefill-only steps of whole prompts first; decodes only when no waiting prompt fits).

Llama-3-8B shapes: 32 layers, hidden 4096, 8 KV heads of 128 -> 2*32*8*128*2 bytes = 128 KiB of
KV per token, 2 MiB per 16-token block. Each number is in docs/simulator.md with its source.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Final

LLAMA3_8B_LAYERS: Final = 32
LLAMA3_8B_HIDDEN: Final = 4096
LLAMA3_8B_KV_BYTES_PER_TOKEN: Final = 2 * LLAMA3_8B_LAYERS * 8 * 128 * 2  # K and V, bf16
LLAMA3_8B_WEIGHT_BYTES: Final = 16_060_000_000  # 8.03e9 parameters in bf16
GIB: Final = 1 << 30
# Llama-3-70B: 80 layers, hidden 8192, 8 KV heads of 128; 70.6e9 parameters in bf16.
LLAMA3_70B_LAYERS: Final = 80
LLAMA3_70B_HIDDEN: Final = 8192
LLAMA3_70B_KV_BYTES_PER_TOKEN: Final = 2 * LLAMA3_70B_LAYERS * 8 * 128 * 2
LLAMA3_70B_WEIGHT_BYTES: Final = 141_200_000_000


@dataclass(frozen=True, slots=True)
class StepProfile:
    """One model on one GPU type. Times in seconds of simulated time."""

    name: str
    description: str
    linear_ms: tuple[tuple[int, float], ...]  # (tokens in the step, ms), increasing tokens
    hbm_bytes_per_s: float
    attention_flops: float
    overhead_ms: float
    gpu_memory_bytes: int
    max_num_batched_tokens: int
    max_num_seqs: int
    per_request_ms: float = 0.0
    per_seq_us: float = 0.0
    mixed_prefill: bool = True
    generation: str = "current"  # the vLLM generation the CPU terms were fitted to
    max_model_len: int = 131_072
    layers: int = LLAMA3_8B_LAYERS
    hidden: int = LLAMA3_8B_HIDDEN
    kv_bytes_per_token: int = LLAMA3_8B_KV_BYTES_PER_TOKEN
    weight_bytes: int = LLAMA3_8B_WEIGHT_BYTES
    activation_reserve_bytes: int = 2 * GIB  # activations + CUDA graphs: an estimate
    gpu_memory_utilization: float = 0.92

    def linear_seconds(self, tokens: int) -> float:
        points = self.linear_ms
        xs = [p[0] for p in points]
        if tokens <= xs[0]:
            return points[0][1] / 1000.0
        i = bisect_left(xs, tokens)
        if i >= len(points):
            (x0, y0), (x1, y1) = points[-2], points[-1]
        else:
            (x0, y0), (x1, y1) = points[i - 1], points[i]
        return (y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)) / 1000.0

    def step_seconds(
        self,
        *,
        tokens: int,
        decode_context_tokens: int,
        prefill_attention_units: float,
        sequences: int = 0,
        new_requests: int = 0,
    ) -> float:
        """Time of a step computing `tokens` tokens in all.

        `decode_context_tokens`: the summed context length of the decoding sequences.
        `prefill_attention_units`: sum over prefill chunks of `q * (c0 + q / 2)`.
        `sequences`: requests scheduled in the step; `new_requests`: requests handed to the
        engine since the previous step began (their CPU set-up delays this step).
        """
        if tokens <= 0:
            return 0.0
        decode_attn = decode_context_tokens * self.kv_bytes_per_token / self.hbm_bytes_per_s
        prefill_attn = (
            4.0 * self.layers * self.hidden * prefill_attention_units / self.attention_flops
        )
        cpu_ms = self.overhead_ms + new_requests * self.per_request_ms
        cpu_ms += sequences * self.per_seq_us / 1000.0
        return self.linear_seconds(tokens) + decode_attn + prefill_attn + cpu_ms / 1000

    def prefill_tokens_per_second(self, prompt_tokens: int = 2048) -> float:
        """The speed a router's cost model should learn: a lone prompt of this length (no
        decodes beside it, nothing cached) computed chunk by chunk, its tokens over its time
        less each step's fixed part (the time of a one-token step), which the model counts
        apart as `step_seconds`."""
        chunk = max(1, min(prompt_tokens, self.max_num_batched_tokens))
        seconds = 0.0
        done = 0
        while done < prompt_tokens:
            q = min(chunk, prompt_tokens - done)
            seconds += self.step_seconds(
                tokens=q,
                decode_context_tokens=0,
                prefill_attention_units=q * (done + q / 2),
                sequences=1,
            ) - self.step_seconds(tokens=1, decode_context_tokens=0, prefill_attention_units=0.5)
            done += q
        return prompt_tokens / seconds

    def num_gpu_blocks(self, block_size: int = 16) -> int:
        """KV blocks that fit beside the weights, as vLLM's memory profiling would find."""
        free = (
            self.gpu_memory_bytes * self.gpu_memory_utilization
            - self.weight_bytes
            - self.activation_reserve_bytes
        )
        return max(1, int(free // (self.kv_bytes_per_token * block_size)))


# Vidur profiles (vllm-interfaces.md): Llama-3-8B on A100, Llama-2-7B on H100 (same width and
# depth as Llama-3-8B apart from the larger vocabulary and GQA, so used for the 8B on H100).
_A100_LINEAR: Final = ((1, 9.7), (32, 10.9), (128, 13.2), (512, 34.6), (2048, 141.8), (4096, 272.9))
_H100_LINEAR: Final = ((1, 5.6), (32, 5.8), (128, 6.4), (512, 12.0), (2048, 40.5), (4096, 82.9))
# Not measured: derived from datasheets (docs/simulator.md, "Derived profiles"). L4, 8B: the
# weights' 16 GB read at 300 GB/s bound a small step (~54 ms), 2 x 8e9 FLOPs per token at 121
# TFLOPS x 60% a large one. 70B on four H100s at tensor parallel 4: 141 GB of weights over
# 4 x 3.35 TB/s (~10.5 ms) plus two all-reduces per layer, FLOPs / (4 x 989 TFLOPS x 55%) and the
# all-reduced activations over NVLink.
_L4_LINEAR: Final = ((1, 58.0), (32, 60.0), (128, 70.0), (512, 130.0), (2048, 460.0), (4096, 910.0))
_H100_70B_TP4_LINEAR: Final = (
    (1, 14.0),
    (32, 15.0),
    (128, 18.5),
    (512, 45.0),
    (2048, 150.0),
    (4096, 300.0),
)

PROFILES: Final[dict[str, StepProfile]] = {
    "a100-8b": StepProfile(
        name="a100-8b",
        description="Llama-3-8B class model on one A100-SXM4-80GB",
        linear_ms=_A100_LINEAR,
        hbm_bytes_per_s=2.039e12,  # A100 80GB SXM datasheet
        attention_flops=312e12 * 0.5,  # datasheet dense BF16 x assumed 50% efficiency
        # Current vLLM (V1): tokenization and detokenization run in the API server process,
        # beside the engine; fitted to the vLLM 0.23 A100 sweep (calibration/musgrave-*.json),
        # which pins the per-step overhead (0.5 ms) and is insensitive to the other two terms
        # (assumptions: a fifth of the 0.5-era fits' per-request and less than half per-seq).
        overhead_ms=0.5,
        per_request_ms=0.5,
        per_seq_us=10.0,
        gpu_memory_bytes=80 * GIB,
        # vLLM engine/arg_utils.py defaults for A100 and smaller GPUs.
        max_num_batched_tokens=2048,
        max_num_seqs=256,
    ),
    "h100-8b": StepProfile(
        name="h100-8b",
        description="Llama-3-8B class model on one H100-SXM5-80GB",
        linear_ms=_H100_LINEAR,
        hbm_bytes_per_s=3.35e12,  # H100 SXM datasheet
        attention_flops=989e12 * 0.5,  # datasheet dense BF16 x assumed 50% efficiency
        # Current vLLM (V1): tokenization and detokenization run in the API server process,
        # beside the engine; fitted to the vLLM 0.23 A100 sweep (calibration/musgrave-*.json),
        # which pins the per-step overhead (0.5 ms) and is insensitive to the other two terms
        # (assumptions: a fifth of the 0.5-era fits' per-request and less than half per-seq).
        overhead_ms=0.5,
        per_request_ms=0.5,
        per_seq_us=10.0,
        gpu_memory_bytes=80 * GIB,
        # vLLM engine/arg_utils.py defaults for H100/H200-class GPUs.
        max_num_batched_tokens=8192,
        max_num_seqs=1024,
    ),
    # A GPU ~10x slower than an H100 for this model, and a big model on a tensor-parallel node:
    # what a router must handle without being told (issue 18). CPU terms as the current engine.
    "l4-8b": StepProfile(
        name="l4-8b",
        description="Llama-3-8B class model on one L4 (24 GB), derived from its datasheet",
        linear_ms=_L4_LINEAR,
        hbm_bytes_per_s=300e9,  # L4 datasheet (GDDR6)
        attention_flops=121e12 * 0.5,  # datasheet dense BF16 x assumed 50% efficiency
        overhead_ms=0.5,
        per_request_ms=0.5,
        per_seq_us=10.0,
        gpu_memory_bytes=24 * GIB,
        # vLLM engine/arg_utils.py defaults for GPUs below the H100 class.
        max_num_batched_tokens=2048,
        max_num_seqs=256,
    ),
    "h100-70b-tp4": StepProfile(
        name="h100-70b-tp4",
        description="Llama-3-70B class model on four H100-SXM5-80GB, tensor parallel 4",
        linear_ms=_H100_70B_TP4_LINEAR,
        hbm_bytes_per_s=4 * 3.35e12,  # each rank reads its quarter of every KV head group
        attention_flops=4 * 989e12 * 0.5,
        overhead_ms=0.5,
        per_request_ms=0.5,
        per_seq_us=10.0,
        gpu_memory_bytes=4 * 80 * GIB,
        max_num_batched_tokens=8192,
        max_num_seqs=1024,
        layers=LLAMA3_70B_LAYERS,
        hidden=LLAMA3_70B_HIDDEN,
        kv_bytes_per_token=LLAMA3_70B_KV_BYTES_PER_TOKEN,
        weight_bytes=LLAMA3_70B_WEIGHT_BYTES,
        activation_reserve_bytes=4 * 2 * GIB,
    ),
    # vLLM 0.5-era engine (V0 scheduler, no chunked prefill, tokenization and request set-up in
    # the engine's process): the CPU terms fitted to the LambdaLabsML/vllm-benchmark runs of
    # vLLM 0.5.4 (extproc/sim/calibration/lambda-v054-*.json).
    "h100-8b-v05": StepProfile(
        name="h100-8b-v05",
        description="Llama-3-8B class model on one H100-SXM5-80GB, vLLM 0.5-era engine",
        linear_ms=_H100_LINEAR,
        hbm_bytes_per_s=3.35e12,
        attention_flops=989e12 * 0.5,
        overhead_ms=1.5,  # fitted (the three H100 cases)
        gpu_memory_bytes=80 * GIB,
        # V0 without chunked prefill: max(max_model_len, 2048); 256 sequences by default.
        max_num_batched_tokens=2048,
        max_num_seqs=256,
        # Fitted; the runs' earliest TTFTs (~0.2 s with 80 prompts sent at once, ~0.8 s with
        # 320) show the same serialized few ms per request before the first step.
        per_request_ms=3.5,
        per_seq_us=25.0,
        mixed_prefill=False,
        generation="v0.5",
    ),
    "a100-8b-v05": StepProfile(
        name="a100-8b-v05",
        description="Llama-3-8B class model on one A100-SXM4-80GB, vLLM 0.5-era engine",
        linear_ms=_A100_LINEAR,
        hbm_bytes_per_s=2.039e12,
        attention_flops=312e12 * 0.5,
        overhead_ms=1.0,  # fitted (the two A100 cases)
        gpu_memory_bytes=80 * GIB,
        max_num_batched_tokens=2048,
        max_num_seqs=256,
        # Fitted: the A100 runs' host spent ~6 ms per request (their first TTFTs: ~0.7 s for
        # 80 prompts at once); another machine than the H100 runs', so not the same figure.
        per_request_ms=6.0,
        per_seq_us=25.0,
        mixed_prefill=False,
        generation="v0.5",
    ),
}


def get_profile(name: str) -> StepProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None


def parse_profile_spec(spec: str) -> tuple[str, ...]:
    """One profile name per server from "a100-8b:4,h100-8b:4" (a name alone counts once)."""
    out: list[str] = []
    for part in spec.split(","):
        name, sep, count = part.strip().partition(":")
        get_profile(name)
        try:
            n = int(count) if sep else 1
        except ValueError:
            raise ValueError(f"bad server count in profile spec {part.strip()!r}") from None
        if n < 1:
            raise ValueError(f"bad server count in profile spec {part.strip()!r}")
        out += [name] * n
    return tuple(out)
