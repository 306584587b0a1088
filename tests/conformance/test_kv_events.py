"""KV events against vLLM's own msgspec structs (`distributed/kv_events.py` from the wheel), both
ways: what vLLM's publisher encodes, the picker decodes; what the simulator encodes, vLLM's
decoder accepts and re-encodes to the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest

from extproc.prefix.hashing import BlockHasher
from extproc.sim import events as sim_events
from extproc.sim.cache import AllBlocksCleared as SimCleared
from extproc.sim.cache import BlockRemoved as SimRemoved
from extproc.sim.cache import BlockStored as SimStored
from extproc.sim.events import EventFormat, encode_batch
from extproc.state import kv_decoding as ours
from extproc.state import kv_sources
from tests.conformance.vllm_src import exec_definitions

_STRUCTS = (
    "EventBatch",
    "KVCacheEvent",
    "MEDIUM_GPU",
    "BlockStored",
    "BlockRemoved",
    "AllBlocksCleared",
    "KVEventBatch",
)


@pytest.fixture(scope="module")
def vllm(vllm_root: Path) -> dict[str, Any]:
    return exec_definitions(
        vllm_root,
        "vllm.distributed.kv_events",
        _STRUCTS,
        {"msgspec": msgspec, "Any": Any, "ExternalBlockHash": bytes | int},
    )


def _publish(vllm: dict[str, Any], events: list[Any], *, rank: int = 0) -> bytes:
    """As `ZmqEventPublisher` does: the rank filled in, then `msgspec.msgpack.Encoder()`."""
    batch = vllm["KVEventBatch"](ts=1700000000.25, events=events)
    if batch.data_parallel_rank is None:
        batch.data_parallel_rank = rank
    payload: bytes = msgspec.msgpack.Encoder().encode(batch)
    return payload


# -- vLLM encodes, the picker decodes ----------------------------------------------------------


def test_picker_decodes_what_vllm_publishes(vllm: dict[str, Any]) -> None:
    stored = vllm["BlockStored"](
        block_hashes=[11, (1 << 64) - 1],
        parent_block_hash=10,
        token_ids=list(range(32)),
        block_size=16,
        lora_id=2,
        medium="GPU",
        lora_name="sql",
        extra_keys=[("sql", "tenant"), ("sql",)],
        group_idx=1,
        kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=4096,
        locality="LOCAL",
        session_id="s",
        lookahead_token_ids=[[1], [2]],
    )
    plain = vllm["BlockStored"](
        block_hashes=[b"\x00" * 24 + (7).to_bytes(8, "big")],
        parent_block_hash=None,
        token_ids=list(range(16)),
        block_size=16,
        lora_id=None,
        medium=None,
        lora_name=None,
    )
    removed = vllm["BlockRemoved"](block_hashes=[11], medium="CPU", group_idx=2)
    batch = ours.decode_batch(
        _publish(vllm, [stored, plain, removed, vllm["AllBlocksCleared"]()], rank=3)
    )
    assert batch.ts == 1700000000.25
    assert batch.dp_rank == 3
    assert batch.unknown == 0
    assert batch.events == (
        ours.BlockStored(
            (11, (1 << 64) - 1), 10, tuple(range(32)), 16, "sql", "GPU",
            extra_keys=(("sql", "tenant"), ("sql",)), group_idx=1,
            kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=4096, lora_id=2,
        ),
        ours.BlockStored((7,), None, tuple(range(16)), 16, None, None),
        ours.BlockRemoved((11,), "CPU", 2),
        ours.AllBlocksCleared(),
    )  # fmt: skip


def test_picker_decodes_vllms_batch_as_a_map(vllm: dict[str, Any]) -> None:
    """A later vLLM whose EventBatch drops array_like sends the batch as a map."""

    event_type = vllm["BlockStored"] | vllm["BlockRemoved"]
    map_batch = msgspec.defstruct(
        "MapBatch",
        [("ts", float), ("events", list[event_type]), ("data_parallel_rank", int | None, None)],
        omit_defaults=True,
    )
    removed = vllm["BlockRemoved"](block_hashes=[5], medium="GPU", group_idx=0)
    payload = msgspec.msgpack.encode(map_batch(ts=2.0, events=[removed], data_parallel_rank=0))
    batch = ours.decode_batch(payload)
    assert (batch.ts, batch.events, batch.dp_rank) == (2.0, (ours.BlockRemoved((5,), "GPU", 0),), 0)


# -- the simulator encodes, vLLM decodes -------------------------------------------------------


def _sim_events() -> list[Any]:
    hasher = BlockHasher()
    blocks = hasher.hash_blocks(list(range(48)), cache_salt="t")
    return [
        SimStored(tuple(blocks[:2]), None, tuple(range(32)), None, None, None),
        SimStored(tuple(blocks[2:]), blocks[1], tuple(range(32, 48)), 3, "sql", (("sql", "t"),)),
        SimRemoved(tuple(blocks[:1])),
        SimCleared(),
    ]


@pytest.mark.parametrize("int_hashes", [True, False], ids=["int-hashes", "bytes-hashes"])
def test_vllm_decodes_what_the_simulator_publishes(vllm: dict[str, Any], int_hashes: bool) -> None:
    events = _sim_events()
    payload = encode_batch(events, EventFormat(int_hashes=int_hashes), ts=12.5, rank=0)
    decoded = msgspec.msgpack.Decoder(vllm["KVEventBatch"]).decode(payload)
    assert decoded.ts == 12.5
    assert decoded.data_parallel_rank == 0
    first, second, removed, cleared = decoded.events
    h = [b.event_id if int_hashes else b.digest for b in (*events[0].block_hashes,
                                                         *events[1].block_hashes)]  # fmt: skip
    assert first.block_hashes == h[:2] and first.parent_block_hash is None
    assert first.token_ids == list(range(32))
    # vLLM sends one extra_keys entry per block (None for none) and the group of the block.
    assert first.extra_keys == [None, None]
    assert first.group_idx == 0
    assert (second.parent_block_hash, second.lora_id, second.lora_name) == (h[1], 3, "sql")
    assert second.extra_keys == [("sql", "t")]
    assert (removed.block_hashes, removed.medium, removed.group_idx) == ([h[0]], "GPU", 0)
    assert type(cleared).__name__ == "AllBlocksCleared"
    # vLLM's own encoder turns what it decoded into what the simulator sent: the same values,
    # fields and field order (not the same bytes: msgspec writes every struct's header as a
    # map16, msgpack the smallest header that fits).
    assert _msgpack_items(_publish(vllm, decoded.events)) == _msgpack_items(
        encode_batch(events, EventFormat(int_hashes=int_hashes), ts=1700000000.25, rank=0)
    )


def _msgpack_items(payload: bytes) -> Any:
    """Maps as ordered (key, value) lists, so field order counts in a comparison."""
    return msgpack.unpackb(payload, raw=False, object_pairs_hook=list)


def test_simulator_to_picker_round_trip_through_vllm(vllm: dict[str, Any]) -> None:
    events = _sim_events()
    payload = encode_batch(events, EventFormat(), ts=1.0, rank=0)
    again = _publish(vllm, msgspec.msgpack.Decoder(vllm["KVEventBatch"]).decode(payload).events)
    assert ours.decode_batch(again).events == ours.decode_batch(payload).events


_ENCODE_EVENT = sim_events.encode_event


def _mutated(kind: str, field: str, arg: Any) -> Any:
    """The simulator's encoder with one field renamed or given a wrong type."""

    def encode(event: Any, fmt: EventFormat) -> Any:
        raw = _ENCODE_EVENT(event, fmt)
        if isinstance(raw, dict) and field in raw:
            if kind == "rename":
                raw[arg] = raw.pop(field)
            else:
                raw[field] = arg
        return raw

    return encode


