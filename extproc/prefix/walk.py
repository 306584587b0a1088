"""One prompt's ids and block hashes, computed front to back, as far as the decision needs.

`PromptBlocks.probe` (`extproc.prefix.blocks`) starts a `Walk` over a prompt's ids or text; the
walk tokenizes and hashes in runs that double, and stops once no candidate holds every block so
far (`Holds`). `PromptProbe` carries what was computed for the decision and finishes the rest
afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from extproc.prefix.cache import Computed, Cuts, HashChain, Plan
from extproc.prefix.local import LocalTokenizer

# A probe hashes this many blocks before it first asks who holds them, then twice as many each
# run: a prompt nobody holds stops after 8 (~25 us uncached), a held one takes a few runs.
_FIRST_HASH_RUN: Final = 8
# Finishing a probed prompt off the decision path yields to the event loop between runs of this
# many blocks (~0.2 ms uncached), so the decisions of other requests are not held up behind it.
_BACKGROUND_HASH_RUN: Final = 64

# `holds(hashes)`: whether some candidate holds every one of the prompt's leading `hashes`.
Holds = Callable[[Sequence[int]], bool]


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """A prompt as the indexes see it."""

    token_count: int
    # vLLM's chained hashes of the prompt's full blocks (64-bit event ids), in order.
    block_hashes: tuple[int, ...]
    # True when the ids are the ones the model server will see (not an estimate).
    exact: bool
    # Where the ids came from: "token_ids", "remote", "none", or the tokenizer's spec.
    source: str
    # Prompts in the request; only the first was tokenized when this is more than one.
    batch: int = 1
    # False when a probe stopped early (`PromptBlocks.probe`): `block_hashes` are the leading
    # blocks only (enough for every candidate's match count), and `token_count` counts the part
    # tokenized plus an estimate for the rest (its characters at the rate of the part tokenized).
    complete: bool = True


class PredictionObserver(Protocol):
    """Told the block hashes the picker computed for a model's prompts (its predictions of what
    the model's servers will store): `extproc.prefix.mismatch` compares them with KV events."""

    def predicted(self, model: str, hashes: Sequence[int]) -> None: ...


class Tokenizing(Protocol):
    """What a walk needs of its `PromptBlocks`."""

    @property
    def block_size(self) -> int: ...
    @property
    def chunk_chars(self) -> int: ...
    @property
    def observer(self) -> PredictionObserver | None: ...
    async def compute(self, plan: Plan) -> Computed:
        """Tokenize what `plan` misses (inline or on a worker thread)."""
        ...


class PromptProbe:
    """`PromptBlocks.probe`'s answer: `tokens` for the decision, `finish()` for the rest."""

    __slots__ = ("_walk", "tokens")

    def __init__(self, tokens: PromptTokens, walk: Walk | None = None) -> None:
        self.tokens = tokens
        self._walk = walk

    async def finish(self) -> PromptTokens:
        """The whole prompt: what is left is tokenized (on a worker thread when long) and
        hashed, yielding to the event loop between runs of blocks. Fills the token and hash
        caches as `blocks` would. Cheap when `tokens.complete` already."""
        if not self.tokens.complete and self._walk is not None:
            self.tokens = await self._walk.finish(pause=True)
        return self.tokens


@dataclass(slots=True)
class WalkText:
    """The text of a prompt being walked, and how much of it is tokenized."""

    local: LocalTokenizer
    cuts: Cuts
    after: tuple[int, ...]  # special tokens after the text (added once it is all tokenized)
    next: int = 0  # chunks tokenized
    ids: int = 0  # the ids they gave


