"""vLLM's KV-cache event messages as typed records: pure decoding, no sockets, no event loop.

Wire format (vLLM `distributed/kv_events.py`; docs/kv_events.md has the details): every engine
step that changed the cache publishes `[topic, seq (8 bytes big-endian), msgpack([ts, events,
dp_rank])]` on a PUB socket. The batch is a positional array (vLLM 0.33's `array_like` struct) or,
should a later revision drop `array_like`, a map with the same field names; both decode. Events are
tagged maps (`{"type": "BlockStored", ...}`, vLLM since June 2026, msgspec `tag=True`, fields
with defaults omitted when default) or positional arrays (`["BlockStored", hashes, parent, ...]`,
before); block hashes are 64-bit ints or raw digests, which `block_hash_int` turns into the same
int. tests/conformance checks all of this against vLLM's own structs. The replay socket answers
with the same batches and closes with seq `END_SEQ` (-1).

The subscriber that reads the sockets is `extproc.state.kv_events`; which KV-cache group of a
hybrid model the index follows is `extproc.state.kv_groups`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

_U64: Final = (1 << 64) - 1
END_SEQ: Final = -1
GPU: Final = "GPU"


class DecodeError(ValueError):
    """A batch or event that does not have one of vLLM's shapes."""


# -- event records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None
    medium: str | None  # None (an older vLLM) means GPU
    # One entry per block (untagged: LoRA name, cache salt, (mm id, offset), ...), or None.
    extra_keys: tuple[tuple[Any, ...] | None, ...] | None = None
    group_idx: int | None = None  # None (an older vLLM) means the only group, 0
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    lora_id: int | None = None

    @property
    def on_gpu(self) -> bool:
        return _is_gpu(self.medium)

    @property
    def group(self) -> int:
        return self.group_idx or 0

    @property
    def skips_blocks(self) -> bool:
        """Fewer hashes than token blocks: the group skipped null (out-of-window) blocks."""
        size = self.block_size
        return size > 0 and len(self.block_hashes) < len(self.token_ids) // size


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None
    group_idx: int | None = None

    @property
    def on_gpu(self) -> bool:
        return _is_gpu(self.medium)

    @property
    def group(self) -> int:
        return self.group_idx or 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None  # vLLM sends none; a tiered cache may name the tier it cleared

    @property
    def on_gpu(self) -> bool:
        return _is_gpu(self.medium)


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None
    unknown: int = 0  # events of a type this module does not know (skipped, counted)


def _is_gpu(medium: str | None) -> bool:
    return medium is None or medium.upper() == GPU


# -- decoding --------------------------------------------------------------------------------


def block_hash_int(value: object) -> int:
    """The 64-bit int vLLM uses for a block hash: ints as they are (two's complement folded into
    uint64), digests by their last 8 bytes read big-endian, as vLLM's int conversion does."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value & _U64
    if isinstance(value, bytes | bytearray) and value:
        return int.from_bytes(value[-8:], "big")
    raise DecodeError(f"not a block hash: {value!r}")


def _hashes(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise DecodeError(f"block_hashes must be a list, got {type(value).__name__}")
    return tuple(block_hash_int(v) for v in value)


def _opt_str(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DecodeError(f"{name} must be a string or nil")


def _int(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DecodeError(f"{name} must be an int")


def _opt_int(value: object, name: str) -> int | None:
    return None if value is None else _int(value, name)


def _extra_keys(value: object) -> tuple[tuple[Any, ...] | None, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise DecodeError("extra_keys must be a list or nil")
    out: list[tuple[Any, ...] | None] = []
    for keys in value:
        if keys is not None and not isinstance(keys, list | tuple):
            raise DecodeError("each extra_keys entry must be a list or nil")
        out.append(None if keys is None else tuple(keys))
    return tuple(out)


# Positions of the fields in the array form, after the tag: the declaration order of vLLM 0.33's
# structs (`distributed/kv_events.py`), which an `array_like` struct would encode in.
_STORED_FIELDS: Final = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
)
_REMOVED_FIELDS: Final = ("block_hashes", "medium", "group_idx", "locality", "ownership")
_KNOWN: Final = {"BlockStored", "BlockRemoved", "AllBlocksCleared"}


def decode_event(raw: object) -> KVEvent | None:
    """One event in either form; None for an event type this module does not know."""
    fields: Mapping[str, Any]
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, list | tuple) and raw:
        tag = raw[0]
        names = (
            _STORED_FIELDS
            if tag == "BlockStored"
            else _REMOVED_FIELDS
            if tag == "BlockRemoved"
            else ("medium",)
        )
        # Trailing fields equal to their default may be omitted: zip stops at the shorter.
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise DecodeError(f"an event must be a map or an array, got {type(raw).__name__}")
    if not isinstance(tag, str):
        raise DecodeError("event without a type tag")
    if tag not in _KNOWN:
        return None
    medium = _opt_str(fields.get("medium"), "medium")
    if tag == "BlockStored":
        parent = fields.get("parent_block_hash")
        tokens = fields.get("token_ids") or ()
        if not isinstance(tokens, list | tuple):
            raise DecodeError("token_ids must be a list")
        return BlockStored(
            block_hashes=_hashes(fields.get("block_hashes")),
            parent=None if parent is None else block_hash_int(parent),
            token_ids=tuple(tokens),
            block_size=_int(fields.get("block_size", 0), "block_size"),
            lora_name=_opt_str(fields.get("lora_name"), "lora_name"),
            medium=medium,
            extra_keys=_extra_keys(fields.get("extra_keys")),
            group_idx=_opt_int(fields.get("group_idx"), "group_idx"),
            kv_cache_spec_kind=_opt_str(fields.get("kv_cache_spec_kind"), "kv_cache_spec_kind"),
            kv_cache_spec_sliding_window=_opt_int(
                fields.get("kv_cache_spec_sliding_window"), "kv_cache_spec_sliding_window"
            ),
            lora_id=_opt_int(fields.get("lora_id"), "lora_id"),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(
            _hashes(fields.get("block_hashes")),
            medium,
            _opt_int(fields.get("group_idx"), "group_idx"),
        )
    return AllBlocksCleared(medium)


_BATCH_SHAPE: Final = "a batch must be [ts, events, dp_rank] or a map of those fields"


def decode_batch(payload: bytes) -> EventBatch:
    """The third frame of a message: `msgpack([ts, events, dp_rank])`, or the same as a map
    (`{"ts", "events", "data_parallel_rank"}`), the form vLLM's struct takes without array_like."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list | tuple) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise DecodeError(_BATCH_SHAPE)
    if (
        not isinstance(ts, int | float)
        or isinstance(ts, bool)
        or not isinstance(events, list | tuple)
    ):
        raise DecodeError(_BATCH_SHAPE)
    decoded: list[KVEvent] = []
    unknown = 0
    for item in events:
        event = decode_event(item)
        if event is None:
            unknown += 1
        else:
            decoded.append(event)
    return EventBatch(float(ts), tuple(decoded), rank if isinstance(rank, int) else None, unknown)


def decode_seq(frame: bytes) -> int:
    """The 8-byte big-endian sequence number; the replay end marker is -1 (signed)."""
    if len(frame) != 8:
        raise DecodeError(f"seq frame of {len(frame)} bytes")
    return int.from_bytes(frame, "big", signed=True)
