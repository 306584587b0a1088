"""Incremental tokenization and block hashing: pay only for the part of a prompt not seen before.

Two caches, both built once per tokenizer at start-up (no module-level state):

- `SpliceEncoder` cuts a prompt's text into chunks at content-defined points and keeps each
  chunk's token ids, keyed by the chunk's text. A conversation that grows by one turn, or many
  requests sharing a long system prompt, share leading chunks, so only the new tail is tokenized.
- `ChainHasher` computes vLLM's chained block hashes and keeps each block's digest keyed by
  (extra keys, parent digest, the block's token ids), so the shared prefix is not re-hashed.

Why splicing is safe, and how a wrong splice is caught:
Tokenizing two pieces separately equals tokenizing the whole only where the tokenizer's
pre-tokenizer must split anyway. The cuts are placed where the regex pre-tokenizers of BPE
vocabularies (cl100k, GPT-2/Llama 3 byte-level) are forced to split: right after a newline that
follows a non-space and precedes a non-space (`...x\\ny...`), or, in long lines, before a single
space between two letters (`...x y...`). No pattern of those regexes lets a match cross such a
point, and their lookaheads look at most one character past it. Tokenizers that break the
assumption (a prepended `▁` in SentencePiece-style vocabularies, a normaliser that looks across
the cut, an added token with `lstrip`) are caught twice:
1. at construction, a self-test splices probe texts and compares with full tokenization; on any
   difference splicing is switched off for that tokenizer (every prompt is tokenized whole);
2. every seam the first time it is seen: the text around the cut (`window` characters each
   side) is tokenized as one piece and as two, and the two answers must be identical; a seam
   that fails makes this prompt fall back to full tokenization. Verified seams are remembered.

`plan()` (on the event loop: cutting and dictionary lookups) is separate from `Plan.compute()`
(pure: tokenizes the missing chunks and checks new seams, touches no shared state, so it can run
in a worker thread) and `commit()` (on the event loop: stores the results). The caller decides
whether `compute` is worth a thread hop from `Plan.missing_chars`. A prompt can also be planned
a run of chunks at a time (`cut`, then `plan_run` from where the last run ended), and hashed a
run of blocks at a time (`ChainHasher.chain`): how a probe computes only the front it needs.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import re
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

from extproc.prefix.hashing import (
    BlockHasher,
    ExtraKeys,
    LoraKey,
    block_extra_keys,
    hash_function,
)

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_CHUNK_CHARS: Final = 1024
DEFAULT_SEAM_WINDOW: Final = 32
DEFAULT_TOKEN_CACHE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_HASH_CACHE_BLOCKS: Final = 262_144

# Forced pre-tokenizer splits (see the module docstring): after "\n" between two non-spaces, or
# before a single space between two letters (`[^\W\d_]` is "a letter" in Python's `re`).
_CUT: Final = re.compile(r"\S\n(?=\S)|[^\W\d_](?= [^\W\d_])")

# Probe texts for the start-up self-test: prose, code, numbers, runs of newlines and spaces,
# non-ASCII letters, chat-template markers.
_PROBES: Final = (
    "The quick brown fox jumps over the lazy dog.\nIt was not amused.\n\nNor was the cat, "
    "which had seen 1234 foxes before\n  and would see 56789 more.\nEnd",
    "def f(x):\n    return x + 1\n\nclass A:\n    pass\n# done\nprint(f(2))\n",
    "<|start_header_id|>user<|end_header_id|>\n\nHi there\nHow are you?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nFine.\nThanks.",
    "Übermäßig größere Straße\nnaïve café résumé\n日本語のテキスト\n"
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440\nok",
    " ".join(f"word{i % 7}x alpha beta" for i in range(60)),
)


class TextEncoder(Protocol):
    """Text to token ids, without special tokens (the only thing splicing needs)."""

    def encode(self, text: str) -> list[int]: ...


class GenerationalCache(Generic[K, V]):
    """A bounded map with approximately-LRU eviction at O(1) cost per operation.

    Two generations: hits in the old one are promoted to the young one; when the young one's
    weight passes half the budget it becomes the old one and the previous old one is dropped.
    Whatever was used within the last half-budget survives. Cheaper than an ordered dict's
    move-to-end on every hit, and the budget is a hard bound (young + old <= budget + one item).
    """

    __slots__ = ("_budget", "_old", "_young", "_young_weight", "hits", "misses")

    def __init__(self, budget: int) -> None:
        if budget < 2:
            raise ValueError("cache budget must be at least 2")
        self._budget = budget
        self._young: dict[K, tuple[V, int]] = {}
        self._old: dict[K, tuple[V, int]] = {}
        self._young_weight = 0
        self.hits = 0
        self.misses = 0

    def young_get(self, key: K) -> V | None:
        """The value if the key is in the young generation (no promotion, no counting): a fast
        path for hot loops, which fall back to `get` on None and count their own hits."""
        entry = self._young.get(key)
        return None if entry is None else entry[0]

    def get(self, key: K) -> V | None:
        entry = self._young.get(key)
        if entry is None:
            entry = self._old.pop(key, None)
            if entry is None:
                self.misses += 1
                return None
            self._insert(key, entry)
        self.hits += 1
        return entry[0]

    def put(self, key: K, value: V, weight: int = 1) -> None:
        if key not in self._young:
            self._insert(key, (value, weight))

    def _insert(self, key: K, entry: tuple[V, int]) -> None:
        self._young[key] = entry
        self._young_weight += entry[1]
        if self._young_weight * 2 > self._budget:
            self._old = self._young
            self._young = {}
            self._young_weight = 0

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def clear(self) -> None:
        self._young.clear()
        self._old.clear()
        self._young_weight = 0


def cut_points(text: str, chunk_chars: int) -> list[int]:
    """Content-defined cut positions: each the first forced split at least `chunk_chars` after
    the previous cut. A cut depends only on the text up to two characters past it, so two prompts
    with a common prefix have the same cuts inside it (all but possibly the last)."""
    cuts: list[int] = []
    search = _CUT.search
    pos = chunk_chars
    while pos < len(text):
        m = search(text, pos - 1)
        if m is None:
            break
        cuts.append(m.end())
        pos = m.end() + chunk_chars
    return cuts


@dataclass(frozen=True, slots=True)
class Cuts:
    """A prompt's chunk boundaries: chunk i is `text[bounds[i]:bounds[i + 1]]`."""

    text: str
    bounds: tuple[int, ...]  # 0, the cuts, len(text)

    @property
    def count(self) -> int:
        return len(self.bounds) - 1


