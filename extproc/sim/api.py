"""The HTTP API of a simulated server as vLLM shapes it: the error envelope
`{"error": {"message", "type", "param", "code"}}`, an inference body checked and turned into
what the engine needs (with vLLM's messages for each refusal), the JSON and SSE answers of
completions and chat completions, and the bodies of the model, LoRA, rendering and probe routes.
No state of its own: the server's handlers (`server`) call these with theirs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from extproc.prefix.hashing import cache_salt_error
from extproc.prefix.tokenizers import Tokenizer
from extproc.sim.engine import EngineConfig
from extproc.sim.request import EngineRequest, FinishedRequest, LoraAdapter

VLLM_VERSION: Final = "0.33.0"
JSON: Final = "application/json"
_LONG_TEXT: Final = 20_000  # characters: tokenize longer prompts off the event loop


class HTTPError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.err_type, self.param)


def error_response(
    status: int, message: str, err_type: str, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, text=json.dumps(body), content_type=JSON)


def bad_request(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(HTTPStatus.BAD_REQUEST, message, "BadRequestError", param)


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated inference request, ready for the engine."""

    prompt_ids: list[int]
    max_tokens: int
    lora: LoraAdapter | None
    model: str
    cache_salt: str | None
    stream: bool
    include_usage: bool


