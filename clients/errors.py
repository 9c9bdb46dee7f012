"""Typed exceptions for failed gateway calls, read from the google.rpc rich status.

The gateway sends every failure with a `grpc-status-details-bin` trailer (a
google.rpc.Status): an ErrorInfo with a `reason` and the `request_id`, plus
RetryInfo, BadRequest and DebugInfo where they apply (server/errors.py). The
clients turn a grpc error into one of the classes below at one place,
`from_rpc_error`, so callers catch `RateLimitedError` or look at `.reason`
instead of parsing trailers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "DeadlineExceededError",
    "FieldViolation",
    "GatewayError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field: `field` is a path such as `messages[0].role`."""

    field: str
    description: str


class GatewayError(Exception):
    """A gateway call that failed.

    `code` is the gRPC status; `reason` the ErrorInfo reason (for example
    `MODEL_NOT_FOUND`, empty when the gateway sent none, as for a connection
    failure); `retry_delay` the RetryInfo delay in seconds, if any;
    `request_id` the call's request id, to quote in a bug report.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        retry_delay: float | None = None,
        request_id: str = "",
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.retry_delay = retry_delay
        self.request_id = request_id
        self.field_violations = field_violations

    def __str__(self) -> str:
        parts = [f"{self.code.name}: {self.message}"]
        if self.reason:
            parts.append(f"reason={self.reason}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " ".join(parts)


class InvalidArgumentError(GatewayError):
    """The request is malformed; `field_violations` lists every bad field."""


class NotFoundError(GatewayError):
    """No model by that name (`reason` MODEL_NOT_FOUND)."""


class UnauthenticatedError(GatewayError):
    """No credentials, or a key or token the gateway does not accept."""


class PermissionDeniedError(GatewayError):
    """The credentials may not use this model or method."""


class RateLimitedError(GatewayError):
    """RESOURCE_EXHAUSTED: a rate limit or budget; `retry_delay` says when to retry."""


class UnavailableError(GatewayError):
    """The gateway is draining or an upstream failed; safe to retry."""


class DeadlineExceededError(GatewayError):
    """The call's deadline passed before it finished."""


class InternalError(GatewayError):
    """A failure inside the gateway; report it with `request_id`."""


_CLASSES: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(error: grpc.RpcError) -> GatewayError:
    """The typed exception for a grpc error (sync `grpc.RpcError` or `AioRpcError`)."""
    call: Any = error  # both kinds are also calls: code(), details(), trailing_metadata()
    code: grpc.StatusCode = call.code()
    trailers = _trailers(call.trailing_metadata())
    request_id = _text(trailers.get(REQUEST_ID_KEY, b""))
    fields: dict[str, Any] = {"request_id": request_id}
    raw = trailers.get(STATUS_DETAILS_KEY)
    if isinstance(raw, bytes):
        fields.update(_read_details(status_pb2.Status.FromString(raw)))
        fields["request_id"] = fields.get("metadata", {}).get("request_id") or request_id
    cls = _CLASSES.get(code, GatewayError)
    return cls(code, call.details() or code.name, **fields)


def _trailers(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str | bytes]:
    return {key: value for key, value in metadata or ()}


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _read_details(status: status_pb2.Status) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            fields.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif detail.Unpack(retry):
            fields["retry_delay"] = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Unpack(bad_request):
            fields["field_violations"] = tuple(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
    return fields
