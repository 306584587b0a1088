from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("picker",)
    PICKER_FIELD_NUMBER: _ClassVar[int]
    picker: str
    def __init__(self, picker: _Optional[str] = ...) -> None: ...

class LoraState(_message.Message):
    __slots__ = ("max_loras", "running", "waiting")
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    max_loras: int
    running: _containers.RepeatedScalarFieldContainer[str]
    waiting: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_loras: _Optional[int] = ..., running: _Optional[_Iterable[str]] = ..., waiting: _Optional[_Iterable[str]] = ...) -> None: ...

class EndpointStats(_message.Message):
    __slots__ = ("age_seconds", "waiting", "running", "kv_usage", "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens", "lora", "has_lora", "block_size", "num_gpu_blocks", "prefill_seconds", "prefill_requests", "prefill_computed_tokens", "prefill_computed_requests", "inter_token_seconds", "inter_tokens", "first_token_seconds", "first_tokens", "step_tokens", "steps")
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    HAS_LORA_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    age_seconds: float
    waiting: float
    running: float
    kv_usage: float
    prefix_cache_queries: float
    prefix_cache_hits: float
    prompt_tokens: float
    generation_tokens: float
    lora: LoraState
    has_lora: bool
    block_size: int
    num_gpu_blocks: int
    prefill_seconds: float
    prefill_requests: float
    prefill_computed_tokens: float
    prefill_computed_requests: float
    inter_token_seconds: float
    inter_tokens: float
    first_token_seconds: float
    first_tokens: float
    step_tokens: float
    steps: float
    def __init__(self, age_seconds: _Optional[float] = ..., waiting: _Optional[float] = ..., running: _Optional[float] = ..., kv_usage: _Optional[float] = ..., prefix_cache_queries: _Optional[float] = ..., prefix_cache_hits: _Optional[float] = ..., prompt_tokens: _Optional[float] = ..., generation_tokens: _Optional[float] = ..., lora: _Optional[_Union[LoraState, _Mapping]] = ..., has_lora: _Optional[bool] = ..., block_size: _Optional[int] = ..., num_gpu_blocks: _Optional[int] = ..., prefill_seconds: _Optional[float] = ..., prefill_requests: _Optional[float] = ..., prefill_computed_tokens: _Optional[float] = ..., prefill_computed_requests: _Optional[float] = ..., inter_token_seconds: _Optional[float] = ..., inter_tokens: _Optional[float] = ..., first_token_seconds: _Optional[float] = ..., first_tokens: _Optional[float] = ..., step_tokens: _Optional[float] = ..., steps: _Optional[float] = ...) -> None: ...

class ScrapeHealth(_message.Message):
    __slots__ = ("last_ok_age_seconds", "consecutive_failures", "last_error")
    LAST_OK_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    last_ok_age_seconds: float
    consecutive_failures: int
    last_error: str
    def __init__(self, last_ok_age_seconds: _Optional[float] = ..., consecutive_failures: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class EndpointState(_message.Message):
    __slots__ = ("address", "stats", "has_stats", "health")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    HAS_STATS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    address: str
    stats: EndpointStats
    has_stats: bool
    health: ScrapeHealth
    def __init__(self, address: _Optional[str] = ..., stats: _Optional[_Union[EndpointStats, _Mapping]] = ..., has_stats: _Optional[bool] = ..., health: _Optional[_Union[ScrapeHealth, _Mapping]] = ...) -> None: ...

class IndexDelta(_message.Message):
    __slots__ = ("address", "reset", "stored", "removed")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    address: str
    reset: bool
    stored: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, address: _Optional[str] = ..., reset: _Optional[bool] = ..., stored: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class StateUpdate(_message.Message):
    __slots__ = ("version", "full", "endpoints", "index")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    version: int
    full: bool
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointState]
    index: _containers.RepeatedCompositeFieldContainer[IndexDelta]
    def __init__(self, version: _Optional[int] = ..., full: _Optional[bool] = ..., endpoints: _Optional[_Iterable[_Union[EndpointState, _Mapping]]] = ..., index: _Optional[_Iterable[_Union[IndexDelta, _Mapping]]] = ...) -> None: ...
