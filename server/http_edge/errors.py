"""Gateway errors as the Anthropic API reports them: the HTTP edge's error boundary.

Every failure of an HTTP call ends here, once: a GatewayError becomes the
status it implies and Anthropic's error body,
`{"type":"error","error":{"type":...,"message":...},"request_id":...}`, so
that the official SDKs raise their own error classes and clients such as
Claude Code react as they would to Anthropic (retry on 429/529 after
`retry-after`, compact on "prompt is too long", give up when
`x-should-retry: false`). An upstream's own error answer, kept by a
pass-through call (UpstreamReply), is relayed as it came instead. Anything
else is a 500 `api_error` with a generic message, never a traceback.
"""

from __future__ import annotations

import json
import math

import grpc

from server.errors import (
    BudgetExceededError,
    ContextWindowExceededError,
    GatewayError,
    InvalidArgumentError,
    OverLimitError,
    QuotaExhaustedError,
    RequestTooLargeError,
    UpstreamMalformedError,
    UpstreamOverloadedError,
)
from server.schema import ANTHROPIC_MESSAGES

JSON = "application/json"

# Status code -> (HTTP status, Anthropic error type).
_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (529, "overloaded_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class BodyTooLargeError(GatewayError):
    """A request body over `http.max_body_bytes`: 413, refused before it is all read.
    RESOURCE_EXHAUSTED in the ledger, as grpc answers a message over its limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REQUEST_TOO_LARGE"


# Errors no retry can cure, however soon: a spent budget, a request larger
# than the key's limit allows, a billing problem upstream, a body too large.
_FINAL = (BudgetExceededError, OverLimitError, QuotaExhaustedError, BodyTooLargeError)


class HttpError(Exception):
    """An error of the HTTP layer itself (a bad path, body or content type)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def status_of(error: GatewayError) -> tuple[int, str]:
    """The HTTP status and Anthropic error type of a gateway error."""
    if isinstance(error, RequestTooLargeError | BodyTooLargeError):
        return 413, "request_too_large"
    if isinstance(error, OverLimitError):
        return 429, "rate_limit_error"
    if isinstance(error, UpstreamOverloadedError):
        return 529, "overloaded_error"
    if isinstance(error, UpstreamMalformedError):
        # A bad gateway in HTTP's own words: the upstream's answer could not be read.
        return 502, "api_error"
    return _BY_CODE.get(error.code, (500, "api_error"))


def message_of(error: GatewayError) -> str:
    """The message a client reads: every bad field of an invalid request named."""
    if isinstance(error, ContextWindowExceededError):
        # Anthropic's own words (server/routing/context_window.py): Claude Code
        # compacts its conversation, or lowers max_tokens, when it reads them.
        return error.message
    if isinstance(error, InvalidArgumentError) and len(error.violations) > 1:
        return "invalid request: " + "; ".join(
            f"{v.field}: {v.description}" for v in error.violations
        )
    return error.message


def error_body(error_type: str, message: str, request_id: str) -> bytes:
    document = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def error_event(error_type: str, message: str) -> bytes:
    """The error as an SSE event, for a stream whose status was already sent."""
    data = {"type": "error", "error": {"type": error_type, "message": message}}
    return b"event: error\ndata: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def error_response(
    error: GatewayError, request_id: str
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and headers for a gateway error (or the upstream's own answer)."""
    reply = error.upstream_reply
    if reply is not None and reply.protocol == ANTHROPIC_MESSAGES and reply.body:
        headers = [(name, value) for name, value in reply.headers if name != "content-type"]
        return reply.status, reply.body, [("content-type", JSON), *headers]
    status, error_type = status_of(error)
    headers = [("content-type", JSON)]
    if error.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(error.retry_after)))))
    if isinstance(error, _FINAL):
        headers.append(("x-should-retry", "false"))
    return status, error_body(error_type, message_of(error), request_id), headers


def stream_error_event(error: GatewayError) -> bytes:
    """A failure after the stream began, as the event that ends it."""
    reply = error.upstream_reply
    if reply is not None and reply.protocol == ANTHROPIC_MESSAGES:
        if reply.event:
            return reply.event
        if reply.body:
            return b"event: error\ndata: " + reply.body + b"\n\n"
    _, error_type = status_of(error)
    return error_event(error_type, message_of(error))


# -- OpenAI's dialect ------------------------------------------------------------------
# `{"error": {"message", "type", "param", "code"}}`, with the statuses above: the
# openai SDKs pick their exception class by status; the type and code say why.

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    504: "server_error",
    529: "server_error",
}
_OPENAI_CODES = {
    401: "invalid_api_key",
    404: "model_not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    504: "timeout",
    529: "overloaded",
}


def openai_error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> bytes:
    document = {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code if code is not None else _OPENAI_CODES.get(status),
        }
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _openai_code(error: GatewayError, status: int) -> str | None:
    if isinstance(error, ContextWindowExceededError):
        return "context_length_exceeded"
    if isinstance(error, BudgetExceededError | QuotaExhaustedError):
        return "insufficient_quota"
    return _OPENAI_CODES.get(status)


def openai_error_response(
    error: GatewayError, request_id: str, protocol: str
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and headers of a gateway error in OpenAI's dialect (or the
    upstream's own answer, when an OpenAI deployment gave it to a relayed call)."""
    reply = error.upstream_reply
    if reply is not None and reply.protocol == protocol and reply.body and not reply.event:
        headers = [(name, value) for name, value in reply.headers if name != "content-type"]
        return reply.status, reply.body, [("content-type", JSON), *headers]
    status, _ = status_of(error)
    param = None
    if isinstance(error, InvalidArgumentError) and error.violations:
        param = error.violations[0].field
    body = openai_error_body(
        status, message_of(error), code=_openai_code(error, status), param=param
    )
    headers = [("content-type", JSON), ("x-request-id", request_id)]
    if error.retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(error.retry_after)))))
    if isinstance(error, _FINAL):
        headers.append(("x-should-retry", "false"))
    return status, body, headers


class OpenAIErrors:
    """OpenAI's error dialect, for the endpoints of `protocol` (and those both SDKs call)."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol

    def error_response(
        self, error: GatewayError, request_id: str
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        return openai_error_response(error, request_id, self.protocol)

    def error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        return openai_error_body(status, message)
