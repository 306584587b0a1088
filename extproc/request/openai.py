"""Parse the OpenAI-style request body: which API, which model, and what the prompt is.

The body is parsed once and kept as the decoded payload; nothing here re-serialises it, so a body
that no later step changes travels to the model server byte for byte as the client sent it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import unquote

from extproc.request import errors
from extproc.request.errors import OpenAIError


class Api(Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"
    EMBEDDINGS = "embeddings"
    MODELS = "models"
    OTHER = "other"


_API_BY_PATH = {
    "/v1/completions": Api.COMPLETIONS,
    "/v1/chat/completions": Api.CHAT,
    "/v1/embeddings": Api.EMBEDDINGS,
    "/v1/models": Api.MODELS,
}

# Bodies of these APIs must be JSON objects naming a model; others pass through unparsed.
_MODEL_APIS = frozenset({Api.COMPLETIONS, Api.CHAT, Api.EMBEDDINGS})


# The largest `max_tokens` and token id taken: far above any model's context or vocabulary, and
# below what the cost model's float arithmetic and vLLM's int32/int64 fields hold.
MAX_TOKENS_LIMIT = 2**31 - 1
# A `\uD800`-`\uDFFF` escape in the raw body: the only way a JSON text can carry a surrogate, so
# only bodies with one are checked for a lone half (which no tokenizer or UTF-8 encoder takes).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def api_of(path: str) -> Api:
    return _API_BY_PATH.get(normalize_path(path), Api.OTHER)


def normalize_path(path: str) -> str:
    """The path the model server will route on, as the picker classifies it.

    The query is dropped; percent-escapes are decoded (the server decodes them before routing,
    so `/v1/%63ompletions` is completions there and must be here); empty and `.` segments go,
    and `..` removes the segment before it, as RFC 3986 and Envoy's `normalize_path` do."""
    decoded = unquote(path.split("?", 1)[0].split("#", 1)[0], errors="replace")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "/".join(segments)


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the model will read: text, token ids, or chat messages (exactly one is set)."""

    texts: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    messages: tuple[Mapping[str, Any], ...] = ()

    def approx_chars(self) -> int:
        """Size of the prompt in characters (token ids count as 4 each), for cheap estimates."""
        chars = sum(map(len, self.texts)) + 4 * sum(map(len, self.token_ids))
        for message in self.messages:
            chars += len(_message_text(message))
        return chars

    def opening(self, chars: int) -> str:
        """The prompt's first `chars` characters (token ids written out, 4 characters each):
        two prompts with different openings share no prefix worth waiting for."""
        if self.texts:
            return self.texts[0][:chars]
        if self.token_ids:
            return ",".join(map(str, self.token_ids[0][: chars // 4]))
        if self.messages:
            first = self.messages[0]
            return f"{first.get('role')}:{_message_text(first)[:chars]}"
        return ""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    api: Api
    model: str | None
    stream: bool = False
    max_tokens: int | None = None
    user: str | None = None
    prompt: Prompt = field(default_factory=Prompt)
    # The decoded body, for later steps (tokenization, rewrites). Empty for body-less requests.
    payload: Mapping[str, Any] = field(default_factory=dict)


def parse_request(path: str, body: bytes) -> ParsedRequest | OpenAIError:
    """Parse `body` sent to `path`. Returns the request, or the error to answer with."""
    api = api_of(path)
    if api not in _MODEL_APIS:
        return _parse_other(api, body)
    payload = _loads(body)
    if isinstance(payload, OpenAIError):
        return payload
    if not isinstance(payload, dict):
        return errors.invalid_json(f"expected a JSON object, got {type(payload).__name__}")
    model = payload.get("model")
    if model is None or model == "":
        return errors.missing_model()
    if not isinstance(model, str):
        return errors.invalid_field("model", "'model' must be a string.")
    prompt = _prompt(api, payload)
    if isinstance(prompt, OpenAIError):
        return prompt
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or not 0 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        return errors.invalid_field(
            "max_tokens", f"'max_tokens' must be an integer from 0 to {MAX_TOKENS_LIMIT}."
        )
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        return errors.invalid_field("stream", "'stream' must be true or false.")
    user = payload.get("user")
    return ParsedRequest(
        api=api,
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        user=user if isinstance(user, str) else None,
        prompt=prompt,
        payload=payload,
    )


def _parse_other(api: Api, body: bytes) -> ParsedRequest:
    # Unknown APIs are routed by load alone; a JSON body naming a model still narrows the choice
    # (and a tenant limited to some models is held to them: leading white space must not hide
    # the model). Anything else (multipart audio, say) passes unparsed, its model unknown.
    model = None
    if body.lstrip()[:1] == b"{":
        payload = _loads(body)
        if isinstance(payload, dict) and isinstance(payload.get("model"), str):
            model = payload["model"]
    return ParsedRequest(api=api, model=model)


def _loads(body: bytes) -> Any:
    """The decoded body, or the 400 to answer: every way a client's bytes can fail to be JSON
    the picker can work with (not UTF-8, not JSON, nested past the parser's recursion limit, an
    integer past Python's digit limit, a lone surrogate) is the client's error, never ours."""
    try:
        # Decoded here, strictly: json.loads(bytes) would let UTF-8-encoded surrogates through
        # (it decodes with surrogatepass), and no tokenizer or encoder takes those.
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return errors.invalid_json(str(exc))
    except RecursionError:
        return errors.invalid_json("nested too deeply")
    except ValueError as exc:  # the integer digit limit (not a JSONDecodeError)
        return errors.invalid_json(str(exc))
    if _SURROGATE_ESCAPE.search(body) is not None and _has_lone_surrogate(payload):
        return errors.invalid_json("a string holds a lone UTF-16 surrogate")
    return payload


def _has_lone_surrogate(payload: Any) -> bool:
    try:
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _prompt(api: Api, payload: Mapping[str, Any]) -> Prompt | OpenAIError:
    if api is Api.CHAT:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return errors.invalid_field("messages", "'messages' must be a non-empty list.")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                return errors.invalid_field(f"messages[{i}]", "each message needs a string 'role'.")
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                return errors.invalid_field(
                    f"messages[{i}].content", "'content' must be a string or a list of parts."
                )
        return Prompt(messages=tuple(messages))
    key = "prompt" if api is Api.COMPLETIONS else "input"
    value = payload.get(key)
    parsed = _texts_or_tokens(value)
    if parsed is None:
        return errors.invalid_field(
            key,
            f"'{key}' must be a string, a list of strings, or token ids (a list of integers "
            "or a list of such lists).",
        )
    return parsed


def _texts_or_tokens(value: Any) -> Prompt | None:
    if isinstance(value, str):
        return Prompt(texts=(value,))
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return Prompt(texts=tuple(value))
    if all(_is_token(v) for v in value):
        return Prompt(token_ids=(tuple(value),))
    if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
        return Prompt(token_ids=tuple(tuple(v) for v in value))
    return None


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS_LIMIT


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
