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
# Errors no retry can cure, however soon: a spent budget, a request larger
# than the key's limit allows, a billing problem upstream.
_FINAL = (BudgetExceededError, OverLimitError, QuotaExhaustedError)


class HttpError(Exception):
    """An error of the HTTP layer itself (a bad path, body or content type)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def status_of(error: GatewayError) -> tuple[int, str]:
    """The HTTP status and Anthropic error type of a gateway error."""
    if isinstance(error, RequestTooLargeError):
        return 413, "request_too_large"
    if isinstance(error, OverLimitError):
        return 429, "rate_limit_error"
    if isinstance(error, UpstreamOverloadedError):
        return 529, "overloaded_error"
    return _BY_CODE.get(error.code, (500, "api_error"))


def message_of(error: GatewayError) -> str:
    """The message a client reads: every bad field of an invalid request named."""
    if isinstance(error, ContextWindowExceededError):
        # Claude Code compacts its conversation when it reads these words.
        return f"prompt is too long: {'; '.join(v.description for v in error.violations)}"
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