async def prompt_ids(tok: Tokenizer, body: Mapping[str, Any], *, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("Field 'messages' must be a non-empty list.", "messages")
        add_gen = bool(body.get("add_generation_prompt", True))
        try:
            size = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
            if size > _LONG_TEXT:
                return await asyncio.to_thread(
                    tok.apply_chat_template, messages, add_generation_prompt=add_gen
                )
            return tok.apply_chat_template(messages, add_generation_prompt=add_gen)
        except (ValueError, AttributeError) as exc:
            raise bad_request(f"Invalid messages: {exc}", "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("Prompt cannot be empty.", "prompt")
        if len(prompt) > _LONG_TEXT:
            return await asyncio.to_thread(tok.encode, prompt)
        return tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if any(t < 0 for t in prompt):
            raise bad_request("Token ids must be non-negative.", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("Batched prompts are not supported by the simulator.", "prompt")
    raise bad_request(
        "Field 'prompt' must be a string, a list of token ids, or a one-element list.",
        "prompt",
    )


async def prepare(
    body: Mapping[str, Any],
    *,
    chat: bool,
    tokenizer: Tokenizer,
    resolve_model: Callable[[Mapping[str, Any]], tuple[str, LoraAdapter | None]],
    max_model_len: int,
    default_max_tokens: int,
) -> Prepared:
    """Check an inference body in vLLM's order (model, cache salt, n, prompt, length)."""
    model, lora = resolve_model(body)
    salt = body.get("cache_salt")
    salt_error = cache_salt_error(salt)
    if salt_error is not None:
        raise bad_request(salt_error, "cache_salt")
    n = body.get("n", 1)
    if n != 1:
        raise bad_request("The simulator supports only n=1.", "n")
    ids = await prompt_ids(tokenizer, body, chat=chat)
    max_len = max_model_len
    raw = body.get("max_completion_tokens") if chat else None
    if raw is None:
        raw = body.get("max_tokens")
    if raw is None:
        max_tokens = max(1, min(default_max_tokens, max_len - len(ids)))
    elif isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise bad_request(f"max_tokens must be at least 1, got {raw}.", "max_tokens")
    else:
        max_tokens = raw
    if len(ids) + max_tokens > max_len:
        raise bad_request(
            f"This model's maximum context length is {max_len} tokens. However, you "
            f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
            f"messages, {max_tokens} in the completion). Please reduce the length of the "
            "messages or completion.",
            "max_tokens",
        )
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    include_usage = bool(
        stream and isinstance(options, dict) and options.get("include_usage", False)
    )
    return Prepared(
        prompt_ids=ids,
        max_tokens=max_tokens,
        lora=lora,
        model=model,
        cache_salt=salt if isinstance(salt, str) else None,
        stream=stream,
        include_usage=include_usage,
    )


def completion(
    request_id: str, model: str, text: str, record: FinishedRequest, *, chat: bool
) -> dict[str, Any]:
    """The JSON answer of a finished, non-streamed request."""
    created = int(time.time())
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": record.finish_reason,
            "stop_reason": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": record.finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        obj = "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(record),
    }


async def stream(
    request: web.Request,
    req: EngineRequest,
    p: Prepared,
    *,
    chat: bool,
    decode: Callable[[list[int]], str],
) -> web.StreamResponse:
    """Serve a streamed request as vLLM does: a chunk per step's tokens, the last one with the
    finish reason, then the usage chunk when asked for and `[DONE]`."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": req.request_id, "object": obj, "created": created, "model": p.model}
    if chat:
        first = {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        await resp.write(sse(first))
    assert req.tokens is not None
    while True:
        ids = await req.tokens.get()
        if ids is None:
            break
        # The engine queues the end marker right after the last tokens: seeing only it left
        # means this chunk is the last one and carries the finish reason, as vLLM's does.
        finished = req.finish_reason is not None and req.tokens.qsize() == 1
        reason = req.finish_reason if finished and req.finish_reason != "abort" else None
        text = decode(ids)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        if reason is not None:
            choice["stop_reason"] = None
        await resp.write(sse({**head, "choices": [choice]}))
    record = await req.done
    if p.include_usage:
        await resp.write(sse({**head, "choices": [], "usage": usage(record)}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def usage(record: FinishedRequest) -> dict[str, Any]:
    prompt, completion_tokens = record.prompt_tokens, record.output_tokens
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": record.cached_tokens},
    }


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def render(body: Mapping[str, Any], p: Prepared, request_id: str) -> dict[str, Any]:
    """`/v1/completions/render` and `/v1/chat/completions/render`: what the engine would get."""
    sampling = {
        "max_tokens": p.max_tokens,
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "n": 1,
    }
    return {
        "request_id": request_id,
        "token_ids": p.prompt_ids,
        "features": None,
        "sampling_params": sampling,
        "model": p.model,
        "stream": p.stream,
        "stream_options": body.get("stream_options"),
        "cache_salt": p.cache_salt,
    }


def model_list(base: str, adapters: Iterable[LoraAdapter], *, max_model_len: int) -> dict[str, Any]:
    """`/v1/models`: the base model, then each LoRA adapter as its child."""
    created = int(time.time())

    def card(model_id: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_model_len,
            "permission": [],
        }

    data = [card(base, base, None)]
    data += [card(a.name, a.path, base) for a in adapters]
    return {"object": "list", "data": data}


def lora_to_load(
    body: Mapping[str, Any], *, base: str, loaded: Collection[str], max_cpu_loras: int
) -> tuple[str, str]:
    """The (name, path) a `/v1/load_lora_adapter` body asks for, refused as vLLM refuses."""
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise HTTPError(
            400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
        )
    if name == base:
        raise HTTPError(
            400,
            f"The lora adapter '{name}' conflicts with a base model name.",
            "InvalidUserInput",
        )
    if name in loaded and not body.get("load_inplace", False):
        raise HTTPError(
            400,
            f"The lora adapter '{name}' has already been loaded. If you want to load the "
            "adapter in place, set 'load_inplace' to True.",
            "InvalidUserInput",
        )
    if len(loaded) >= max_cpu_loras and name not in loaded:
        # vLLM keeps the registration and evicts from its CPU LRU; the simulator has no
        # reload path, so it refuses instead and says so.
        raise HTTPError(
            400,
            f"The simulator holds at most max_cpu_loras={max_cpu_loras} adapters.",
            "InvalidUserInput",
        )
    return name, path


def lora_to_unload(body: Mapping[str, Any], *, loaded: Collection[str]) -> str:
    """The adapter a `/v1/unload_lora_adapter` body names, refused as vLLM refuses."""
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise HTTPError(
            400,
            "'lora_name' needs to be provided to unload a LoRA adapter.",
            "InvalidUserInput",
        )
    if name not in loaded:
        raise HTTPError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    return name


def server_info(model: str, engine: EngineConfig) -> dict[str, Any]:
    """`/server_info` and `/get_server_info`, as other routers probe for them."""
    return {
        "model_path": model,
        "served_model_name": model,
        "tokenizer_path": model,
        "version": VLLM_VERSION,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "block_size": engine.block_size,
        "num_gpu_blocks": engine.num_gpu_blocks,
        "dp_size": 1,
        "tp_size": 1,
        # The simulator's own: which step-time profile (GPU type) this server runs.
        "sim_profile": engine.profile.name,
    }


def model_info(model: str, engine: EngineConfig) -> dict[str, Any]:
    """`/model_info` and `/get_model_info`, as other routers probe for them."""
    return {
        "model_path": model,
        "tokenizer_path": model,
        "is_generation": True,
        "served_model_name": model,
        "max_model_len": engine.max_model_len,
    }
