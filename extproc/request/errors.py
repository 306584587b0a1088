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
        f"The model '{model}' does not exist or is not served by this pool.",
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
