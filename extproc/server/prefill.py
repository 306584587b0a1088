"""The `centralized` prefill: the picker posts a disaggregated request's prompt to its prefill
endpoint and reads back where the KV cache is (`extproc.scheduling.disaggregation`).

One aiohttp session for the picker's life, no connection limit (a prefill is one request per
routed request, and a pool's worth at once must not queue behind each other here). The answer
is the endpoint's `kv_transfer_params`, or a sentence saying why there are none: the pipeline
then lets the decode endpoint compute the prompt itself, so a failed prefill costs time, never
the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from extproc.scheduling.disaggregation import returned_params


class HttpPrefiller:
    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def prefill(
        self, address: str, path: str, body: bytes, *, request_id: str
    ) -> Mapping[str, Any] | str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout
            )
        headers = {"content-type": "application/json"}
        if request_id:
            # The same id on both halves, as vLLM's proxy sends it: logs join up.
            headers["x-request-id"] = request_id
        try:
            async with self._session.post(
                f"http://{address}{path}", data=body, headers=headers
            ) as response:
                answer = await response.read()
                if response.status != 200:
                    return f"HTTP {response.status}: {answer[:200].decode(errors='replace')}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        params = returned_params(answer)
        return params if params is not None else "the answer has no kv_transfer_params"

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
