"""extproc.prefix.hashing against vLLM's check values and its chaining rules."""

from __future__ import annotations

import hashlib
import pickle

import cbor2
import pytest

from extproc.prefix.hashing import (
    BlockHasher,
    LoraKey,
    block_extra_keys,
    cache_salt_error,
    event_extra_keys,
    event_id,
    hash_blocks,
    none_hash,
    resolve_seed,
)

FIRST_BLOCK = list(range(16))


@pytest.mark.parametrize(
    ("algo", "digest_prefix", "event"),
    [
        pytest.param("sha256", "fe8fa5dd", 3262291359910021016, id="sha256"),
        pytest.param("sha256_cbor", None, 2233398808101521225, id="sha256_cbor"),
    ],
)
def test_first_block_matches_vllm_check_values(
    algo: str, digest_prefix: str | None, event: int
) -> None:
    (block,) = hash_blocks(FIRST_BLOCK, algo=algo)  # type: ignore[arg-type]
    assert block.event_id == event
    assert event_id(block.digest) == event
    if digest_prefix is not None:
        assert block.digest.hex().startswith(digest_prefix)


def test_chain_is_vllm_formula() -> None:
    tokens = list(range(40))
    blocks = hash_blocks(tokens)
    assert len(blocks) == 2  # the 8-token tail is never hashed
    none = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL))
    h0 = hashlib.sha256(
        pickle.dumps((none.digest(), tuple(range(16)), None), protocol=pickle.HIGHEST_PROTOCOL)
    ).digest()
    h1 = hashlib.sha256(
        pickle.dumps((h0, tuple(range(16, 32)), None), protocol=pickle.HIGHEST_PROTOCOL)
    ).digest()
    assert [b.digest for b in blocks] == [h0, h1]


def test_cbor_chain_is_language_neutral_formula() -> None:
    blocks = hash_blocks(list(range(32)), algo="sha256_cbor", cache_salt="t1")
    none = hashlib.sha256(cbor2.dumps("vllm-none-hash", canonical=True)).digest()
    h0 = hashlib.sha256(
        cbor2.dumps((none, tuple(range(16)), (("cache_salt", "t1"),)), canonical=True)
    ).digest()
    h1 = hashlib.sha256(cbor2.dumps((h0, tuple(range(16, 32)), None), canonical=True)).digest()
    assert [b.digest for b in blocks] == [h0, h1]


@pytest.mark.parametrize("serialise", ["pickle", "cbor"])
def test_xxhash_chain_is_xxh3_128(serialise: str) -> None:
    import xxhash

    def dumps(value: object) -> bytes:
        if serialise == "cbor":
            return cbor2.dumps(value, canonical=True)
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    algo = "xxhash" if serialise == "pickle" else "xxhash_cbor"
    blocks = hash_blocks(list(range(32)), algo=algo, seed="0")  # type: ignore[arg-type]
    none = xxhash.xxh3_128_digest(dumps("0"))
    h0 = xxhash.xxh3_128_digest(dumps((none, tuple(range(16)), None)))
    h1 = xxhash.xxh3_128_digest(dumps((h0, tuple(range(16, 32)), None)))
    assert [b.digest for b in blocks] == [h0, h1]
    assert blocks[0].event_id == int.from_bytes(h0[-8:], "big")


def test_continuing_a_chain_equals_hashing_it_whole() -> None:
    hasher = BlockHasher()
    tokens = list(range(100, 164))
    whole = hasher.hash_blocks(tokens, cache_salt="s")
    head = hasher.hash_blocks(tokens[:32], cache_salt="s")
    tail = hasher.hash_blocks(tokens[32:], cache_salt="s", parent=head[-1].digest, start_block=2)
    assert head + tail == whole


@pytest.mark.parametrize(
    ("kwargs_a", "kwargs_b"),
    [
        pytest.param({"cache_salt": "a"}, {"cache_salt": "b"}, id="salts"),
        pytest.param({}, {"cache_salt": "a"}, id="salt-vs-none"),
        pytest.param({"lora": LoraKey("x", "/p")}, {}, id="lora-vs-base"),
        pytest.param({"lora": LoraKey("x", "/p")}, {"lora": LoraKey("x", "/q")}, id="lora-path"),
    ],
)
def test_extra_keys_isolate_every_block(
    kwargs_a: dict[str, object], kwargs_b: dict[str, object]
) -> None:
    tokens = list(range(48))
    a = hash_blocks(tokens, **kwargs_a)  # type: ignore[arg-type]
    b = hash_blocks(tokens, **kwargs_b)  # type: ignore[arg-type]
    assert all(x.digest != y.digest for x, y in zip(a, b, strict=True))


def test_extra_keys_order_and_event_form() -> None:
    lora = LoraKey("sql", "/adapters/sql")
    first = block_extra_keys(0, lora=lora, cache_salt="t")
    later = block_extra_keys(1, lora=lora, cache_salt="t")
    assert first == (("lora", "sql", "/adapters/sql"), ("cache_salt", "t"))
    assert later == (("lora", "sql", "/adapters/sql"),)
    assert block_extra_keys(0) is None
    assert event_extra_keys(first) == ("sql", "t")
    assert event_extra_keys(None) is None


def test_seed_rule() -> None:
    assert resolve_seed({}) == "vllm-none-hash"
    assert resolve_seed({"PYTHONHASHSEED": "0"}) == "0"
    # xxhash is not collision resistant: vLLM keeps its seed secret (random per process).
    for algo in ("xxhash", "xxhash_cbor"):
        assert resolve_seed({"PYTHONHASHSEED": "7"}, algo=algo) == "7"  # type: ignore[arg-type]
        a, b = (resolve_seed({}, algo=algo) for _ in range(2))  # type: ignore[arg-type]
        assert a != b
        assert len(a) == 64
    seeded = hash_blocks(FIRST_BLOCK, seed="0")
    assert seeded != hash_blocks(FIRST_BLOCK)
    assert (
        none_hash("sha256", "0")
        == hashlib.sha256(pickle.dumps("0", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    )


@pytest.mark.parametrize(
    ("salt", "ok"),
    [
        pytest.param(None, True, id="none"),
        pytest.param("tenant-1", True, id="plain"),
        pytest.param("x" * 128, True, id="128"),
        pytest.param("x" * 129, False, id="129"),
        pytest.param("a/b", False, id="slash"),
        pytest.param("a@b", False, id="at"),
        pytest.param("a\\b", False, id="backslash"),
        pytest.param("a\x00b", False, id="nul"),
        pytest.param("", False, id="empty"),
        pytest.param(3, False, id="not-a-string"),
    ],
)
def test_cache_salt_validation(salt: object, ok: bool) -> None:
    assert (cache_salt_error(salt) is None) is ok


def test_bad_algo_and_block_size() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        hash_blocks(FIRST_BLOCK, algo="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        BlockHasher(block_size=0)
