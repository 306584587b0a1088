"""The pipeline step "tokens and block hashes": a request's prompt as vLLM's KV block hashes.

Built once at start-up from `BlocksSettings`; one per event loop:

    blocks = PromptBlocks(BlocksSettings(tokenizers={"meta-llama/Llama-3.1-8B-Instruct":
                                                     "hf:/models/llama-3.1-8b"}))
    tokens = await blocks.blocks(parsed, lora=None, cache_salt=None, endpoint_for_remote=None)
    tokens.block_hashes        # 64-bit event ids, the keys of the precise and approximate indexes
    index.lookup(tokens.block_hashes, candidates)
    await blocks.aclose()      # at shutdown: the worker threads and the remote session

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
would not free the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

from extproc.prefix.cache import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_HASH_CACHE_BLOCKS,
    ChainHasher,
    SpliceEncoder,
    TextEncoder,
)
from extproc.prefix.hashing import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_NONE_HASH_SEED,
    BlockHasher,
    HashAlgo,
    LoraKey,
)
from extproc.prefix.remote import HttpRemoteTokenizer, RemoteTokenizer, tokenize_body
from extproc.prefix.tokenizers import (
    ByteEstimateTokenizer,
    ChatMessage,
    HFTokenizer,
    TiktokenTokenizer,
    message_text,
    render_chat,
)

log = logging.getLogger(__name__)

DEFAULT_INLINE_MAX_CHARS: Final = 2048
DEFAULT_REMOTE_FALLBACK: Final = "bytes:4"


@dataclass(frozen=True, slots=True)
class BlocksSettings:
    """Everything `PromptBlocks` needs; config keys map one to one onto these fields."""

    # Model name -> tokenizer spec (see the module docstring); other models use the default.
    tokenizers: Mapping[str, str] = field(default_factory=dict)
    default_tokenizer: str = "cl100k_base"
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
        if self.hash_algo not in ("sha256", "sha256_cbor"):
            raise ValueError(f"unsupported hash algorithm {self.hash_algo!r}")
        if self.inline_max_chars < 0 or self.tokenizer_threads < 1:
            raise ValueError("inline_max_chars must be >= 0 and tokenizer_threads >= 1")


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


class ChatRenderer(Protocol):
    """Chat messages to the prompt text the model reads (its chat template)."""

    def __call__(self, messages: Sequence[ChatMessage]) -> str: ...


@dataclass(frozen=True, slots=True)
class _HFEncoder:
    """An HF tokenizer's ids without special tokens (the splice-able part)."""

    tokenizer: Any  # tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids


class _Local:
    """One local tokenizer, with its caches. Shared by every model with the same spec."""

    def __init__(
        self,
        spec: str,
        encoder: TextEncoder,
        *,
        exact: bool,
        render: ChatRenderer,
        specials: tuple[tuple[int, ...], tuple[int, ...]],
        settings: BlocksSettings,
        splicing: bool,
    ) -> None:
        self.spec = spec
        self.exact = exact
        self.render = render
        self.specials = specials  # (before, after) the text of a completion prompt
        self.splicer = SpliceEncoder(
            encoder,
            chunk_chars=settings.chunk_chars,
            cache_chars=settings.token_cache_mib * 1024 * 1024,
            splicing=splicing,
        )


@dataclass(frozen=True, slots=True)
class _Choice:
    local: _Local
    remote: bool


