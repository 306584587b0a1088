"""Errors the picker answers itself, in the OpenAI error envelope.

Every refusal leaves the picker as an `OpenAIError`; the server turns it into an ext_proc
ImmediateResponse, so the client sees the same JSON shape vLLM and OpenAI use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OpenAIError:
    status: int
    message: str
    type: str
    code: str
    param: str | None = None
    # Extra response headers, e.g. ("retry-after", "1").
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


# How much of a client's own string (a model name, a header value) goes into a message or a log
# line: enough to recognise it, never enough to flood either.
CLIENT_TEXT_LIMIT = 120


def client_text(value: str, *, limit: int = CLIENT_TEXT_LIMIT) -> str:
    """`value`, as a client sent it, made safe to echo and log: control characters (a newline
    would forge a log line), quotes and non-ASCII escaped as in a Python literal, and cut to
    `limit` characters with the length of the rest said."""
    shown = value if len(value) <= limit else value[:limit]
    quoted = ascii(shown)[1:-1]
    if len(value) > limit:
        quoted += f"... ({len(value) - limit} more characters)"
    return quoted


def invalid_json(detail: str) -> OpenAIError:
    return OpenAIError(
        400, f"Request body is not valid JSON: {detail}", "invalid_request_error", "invalid_json"
    )


def invalid_field(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", "invalid_value", param=param)


def missing_model() -> OpenAIError:
    return OpenAIError(
        400,
        "The request must name a model: the 'model' field is missing.",
        "invalid_request_error",
        "missing_model",
        param="model",
    )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model '{client_text(model)}' does not exist or is not served by this pool.",
        "invalid_request_error",
        "model_not_found",
        param="model",
    )


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"Request body is larger than the limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


def bad_header(name: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", "invalid_header", param=name)


def no_ready_endpoint(what: str, retry_after: int) -> OpenAIError:
    return OpenAIError(
        503,
        f"No ready endpoint can serve {what} right now; retry later.",
        "service_unavailable",
        "no_ready_endpoint",
        headers=(("retry-after", str(retry_after)),),
    )


def shed(reason: str, retry_after: int) -> OpenAIError:
    return OpenAIError(
        429,
        f"The pool is saturated and this request is sheddable: {reason}.",
        "rate_limit_exceeded",
        "request_shed",
        headers=(("retry-after", str(retry_after)), ("x-llm-d-request-dropped-reason", reason)),
    )


def internal_error() -> OpenAIError:
    return OpenAIError(
        500,
        "The endpoint picker failed on this request; it has been logged.",
        "internal_error",
        "picker_error",
    )


def unauthorized(code: str, message: str) -> OpenAIError:
    return OpenAIError(
        401,
        message,
        "invalid_request_error",
        code,
        headers=(("www-authenticate", 'Bearer realm="extproc"'),),
    )


def model_not_allowed(model: str) -> OpenAIError:
    return OpenAIError(
        403,
        f"This API key or tenant may not use the model '{client_text(model)}'.",
        "permission_error",
        "model_not_allowed",
        param="model",
    )


def model_unclassified() -> OpenAIError:
    return OpenAIError(
        403,
        "This API key or tenant may use only some models, and the model of this request cannot "
        "be told: send a JSON body naming 'model' to an OpenAI API path.",
        "permission_error",
        "model_not_allowed",
        param="model",
    )


# OpenAI's rate-limit answers name the kind of limit in `type` and the limit in these headers.
_LIMIT_KINDS = {
    "requests_per_minute": ("requests", "x-ratelimit-limit-requests", "requests per minute"),
    "tokens_per_minute": ("tokens", "x-ratelimit-limit-tokens", "tokens per minute"),
    "max_concurrency": ("concurrency", "x-ratelimit-limit-concurrency", "requests in flight"),
}


def rate_limited(limit: str, value: int, retry_after: int) -> OpenAIError:
    kind, header, words = _LIMIT_KINDS[limit]
    return OpenAIError(
        429,
        f"Rate limit reached: {value} {words}. Retry after {retry_after} s.",
        kind,
        "rate_limit_exceeded",
        headers=(
            ("retry-after", str(retry_after)),
            (header, str(value)),
            ("x-extproc-limit", limit),
        ),
    )


def queue_timeout(waited: float, retry_after: int) -> OpenAIError:
    """The pool stayed saturated for longer than the fair queue's timeout."""
    return OpenAIError(
        429,
        f"The pool is saturated: this request waited {waited:g} s for room and gave up.",
        "rate_limit_exceeded",
        "queue_timeout",
        headers=(("retry-after", str(retry_after)),),
    )


def queue_full(limit: int, retry_after: int) -> OpenAIError:
    return OpenAIError(
        429,
        f"The pool is saturated and {limit} requests of this tenant are already waiting.",
        "rate_limit_exceeded",
        "queue_full",
        headers=(("retry-after", str(retry_after)),),
    )


def limiter_unavailable(reason: str, retry_after: int) -> OpenAIError:
    return OpenAIError(
        503,
        f"Limits cannot be checked right now ({reason}); retry later.",
        "service_unavailable",
        "limiter_unavailable",
        headers=(("retry-after", str(retry_after)),),
    )
