"""How an endpoint is chosen: prompt tokens and block hashes, admission and profiles, what the
fleet's GPUs are and cost, and prefill/decode disaggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from extproc.config.base import DisaggregationMode, HashAlgoName, PrefixIndexMode, key


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    """Prompt tokens and vLLM's block hashes, for prefix-aware scheduling (docs/prefix.md)."""

    tokenizers: Mapping[str, str] = key(
        MappingProxyType({}),
        "Model name -> tokenizer: `cl100k_base`, `tiktoken:PATH`, `hf:PATH` (tokenizer.json or "
        "its directory, with tokenizer_config.json's chat template), `remote` (the endpoint's "
        "/tokenize), `bytes:N` (an estimate).",
    )
    default_tokenizer: str = key(
        "auto",
        "Tokenizer for models not listed above. `auto`: each model's own tokenizer.json and "
        "chat template, found in `models_dirs`, the Hugging Face cache (HF_HOME, HF_HUB_CACHE) "
        "or the hub (`tokenizer_hub`); the endpoint's /tokenize while looking and when none is "
        "found. Or any spec above for every such model (`cl100k_base` is an estimate: its hashes "
        "match no Llama, Qwen or Mistral server).",
    )
    models_dirs: tuple[str, ...] = key(
        (),
        "Directories `auto` looks in first: DIR/<org>/<name>/, DIR/<name>/ (holding "
        "tokenizer.json), or DIR as a Hugging Face cache.",
    )
    tokenizer_hub: bool = key(
        True,
        "`auto` may download a model's tokenizer files from the Hugging Face hub (HF_ENDPOINT, "
        "HF_TOKEN; off with HF_HUB_OFFLINE=1) into the Hugging Face cache.",
    )
    mismatch_window_blocks: int = key(
        256,
        "With KV events: stored blocks per endpoint after which the picker judges whether its "
        "block hashes are the server's (docs/prefix.md, mismatch detection).",
        minimum=1,
    )
    block_size: int = key(16, "vLLM's --block-size on the fleet.", minimum=1)
    hash_algo: HashAlgoName = key("sha256", "vLLM's --prefix-caching-hash-algo on the fleet.")
    hash_seed: str = key(
        "vllm-none-hash", "The fleet's PYTHONHASHSEED, or vLLM's fixed default seed."
    )
    index: PrefixIndexMode = key(
        "auto",
        "`precise` (KV events), `approximate` (learned from our own routing) or `auto` "
        "(precise when kv_events.enabled).",
    )


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    """Admission, explanations and configured profiles (docs/scheduling.md)."""

    explain: bool = key(
        False,
        "Log each decision's per-endpoint scores and send them upstream in `x-extproc-scores`.",
    )
    saturation_queue: float = key(
        5.0, "An endpoint with this many waiting requests is saturated.", minimum=0.01
    )
    saturation_kv: float = key(
        0.8, "An endpoint with this KV-cache usage is saturated.", minimum=0.01
    )
    saturation_requests: float = key(
        0.0,
        "An endpoint with this many requests (running + waiting, with our picks since its last "
        "scrape) is saturated; 0: not a criterion. The fair queue holds requests while every "
        "endpoint is saturated, so this caps what each server is given at once.",
        minimum=0,
    )
    endpoint_picker_config: Mapping[str, Any] = key(
        MappingProxyType({}),
        "An EndpointPickerConfig (plugins, schedulingProfiles): each profile becomes a strategy.",
    )
    ttft_target_seconds: float = key(
        0.5,
        "The `cheapest` strategy's latency target: among endpoints predicted to give the first "
        "token within it, the cheapest per request wins; when none is, the fastest.",
        minimum=0.001,
    )


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What the endpoints are: GPU types, prices, roles (docs/disaggregation.md)."""

    prices: Mapping[str, float] = key(
        MappingProxyType({}),
        "Accelerator -> cost per hour, for endpoints that do not state their own "
        "(`cost_per_hour`); the `cheapest` strategy ranks by it.",
    )
    speeds: Mapping[str, float] = key(
        MappingProxyType({}),
        "Accelerator -> prefill tokens per second: the cost model's starting estimate for "
        "endpoints of that type (it learns each endpoint's own from its metrics).",
    )
    role_label: str = key(
        "llm-d.ai/role",
        "Pod label naming an endpoint's role (`prefill`, `decode`, `both`; llm-d's "
        "`prefill-decode` reads as `both`).",
    )
    accelerator_label: str = key(
        "extproc.io/accelerator", "Pod label naming its accelerator (GPU type)."
    )
    cost_label: str = key(
        "extproc.io/cost-per-hour", "Pod label with its cost per hour (a number)."
    )


@dataclass(frozen=True, slots=True)
class DisaggregationConfig:
    """Prefill/decode disaggregation (docs/disaggregation.md): the prompt is computed on a
    prefill endpoint and its KV cache moved to the decode endpoint that generates."""

    mode: DisaggregationMode = key(
        "off",
        "`off`; `p2p`: route to the decode endpoint and name the prefill endpoint in "
        "`prefiller_header` (the llm-d routing sidecar pulls the KV cache); `centralized`: the "
        "picker runs the prefill (`max_tokens` 1, vLLM `kv_transfer_params`) and sends the "
        "decode endpoint the returned `kv_transfer_params`.",
    )
    threshold_tokens: int = key(
        256,
        "Prompt tokens the chosen decode endpoint does not hold cached below which it prefills "
        "them itself: moving a short prompt's KV costs more than computing it.",
        minimum=0,
    )
    prefill_strategy: str = key(
        "cost", "Strategy choosing the prefill endpoint (prefix-cache aware: `cost`)."
    )
    decode_strategy: str = key(
        "prefix-cache:2,least-kv-cache:1,least-request:1",
        "Strategy choosing the decode endpoint: free KV cache and load, and the prefix it holds "
        "(a conversation's next turn is then short enough to prefill there).",
    )
    prefiller_header: str = key(
        "x-prefiller-host-port", "Header naming the prefill endpoint in `p2p` mode."
    )
    prefill_timeout_seconds: float = key(
        30.0,
        "`centralized`: how long the picker waits for the prefill; after that (or an error) "
        "the decode endpoint computes the whole prompt.",
        minimum=0.01,
    )
