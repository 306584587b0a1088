"""Hypothesis strategies for hostile OpenAI-style requests: bodies as raw bytes (so they can hold
what Python's `json.dumps` would never write: 10**400's digits, a 5,000-digit integer, `NaN`,
a lone surrogate escape, 12,000 nesting levels), and request heads with odd paths and headers.

A body is built as a tree of Python values with `Raw` leaves for verbatim number tokens, then
written by `encode`; strings go out as JSON escapes (`\\ud800` stays a lone surrogate escape)
or, when `ascii_only` is off, as UTF-8 with surrogates passed through (bytes that are not UTF-8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`common` nine times in ten, else `rare` (and shrinking goes to `common`)."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 9 else common)


# --- leaves -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Raw:
    """A JSON token written verbatim: a number Python would not write, or NaN/Infinity."""

    text: str


# Numbers a client can send that the picker's arithmetic or Python's parser may choke on.
HUGE_NUMBERS = (
    "1" + "0" * 400,  # 10**400: parses, overflows float()
    "-1" + "0" * 400,
    "9" * 5000,  # past Python's int digit limit (4300): ValueError from json.loads
    "1e999",  # float('inf') after parsing
    "-1e999",
    "1e-400",  # 0.0
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "2147483647",
    "2147483648",  # one past int32
    "9223372036854775808",  # one past int64
    "18446744073709551616",
    "1.0",
    "-1",
)

SURROGATES = ("\ud800", "\udbff", "\udc00", "\udfff", "\ud83d")  # the last: half an emoji

ODD_TEXTS = (
    "",
    " ",
    "\x00",
    "\u2028",
    "\ufeff",
    "\ud83d\ude00",  # a valid pair: one emoji once parsed
    "<|begin_of_text|><|eot_id|>",  # special tokens as plain text
    "{{ raise_exception('x') }}",  # a chat template's own syntax as content
    "a" * 100_000,
    "😀" * 5_000,
    "日本語 " * 2_000,
)


def _with_surrogate(parts: tuple[str, str, str]) -> str:
    before, surrogate, after = parts
    return before + surrogate + after


texts: st.SearchStrategy[str] = st.one_of(
    st.text(max_size=40),
    st.tuples(st.text(max_size=8), st.sampled_from(SURROGATES), st.text(max_size=8)).map(
        _with_surrogate
    ),
    st.sampled_from(ODD_TEXTS),
)

raw_numbers = st.sampled_from(HUGE_NUMBERS).map(Raw)
# Object keys: short (a long one says nothing more), with the odd lone surrogate.
keys = st.one_of(
    st.text(max_size=8),
    st.tuples(st.just(""), st.sampled_from(SURROGATES), st.text(max_size=4)).map(_with_surrogate),
)

leaves: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    raw_numbers,
)

json_values: st.SearchStrategy[Any] = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


def encode(value: Any, *, ascii_only: bool = True) -> bytes:
    """`value` as a JSON text, `Raw` leaves verbatim. With `ascii_only` off, strings are written as
    UTF-8 and a lone surrogate becomes the 3 bytes no UTF-8 decoder takes."""
    return _text(value, ascii_only=ascii_only).encode("utf-8", "surrogatepass")


def _text(value: Any, *, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (
            f"{_text(str(k), ascii_only=ascii_only)}: {_text(v, ascii_only=ascii_only)}"
            for k, v in value.items()
        )
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_text(v, ascii_only=ascii_only) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    return json.dumps(value)  # None, bool, int, float (NaN and Infinity as Python writes them)


# --- request bodies -----------------------------------------------------------------------------

MODELS = ("model-a", "model-b", "model-c", "model-a-lora", "no-such-model")

models: st.SearchStrategy[Any] = mostly(st.sampled_from(MODELS), st.one_of(texts, json_values))

max_tokens: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=-5, max_value=5000),
    raw_numbers,
    st.sampled_from([2**31 - 1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    json_values,
)

token_ids: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=0, max_value=100_000), raw_numbers, st.integers()
)

prompts: st.SearchStrategy[Any] = st.one_of(
    texts,
    st.lists(texts, max_size=3),
    st.lists(token_ids, max_size=20),
    st.lists(st.lists(token_ids, max_size=10), max_size=3),
    json_values,
)

content_parts: st.SearchStrategy[Any] = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, json_values)}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": texts})}
    ),
    json_values,
)

messages: st.SearchStrategy[Any] = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), texts)},
            optional={
                "content": st.one_of(texts, st.lists(content_parts, max_size=3), json_values),
                "name": texts,
            },
        ),
        max_size=4,
    ),
    json_values,
)

_COMMON = {
    "max_tokens": max_tokens,
    "max_completion_tokens": max_tokens,
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(
        st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), json_values)}),
        json_values,
    ),
    "user": st.one_of(texts, json_values),
    "cache_salt": st.one_of(texts, json_values),
    "temperature": st.one_of(st.floats(allow_nan=True, allow_infinity=True), raw_numbers),
    "n": st.one_of(st.integers(), raw_numbers),
    "extra": json_values,
}


def _shape(main: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"model": models, **main}, optional=_COMMON)


# Loosely shaped: every field may be of any type.
loose_completion_bodies = _shape({"prompt": prompts})
loose_chat_bodies = _shape({"messages": messages})
loose_embedding_bodies = _shape({"input": prompts})

# Well typed, hostile only in content (text with lone surrogates, megabyte strings, big ids):
# what gets furthest down the pipeline.
typed_prompts = st.one_of(
    texts,
    st.lists(texts, min_size=1, max_size=3),
    st.lists(st.integers(0, 200_000), min_size=1, max_size=20),
)
typed_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant"]),
            "content": st.one_of(
                texts,
                st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2
                ),
            ),
        }
    ),
    min_size=1,
    max_size=3,
)
_TYPED_COMMON = {
    "max_tokens": st.integers(0, 4096),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": texts,
    "cache_salt": texts,
}


def _typed(main: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(MODELS[:4]), **main}, optional=_TYPED_COMMON
    )


# Any one field of a well-typed request given a hostile value (a number past every limit, a
# value of the wrong type): one bad field at a time reaches the step that reads it.
_HOSTILE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **_COMMON,
    "max_tokens": st.one_of(raw_numbers, max_tokens),
    "max_completion_tokens": st.one_of(raw_numbers, max_tokens),
    "model": models,
    "prompt": prompts,
    "messages": messages,
    "input": prompts,
}


@st.composite
def _one_field_hostile(draw: st.DrawFn, main: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    body = draw(_typed(main))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(_HOSTILE_FIELDS)))
        body[name] = draw(_HOSTILE_FIELDS[name])
    return body


def _bodies(main: dict[str, st.SearchStrategy[Any]], loose: st.SearchStrategy[Any]) -> Any:
    return st.one_of(_one_field_hostile(main), _one_field_hostile(main), loose)


completion_bodies = _bodies({"prompt": typed_prompts}, loose_completion_bodies)
chat_bodies = _bodies({"messages": typed_messages}, loose_chat_bodies)
embedding_bodies = _bodies({"input": typed_prompts}, loose_embedding_bodies)

# Paths for each body shape, spelled as clients and attackers spell them.
COMPLETIONS_PATHS = (
    "/v1/completions",
    "/v1/completions/",
    "/v1/%63ompletions",
    "/v1//completions",
    "/v1/./completions",
    "/v1/x/../completions",
    "/v1/completions?stream=true",
    "/v1/completions#frag",
    "/%76%31/completions",
)
CHAT_PATHS = ("/v1/chat/completions", "/v1/chat%2Fcompletions", "/v1/chat/completions/..")
EMBEDDINGS_PATHS = ("/v1/embeddings", "/v1/EMBEDDINGS")
OTHER_PATHS = (
    "/v1/models",
    "/v1/responses",
    "/v1/audio/transcriptions",
    "/health",
    "/",
    "",
    "*",
    "/v1/completions%00",
    "/v1/%ZZcompletions",
    "/%2e%2e/%2e%2e/v1/completions",
    "/v1/completions\r\nx-injected: 1",
    "/" + "a/" * 2000,
)
PATHS = COMPLETIONS_PATHS + CHAT_PATHS + EMBEDDINGS_PATHS + OTHER_PATHS

paths: st.SearchStrategy[str] = st.one_of(st.sampled_from(PATHS), texts)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """A body whose value somewhere is nested thousands of levels deep (past Python's
    recursion limit, which `json.loads` hits at about 1,000)."""
    depth = draw(st.integers(min_value=1_000, max_value=12_000))
    kind = draw(st.sampled_from(["array", "object"]))
    inner = "[" * depth + "]" * depth if kind == "array" else '{"a": ' * depth + "0" + "}" * depth
    where = draw(st.sampled_from(["top", "prompt", "messages", "extra"]))
    if where == "top":
        return inner.encode()
    if where == "messages":
        value = f'[{{"role": "user", "content": {inner}}}]'
        return f'{{"model": "model-a", "messages": {value}}}'.encode()
    return f'{{"model": "model-a", "{where}": {inner}, "prompt": "hi"}}'.encode()


@st.composite
def shaped_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A path and a body of the OpenAI shape that path expects (or of another, or of none)."""
    api = draw(st.sampled_from(["completions", "chat", "embeddings", "mismatched"]))
    ascii_only = draw(st.booleans())
    if api == "completions":
        return draw(st.sampled_from(COMPLETIONS_PATHS)), encode(
            draw(completion_bodies), ascii_only=ascii_only
        )
    if api == "chat":
        return draw(st.sampled_from(CHAT_PATHS)), encode(draw(chat_bodies), ascii_only=ascii_only)
    if api == "embeddings":
        return draw(st.sampled_from(EMBEDDINGS_PATHS)), encode(
            draw(embedding_bodies), ascii_only=ascii_only
        )
    body = draw(st.one_of(completion_bodies, chat_bodies, embedding_bodies, json_values))
    return draw(paths), encode(body, ascii_only=ascii_only)


