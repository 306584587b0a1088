"""Read `usage` from a model server's response as it streams past, without holding it.

SSE responses carry usage in their last data event (when the client asked for it), so only a
bounded tail of the stream is kept; JSON responses are kept whole up to a limit and parsed once
at the end. Chunks are passed on untouched either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_TAIL = 16 * 1024  # the usage event is well under this
_JSON_LIMIT = 1024 * 1024  # larger JSON responses (embeddings of big batches) are not parsed


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class UsageReader:
    def __init__(self, *, sse: bool) -> None:
        self._sse = sse
        self._parts: list[bytes] = []
        self._size = 0
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if not chunk or self._overflow:
            return
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._sse:
            if self._size > 2 * _TAIL:
                tail = b"".join(self._parts)[-_TAIL:]
                self._parts, self._size = [tail], len(tail)
        elif self._size > _JSON_LIMIT:
            self._parts, self._overflow = [], True

    def result(self) -> Usage | None:
        data = b"".join(self._parts)
        if self._sse:
            return _usage_from_sse(data)
        try:
            document = json.loads(data) if data else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return _usage_from(document)


def _usage_from_sse(data: bytes) -> Usage | None:
    # Walk events from the end: the last one with a usage object wins.
    for event in reversed(data.split(b"\n\n")):
        line = event.strip()
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            usage = _usage_from(json.loads(line[5:]))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if usage is not None:
            return usage
    return None


def _usage_from(document: Any) -> Usage | None:
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=_int(cached),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
