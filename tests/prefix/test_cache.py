"""extproc.prefix.cache: spliced tokenization equals full tokenization, and cached chain hashes
equal vLLM's (via the shared BlockHasher)."""

from __future__ import annotations

import gc
import random
import tracemalloc
from pathlib import Path

import pytest

from extproc.prefix.cache import (
    ChainHasher,
    GenerationalCache,
    SpliceEncoder,
    TextEncoder,
    cut_points,
)
from extproc.prefix.hashing import BlockHasher, LoraKey
from extproc.prefix.local import _HFEncoder
from extproc.prefix.tokenizers import TiktokenTokenizer, render_chat
from tests.prefix.helpers import random_conversation, random_text, train_hf_bpe


@pytest.fixture(scope="module")
def cl100k() -> TiktokenTokenizer:
    return TiktokenTokenizer.cl100k()


@pytest.fixture(scope="module")
def hf_bpe(tmp_path_factory: pytest.TempPathFactory) -> _HFEncoder:
    from tokenizers import Tokenizer

    directory = train_hf_bpe(tmp_path_factory.mktemp("bpe"))
    return _HFEncoder(Tokenizer.from_file(str(directory / "tokenizer.json")))


@pytest.fixture(params=["cl100k", "hf_bpe"])
def encoder(request: pytest.FixtureRequest) -> TextEncoder:
    enc: TextEncoder = request.getfixturevalue(request.param)
    return enc


def test_cut_points_depend_only_on_the_prefix() -> None:
    rng = random.Random(3)
    for _ in range(50):
        text = random_text(rng, 800)
        longer = text + random_text(rng, 200)
        cuts = cut_points(text, 128)
        # Every cut but the last (which may move once more text arrives) reappears.
        assert cut_points(longer, 128)[: max(0, len(cuts) - 1)] == cuts[: max(0, len(cuts) - 1)]
        for cut in cuts:
            assert 0 < cut < len(text)


def test_random_texts_splice_exactly(encoder: TextEncoder) -> None:
    rng = random.Random(11)
    splicer = SpliceEncoder(encoder, chunk_chars=128)
    assert splicer.splicing
    for _ in range(150):
        text = random_text(rng, rng.randint(0, 600))
        assert list(splicer.encode(text)) == encoder.encode(text)
        assert list(splicer.encode(text)) == encoder.encode(text)  # now from the cache
    assert splicer.stats.chunks_hit > 0
    assert splicer.stats.bad_seams == 0


def test_growing_conversations_and_shared_system_prompts(encoder: TextEncoder) -> None:
    rng = random.Random(5)
    splicer = SpliceEncoder(encoder, chunk_chars=128)
    for _ in range(10):
        messages = random_conversation(rng, turns=1, words=120)
        for _turn in range(8):
            text = render_chat(messages)
            missed = splicer.stats.chunks_missed
            assert list(splicer.encode(text)) == encoder.encode(text)
            new_chunks = splicer.stats.chunks_missed - missed
            if len(messages) > 2:
                # Only the tail (the last chunk of the previous prompt and the new turn) is new.
                assert new_chunks <= 2 + len(text) // 128 - len(render_chat(messages[:-1])) // 128
            role = "assistant" if messages[-1]["role"] == "user" else "user"
            messages.append({"role": role, "content": random_text(rng, rng.randint(1, 60))})
    system = random_text(rng, 1500)
    for i in range(20):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": str(i)}]
        text = render_chat(messages)
        before = splicer.stats.chunks_missed
        assert list(splicer.encode(text)) == encoder.encode(text)
        if i:
            assert splicer.stats.chunks_missed - before <= 1
    assert splicer.stats.bad_seams == 0


class _SeamBreaker:
    """cl100k, except that "\\nX" adds a token: a tokenizer whose cuts after a newline are not
    neutral, which the start-up probes do not notice (they contain no "\\nX")."""

    def __init__(self, inner: TiktokenTokenizer) -> None:
        self._inner = inner

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text) + [999_999] * text.count("\nX")


class _PrefixMarker:
    """A SentencePiece-like habit: every encode starts with a marker token."""

    def __init__(self, inner: TiktokenTokenizer) -> None:
        self._inner = inner

    def encode(self, text: str) -> list[int]:
        return [7, *self._inner.encode(text)]