@dataclass(frozen=True, slots=True)
class Plan:
    """What one prompt needs: its chunks, which are known, and which seams are unverified."""

    text: str
    chunks: tuple[str, ...]
    known: tuple[tuple[int, ...] | None, ...]
    seams: tuple[tuple[str, str], ...]  # unverified seams, as (left window, right window)
    encode: Callable[[str], list[int]]
    splicing: bool

    @property
    def missing_chars(self) -> int:
        """Characters still to tokenize (the cost `compute` will have)."""
        if not self.splicing:
            return len(self.text)
        return sum(len(c) for c, k in zip(self.chunks, self.known, strict=True) if k is None)

    def compute(self) -> Computed:
        """Tokenize what is missing and check new seams. Pure: safe in a worker thread."""
        if not self.splicing:
            return Computed(tuple(self.encode(self.text)), (), (), spliced=False)
        encode = self.encode
        for left, right in self.seams:
            if encode(left) + encode(right) != encode(left + right):
                # The cut is not neutral here: never splice this prompt.
                return Computed(tuple(self.encode(self.text)), (), (), spliced=False, bad_seam=True)
        fresh: list[tuple[str, tuple[int, ...]]] = []
        ids: list[int] = []
        for chunk, known in zip(self.chunks, self.known, strict=True):
            if known is None:
                new = tuple(encode(chunk))
                fresh.append((chunk, new))
                ids.extend(new)
            else:
                ids.extend(known)
        return Computed(tuple(ids), tuple(fresh), self.seams, spliced=True)


