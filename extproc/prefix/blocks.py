"""The pipeline step "tokens and block hashes": a request's prompt as vLLM's KV block hashes.

Built once at start-up from `BlocksSettings`; one per event loop:

    blocks = PromptBlocks(BlocksSettings(tokenizers={"meta-llama/Llama-3.1-8B-Instruct":
                                                     "hf:/models/llama-3.1-8b"}))
    tokens = await blocks.blocks(parsed, lora=None, cache_salt=None, endpoint_for_remote=None)
    tokens.block_hashes        # 64-bit event ids, the keys of the precise and approximate indexes
    index.lookup(tokens.block_hashes, candidates)
    await blocks.aclose()      # at shutdown: the worker threads and the remote session

On the decision path the pipeline probes instead: only as far as some candidate holds the
prompt (the match counts cannot grow past that), the rest after the decision:

    probe = await blocks.probe(parsed, ..., holds=lambda hashes: some candidate holds them all)
    probe.tokens               # complete=False: leading hashes only, token count estimated
    tokens = await probe.finish()   # the whole prompt, later (the approximate index learns it)

What a prompt becomes, by API:
- completions with token ids: the ids as given (no tokenization, exact);
- completions with text: the text, plus the tokenizer's special tokens (BOS) for `hf:` models
  when `add_special_tokens` (vLLM's default for completions);
- chat: the messages through the model's chat template, tokenized without special tokens (the
  template writes them), as vLLM does. `hf:` directories whose `tokenizer_config.json` (or
  `chat_template.jinja`) has a template render it with Jinja2 the way transformers does; every
  other tokenizer uses the shared Llama 3 layout (`tokenizers.render_chat`), as the simulator;
- a list of prompts (a batch): only the first is used, and `PromptTokens.batch` says how many
  there were.

Tokenizer specs, per model (`BlocksSettings.tokenizers`, else `default_tokenizer`):
`cl100k_base`, `tiktoken:PATH`, `hf:PATH` (a tokenizer.json, or a directory holding one and
optionally tokenizer_config.json), `bytes[:N]` (estimate: exact=False), and `remote[:FALLBACK]`:
the chosen endpoint's `/tokenize` (exact, its own chat template), falling back to the local
FALLBACK spec (default `bytes:4`) with exact=False when the endpoint fails or none is given.

Cost: text goes through a `SpliceEncoder` (cached chunks, `extproc.prefix.cache`) and ids through
a `ChainHasher` (cached block digests). Tokenizing runs on the event loop when fewer than
`inline_max_chars` characters are new (a worker-thread hop costs more than that:
docs/prefix.md), else on a small executor (tiktoken and HF tokenizers release the GIL).
Hashing always runs inline: pickle and SHA-256 of 200-byte inputs hold the GIL, so a thread
would not free the loop. A probe tokenizes and hashes in runs that double (one chunk, 8 blocks
first), so a prompt nobody holds costs one chunk and a fully held one a handful of runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from extproc.prefix.cache import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_HASH_CACHE_BLOCKS,
    ChainHasher,
    Computed,
    Plan,
)
from extproc.prefix.hashing import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_NONE_HASH_SEED,
    HASH_ALGOS,
    NON_CRYPTO_ALGOS,
    BlockHasher,
    HashAlgo,
    LoraKey,
)
from extproc.prefix.local import LocalTokenizer, build_local
from extproc.prefix.remote import HttpRemoteTokenizer, RemoteTokenizer, tokenize_body
from extproc.prefix.resolve import DEFAULT_HUB_TIMEOUT_SECONDS, fetch_from_hub, find_local
from extproc.prefix.walk import (
    Holds,
    PredictionObserver,
    PromptProbe,
    PromptTokens,
    Walk,
    WalkText,
)

# `PromptProbe`, `PromptTokens` and `PredictionObserver` are the walk's (`extproc.prefix.walk`),
# named here too because `PromptBlocks`' methods answer with them.
__all__ = [
    "AUTO",
    "AUTO_INTERIM",
    "DEFAULT_INLINE_MAX_CHARS",
    "DEFAULT_REMOTE_FALLBACK",
    "BlocksSettings",
    "BlocksStats",
    "PredictionObserver",
    "PromptBlocks",
    "PromptLike",
    "PromptProbe",
    "PromptTokens",
    "RequestLike",
]


log = logging.getLogger(__name__)

DEFAULT_INLINE_MAX_CHARS: Final = 2048
DEFAULT_REMOTE_FALLBACK: Final = "bytes:4"
# `default_tokenizer: auto`: each model's own tokenizer files (`extproc.prefix.resolve`). Until
# they are found, and for good when none are, the chosen endpoint's /tokenize: exact, at the
# cost of a round trip, rather than another vocabulary whose hashes never match the server's.
AUTO: Final = "auto"
AUTO_INTERIM: Final = "remote"


@dataclass(frozen=True, slots=True)
class BlocksSettings:
    """Everything `PromptBlocks` needs; config keys map one to one onto these fields."""

    # Model name -> tokenizer spec (see the module docstring); other models use the default.
    tokenizers: Mapping[str, str] = field(default_factory=dict)
    # `prefix.default_tokenizer` (config) defaults to AUTO; built by hand (tests, benchmarks),
    # the default is a fixed real vocabulary that looks up no files and no hub.
    default_tokenizer: str = "cl100k_base"
    # Where `auto` looks for a model's tokenizer.json before the Hugging Face cache and hub.
    models_dirs: tuple[str, ...] = ()
    hub: bool = True  # `auto` may download tokenizer files from the Hugging Face hub
    hub_timeout_seconds: float = DEFAULT_HUB_TIMEOUT_SECONDS
    # The environment `auto` reads (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, ...);
    # None: the process's.
    environ: Mapping[str, str] | None = None
    # Must match the fleet: vLLM's --block-size, --prefix-caching-hash-algo, PYTHONHASHSEED.
    block_size: int = DEFAULT_BLOCK_SIZE
    hash_algo: HashAlgo = "sha256"
    hash_seed: str = DEFAULT_NONE_HASH_SEED
    # Completions through an hf: tokenizer get its special tokens (BOS), as vLLM's
    # `add_special_tokens` defaults to true for completions.
    add_special_tokens: bool = True
    # Tokenize on the event loop when at most this many characters are not cached.
    inline_max_chars: int = DEFAULT_INLINE_MAX_CHARS
    tokenizer_threads: int = 2
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    token_cache_mib: int = 64  # per tokenizer: cached chunk text + ids
    hash_cache_blocks: int = DEFAULT_HASH_CACHE_BLOCKS  # cached block digests (~300 B each)
    remote_timeout_seconds: float = 0.05
    remote_backoff_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be positive")
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"unsupported hash algorithm {self.hash_algo!r}")
        if self.inline_max_chars < 0 or self.tokenizer_threads < 1:
            raise ValueError("inline_max_chars must be >= 0 and tokenizer_threads >= 1")


@dataclass(frozen=True, slots=True)
class BlocksStats:
    """Counters since start-up, for metrics."""

    prompts: int
    chunks_hit: int
    chunks_missed: int
    bad_seams: int
    hash_hits: int
    hash_misses: int
    offloaded: int
    remote_ok: int
    remote_failed: int


class PromptLike(Protocol):
    """The parts of `extproc.request.openai.Prompt` read here (structural: `extproc.prefix`
    sits beside `extproc.request` in the layers and does not import it)."""

    @property
    def texts(self) -> tuple[str, ...]: ...
    @property
    def token_ids(self) -> tuple[tuple[int, ...], ...]: ...
    @property
    def messages(self) -> tuple[Mapping[str, Any], ...]: ...
    def approx_chars(self) -> int: ...


class RequestLike(Protocol):
    """The parts of `extproc.request.openai.ParsedRequest` read here."""

    @property
    def model(self) -> str | None: ...
    @property
    def prompt(self) -> PromptLike: ...


@dataclass(frozen=True, slots=True)
class _Choice:
    local: LocalTokenizer
    remote: bool


class PromptBlocks:
    """Prompt -> token count and block hashes. Built once at start-up; one event loop owns it."""

    def __init__(self, settings: BlocksSettings, *, remote: RemoteTokenizer | None = None) -> None:
        self.settings = settings
        if settings.hash_algo in NON_CRYPTO_ALGOS and settings.hash_seed == DEFAULT_NONE_HASH_SEED:
            # vLLM seeds xxhash randomly per process unless PYTHONHASHSEED is set, so the
            # default seed matches no pod: precise routing would silently find nothing.
            log.warning(
                "prefix.hash_algo=%s: vLLM seeds it randomly per process unless PYTHONHASHSEED "
                "is set; set PYTHONHASHSEED on every pod and the same value as prefix.hash_seed",
                settings.hash_algo,
            )
        self.hasher = BlockHasher(
            algo=settings.hash_algo, block_size=settings.block_size, seed=settings.hash_seed
        )
        self._hasher = ChainHasher(self.hasher, cache_blocks=settings.hash_cache_blocks)
        locals_: dict[str, LocalTokenizer] = {}
        self._choices = {
            model: self._choice(spec, locals_) for model, spec in settings.tokenizers.items()
        }
        self._auto = settings.default_tokenizer == AUTO
        self._default = self._choice(
            AUTO_INTERIM if self._auto else settings.default_tokenizer, locals_
        )
        self._locals = tuple(locals_.values())
        self._environ = dict(os.environ) if settings.environ is None else settings.environ
        self._resolving: dict[str, asyncio.Task[None]] = {}  # `auto`: models being looked up
        self._resolver: ThreadPoolExecutor | None = None
        self._observer: PredictionObserver | None = None
        self._remote = remote or HttpRemoteTokenizer(
            timeout_seconds=settings.remote_timeout_seconds,
            backoff_seconds=settings.remote_backoff_seconds,
        )
        self._executor = ThreadPoolExecutor(
            settings.tokenizer_threads, thread_name_prefix="tokenize"
        )
        self._offloaded = 0
        self._remote_ok = 0
        self._remote_failed = 0

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    @property
    def chunk_chars(self) -> int:
        return self.settings.chunk_chars

    @property
    def observer(self) -> PredictionObserver | None:
        return self._observer

    def observe(self, observer: PredictionObserver | None) -> None:
        """Tell `observer` the block hashes computed for every prompt from now on."""
        self._observer = observer

    def tokenizer_of(self, model: str) -> str:
        """The tokenizer spec `model` is tokenized with now (`remote` while `auto` resolves)."""
        choice = self._choices.get(model, self._default)
        return ("remote:" if choice.remote else "") + choice.local.spec

    async def resolved(self, model: str) -> str:
        """`auto`: look `model`'s tokenizer up now if not yet, wait for it, and answer
        `tokenizer_of` (start-up warming and tests)."""
        if self._auto and model not in self._choices:
            self._resolve(model)
            await asyncio.shield(self._resolving[model])
        return self.tokenizer_of(model)

    async def blocks(
        self,
        request: RequestLike,
        *,
        lora: LoraKey | None,
        cache_salt: str | None,
        endpoint_for_remote: str | None,
        base_model: str | None = None,
    ) -> PromptTokens:
        """The request's whole prompt as block hashes.

        `lora` and `cache_salt` enter the hashes as vLLM's extra keys. `endpoint_for_remote` is
        the endpoint to ask when the model's tokenizer is `remote`. `base_model` chooses the
        tokenizer when `request.model` names a LoRA adapter (default: `request.model`).
        """
        probe = await self.probe(
            request, lora=lora, cache_salt=cache_salt, endpoint_for_remote=endpoint_for_remote,
            base_model=base_model, holds=None,
        )  # fmt: skip
        return probe.tokens

    async def probe(
        self,
        request: RequestLike,
        *,
        lora: LoraKey | None,
        cache_salt: str | None,
        endpoint_for_remote: str | None,
        base_model: str | None = None,
        holds: Holds | None,
    ) -> PromptProbe:
        """The request's prompt as block hashes, front to back, only as far as `holds` needs.

        Tokens and hashes are computed in runs (a chunk of text, then a run of blocks), and the
        probe stops after the first run of hashes that no candidate holds in full (`holds` says
        False): no candidate's match can reach past a block it does not hold, so index lookups on
        the probed hashes answer exactly what they would on all of them. A prompt nobody holds
        costs one chunk; `probe.tokens.complete` is then False and `probe.finish()` computes the
        rest (the caller does that after its decision). `holds=None` computes everything now, as
        `blocks` does; so does a `remote` tokenizer, whose one round trip gives every id anyway.
        Other arguments as for `blocks`.
        """
        prompt = request.prompt
        chain = self._hasher.chain(lora=lora, cache_salt=cache_salt)
        if prompt.token_ids:
            ids = list(prompt.token_ids[0])
            walk = Walk(
                self, chain, ids, None, exact=True, source="token_ids", batch=len(prompt.token_ids),
                model=base_model or request.model or "",
            )  # fmt: skip
            return await walk.run(holds)
        if not prompt.texts and not prompt.messages:
            return PromptProbe(PromptTokens(0, (), exact=False, source="none"))
        model = base_model or request.model or ""
        choice = self._choices.get(model)
        if choice is None:
            choice = self._default
            if self._auto and model:
                self._resolve(model)
        batch = max(1, len(prompt.texts))
        if choice.remote:
            holds = None
        if choice.remote and endpoint_for_remote is not None:
            body = tokenize_body(
                model=request.model,
                prompt=prompt.texts[0] if prompt.texts else None,
                messages=list(prompt.messages) if prompt.messages else None,
            )
            remote_ids = await self._remote.tokenize(endpoint_for_remote, body)
            if remote_ids is not None:
                self._remote_ok += 1
                ids = list(remote_ids)
                walk = Walk(
                    self, chain, ids, None, exact=True, source="remote", batch=batch, model=model
                )
                return await walk.run(None)
            self._remote_failed += 1
        local = choice.local
        try:
            text, (before, after) = _text_of(local, prompt)
        except ValueError as exc:
            # An unrenderable conversation (the template raised): the server will refuse it
            # too; route it on its size alone.
            log.debug("cannot tokenize request locally: %s", exc)
            return PromptProbe(
                PromptTokens(prompt.approx_chars() // 4, (), exact=False, source="none")
            )
        walk = Walk(
            self, chain, list(before), WalkText(local, local.splicer.cut(text), after),
            exact=local.exact and not choice.remote, source=local.spec, batch=batch, model=model,
        )  # fmt: skip
        return await walk.run(holds)

    def stats(self) -> BlocksStats:
        s = [local.splicer.stats for local in self._locals]
        cache = self._hasher.cache
        return BlocksStats(
            prompts=sum(x.prompts for x in s),
            chunks_hit=sum(x.chunks_hit for x in s),
            chunks_missed=sum(x.chunks_missed for x in s),
            bad_seams=sum(x.bad_seams for x in s),
            hash_hits=cache.hits,
            hash_misses=cache.misses,
            offloaded=self._offloaded,
            remote_ok=self._remote_ok,
            remote_failed=self._remote_failed,
        )

    async def aclose(self) -> None:
        for task in self._resolving.values():
            task.cancel()
        await asyncio.gather(*self._resolving.values(), return_exceptions=True)
        await self._remote.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._resolver is not None:
            self._resolver.shutdown(wait=False, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------------

    async def compute(self, plan: Plan) -> Computed:
        """Tokenize what `plan` misses: inline when it is little, else on a worker thread (for
        the walks, `extproc.prefix.walk`)."""
        if plan.missing_chars > self.settings.inline_max_chars:
            self._offloaded += 1
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, plan.compute)
        return plan.compute()

    def _resolve(self, model: str) -> None:
        if model not in self._resolving:
            task = asyncio.get_running_loop().create_task(
                self._resolve_model(model), name=f"tokenizer {model}"
            )
            self._resolving[model] = task

    async def _resolve_model(self, model: str) -> None:
        """`auto`: find and load `model`'s own tokenizer off the event loop; requests meanwhile
        use the interim choice. The outcome, found or not, holds until restart."""
        s = self.settings
        loop = asyncio.get_running_loop()
        if self._resolver is None:
            # Its own thread: a slow disk or a large tokenizer.json must not hold up the
            # tokenizing threads the request path offloads to.
            self._resolver = ThreadPoolExecutor(1, thread_name_prefix="tokenizer-resolve")
        try:
            find = functools.partial(
                find_local, model, models_dirs=s.models_dirs, environ=self._environ
            )
            directory = await loop.run_in_executor(self._resolver, find)
            if directory is None and s.hub:
                directory = await fetch_from_hub(
                    model, environ=self._environ, timeout_seconds=s.hub_timeout_seconds
                )
            if directory is None:
                log.warning(
                    "no tokenizer files for model %s (models directories %s, the Hugging Face "
                    "cache%s): its prompts are tokenized by the endpoint's /tokenize; set "
                    "prefix.tokenizers or prefix.models_dirs to tokenize locally",
                    model, list(s.models_dirs) or "none", ", the hub" if s.hub else "",
                )  # fmt: skip
                self._choices[model] = self._default
                return
            build = functools.partial(build_local, f"hf:{directory}", s)
            local = await loop.run_in_executor(self._resolver, build)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken tokenizer file must not end the picker
            log.warning("cannot load model %s's tokenizer: %s; using the endpoint's /tokenize",
                        model, exc)  # fmt: skip
            self._choices[model] = self._default
            return
        self._locals = (*self._locals, local)
        self._choices[model] = _Choice(local, remote=False)
        log.info("model %s: tokenizing with its own tokenizer from %s", model, directory)

    def _choice(self, spec: str, built: dict[str, LocalTokenizer]) -> _Choice:
        remote = spec == "remote" or spec.startswith("remote:")
        local_spec = (spec.partition(":")[2] or DEFAULT_REMOTE_FALLBACK) if remote else spec
        local = built.get(local_spec)
        if local is None:
            local = built[local_spec] = build_local(local_spec, self.settings)
        return _Choice(local, remote)


def _text_of(
    local: LocalTokenizer, prompt: PromptLike
) -> tuple[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The text to tokenize, and the special tokens around it (a completion's BOS, for `hf:`)."""
    if prompt.messages:
        return local.render(prompt.messages), ((), ())
    return prompt.texts[0], local.specials