class Walk:
    """One prompt's ids and block hashes, computed front to back (`PromptBlocks.probe`)."""

    def __init__(
        self,
        owner: Tokenizing,
        chain: HashChain,
        ids: list[int],
        text: WalkText | None,
        *,
        exact: bool,
        source: str,
        batch: int,
        model: str,
    ) -> None:
        self._owner = owner
        self._model = model
        self._told = 0  # hashes already told to the owner's observer
        self._chain = chain
        self._ids = ids  # the prompt's ids so far, from its start
        self._hashes: list[int] = []
        self._text = text  # None: `ids` are all of them
        self._exact = exact
        self._source = source
        self._batch = batch

    async def run(self, holds: Holds | None) -> PromptProbe:
        if holds is None:
            return PromptProbe(await self.finish(pause=False))
        return PromptProbe(await self._probe(holds), self)

    async def _probe(self, holds: Holds) -> PromptTokens:
        """Hash what is tokenized, a run at a time, while some candidate holds every block so
        far; tokenize more only when all of it is hashed and held. Runs double each time (a
        run of text counts the characters not in the token cache: one new chunk first)."""
        size = self._owner.block_size
        hash_run = _FIRST_HASH_RUN
        text_run = self._owner.chunk_chars
        while True:
            ready = len(self._ids) // size
            if self._chain.blocks < ready:
                stop = min(ready, self._chain.blocks + hash_run)
                self._hashes.extend(self._chain.extend(self._ids, stop))
                hash_run *= 2
                if not holds(self._hashes):
                    break  # no candidate's match reaches past these blocks
            elif self._text_left():
                await self._tokenize(text_run)
                text_run *= 2
            else:
                break
        return self.tokens()

    async def finish(self, *, pause: bool) -> PromptTokens:
        """Everything left. `pause`: yield to the event loop between runs of hashes (work off
        the decision path must not hold up the decisions of other requests)."""
        if self._text_left():
            await self._tokenize(None)
        ready = len(self._ids) // self._owner.block_size
        run = _BACKGROUND_HASH_RUN if pause else ready
        while self._chain.blocks < ready:
            self._hashes.extend(self._chain.extend(self._ids, min(ready, self._chain.blocks + run)))
            if pause and self._chain.blocks < ready:
                await asyncio.sleep(0)
        return self.tokens()

    def tokens(self) -> PromptTokens:
        count = len(self._ids)
        text = self._text
        complete = self._chain.blocks == count // self._owner.block_size
        if text is not None and text.next < text.cuts.count:
            complete = False
            done = text.cuts.bounds[text.next]
            left = len(text.cuts.text) - done
            # Not tokenized yet: its characters at the rate of the part that was.
            count += (round(left * text.ids / done) if text.ids else left // 4) + len(text.after)
        hashes = tuple(self._hashes)
        observer = self._owner.observer
        if observer is not None and len(hashes) > self._told and self._model:
            observer.predicted(self._model, hashes[self._told :])
            self._told = len(hashes)
        return PromptTokens(
            count, hashes, self._exact, self._source, self._batch, complete=complete
        )

    def _text_left(self) -> bool:
        return self._text is not None and self._text.next < self._text.cuts.count

    async def _tokenize(self, missing_chars: int | None) -> None:
        """The next chunks of text, up to about `missing_chars` characters not in the token
        cache (None: all that are left)."""
        text = self._text
        assert text is not None
        cuts, start = text.cuts, text.next
        splicer = text.local.splicer
        plan = splicer.plan_run(cuts, start, missing_chars=missing_chars)
        stop = start + len(plan.chunks)
        computed = await self._owner.compute(plan)
        splicer.commit(computed)
        if computed.bad_seam and stop < cuts.count:
            # A cut in this run is not neutral: the rest of the prompt, from the last cut known
            # to be, is tokenized in one piece (as a whole prompt with a bad seam is).
            rest = splicer.plan_whole(cuts.text[cuts.bounds[start] :])
            computed = await self._owner.compute(rest)
            stop = cuts.count
        self._ids.extend(computed.ids)
        text.ids += len(computed.ids)
        text.next = stop
        if stop == cuts.count:
            self._ids.extend(text.after)
