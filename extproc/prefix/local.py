"""Local tokenizers built from specs (`cl100k_base`, `tiktoken:PATH`, `hf:PATH`, `bytes[:N]`),
each with its token cache (`extproc.prefix.cache.SpliceEncoder`), its chat renderer and the
special tokens a completion prompt gets. `extproc.prefix.blocks` chooses one per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from extproc.prefix.cache import SpliceEncoder, TextEncoder
from extproc.prefix.tokenizers import (
    ByteEstimateTokenizer,
    ChatMessage,
    ChatRenderer,
    HFTokenizer,
    TiktokenTokenizer,
    load_chat_template,
    render_chat,
)


class LocalSettings(Protocol):
    """The parts of `extproc.prefix.blocks.BlocksSettings` a local tokenizer is built from."""

    @property
    def chunk_chars(self) -> int: ...
    @property
    def token_cache_mib(self) -> int: ...
    @property
    def add_special_tokens(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class _HFEncoder:
    """An HF tokenizer's ids without special tokens (the splice-able part)."""

    tokenizer: Any  # tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids


class LocalTokenizer:
    """One local tokenizer, with its caches. Shared by every model with the same spec."""

    def __init__(
        self,
        spec: str,
        encoder: TextEncoder,
        *,
        exact: bool,
        render: ChatRenderer,
        specials: tuple[tuple[int, ...], tuple[int, ...]],
        settings: LocalSettings,
        splicing: bool,
    ) -> None:
        self.spec = spec
        self.exact = exact
        self.render = render
        self.specials = specials  # (before, after) the text of a completion prompt
        self.splicer = SpliceEncoder(
            encoder,
            chunk_chars=settings.chunk_chars,
            cache_bytes=settings.token_cache_mib * 1024 * 1024,
            splicing=splicing,
        )


def build_local(spec: str, settings: LocalSettings) -> LocalTokenizer:
    kind, _, arg = spec.partition(":")
    llama3 = _llama3
    if spec in ("", "cl100k_base", "cl100k"):
        tik = TiktokenTokenizer.cl100k()
        return LocalTokenizer(
            "cl100k_base", tik, exact=True, render=llama3, specials=((), ()),
            settings=settings, splicing=True,
        )  # fmt: skip
    if kind == "tiktoken" and arg:
        tik = TiktokenTokenizer.from_file(arg)
        return LocalTokenizer(
            spec, tik, exact=True, render=llama3, specials=((), ()), settings=settings,
            splicing=True,
        )  # fmt: skip
    if kind == "bytes":
        est = ByteEstimateTokenizer(int(arg) if arg else 4)
        # Byte groups start at the text's first byte, so a cut moves every later group:
        # splicing cannot be exact and the self-test would only confirm that.
        return LocalTokenizer(
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


def _build_hf(spec: str, path: Path, settings: LocalSettings) -> LocalTokenizer:
    directory = path if path.is_dir() else path.parent
    hf = HFTokenizer.from_file(path / "tokenizer.json" if path.is_dir() else path)
    encoder = _HFEncoder(hf.tokenizer)
    specials: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    if settings.add_special_tokens:
        specials = _special_tokens(hf.tokenizer)
    template = load_chat_template(directory) if path.is_dir() else None
    return LocalTokenizer(
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
