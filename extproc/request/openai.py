"""Parse the OpenAI-style request body: which API, which model, and what the prompt is.

The body is parsed once and kept as the decoded payload; nothing here re-serialises it, so a body
that no later step changes travels to the model server byte for byte as the client sent it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

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


def api_of(path: str) -> Api:
    return _API_BY_PATH.get(path.split("?", 1)[0].rstrip("/"), Api.OTHER)


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
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return errors.invalid_json(str(exc))
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
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0
    ):
        return errors.invalid_field("max_tokens", "'max_tokens' must be a non-negative integer.")
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
    # Unknown APIs are routed by load alone; a JSON body naming a model still narrows the choice.
    model = None
    if body[:1] == b"{":
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("model"), str):
            model = payload["model"]
    return ParsedRequest(api=api, model=model)


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
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
