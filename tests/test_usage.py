"""Reading usage from responses as they stream past."""

from __future__ import annotations

import json

from extproc.request.usage import Usage, UsageReader


def test_sse_usage_from_the_last_event_even_after_a_long_stream() -> None:
    reader = UsageReader(sse=True)
    for i in range(2000):  # far longer than the kept tail
        reader.feed(f'data: {{"choices":[{{"text":"{i}"}}],"usage":null}}\n\n'.encode())
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 2000,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    reader.feed(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
    reader.feed(b"data: [DONE]\n\n")
    assert reader.result() == Usage(5, 2000, 3)


def test_sse_usage_split_across_chunks() -> None:
    reader = UsageReader(sse=True)
    event = b'data: {"usage": {"prompt_tokens": 4, "completion_tokens": 1}}\n\ndata: [DONE]\n\n'
    for byte in range(0, len(event), 7):
        reader.feed(event[byte : byte + 7])
    assert reader.result() == Usage(4, 1, 0)


def test_sse_without_usage_and_broken_json() -> None:
    reader = UsageReader(sse=True)
    reader.feed(b'data: {"usage": {oops\n\ndata: [DONE]\n\n')
    assert reader.result() is None


def test_json_usage_and_oversized_json() -> None:
    reader = UsageReader(sse=False)
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}})
    reader.feed(body[:10].encode())
    reader.feed(body[10:].encode())
    assert reader.result() == Usage(9, 1, 0)
    big = UsageReader(sse=False)
    big.feed(b"x" * (2 * 1024 * 1024))
    assert big.result() is None
