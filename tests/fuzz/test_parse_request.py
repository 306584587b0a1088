"""The request parser takes any bytes a client can send to any path and answers with a parsed
request or a 4xx OpenAI error: never an exception (which the picker would turn into a 500, and
which, past the limit step, used to leave a tenant's slot taken)."""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from extproc.request.errors import OpenAIError
from extproc.request.openai import Api, ParsedRequest, api_of, parse_request

from . import strategies as hs


def _check(path: str, body: bytes) -> None:
    parsed = parse_request(path, body)
    if isinstance(parsed, OpenAIError):
        assert 400 <= parsed.status < 500, parsed
        error = json.loads(parsed.body())["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        return
    assert isinstance(parsed, ParsedRequest), parsed
    assert parsed.api is api_of(path)
    if parsed.api in (Api.COMPLETIONS, Api.CHAT, Api.EMBEDDINGS):
        assert isinstance(parsed.model, str) and parsed.model
    # Later steps size the prompt from this; it must not raise either.
    assert parsed.prompt.approx_chars() >= 0


@given(path=hs.paths, body=st.binary(max_size=400))
def test_arbitrary_bytes_are_parsed_or_refused_with_a_4xx(path: str, body: bytes) -> None:
    _check(path, body)


@given(
    path=st.sampled_from(hs.PATHS),
    value=hs.json_values,
    ascii_only=st.booleans(),
)
def test_arbitrary_json_is_parsed_or_refused_with_a_4xx(
    path: str, value: object, ascii_only: bool
) -> None:
    _check(path, hs.encode(value, ascii_only=ascii_only))


@given(request=hs.requests())
@example(request=("/v1/completions", hs.LONE_SURROGATE_PROMPT))
@example(request=("/v1/chat/completions", hs.LONE_SURROGATE_MESSAGE))
@example(request=("/v1/completions", hs.RAW_SURROGATE_PROMPT))
@example(request=("/v1/completions", hs.HUGE_MAX_TOKENS))
@example(request=("/v1/completions", hs.MANY_DIGITS))
@example(request=("/v1/completions", hs.DEEP_PROMPT))
@example(request=("/v1/responses", b'{"model": "m", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"))
def test_hostile_openai_requests_are_parsed_or_refused_with_a_4xx(
    request: tuple[str, bytes],
) -> None:
    _check(*request)


@given(body=hs.deeply_nested())
def test_deep_nesting_is_refused_with_a_4xx(body: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses"):
        _check(path, body)