def test_a_bad_seam_falls_back_to_full_tokenization(cl100k: TiktokenTokenizer) -> None:
    breaker = _SeamBreaker(cl100k)
    splicer = SpliceEncoder(breaker, chunk_chars=128)
    assert splicer.splicing  # the probes pass...
    text = ("word " * 30 + "end\nXray ") * 20
    assert list(splicer.encode(text)) == breaker.encode(text)  # ...the seam check catches it
    assert splicer.stats.bad_seams >= 1


def test_a_tokenizer_failing_the_self_test_never_splices(cl100k: TiktokenTokenizer) -> None:
    marker = _PrefixMarker(cl100k)
    splicer = SpliceEncoder(marker, chunk_chars=128)
    assert not splicer.splicing
    text = random_text(random.Random(1), 500)
    assert list(splicer.encode(text)) == marker.encode(text)


def test_chunk_cache_is_bounded(cl100k: TiktokenTokenizer) -> None:
    splicer = SpliceEncoder(cl100k, chunk_chars=128, cache_bytes=20_000)
    rng = random.Random(2)
    for _ in range(100):
        splicer.encode(random_text(rng, 300))
    assert 0 < len(splicer._chunks) * 128 < 2 * 20_000


def test_generational_cache_keeps_recent_entries() -> None:
    cache: GenerationalCache[int, int] = GenerationalCache(10)
    for i in range(100):
        cache.put(i, i)
        assert cache.get(0) == 0 or i == 0  # touched every time: never evicted
    assert len(cache) <= 11
    assert cache.get(1) is None


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
@pytest.mark.parametrize(
    ("lora", "salt"),
    [(None, None), (LoraKey("sql", "/adapters/sql"), None), (None, "tenant-a"),
     (LoraKey("sql", "/adapters/sql"), "tenant-b")],
    ids=["plain", "lora", "salt", "lora+salt"],
)  # fmt: skip
def test_chain_hasher_equals_block_hasher(
    algo: str, lora: LoraKey | None, salt: str | None
) -> None:
    reference = BlockHasher(algo=algo, seed="42")  # type: ignore[arg-type]
    hasher = ChainHasher(reference)
    rng = random.Random(4)
    ids = [rng.randrange(200_000) for _ in range(16 * 40 + 7)]
    expected = tuple(b.event_id for b in reference.hash_blocks(ids, lora=lora, cache_salt=salt))
    assert hasher.event_ids(ids, lora=lora, cache_salt=salt) == expected
    assert hasher.event_ids(ids, lora=lora, cache_salt=salt) == expected  # cached
    assert hasher.cache.hits >= 40
    # A different salt or adapter shares nothing, even from the cache.
    other = hasher.event_ids(ids, lora=None, cache_salt="other")
    assert not set(other) & set(expected)


def test_chain_hasher_handles_huge_ids_and_short_prompts() -> None:
    reference = BlockHasher()
    hasher = ChainHasher(reference)
    ids = [2**62 + i for i in range(32)]
    assert hasher.event_ids(ids) == tuple(b.event_id for b in reference.hash_blocks(ids))
    assert hasher.event_ids(list(range(15))) == ()


def test_vllm_check_value_through_the_cache() -> None:
    assert ChainHasher(BlockHasher()).event_ids(list(range(16))) == (3262291359910021016,)
    cbor = ChainHasher(BlockHasher(algo="sha256_cbor"))
    assert cbor.event_ids(list(range(16))) == (2233398808101521225,)


def test_hf_tokenizer_roundtrip_path(tmp_path: Path) -> None:
    # The helper's tokenizer is a real byte-level BPE: sanity-check it tokenizes sub-words.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(train_hf_bpe(tmp_path) / "tokenizer.json"))
    ids = tok.encode("the quick brown fox", add_special_tokens=False).ids
    assert 1 < len(ids) < len("the quick brown fox")


def test_the_token_caches_hold_no_more_memory_than_their_budget(cl100k: TiktokenTokenizer) -> None:
    """The budget is bytes of memory, as CPython spends them: weighing a token id at 8 bytes
    (it costs about 40) once let the caches hold three times their budget."""
    budget = 2 * 1024 * 1024
    rng = random.Random(3)
    prompts = [random_text(rng, 400) for _ in range(700)]  # far more than the budget holds
    gc.collect()
    tracemalloc.start()
    try:
        splicer = SpliceEncoder(cl100k, chunk_chars=512, cache_bytes=budget)
        before = tracemalloc.get_traced_memory()[0]
        for prompt in prompts:
            splicer.encode(prompt)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(splicer._chunks) > 0
    assert held < 1.25 * budget, f"{held / budget:.2f}x the budget"