@dataclass(frozen=True, slots=True)
class Computed:
    ids: tuple[int, ...]
    fresh: tuple[tuple[str, tuple[int, ...]], ...]  # newly tokenized chunks, for the cache
    verified: tuple[tuple[str, str], ...]  # seams now known good
    spliced: bool
    bad_seam: bool = False


@dataclass(slots=True)
class SpliceStats:
    prompts: int = 0
    chunks_hit: int = 0
    chunks_missed: int = 0
    bad_seams: int = 0


class SpliceEncoder:
    """Chunked, cached tokenization of text for one tokenizer. One event loop owns it."""

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        window: int = DEFAULT_SEAM_WINDOW,
        cache_bytes: int = DEFAULT_TOKEN_CACHE_BYTES,
        splicing: bool = True,
    ) -> None:
        if chunk_chars < 4 * window:
            raise ValueError("chunk_chars must be at least four seam windows")
        self._encode = encoder.encode
        self._chunk_chars = chunk_chars
        self._window = window
        # `cache_bytes` bounds what both caches hold in memory, three quarters for chunks and
        # one for seams, each entry weighed at what CPython spends on it (below): weighing a
        # token id at 8 bytes once let the caches hold about 3x their budget.
        self._chunks: GenerationalCache[str, tuple[int, ...]] = GenerationalCache(
            max(2, cache_bytes * 3 // 4)
        )
        self._seams: GenerationalCache[tuple[str, str], bool] = GenerationalCache(
            max(2, cache_bytes // 4)
        )
        self._seam_weight = _seam_bytes(window)
        self.stats = SpliceStats()
        self.splicing = splicing and self._self_test()

    def plan(self, text: str) -> Plan:
        """The whole prompt at once."""
        return self.plan_run(self.cut(text), 0)

    def cut(self, text: str) -> Cuts:
        """Where `text` is cut (one prompt; nothing looked up or tokenized yet). A tokenizer
        that cannot splice gets one chunk."""
        self.stats.prompts += 1
        if not self.splicing:
            return Cuts(text, (0, len(text)))
        return Cuts(text, (0, *cut_points(text, self._chunk_chars), len(text)))

    def plan_run(self, cuts: Cuts, start: int, *, missing_chars: int | None = None) -> Plan:
        """The chunks from `start` on: all of them, or (`missing_chars`) up to the one that
        brings the characters to tokenize to that many (cached chunks cost nothing, so a run
        takes every cached chunk on its way). Its seams are checked, the one after its last
        chunk included: a chunk's ids are final only once the cut ending it is known to be
        neutral. The one before `start` was checked with the chunks before it."""
        if not self.splicing:
            return self.plan_whole(cuts.text)
        whole, bounds = cuts.text, cuts.bounds
        chunks: list[str] = []
        known: list[tuple[int, ...] | None] = []
        missing = 0
        stop = start
        while stop < cuts.count and (missing_chars is None or missing < missing_chars):
            chunk = whole[bounds[stop] : bounds[stop + 1]]
            ids = self._chunks.get(chunk)
            if ids is None:
                missing += len(chunk)
            chunks.append(chunk)
            known.append(ids)
            stop += 1
        w = self._window
        seams: list[tuple[str, str]] = []
        for cut in bounds[start + 1 : min(stop + 1, cuts.count)]:
            seam = (whole[max(0, cut - w) : cut], whole[cut : cut + w])
            if self._seams.get(seam) is None:
                seams.append(seam)
        hits = sum(k is not None for k in known)
        self.stats.chunks_hit += hits
        self.stats.chunks_missed += len(chunks) - hits
        text = whole[bounds[start] : bounds[stop]]
        return Plan(text, tuple(chunks), tuple(known), tuple(seams), self._encode, splicing=True)

    def plan_whole(self, text: str) -> Plan:
        """`text` tokenized in one piece, without the cache."""
        return Plan(text, (text,), (None,), (), self._encode, splicing=False)

    def commit(self, computed: Computed) -> None:
        """Store what `Plan.compute` found (on the owner's event loop)."""
        if computed.bad_seam:
            self.stats.bad_seams += 1
        for chunk, ids in computed.fresh:
            self._chunks.put(chunk, ids, _chunk_bytes(chunk, ids))
        for seam in computed.verified:
            self._seams.put(seam, True, self._seam_weight)

    def encode(self, text: str) -> tuple[int, ...]:
        """Plan, compute and commit inline (tests, and callers with no event loop)."""
        computed = self.plan(text).compute()
        self.commit(computed)
        return computed.ids

    def _self_test(self) -> bool:
        encode = self._encode
        small = max(16, self._chunk_chars // 16)
        for probe in _PROBES:
            text = probe * 3
            cuts = cut_points(text, small)
            bounds = [0, *cuts, len(text)]
            spliced = [t for a, b in itertools.pairwise(bounds) for t in encode(text[a:b])]
            if spliced != encode(text):
                return False
        return True


# What CPython spends on a cache entry, measured (sys.getsizeof and tracemalloc) rather than
# guessed: the dict slot and key/value tuple (~200 bytes), the str's characters (ASCII: one
# byte each), and per token id a tuple pointer (8) plus the int object (28; ids above 256 are
# not shared).
_ENTRY_BYTES = 200
_TOKEN_ID_BYTES = 40


def _chunk_bytes(chunk: str, ids: tuple[int, ...]) -> int:
    return _ENTRY_BYTES + len(chunk) + _TOKEN_ID_BYTES * len(ids)


def _seam_bytes(window: int) -> int:
    """A seam: two `window`-character strings in a tuple, a dict slot."""
    return 2 * window + 250


# -- block hashing -------------------------------------------------------------------------------


def _token_bytes(ids: Sequence[int]) -> tuple[bytes, int] | None:
    """Token ids packed for cache keys: (bytes, bytes per id), or None if an id is too large."""
    for code, width in (("I", 4), ("Q", 8)):
        try:
            arr = array(code, ids)
        except OverflowError:
            continue
        if arr.itemsize == width:
            return arr.tobytes(), width
    return None


class ChainHasher:
    """vLLM's chained block hashes (see `extproc.prefix.hashing`), with a digest cache.

    Hashes are computed with the shared `hash_function(algo)`, so they are vLLM's by the same
    definition the simulator uses; only the loop is written for speed (no per-block objects).
    A block's digest is cached under (extra keys, parent digest, packed token ids): the same
    inputs the digest is a function of, so a hit is exactly the digest vLLM would compute.
    """

    def __init__(self, hasher: BlockHasher, *, cache_blocks: int = DEFAULT_HASH_CACHE_BLOCKS):
        self.block_size = hasher.block_size
        self.algo = hasher.algo
        self._none = hasher.none
        self._fn = hash_function(hasher.algo)
        self._fast_pickle = hasher.algo == "sha256"
        # Key: the packed parent digest + block tokens, with the extra keys in front when there
        # are any. Value: (digest, event id).
        self._cache: GenerationalCache[Any, tuple[bytes, int]] = GenerationalCache(cache_blocks)

    @property
    def cache(self) -> GenerationalCache[Any, tuple[bytes, int]]:
        return self._cache

    def event_ids(
        self,
        ids: Sequence[int],
        *,
        lora: LoraKey | None = None,
        cache_salt: str | None = None,
    ) -> tuple[int, ...]:
        """64-bit event ids of every full block of `ids`, in order."""
        chain = self.chain(lora=lora, cache_salt=cache_salt)
        return chain.extend(ids, len(ids) // self.block_size)

    def chain(self, *, lora: LoraKey | None = None, cache_salt: str | None = None) -> HashChain:
        """One prompt's chain, to hash a run of blocks at a time as its ids become known."""
        return HashChain(
            self,
            none=self._none,
            first=block_extra_keys(0, lora=lora, cache_salt=cache_salt),
            rest=block_extra_keys(1, lora=lora, cache_salt=cache_salt),
        )

    def _run(
        self,
        ids: Sequence[int],
        start: int,
        stop: int,
        *,
        prev: bytes,
        first: ExtraKeys,
        rest: ExtraKeys,
    ) -> tuple[list[int], bytes]:
        """Event ids of blocks `start` to `stop` (exclusive) of `ids`, block `start - 1` having
        digest `prev`; and the last block's digest."""
        size = self.block_size
        fn = self._fn
        if self._fast_pickle:
            dumps, proto, sha = pickle.dumps, pickle.HIGHEST_PROTOCOL, hashlib.sha256

            def fn(value: Any) -> bytes:  # same as hashing.sha256, minus one call level
                return sha(dumps(value, proto)).digest()

        # Only this run's tokens are packed (`ids` as it is when that is all of them: no copy),
        # so a chain extended run by run packs every token once.
        whole = start == 0 and len(ids) < (stop + 1) * size
        packed = _token_bytes(ids if whole else ids[start * size : stop * size])
        cache = self._cache
        # The hot loop reads the young generation directly (a hit there is the common case on a
        # warm prompt); anything else goes through the cache's own get/put.
        young_get = cache.young_get
        out: list[int] = []
        data, width = packed if packed is not None else (b"", 0)
        stride = size * width
        young_hits = 0
        for i in range(start, stop):
            extra: ExtraKeys = first if i == 0 else rest
            key: Any = None
            entry: tuple[bytes, int] | None = None
            if packed is not None:
                at = (i - start) * stride
                key = prev + data[at : at + stride]
                if extra is not None:
                    key = (extra, key)
                entry = young_get(key)
                if entry is not None:
                    young_hits += 1
                else:
                    entry = cache.get(key)
            if entry is None:
                digest = fn((prev, tuple(ids[i * size : (i + 1) * size]), extra))
                entry = (digest, int.from_bytes(digest[-8:], "big"))
                if key is not None:
                    cache.put(key, entry)
            prev = entry[0]
            out.append(entry[1])
        cache.hits += young_hits
        return out, prev


class HashChain:
    """One prompt's block hashes, extended as its ids become known: the same event ids (and
    cache) as `ChainHasher.event_ids`, which is a single `extend` over every full block."""

    __slots__ = ("_first", "_hasher", "_prev", "_rest", "blocks")

    def __init__(
        self, hasher: ChainHasher, *, none: bytes, first: ExtraKeys, rest: ExtraKeys
    ) -> None:
        self._hasher = hasher
        self._first = first  # block 0's extra keys (the cache salt goes there only)
        self._rest = rest
        self._prev = none  # the digest the next block chains from
        self.blocks = 0  # blocks hashed so far

    def extend(self, ids: Sequence[int], stop: int) -> tuple[int, ...]:
        """Event ids of the next blocks, up to block `stop` (exclusive), of `ids`: the prompt's
        ids from its start, at least `stop` full blocks of them."""
        if stop <= self.blocks:
            return ()
        if len(ids) < stop * self._hasher.block_size:
            raise ValueError("not enough ids for the blocks asked for")
        out, self._prev = self._hasher._run(
            ids, self.blocks, stop, prev=self._prev, first=self._first, rest=self._rest
        )
        self.blocks = stop
        return tuple(out)
