"""vLLM's `kv_transfer_params`: the bodies of a disaggregated request's two halves.

The shapes are vLLM's NixlConnector protocol, as its disaggregated-serving proxy and the llm-d
routing sidecar send them: the prefill endpoint gets the request with `do_remote_decode` set,
one output token and no stream; it answers with the `kv_transfer_params` that locate the KV
blocks it holds (engine, block ids, host, port), and the decode endpoint gets the original
request with those parameters, pulls the blocks and generates. Both ends are vLLM's; the picker
only carries the parameters across, without reading them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# What a prefill request carries: "compute the prompt, keep its KV for a remote decode".
PREFILL_PARAMS: Mapping[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(payload: Mapping[str, Any]) -> bytes:
    """The request as its prefill endpoint gets it: one token, no stream, KV kept."""
    body = {**payload, "kv_transfer_params": dict(PREFILL_PARAMS), "stream": False}
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    return json.dumps(body, ensure_ascii=False).encode()


def decode_body(payload: Mapping[str, Any], params: Mapping[str, Any]) -> bytes:
    """The request as its decode endpoint gets it: as sent, plus where its KV is."""
    return json.dumps({**payload, "kv_transfer_params": dict(params)}, ensure_ascii=False).encode()


def returned_params(body: bytes) -> Mapping[str, Any] | None:
    """The `kv_transfer_params` of a prefill endpoint's answer, or None when it has none (an
    engine without a KV connector answers the request as an ordinary one)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    return params if isinstance(params, dict) and params else None
