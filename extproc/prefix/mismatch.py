"""Is the picker hashing prompts the way the model servers do? Checked from their KV events.

Precise routing looks up the picker's block hashes in an index of the hashes the servers
publish. When the picker tokenizes with another vocabulary or chat template, or hashes with
another algorithm, seed or block size, no lookup ever matches and routing silently loses its
prefix-cache awareness. Each `BlockStored` event carries the server's own token ids and hashes,
which tell the causes apart, per model and endpoint:

- block size: the event's `block_size` is not `prefix.block_size`;
- hashing: the event's first block (a prompt's block 0: no parent, no LoRA or extra keys)
  re-hashed with the picker's `BlockHasher` is not the hash the server published, so the
  algorithm or the seed (PYTHONHASHSEED) differ. One hash per such event, nothing more;
- tokens: the hashing agrees, yet almost none of the stored blocks are ones the picker computed
  for that model's prompts (`predicted`): the server's token ids are not the picker's, so the
  tokenizer or the chat template differ. Blocks of generated text and of requests other routers
  sent are never predicted, so the threshold is low (`min_share`); a fleet the picker routes
  with its model's own tokenizer predicts the prompt blocks of every request it sent.

Stored blocks are counted in windows of `window_blocks` per (model, endpoint); each full window
gives a `Verdict` to `on_verdict` (the server wires it to a metric, a health condition and a
rate-limited WARNING). Work per event: one set intersection of its hashes with the model's
predicted hashes, plus one block hash for events that start a prompt. All on the event loop
that runs the KV-event subscribers and the pipeline; not thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from extproc.prefix.hashing import BlockHasher
from extproc.state.kv_decoding import BlockStored

log = logging.getLogger(__name__)

Kind = Literal["ok", "block_size", "hash", "tokens"]

DEFAULT_WINDOW_BLOCKS: Final = 256
DEFAULT_MIN_SHARE: Final = 0.02
DEFAULT_PREDICTED_PER_MODEL: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class MismatchSettings:
    window_blocks: int = DEFAULT_WINDOW_BLOCKS  # stored blocks per verdict
    # Below this share of predicted blocks in a window, the tokens are judged not the picker's.
    min_share: float = DEFAULT_MIN_SHARE
    # Most recent predicted hashes kept per model (~100 bytes each).
    predicted_per_model: int = DEFAULT_PREDICTED_PER_MODEL

    def __post_init__(self) -> None:
        if self.window_blocks < 1 or self.predicted_per_model < 1:
            raise ValueError("window_blocks and predicted_per_model must be positive")
        if not 0 <= self.min_share <= 1:
            raise ValueError("min_share must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One window of one endpoint's stored blocks, judged."""

    model: str
    endpoint: str
    kind: Kind
    blocks: int  # stored blocks in the window
    predicted: int  # of them, blocks the picker had computed for this model's prompts
    hash_checks: int  # first blocks re-hashed
    hash_matches: int
    server_block_size: int  # the last event's

    @property
    def mismatched(self) -> bool:
        return self.kind != "ok"

    def describe(self, *, block_size: int, tokenizer: str) -> str:
        """What was seen and what to configure, for a log line or a health condition."""
        seen = f"{self.predicted} of {self.blocks} blocks stored by {self.endpoint} were predicted"
        if self.hash_checks:
            seen += f", {self.hash_matches} of {self.hash_checks} first blocks re-hash alike"
        if self.kind == "block_size":
            return (
                f"model {self.model}: {self.endpoint} stores blocks of {self.server_block_size} "
                f"tokens, the picker hashes {block_size}; set prefix.block_size to "
                f"{self.server_block_size}"
            )
        if self.kind == "hash":
            return (
                f"model {self.model}: block hashes differ from {self.endpoint}'s for the same "
                f"tokens ({seen}); set prefix.hash_algo to the fleet's "
                "--prefix-caching-hash-algo and prefix.hash_seed to its PYTHONHASHSEED"
            )
        if self.kind == "tokens":
            return (
                f"model {self.model}: {self.endpoint} tokenizes prompts differently from the "
                f"picker's {tokenizer} ({seen}); set prefix.tokenizers[{self.model!r}] to the "
                "model's tokenizer (hf:DIR with its tokenizer_config.json, or remote)"
            )
        return f"model {self.model}: {self.endpoint} agrees with the picker ({seen})"


@dataclass(slots=True)
class _Tally:
    blocks: int = 0
    predicted: int = 0
    hash_checks: int = 0
    hash_matches: int = 0
    server_block_size: int = 0
    block_size_differs: bool = False


