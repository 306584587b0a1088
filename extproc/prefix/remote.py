"""Remote tokenization: ask a model server for a prompt's exact token ids.

vLLM's `POST /tokenize` tokenizes a completion prompt (`{"model", "prompt"}`) or chat messages
through the served model's own chat template (`{"model", "messages", "add_generation_prompt"}`)
and answers `{"count", "max_model_len", "tokens"}`. That is exact by definition (the server's
tokenizer, template and special tokens) but costs a round trip, so the picker uses it only for
models configured as `remote`, with a short timeout, and falls back to a local estimate.

`RemoteTokenizer` is the seam tests and other transports plug into; `HttpRemoteTokenizer` is the
aiohttp implementation. Failures never raise: `tokenize` returns None and the caller falls back.
An endpoint that failed is not asked again for `backoff_seconds`, so a dead server costs one
timeout per back-off period instead of one per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol

import aiohttp

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS: Final = 0.05
DEFAULT_BACKOFF_SECONDS: Final = 1.0


class RemoteTokenizer(Protocol):
    async def tokenize(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        """Token ids from `endpoint`'s /tokenize for `body`, or None on any failure."""
        ...

    async def aclose(self) -> None: ...


def tokenize_body(
    *, model: str | None, prompt: str | None = None, messages: Any = None
) -> dict[str, Any]:
    """The /tokenize request for a completion prompt or chat messages (vLLM's field names)."""
    body: dict[str, Any] = {}
    if model is not None:
        body["model"] = model
    if messages is not None:
        body["messages"] = messages
        body["add_generation_prompt"] = True
    else:
        body["prompt"] = prompt
    return body


class HttpRemoteTokenizer:
    """POST http://{endpoint}/tokenize over one pooled aiohttp session (created on first use,
    inside the running loop; close with `aclose`)."""

    def __init__(
        self,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
        scheme: str = "http",
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._backoff = backoff_seconds
        self._scheme = scheme
        self._session: aiohttp.ClientSession | None = None
        self._down_until: dict[str, float] = {}
        self.failures = 0

    async def tokenize(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        now = time.monotonic()
        if self._down_until.get(endpoint, 0.0) > now:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"{self._scheme}://{endpoint}/tokenize"
        try:
            async with self._session.post(url, json=body) as resp:
                if resp.status != 200:
                    raise ValueError(f"status {resp.status}")
                payload = await resp.json()
            tokens = payload.get("tokens") if isinstance(payload, dict) else None
            if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                raise ValueError("no integer 'tokens' list in the answer")
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.failures += 1
            self._down_until[endpoint] = now + self._backoff
            log.debug("remote tokenize at %s failed: %s", endpoint, exc)
            return None
        self._down_until.pop(endpoint, None)
        return tokens

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
