"""Our block hashes against vLLM's own request block hasher (`v1/core/kv_cache_utils.py` and
`utils/hashing.py` from the wheel), for every algorithm, seed rule and extra key we model."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NewType

import pytest

from extproc.prefix.hashing import HASH_ALGOS, BlockHasher, HashAlgo, LoraKey, event_extra_keys
from tests.conformance.vllm_src import exec_definitions, load_module

_KV_CACHE_UTILS = "vllm.v1.core.kv_cache_utils"
_DEFINITIONS = (
    "DEFAULT_NONE_HASH_SEED",
    "_NON_CRYPTO_HASH_FUNCTIONS",
    "_NONE_HASH_SEED",
    "resolve_none_hash_seed",
    "init_none_hash",
    "hash_block_tokens",
    "maybe_convert_block_hash",
    "to_event_extra_keys",
    "_gen_mm_extra_hash_keys",
    "_gen_lora_extra_hash_keys",
    "_gen_prompt_embeds_extra_hash_keys",
    "generate_block_hash_extra_keys",
    "get_request_block_hasher",
)


class VLLMHashing:
    """vLLM's hashing code for one algorithm, with NONE_HASH initialised as vLLM does at start."""

    def __init__(self, root: Path, algo: str) -> None:
        hashing = load_module(root, "vllm.utils.hashing")
        self.hashing = hashing
        self.env = exec_definitions(
            root,
            _KV_CACHE_UTILS,
            _DEFINITIONS,
            {
                "os": os,
                "hashlib": hashlib,
                "Any": Any,
                "Callable": Callable,
                "Iterable": Iterable,
                "Sequence": Sequence,
                "BlockHash": NewType("BlockHash", bytes),
                "ExternalBlockHash": bytes | int,
                "Request": Any,
                "xxhash": hashing.xxhash,
                "xxhash_cbor": hashing.xxhash_cbor,
                "envs": SimpleNamespace(VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=True),
                "logger": logging.getLogger("vllm-conformance"),
            },
        )
        self.fn = hashing.get_hash_fn_by_name(algo)
        self.env["init_none_hash"](self.fn)

    @property
    def seed(self) -> str:
        seed: str = self.env["_NONE_HASH_SEED"]
        return seed

    def block_hashes(
        self,
        tokens: list[int],
        *,
        block_size: int = 16,
        lora: LoraKey | None = None,
        cache_salt: str | None = None,
    ) -> list[bytes]:
        request = SimpleNamespace(
            block_hashes=[],
            num_tokens=len(tokens),
            all_token_ids=tokens,
            mm_features=[],
            lora_request=None
            if lora is None
            else SimpleNamespace(lora_name=lora.name, lora_path=lora.path),
            cache_salt=cache_salt,
            prompt_embeds=None,
        )
        hasher = self.env["get_request_block_hasher"](block_size, self.fn)
        return list(hasher(request))

    def event_id(self, digest: bytes) -> int:
        value: int = self.env["maybe_convert_block_hash"](digest)
        return value

    def event_extra_keys(self, tokens: list[int], **request: Any) -> list[Any] | None:
        req = SimpleNamespace(mm_features=[], prompt_embeds=None, **request)
        per_block = [
            self.env["generate_block_hash_extra_keys"](req, i * 16, (i + 1) * 16, 0)[0]
            for i in range(len(tokens) // 16)
        ]
        keys: list[Any] | None = self.env["to_event_extra_keys"](per_block)
        return keys


CASES = [
    pytest.param({"tokens": list(range(16))}, id="first-block"),
    pytest.param({"tokens": list(range(1000, 1100))}, id="partial-tail"),
    pytest.param({"tokens": list(range(64)), "cache_salt": "tenant-a"}, id="salt"),
    pytest.param({"tokens": list(range(48)), "lora": LoraKey("sql", "/a/sql")}, id="lora"),
    pytest.param(
        {"tokens": [7] * 80, "lora": LoraKey("x", "/x"), "cache_salt": "s"}, id="lora-and-salt"
    ),
    pytest.param({"tokens": list(range(40)), "block_size": 8}, id="block-size-8"),
]


def _ours(
    algo: HashAlgo, seed: str, case: dict[str, Any], *, mutate: str | None = None
) -> list[tuple[bytes, int]]:
    block_size = case.get("block_size", 16)
    if mutate == "seed":
        seed += "-wrong"
    hasher = BlockHasher(algo=algo, block_size=block_size, seed=seed)
    lora = case.get("lora")
    if mutate == "lora-path" and lora is not None:
        lora = LoraKey(lora.name, lora.path + "/other")
    blocks = hasher.hash_blocks(case["tokens"], lora=lora, cache_salt=case.get("cache_salt"))
    return [(b.digest, b.event_id) for b in blocks]


def _vllm(vllm: VLLMHashing, case: dict[str, Any]) -> list[tuple[bytes, int]]:
    digests = vllm.block_hashes(
        case["tokens"],
        block_size=case.get("block_size", 16),
        lora=case.get("lora"),
        cache_salt=case.get("cache_salt"),
    )
    return [(d, vllm.event_id(d)) for d in digests]


@pytest.mark.parametrize("algo", HASH_ALGOS)
@pytest.mark.parametrize("case", CASES)
def test_hashes_equal_vllms_with_a_shared_seed(
    vllm_root: Path, monkeypatch: pytest.MonkeyPatch, algo: HashAlgo, case: dict[str, Any]
) -> None:
    """PYTHONHASHSEED set on the fleet, the same value as the picker's seed: every algorithm."""
    monkeypatch.setenv("PYTHONHASHSEED", "4242")
    vllm = VLLMHashing(vllm_root, algo)
    assert vllm.seed == "4242"
    expected = _vllm(vllm, case)
    assert expected  # every case has at least one full block
    assert _ours(algo, "4242", case) == expected


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_default_seed_rule(
    vllm_root: Path, monkeypatch: pytest.MonkeyPatch, algo: HashAlgo
) -> None:
    """Without PYTHONHASHSEED: the fixed seed for sha256*, a secret random one for xxhash*."""
    from extproc.prefix.hashing import resolve_seed

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    vllm = VLLMHashing(vllm_root, algo)
    ours = resolve_seed({}, algo=algo)
    if algo.startswith("sha256"):
        assert vllm.seed == ours == "vllm-none-hash"
    else:
        again = VLLMHashing(vllm_root, algo)
        assert vllm.seed != again.seed  # random per process: no picker can match it
        assert ours != vllm.seed and len(ours) == len(vllm.seed)
    # Given the seed vLLM resolved, our hashes are vLLM's.
    case = {"tokens": list(range(64)), "cache_salt": "t"}
    assert _ours(algo, vllm.seed, case) == _vllm(vllm, case)


@pytest.mark.parametrize(
    ("algo", "event"),
    [("sha256", 3262291359910021016), ("sha256_cbor", 2233398808101521225)],
)
def test_vllm_documented_check_values(
    vllm_root: Path, monkeypatch: pytest.MonkeyPatch, algo: HashAlgo, event: int
) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    vllm = VLLMHashing(vllm_root, algo)
    [(digest, vllm_event)] = _vllm(vllm, {"tokens": list(range(16))})
    [(our_digest, our_event)] = _ours(algo, "vllm-none-hash", {"tokens": list(range(16))})
    assert vllm_event == our_event == event
    assert digest == our_digest
    if algo == "sha256":
        assert digest.hex().startswith("fe8fa5dd")


@pytest.mark.parametrize(
    "request_fields",
    [
        pytest.param({"lora_request": None, "cache_salt": None}, id="plain"),
        pytest.param({"lora_request": None, "cache_salt": "tenant"}, id="salt"),
        pytest.param(
            {"lora_request": SimpleNamespace(lora_name="sql", lora_path="/p"), "cache_salt": "t"},
            id="lora-salt",
        ),
    ],
)
def test_event_extra_keys_are_vllms(vllm_root: Path, request_fields: dict[str, Any]) -> None:
    """The untagged per-block keys a BlockStored event carries (`to_event_extra_keys`)."""
    from extproc.prefix.hashing import block_extra_keys

    vllm = VLLMHashing(vllm_root, "sha256")
    tokens = list(range(48))
    lora_req = request_fields["lora_request"]
    lora = None if lora_req is None else LoraKey(lora_req.lora_name, lora_req.lora_path)
    ours = [
        event_extra_keys(block_extra_keys(i, lora=lora, cache_salt=request_fields["cache_salt"]))
        for i in range(3)
    ]
    assert ours == vllm.event_extra_keys(tokens, **request_fields)


@pytest.mark.parametrize("mutation", [None, "seed", "lora-path"])
def test_a_wrong_seed_or_key_fails_the_check(
    vllm_root: Path, monkeypatch: pytest.MonkeyPatch, mutation: str | None
) -> None:
    """The check above can fail: a hasher with a wrong seed or LoRA key does not conform."""
    monkeypatch.setenv("PYTHONHASHSEED", "4242")
    case = {"tokens": list(range(48)), "lora": LoraKey("sql", "/a/sql")}
    for algo in HASH_ALGOS:
        vllm = VLLMHashing(vllm_root, algo)
        conforms = _ours(algo, "4242", case, mutate=mutation) == _vllm(vllm, case)
        assert conforms is (mutation is None), algo