class MismatchDetector:
    """Compares the picker's hashing with the servers' KV events (module docstring).

    `predicted` is the `PromptBlocks` observer; `stored` is the KV-event subscribers' observer.
    `model_of(endpoint)` names the base model an endpoint serves (None: unknown, not judged).
    """

    def __init__(
        self,
        hasher: BlockHasher,
        *,
        model_of: Callable[[str], str | None],
        on_verdict: Callable[[Verdict], None],
        settings: MismatchSettings | None = None,
    ) -> None:
        self._hasher = hasher
        self._model_of = model_of
        self._on_verdict = on_verdict
        self._settings = settings or MismatchSettings()
        # Per model: recently predicted hashes, oldest first (a dict keeps insertion order).
        self._predicted: dict[str, dict[int, None]] = {}
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._verdicts: dict[tuple[str, str], Verdict] = {}
        # The last window's first-block checks, for windows without any: a prompt's block 0 is
        # stored once per distinct start, so a fleet with a shared system prompt rarely shows one.
        self._hash_checks: dict[tuple[str, str], tuple[int, int]] = {}

    def predicted(self, model: str, hashes: Sequence[int]) -> None:
        known = self._predicted.get(model)
        if known is None:
            known = self._predicted[model] = {}
        known.update(dict.fromkeys(hashes))
        cap = self._settings.predicted_per_model
        if len(known) > cap:
            # An eighth at a time, so trimming stays amortised O(1) a hash.
            for h in list(itertools.islice(known, len(known) - cap + cap // 8)):
                del known[h]

    def stored(self, endpoint: str, event: BlockStored) -> None:
        model = self._model_of(endpoint)
        if model is None or not event.block_hashes:
            return
        known = self._predicted.get(model)
        if known is None:
            return  # the picker has computed nothing for this model yet: nothing to compare
        key = (model, endpoint)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        size = self._hasher.block_size
        tally.server_block_size = event.block_size
        if event.block_size != size:
            tally.block_size_differs = True
        elif (
            event.parent is None
            and event.lora_name is None
            and not any(event.extra_keys or ())
            and len(event.token_ids) >= size
            and not event.skips_blocks
        ):
            first = self._hasher.hash_blocks(event.token_ids[:size])
            tally.hash_checks += 1
            tally.hash_matches += first[0].event_id == event.block_hashes[0]
        tally.blocks += len(event.block_hashes)
        tally.predicted += len(known.keys() & set(event.block_hashes))
        if tally.blocks >= self._settings.window_blocks:
            del self._tallies[key]
            if tally.hash_checks:
                self._hash_checks[key] = (tally.hash_checks, tally.hash_matches)
            else:
                tally.hash_checks, tally.hash_matches = self._hash_checks.get(key, (0, 0))
            verdict = self._judge(model, endpoint, tally)
            self._verdicts[key] = verdict
            self._on_verdict(verdict)

    def verdicts(self) -> tuple[Verdict, ...]:
        """The latest verdict of every (model, endpoint) judged so far."""
        return tuple(self._verdicts.values())

    def forget(self, endpoint: str) -> None:
        """`endpoint` left the pool: drop its window and verdicts."""
        for key in [k for k in (*self._tallies, *self._verdicts) if k[1] == endpoint]:
            self._tallies.pop(key, None)
            self._verdicts.pop(key, None)
            self._hash_checks.pop(key, None)

    def _judge(self, model: str, endpoint: str, t: _Tally) -> Verdict:
        kind: Kind = "ok"
        if t.block_size_differs:
            kind = "block_size"
        elif t.hash_checks and t.hash_matches * 2 < t.hash_checks:
            kind = "hash"
        elif t.predicted < self._settings.min_share * t.blocks:
            kind = "tokens"
        return Verdict(
            model, endpoint, kind, t.blocks, t.predicted, t.hash_checks, t.hash_matches,
            t.server_block_size,
        )  # fmt: skip


class MismatchSink(Protocol):
    """Where verdicts go besides the log: metrics and the health condition."""

    def mismatch(self, model: str, endpoint: str, mismatched: bool) -> None: ...

    def checked(self, model: str, *, predicted: int, unpredicted: int) -> None: ...

    def condition(self, message: str) -> None:
        """What keeps the prefix hashing from matching the fleet's, or "" once nothing does."""
        ...


class MismatchReporter:
    """Verdicts to a sink, and one WARNING per (model, endpoint) and kind at most every
    `warn_every_seconds` (a mismatch lasts until reconfigured: repeating it each window would
    drown the log)."""

    def __init__(
        self,
        sink: MismatchSink,
        *,
        block_size: int,
        tokenizer_of: Callable[[str], str],
        warn_every_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._block_size = block_size
        self._tokenizer_of = tokenizer_of
        self._warn_every = warn_every_seconds
        self._clock = clock
        self._warned: dict[tuple[str, str, Kind], float] = {}
        self._bad: dict[tuple[str, str], str] = {}  # (model, endpoint) -> what is wrong

    def __call__(self, verdict: Verdict) -> None:
        key = (verdict.model, verdict.endpoint)
        sink = self._sink
        sink.checked(
            verdict.model,
            predicted=verdict.predicted,
            unpredicted=verdict.blocks - verdict.predicted,
        )
        sink.mismatch(verdict.model, verdict.endpoint, verdict.mismatched)
        was = self._bad.get(key)
        if not verdict.mismatched:
            if was is not None:
                del self._bad[key]
                log.info("prefix hashing matches again: %s", self._describe(verdict))
                sink.condition(self._condition())
            return
        message = self._describe(verdict)
        self._bad[key] = message
        now = self._clock()
        last = self._warned.get((*key, verdict.kind))
        if last is None or now - last >= self._warn_every:
            self._warned[(*key, verdict.kind)] = now
            log.warning("prefix hashing mismatch, precise routing finds nothing: %s", message)
        if was != message:
            sink.condition(self._condition())

    def _describe(self, verdict: Verdict) -> str:
        return verdict.describe(
            block_size=self._block_size, tokenizer=self._tokenizer_of(verdict.model)
        )

    def _condition(self) -> str:
        return "; ".join(sorted(set(self._bad.values())))