bodies: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=200),
    st.tuples(json_values, st.booleans()).map(lambda v: encode(v[0], ascii_only=v[1])),
    deeply_nested(),
    shaped_requests().map(lambda request: request[1]),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """Any path with any body: mostly well-shaped, some wholly arbitrary."""
    return draw(st.one_of(shaped_requests(), shaped_requests(), st.tuples(paths, bodies)))


# The known hostile inputs, kept as explicit examples whatever the profile draws.
LONE_SURROGATE_PROMPT = b'{"model": "model-a", "prompt": "a\\ud800b", "max_tokens": 5}'
LONE_SURROGATE_MESSAGE = (
    b'{"model": "model-a", "messages": [{"role": "user", "content": "a\\udc00b"}]}'
)
# The same surrogate as raw bytes (its CESU-8 form, not UTF-8): Python's `json.loads(bytes)`
# decodes with `surrogatepass`, so no `\u` escape is needed to carry one.
RAW_SURROGATE_PROMPT = b'{"model": "model-a", "prompt": "\xed\xa0\x80"}'
RAW_SURROGATE_HF_PROMPT = b'{"model": "model-b", "prompt": "\xed\xa0\x80"}'
HUGE_MAX_TOKENS = b'{"model": "model-a", "prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}"
MANY_DIGITS = b'{"model": "model-a", "prompt": "hi", "max_tokens": ' + b"1" * 5000 + b"}"
DEEP_PROMPT = b'{"model": "model-a", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
