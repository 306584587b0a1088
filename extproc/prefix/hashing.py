"""vLLM's prefix-cache block hashing, bit for bit (vLLM 0.33 `v1/core/kv_cache_utils.py`).

A prompt is cut into full blocks of `block_size` tokens (a trailing partial block is never
hashed). Block i hashes `(parent, tuple(block_tokens), extra_keys)` where parent is block i-1's
digest, or `NONE_HASH` for the first block, and `NONE_HASH = hash_fn(seed)`. The seed is
`PYTHONHASHSEED` when set, else the fixed string `"vllm-none-hash"` for the sha256 algorithms; so
two processes (a pod and the picker) agree without sharing anything. The xxhash algorithms are
not collision resistant, so without `PYTHONHASHSEED` vLLM seeds them with random bytes per process
(`resolve_none_hash_seed`): no two pods, and no picker, then share a hash. A fleet on `xxhash` or
`xxhash_cbor` must set `PYTHONHASHSEED` on every pod, and the picker needs the same value as its
`prefix.hash_seed`.

Extra keys, in vLLM's order, are `("lora", name, path)` on every block of a LoRA request and
`("cache_salt", salt)` on the first block only (the chain carries it into every later block).
KV events publish hashes as the low 64 bits of the digest (big-endian) and the extra keys untagged
(`name`, `salt`), which `BlockHash.event_id` and `event_extra_keys` reproduce.

Multimodal and prompt-embeds keys are not modelled: the picker and simulator see text only.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import cbor2
import xxhash as _xxhash

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: Final[tuple[HashAlgo, ...]] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
# Not collision resistant: vLLM keeps their NONE_HASH seed secret (random) unless PYTHONHASHSEED.
NON_CRYPTO_ALGOS: Final[frozenset[HashAlgo]] = frozenset({"xxhash", "xxhash_cbor"})
DEFAULT_BLOCK_SIZE: Final = 16
DEFAULT_NONE_HASH_SEED: Final = "vllm-none-hash"
_U64_MASK: Final = (1 << 64) - 1

ExtraKeys = tuple[tuple[str, ...], ...] | None


def sha256(value: Any) -> bytes:
    """vLLM's `sha256`: pickle (highest protocol) then SHA-256. Python-only by nature."""
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def sha256_cbor(value: Any) -> bytes:
    """vLLM's `sha256_cbor`: canonical CBOR then SHA-256, reproducible from any language."""
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def xxhash(value: Any) -> bytes:
    """vLLM's `xxhash`: pickle (highest protocol) then xxh3_128 (16-byte digest)."""
    return _xxhash.xxh3_128_digest(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def xxhash_cbor(value: Any) -> bytes:
    """vLLM's `xxhash_cbor`: canonical CBOR then xxh3_128."""
    return _xxhash.xxh3_128_digest(cbor2.dumps(value, canonical=True))


def hash_function(algo: HashAlgo) -> Callable[[Any], bytes]:
    if algo == "sha256":
        return sha256
    if algo == "sha256_cbor":
        return sha256_cbor
    if algo == "xxhash":
        return xxhash
    if algo == "xxhash_cbor":
        return xxhash_cbor
    raise ValueError(f"unsupported prefix-caching hash algorithm {algo!r}; use one of {HASH_ALGOS}")


def resolve_seed(environ: Mapping[str, str], *, algo: HashAlgo = "sha256") -> str:
    """The NONE_HASH seed vLLM would use given this environment (pass `os.environ`).

    For the xxhash algorithms without PYTHONHASHSEED that is fresh random bytes, as in vLLM: a
    simulated pod is then as unmatchable as a real one, which is the point of simulating it."""
    seed = environ.get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    if algo in NON_CRYPTO_ALGOS:
        return os.urandom(32).hex()
    return DEFAULT_NONE_HASH_SEED


def none_hash(algo: HashAlgo = "sha256", seed: str = DEFAULT_NONE_HASH_SEED) -> bytes:
    return hash_function(algo)(seed)


def event_id(digest: bytes) -> int:
    """The int a KV event carries for a digest: its low 64 bits, read big-endian."""
    return int.from_bytes(digest, "big") & _U64_MASK


@dataclass(frozen=True, slots=True)
class LoraKey:
    """The LoRA part of a block's extra keys. The path is included so re-pointing a name at a
    different adapter does not reuse the old adapter's KV."""

    name: str
    path: str


@dataclass(frozen=True, slots=True)
class BlockHash:
    """One full block's hash: `digest` chains into the next block, `event_id` is what KV events
    and the picker's index use."""

    digest: bytes
    event_id: int


def block_extra_keys(
    index: int, *, lora: LoraKey | None = None, cache_salt: str | None = None
) -> ExtraKeys:
    """vLLM's `generate_block_hash_extra_keys` for text-only requests (None when empty)."""
    keys: list[tuple[str, ...]] = []
    if lora is not None:
        keys.append(("lora", lora.name, lora.path))
    if index == 0 and cache_salt:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


def event_extra_keys(extra: ExtraKeys) -> tuple[str, ...] | None:
    """The untagged form KV events publish (`to_event_extra_keys`): the second item of each key."""
    if extra is None:
        return None
    return tuple(key[1] for key in extra)


@dataclass(frozen=True, slots=True)
class BlockHasher:
    """Hashes token ids into chained block hashes for one algorithm, block size and seed.

    Build one at start-up and share it: it holds only immutable configuration and NONE_HASH.
    """

    algo: HashAlgo = "sha256"
    block_size: int = DEFAULT_BLOCK_SIZE
    seed: str = DEFAULT_NONE_HASH_SEED
    none: bytes = b""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if not self.none:
            # NONE_HASH depends only on the algorithm and seed: compute it once per hasher.
            object.__setattr__(self, "none", none_hash(self.algo, self.seed))

    def hash_blocks(
        self,
        token_ids: Sequence[int],
        *,
        lora: LoraKey | None = None,
        cache_salt: str | None = None,
        parent: bytes | None = None,
        start_block: int = 0,
    ) -> list[BlockHash]:
        """Hashes of every full block of `token_ids`.

        `parent` and `start_block` continue a chain: pass the digest of block `start_block - 1`
        and the tokens from block `start_block` on (the salt only applies when it is block 0).
        """
        fn = hash_function(self.algo)
        size = self.block_size
        prev = parent if parent else self.none
        out: list[BlockHash] = []
        for i in range(len(token_ids) // size):
            index = start_block + i
            block = tuple(token_ids[i * size : (i + 1) * size])
            digest = fn((prev, block, block_extra_keys(index, lora=lora, cache_salt=cache_salt)))
            out.append(BlockHash(digest, event_id(digest)))
            prev = digest
        return out


def hash_blocks(
    token_ids: Sequence[int],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    algo: HashAlgo = "sha256",
    lora: LoraKey | None = None,
    cache_salt: str | None = None,
    parent: bytes | None = None,
    seed: str = DEFAULT_NONE_HASH_SEED,
) -> list[BlockHash]:
    """One-shot form of `BlockHasher.hash_blocks` (recomputes NONE_HASH each call)."""
    hasher = BlockHasher(algo=algo, block_size=block_size, seed=seed)
    return hasher.hash_blocks(token_ids, lora=lora, cache_salt=cache_salt, parent=parent)


_SALT_FORBIDDEN: Final = frozenset("@/\\\x00")
MAX_CACHE_SALT_LENGTH: Final = 128


def cache_salt_error(salt: object) -> str | None:
    """vLLM's `validate_cache_salt` message for a bad salt, or None when it is acceptable."""
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        return "Parameter 'cache_salt' must be a non-empty string if provided."
    if len(salt) > MAX_CACHE_SALT_LENGTH or any(ch in _SALT_FORBIDDEN for ch in salt):
        return (
            "Parameter 'cache_salt' must be at most 128 characters and must "
            "not contain '@', '/', '\\\\', or NUL."
        )
    return None
