"""Parsing OpenAI-style bodies: every prompt shape, and every way a body can be wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.request.errors import OpenAIError
from extproc.request.openai import Api, ParsedRequest, Prompt, api_of, parse_request


def _parse(path: str, payload: Any) -> ParsedRequest:
    parsed = parse_request(path, json.dumps(payload).encode())
    assert isinstance(parsed, ParsedRequest), parsed
    return parsed


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Hello", Prompt(texts=("Hello",))),
        (["a", "b"], Prompt(texts=("a", "b"))),
        ([1, 2, 3], Prompt(token_ids=((1, 2, 3),))),
        ([[1, 2], [3]], Prompt(token_ids=((1, 2), (3,)))),
    ],
    ids=["string", "list-of-strings", "token-ids", "batch-of-token-ids"],
)
def test_completion_prompt_shapes(prompt: Any, expected: Prompt) -> None:
    parsed = _parse("/v1/completions", {"model": "m", "prompt": prompt})
    assert parsed.api is Api.COMPLETIONS
    assert parsed.prompt == expected


def test_chat_messages_with_string_and_part_lists() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
        },
    ]
    parsed = _parse(
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": messages,
            "stream": True,
            "max_completion_tokens": 9,
            "user": "u1",
        },
    )
    assert (parsed.api, parsed.model, parsed.stream, parsed.max_tokens, parsed.user) == (
        Api.CHAT,
        "m",
        True,
        9,
        "u1",
    )
    assert parsed.prompt.messages == tuple(messages)
    assert parsed.prompt.approx_chars() == len("Be brief.") + len("Hi there")


def test_a_prompts_opening_is_its_first_characters_whatever_its_form() -> None:
    text = _parse("/v1/completions", {"model": "m", "prompt": "abcdef"})
    assert text.prompt.opening(3) == "abc"
    tokens = _parse("/v1/completions", {"model": "m", "prompt": [5, 6, 7, 8, 9]})
    assert tokens.prompt.opening(8) == "5,6"
    chat = _parse(
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}],
        },
    )
    assert chat.prompt.opening(2) == "system:Be"


def test_embeddings_and_query_strings() -> None:
    parsed = _parse("/v1/embeddings?x=1", {"model": "e", "input": ["a", "bc"]})
    assert parsed.api is Api.EMBEDDINGS
    assert parsed.prompt.texts == ("a", "bc")


def test_a_surrogate_pair_is_text_not_an_error() -> None:
    parsed = parse_request("/v1/completions", b'{"model": "m", "prompt": "a\\ud83d\\ude00b"}')
    assert isinstance(parsed, ParsedRequest) and parsed.prompt.texts == ("a\U0001f600b",)


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/%63ompletions", Api.COMPLETIONS),
        ("/v1/chat/%43ompletions", Api.OTHER),  # paths are case-sensitive, as at the server
        ("//v1//chat/completions/", Api.CHAT),
        ("/v1/./embeddings?x=1", Api.EMBEDDINGS),
        ("/v1/models/../completions", Api.COMPLETIONS),
        ("/../../v1/models", Api.MODELS),
        ("/v1/chat%2Fcompletions", Api.CHAT),
        ("/v1/completion", Api.OTHER),
    ],
)
def test_paths_are_classified_as_the_server_will_route_them(path: str, api: Api) -> None:
    assert api_of(path) is api


def test_a_body_with_leading_white_space_still_names_its_model() -> None:
    other = parse_request("/v1/responses", b' \n {"model": "m", "input": "x"}')
    assert isinstance(other, ParsedRequest) and other.model == "m"
    spelled = parse_request("/v1/%63ompletions", b' {"model": "m", "prompt": "x"}')
    assert isinstance(spelled, ParsedRequest)
    assert (spelled.api, spelled.model, spelled.prompt.texts) == (Api.COMPLETIONS, "m", ("x",))


def test_other_paths_pass_through_and_keep_a_model_if_named() -> None:
    other = parse_request("/v1/responses", b'{"model": "m", "input": "x"}')
    assert isinstance(other, ParsedRequest)
    assert (other.api, other.model) == (Api.OTHER, "m")
    raw = parse_request("/upload", b"\x00\x01 not json")
    assert isinstance(raw, ParsedRequest) and raw.model is None


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        ("/v1/completions", b"{", 400, "invalid_json", None),
        ("/v1/completions", b"\xff\xfe", 400, "invalid_json", None),
        ("/v1/completions", b'"just a string"', 400, "invalid_json", None),
        ("/v1/completions", b'{"prompt": "x"}', 400, "missing_model", "model"),
        ("/v1/completions", b'{"model": "", "prompt": "x"}', 400, "missing_model", "model"),
        ("/v1/completions", b'{"model": ["m"], "prompt": "x"}', 400, "invalid_value", "model"),
        ("/v1/completions", b'{"model": "m"}', 400, "invalid_value", "prompt"),
        ("/v1/completions", b'{"model": "m", "prompt": [1, "a"]}', 400, "invalid_value", "prompt"),
        ("/v1/completions", b'{"model": "m", "prompt": [-1]}', 400, "invalid_value", "prompt"),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "x", "max_tokens": "9"}',
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "x", "stream": "yes"}',
            400,
            "invalid_value",
            "stream",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": []}',
            400,
            "invalid_value",
            "messages",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"content": "x"}]}',
            400,
            "invalid_value",
            "messages[0]",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            400,
            "invalid_value",
            "messages[0].content",
        ),
        ("/v1/embeddings", b'{"model": "m", "input": {}}', 400, "invalid_value", "input"),
        # Input Python's json module raises on in ways other than JSONDecodeError (was a 500).
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
        (
            "/v1/completions",
            b'{"model": "m", "n": 1' + b"0" * 5000 + b"}",
            400,
            "invalid_json",
            None,
        ),
        ("/v1/completions", b'{"model": "m", "prompt": "a\\ud800b"}', 400, "invalid_json", None),
        # The same surrogate as raw UTF-8-encoded bytes, which json.loads(bytes) lets through.
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "a\xed\xa0\x80b"}',
            400,
            "invalid_json",
            None,
        ),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"role": "\\udfff"}]}',
            400,
            "invalid_json",
            None,
        ),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}",
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": [4294967296]}',
            400,
            "invalid_value",
            "prompt",
        ),
    ],
)
def test_bad_bodies_name_the_problem(
    path: str, body: bytes, status: int, code: str, param: str | None
) -> None:
    error = parse_request(path, body)
    assert isinstance(error, OpenAIError)
    assert (error.status, error.code, error.param) == (status, code, param)
    envelope = json.loads(error.body())
    assert set(envelope["error"]) == {"message", "type", "param", "code"}
