"""Errors on the OpenAI port: every failure as OpenAI's JSON (``{"error": {"message", "type",
"param", "code"}}``) with its HTTP status, mapped here from the domain's RequestError and from
gRPC status codes, and nowhere else.

The message is the gRPC port's (paths translated to the client's request by the caller). The
status follows the gRPC code: INVALID_ARGUMENT 400, UNAUTHENTICATED 401, NOT_FOUND 404, a size
or count limit of the request (RESOURCE_EXHAUSTED raised by our own checks) 413, other
RESOURCE_EXHAUSTED (load, from the inference tier) 429, UNAVAILABLE 503 (with Retry-After),
DEADLINE_EXCEEDED 504; anything else 500. ``code`` is OpenAI's where one exists for the refusal:
``context_length_exceeded`` for a prompt (plus its max tokens) longer than the context (our
reason CONTEXT_EXCEEDED, whichever tier found it), else one by HTTP status.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

from kimivl_contract.errors import Reason, RequestError

C = grpc.StatusCode
HTTP_STATUS = {
    C.INVALID_ARGUMENT: 400, C.FAILED_PRECONDITION: 400, C.OUT_OF_RANGE: 400, C.UNAUTHENTICATED: 401,
    C.PERMISSION_DENIED: 403, C.NOT_FOUND: 404, C.RESOURCE_EXHAUSTED: 429, C.CANCELLED: 499,
    C.UNIMPLEMENTED: 501, C.UNAVAILABLE: 503, C.DEADLINE_EXCEEDED: 504,
}
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 499: "invalid_request_error", 503: "server_error", 504: "server_error"}
# OpenAI's codes for our reasons (programs written against OpenAI branch on these).
REASON_CODES = {Reason.CONTEXT_EXCEEDED: "context_length_exceeded"}
CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded", 503: "service_unavailable",
         504: "timeout"}


@dataclass
class HttpError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code or CODES.get(self.status)}}

    def json(self) -> str:
        return json.dumps(self.body())


def from_status(code: grpc.StatusCode, message: str, *, param: str | None = None,
                retry_after_s: float | None = None, reason: str | None = None) -> HttpError:
    """``reason``: the status's ErrorInfo reason, where our own servers gave one."""
    status = HTTP_STATUS.get(code, 500)
    headers = {}
    if status == 503 or retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s if retry_after_s is not None else 1)))
    return HttpError(status, message, param, REASON_CODES.get(reason), headers=headers)


def from_request_error(e: RequestError, message: str | None = None, param: str | None = None) -> HttpError:
    """``message`` / ``param``: the error's, translated to the client's request (default: as is)."""
    message = str(e) if message is None else message
    if e.code == C.RESOURCE_EXHAUSTED and e.resource_exhausted:  # the request is over a size/count limit
        return HttpError(413, message, param)
    return from_status(e.code, message, param=param, retry_after_s=getattr(e, "retry_after_s", None),
                       reason=e.reason)


def not_found_model(model: str) -> HttpError:
    return HttpError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