@pytest.mark.parametrize(
    "mutation",
    [
        None,
        pytest.param(("rename", "block_hashes", "block_hash"), id="field-renamed"),
        pytest.param(("rename", "parent_block_hash", "parent"), id="required-field-missing"),
        pytest.param(("retype", "group_idx", "0"), id="group_idx-as-string"),
        pytest.param(("retype", "token_ids", "0 1 2"), id="token_ids-not-a-list"),
    ],
)
def test_a_wrong_event_field_fails_the_check(
    vllm: dict[str, Any], monkeypatch: pytest.MonkeyPatch, mutation: tuple[str, str, Any] | None
) -> None:
    """The decode check above can fail: vLLM's decoder rejects a mutated encoder's events."""
    if mutation is not None:
        monkeypatch.setattr(sim_events, "encode_event", _mutated(*mutation))
    payload = encode_batch(_sim_events(), EventFormat(), ts=1.0, rank=0)
    decoder = msgspec.msgpack.Decoder(vllm["KVEventBatch"])
    if mutation is None:
        decoder.decode(payload)
    else:
        with pytest.raises(msgspec.ValidationError):
            decoder.decode(payload)


# -- /kv_event_sources -------------------------------------------------------------------------


def test_kv_event_sources_of_vllm_033(vllm_root: Path) -> None:
    """vLLM 0.33 answers `{rank: KVEventsConfig}`; the publisher fills the config with its
    rank-offset endpoints (`ZmqEventPublisher.__init__`). Here vLLM's dataclass, as JSON."""
    import dataclasses
    import json

    def config(cls: Any) -> Any:
        return dataclasses.dataclass(cls)

    env = exec_definitions(
        vllm_root, "vllm.config.kv_events", ["KVEventsConfig"], {"config": config, "Literal": Any}
    )
    cfg = env["KVEventsConfig"](
        enable_kv_cache_events=True, publisher="zmq", endpoint="tcp://*:5557",
        replay_endpoint="tcp://*:5558", topic="kv",
    )  # fmt: skip
    document = json.loads(json.dumps({"0": dataclasses.asdict(cfg)}))
    assert kv_sources.parse_event_sources(document, "10.0.0.5:8000") == kv_sources.KVEventSource(
        "tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558", "kv"
    )
    off = env["KVEventsConfig"]()
    assert kv_sources.parse_event_sources({"0": dataclasses.asdict(off)}, "10.0.0.5:8000") is None