class PromptBlocks:
    """Prompt -> token count and block hashes. Built once at start-up; one event loop owns it."""

    def __init__(self, settings: BlocksSettings, *, remote: RemoteTokenizer | None = None) -> None:
        self.settings = settings
        self._hasher = ChainHasher(
            BlockHasher(
                algo=settings.hash_algo, block_size=settings.block_size, seed=settings.hash_seed
            ),
            cache_blocks=settings.hash_cache_blocks,
        )
        locals_: dict[str, _Local] = {}
        self._choices = {
            model: self._choice(spec, locals_) for model, spec in settings.tokenizers.items()
        }
        self._default = self._choice(settings.default_tokenizer, locals_)
        self._locals = tuple(locals_.values())
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

    async def blocks(
        self,
        request: RequestLike,
        *,
        lora: LoraKey | None,
        cache_salt: str | None,
        endpoint_for_remote: str | None,
        base_model: str | None = None,
    ) -> PromptTokens:
        """The request's prompt as block hashes.

        `lora` and `cache_salt` enter the hashes as vLLM's extra keys. `endpoint_for_remote` is
        the endpoint to ask when the model's tokenizer is `remote`. `base_model` chooses the
        tokenizer when `request.model` names a LoRA adapter (default: `request.model`).
        """
        prompt = request.prompt
        if prompt.token_ids:
            ids: Sequence[int] = prompt.token_ids[0]
            return self._tokens(
                ids, lora=lora, salt=cache_salt, exact=True, source="token_ids",
                batch=len(prompt.token_ids),
            )  # fmt: skip
        if not prompt.texts and not prompt.messages:
            return PromptTokens(0, (), exact=False, source="none")
        choice = self._choices.get(base_model or request.model or "", self._default)
        batch = max(1, len(prompt.texts))
        if choice.remote and endpoint_for_remote is not None:
            body = tokenize_body(
                model=request.model,
                prompt=prompt.texts[0] if prompt.texts else None,
                messages=list(prompt.messages) if prompt.messages else None,
            )
            remote_ids = await self._remote.tokenize(endpoint_for_remote, body)
            if remote_ids is not None:
                self._remote_ok += 1
                return self._tokens(
                    remote_ids, lora=lora, salt=cache_salt, exact=True, source="remote",
                    batch=batch,
                )  # fmt: skip
            self._remote_failed += 1
        local = choice.local
        try:
            ids = await self._encode_local(local, request)
        except ValueError as exc:
            # An unrenderable conversation (the template raised): the server will refuse it
            # too; route it on its size alone.
            log.debug("cannot tokenize request locally: %s", exc)
            return PromptTokens(prompt.approx_chars() // 4, (), exact=False, source="none")
        exact = local.exact and not choice.remote
        return self._tokens(
            ids, lora=lora, salt=cache_salt, exact=exact, source=local.spec, batch=batch
        )

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
        await self._remote.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------------

    def _tokens(
        self,
        ids: Sequence[int],
        *,
        lora: LoraKey | None,
        salt: str | None,
        exact: bool,
        source: str,
        batch: int,
    ) -> PromptTokens:
        hashes = self._hasher.event_ids(ids, lora=lora, cache_salt=salt)
        return PromptTokens(len(ids), hashes, exact, source, batch)

    async def _encode_local(self, local: _Local, request: RequestLike) -> Sequence[int]:
        prompt = request.prompt
        if prompt.messages:
            text = local.render(prompt.messages)
            before: tuple[int, ...] = ()
            after: tuple[int, ...] = ()
        else:
            text = prompt.texts[0]
            before, after = local.specials
        plan = local.splicer.plan(text)
        if plan.missing_chars > self.settings.inline_max_chars:
            self._offloaded += 1
            loop = asyncio.get_running_loop()
            computed = await loop.run_in_executor(self._executor, plan.compute)
        else:
            computed = plan.compute()
        local.splicer.commit(computed)
        if before or after:
            return (*before, *computed.ids, *after)
        return computed.ids

    def _choice(self, spec: str, built: dict[str, _Local]) -> _Choice:
        remote = spec == "remote" or spec.startswith("remote:")
        local_spec = (spec.partition(":")[2] or DEFAULT_REMOTE_FALLBACK) if remote else spec
        local = built.get(local_spec)
        if local is None:
            local = built[local_spec] = _build_local(local_spec, self.settings)
        return _Choice(local, remote)


# -- building tokenizers from specs ------------------------------------------------------------


def _build_local(spec: str, settings: BlocksSettings) -> _Local:
    kind, _, arg = spec.partition(":")
    llama3 = _llama3
    if spec in ("", "cl100k_base", "cl100k"):
        tik = TiktokenTokenizer.cl100k()
        return _Local(
            "cl100k_base", tik, exact=True, render=llama3, specials=((), ()),
            settings=settings, splicing=True,
        )  # fmt: skip
    if kind == "tiktoken" and arg:
        tik = TiktokenTokenizer.from_file(arg)
        return _Local(
            spec, tik, exact=True, render=llama3, specials=((), ()), settings=settings,
            splicing=True,
        )  # fmt: skip
    if kind == "bytes":
        est = ByteEstimateTokenizer(int(arg) if arg else 4)
        # Byte groups start at the text's first byte, so a cut moves every later group:
        # splicing cannot be exact and the self-test would only confirm that.
        return _Local(
            spec, est, exact=False, render=llama3, specials=((), ()), settings=settings,
            splicing=False,
        )  # fmt: skip
    path = Path(arg) if kind == "hf" and arg else Path(spec)
    if kind == "hf" or path.name == "tokenizer.json" or path.is_dir():
        return _build_hf(spec, path, settings)
    raise ValueError(
        f"unknown tokenizer spec {spec!r}: use cl100k_base, tiktoken:PATH, hf:PATH, "
        "remote[:FALLBACK] or bytes[:N]"
    )


def _llama3(messages: Sequence[ChatMessage]) -> str:
    return render_chat(messages, add_generation_prompt=True)


def _build_hf(spec: str, path: Path, settings: BlocksSettings) -> _Local:
    directory = path if path.is_dir() else path.parent
    hf = HFTokenizer.from_file(path / "tokenizer.json" if path.is_dir() else path)
    encoder = _HFEncoder(hf.tokenizer)
    specials: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    if settings.add_special_tokens:
        specials = _special_tokens(hf.tokenizer)
    template = load_chat_template(directory) if path.is_dir() else None
    return _Local(
        spec, encoder, exact=True, render=template or _llama3, specials=specials, settings=settings,
        splicing=True,
    )  # fmt: skip


def _special_tokens(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What the post-processor adds around a single sequence (BOS before, maybe EOS after).
    Splicing tokenizes the text without them and adds them back, so check that this is all the
    post-processor does."""
    probes = ("hello world", "A second, longer probe.\nWith a newline.")
    found: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for probe in probes:
        plain = tokenizer.encode(probe, add_special_tokens=False).ids
        full = tokenizer.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                found.add((tuple(full[:start]), tuple(full[start + len(plain) :])))
                break
        else:
            found.add(((-1,), ()))
    if len(found) != 1 or ((-1,), ()) in found:
        raise ValueError(
            "the tokenizer's post-processor does more than add tokens around the text; "
            "set add_special_tokens to false or use a remote tokenizer for this model"
        )
    return found.pop()


# -- Hugging Face chat templates -----------------------------------------------------------------

_SPECIAL_TOKEN_KEYS: Final = (
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
)  # fmt: skip


def load_chat_template(directory: Path) -> ChatRenderer | None:
    """The directory's chat template (`chat_template.jinja`, else `chat_template` in
    tokenizer_config.json), compiled as transformers does, or None when it has none."""
    config_file = directory / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    source: str | None = None
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    else:
        template = config.get("chat_template")
        if isinstance(template, list):
            # Named templates: transformers uses "default" for chat.
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            source = template
    if source is None:
        return None
    specials: dict[str, str] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    return JinjaChatTemplate(source, specials)


class JinjaChatTemplate:
    """A Hugging Face chat template rendered like transformers' `apply_chat_template`:
    a sandboxed Jinja2 environment with trim_blocks, lstrip_blocks and loop controls, its
    `tojson`, `raise_exception` and `strftime_now`, the special tokens as variables, and
    `add_generation_prompt=True`. transformers' `{% generation %}` tag is not supported.
    Content-part lists are joined into one string ("\\n" between text parts), as vLLM does for
    templates that take string content."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(
            value: Any,
            ensure_ascii: bool = False,
            indent: int | None = None,
            separators: tuple[str, str] | None = None,
            sort_keys: bool = False,
        ) -> str:
            return json.dumps(
                value,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._template = env.from_string(source)
        self._specials = dict(special_tokens)
        self._error: type[Exception] = jinja2.exceptions.TemplateError

    def __call__(self, messages: Sequence[ChatMessage]) -> str:
        normalised = [_string_content(m) for m in messages]
        try:
            text: str = self._template.render(
                messages=normalised, add_generation_prompt=True, tools=None, documents=None,
                **self._specials,
            )  # fmt: skip
        except self._error as exc:
            raise ValueError(f"chat template: {exc}") from exc
        return text


def _string_content(message: ChatMessage) -> Mapping[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        texts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        ]
        return {**message, "content": "\n".join(texts)}
    if content is None or isinstance(content, str):
        return message
    return {**message, "content": message_text(content)}
