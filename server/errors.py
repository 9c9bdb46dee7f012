"""The gateway's one error hierarchy and its translation to gRPC statuses.

Every error the gateway reports is a GatewayError subclass that declares its
gRPC status code and an ErrorInfo reason. The servicer's error boundary
(server/grpc_edge/servicer.py) is the only place that turns one into a status on the
wire, using the google.rpc rich error model through grpcio-status: ErrorInfo
always, plus BadRequest field violations, RetryInfo or QuotaFailure where
they apply. Anything that is not a GatewayError becomes INTERNAL with a
generic message, never UNKNOWN and never a traceback.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message as ProtoMessage
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "llmgateway"

# -- Errors that fit on the wire -----------------------------------------------
# A gRPC status travels in trailers, and a client refuses trailers past its
# metadata limit (8 KiB soft, 16 KiB hard by default) with RESOURCE_EXHAUSTED
# "received metadata size exceeds...", hiding the real error. An error lists
# the caller's bad fields and echoes their values, so what it echoes is capped:
# each string, the violations listed and the bytes they take, the message and
# the upstream attempts. A status past MAX_STATUS_BYTES (several caps reached
# at once, in characters UTF-8 takes 4 bytes for, which grpc-message
# percent-encodes) loses its attempts and most of its message; even with
# every cap reached it then takes under 7 KiB of trailers.

# Any one echoed string (a field path, a description, a metadata value).
MAX_ECHO_BYTES = 200
# Violations listed, and the UTF-8 bytes their fields and descriptions take
# (the first is always listed); those left out are counted in a last one.
# Bytes are what the wire limits; the count lets the 30-odd violations of one
# badly wrong body be named at once.
MAX_LISTED_VIOLATIONS = 50
MAX_VIOLATION_BYTES = 2560
# The status message on the gRPC wire, and the upstream attempts (DebugInfo).
MAX_MESSAGE_BYTES = 1024
MAX_ATTEMPT_BYTES = 1024
# The field of the last violation, which says how many were left out.
OMITTED_FIELD = "…"
# What a status should take on the wire (its message percent-encoded in
# grpc-message, the whole status in base64 in grpc-status-details-bin).
MAX_STATUS_BYTES = 6 * 1024


def clip(text: str, limit: int = MAX_ECHO_BYTES) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, ending in "…" when cut."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text
    # "…" takes 3 bytes; a character cut in half is dropped.
    return encoded[: limit - 3].decode("utf-8", "ignore") + "…"


def _wire_bytes(status: status_pb2.Status) -> int:
    """What `status` takes in trailers: grpc-message percent-encodes every byte
    outside printable ASCII (and "%"), grpc-status-details-bin is base64."""
    message = status.message.encode("utf-8", "surrogatepass")
    encoded = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in message)
    size: int = status.ByteSize()
    return encoded + 4 * math.ceil(size / 3)


def _within(texts: Sequence[str], budget: int, most: int) -> int:
    """How many of `texts`, from the first, fit `most` items and `budget` bytes
    (the first always does)."""
    used = 0
    for count, text in enumerate(texts[:most]):
        used += len(text.encode("utf-8", "surrogatepass"))
        if used > budget and count:
            return count
    return min(len(texts), most)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """An upstream's error answer, kept whole for an edge that relays it verbatim.

    Set by a provider serving a pass-through request (server/schema.py's
    Passthrough): the HTTP front door sends it to a client of the same
    `protocol` with its status, body and the headers that matter.
    """

    protocol: str
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    # An error that came as an event of a stream: the event's own bytes.
    event: bytes = b""


class GatewayError(Exception):
    """Base of every error the gateway reports to its caller."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after
        # One line per upstream attempt, in order, set by the router when it
        # gives up (server/routing/); sent as a DebugInfo detail.
        self.attempts: list[str] = []
        # The upstream's own error answer, for an edge that relays it.
        self.upstream_reply: UpstreamReply | None = None

    def detail_messages(self) -> list[ProtoMessage]:
        """The google.rpc detail messages besides ErrorInfo and RetryInfo."""
        return []

    def to_status(self, request_id: str = "") -> grpc.Status:
        """Builds the rich status (details in `grpc-status-details-bin`), small
        enough for any client's metadata limit (see MAX_STATUS_BYTES)."""
        status = self._rich_status(request_id, MAX_MESSAGE_BYTES, with_attempts=True)
        if _wire_bytes(status) > MAX_STATUS_BYTES:
            # Only when nearly every cap is reached at once: the attempts go,
            # and the message is cut to the length of one echoed value.
            status = self._rich_status(request_id, MAX_ECHO_BYTES, with_attempts=False)
        return rpc_status.to_status(status)

    def _rich_status(
        self, request_id: str, message_limit: int, *, with_attempts: bool
    ) -> status_pb2.Status:
        metadata = {key: clip(value) for key, value in self.metadata.items()}
        if request_id:
            metadata["request_id"] = clip(request_id)
        if self.attempts:
            metadata["attempts"] = str(len(self.attempts))
        details: list[ProtoMessage] = [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=metadata)
        ]
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        details.extend(self.detail_messages())
        if self.attempts and with_attempts:
            attempts = [clip(line) for line in self.attempts]
            listed = _within(attempts, MAX_ATTEMPT_BYTES, MAX_LISTED_VIOLATIONS)
            if listed < len(attempts):
                attempts[listed:] = [f"... and {len(attempts) - listed} more attempts"]
            details.append(
                error_details_pb2.DebugInfo(
                    stack_entries=attempts, detail="upstream attempts, in order"
                )
            )
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name),
            message=clip(self.message, message_limit),
            details=packed,
        )


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: `field` is a path such as `messages[0].content[1].text`."""

    field: str
    description: str


class InvalidArgumentError(GatewayError):
    """The request is malformed; `violations` say which fields and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], message: str = "") -> None:
        # Both edges list these (BadRequest on gRPC, the message over HTTP),
        # so the caps apply here, once: see MAX_LISTED_VIOLATIONS.
        clipped = [FieldViolation(clip(v.field), clip(v.description)) for v in violations]
        listed = _within(
            [v.field + v.description for v in clipped], MAX_VIOLATION_BYTES, MAX_LISTED_VIOLATIONS
        )
        self.violations = clipped[:listed]
        # How many violations were found but not listed.
        self.omitted = len(clipped) - listed
        if self.omitted:
            self.violations.append(
                FieldViolation(
                    OMITTED_FIELD,
                    f"{self.omitted} more field violation{_s(self.omitted)} left out"
                    f" (only the first{f' {listed}' if listed > 1 else ''} listed)",
                )
            )
        if not message:
            first = clipped[0]
            more = len(clipped) - 1
            message = f"invalid request: {first.field}: {first.description}"
            if more:
                message += f" (and {more} more field violation{_s(more)}"
                if self.omitted:
                    message += f", {self.omitted} of them not listed"
                message += ")"
        super().__init__(message)

    def detail_messages(self) -> list[ProtoMessage]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        ]


def _s(count: int) -> str:
    return "s" if count > 1 else ""


class ModelNotFoundError(GatewayError):
    """The requested model is not served by this gateway."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {clip(model)!r} is not served here; the model list (ListModels,"
            " GET /v1/models) shows the models that are",
            metadata={"model": model},
        )


class UnavailableError(GatewayError):
    """The gateway or an upstream cannot serve the call right now; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class ShuttingDownError(UnavailableError):
    reason = "SHUTTING_DOWN"


class GatewayOverloadedError(UnavailableError):
    """Every slot for calls in flight (`server.max_concurrent_calls`) stayed taken for
    as long as a call may wait (`server.max_queue_s`): refused before any work,
    so a retry (RetryInfo), here or on another replica, is safe."""

    reason = "GATEWAY_OVERLOADED"

    def to_status(self, request_id: str = "") -> grpc.Status:
        # RetryInfo, and a `retry-after` trailer as quota refusals carry.
        return _with_retry_after(super().to_status(request_id), self.retry_after)


class CircuitOpenError(UnavailableError):
    """Every deployment that could serve the call is skipped by its circuit breaker.

    `retry_after` is the time until the first of their breakers lets a probe
    through (RetryInfo, and a `retry-after` trailer as other refusals carry).
    """

    reason = "CIRCUIT_OPEN"

    def to_status(self, request_id: str = "") -> grpc.Status:
        return _with_retry_after(super().to_status(request_id), self.retry_after)


class ContextWindowExceededError(InvalidArgumentError):
    """The input plus max_tokens does not fit the window of any deployment of the model."""

    reason = "CONTEXT_WINDOW_EXCEEDED"


class InternalError(GatewayError):
    """A bug or an unexpected state in the gateway; the message stays generic."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class UpstreamProtocolError(InternalError):
    """An event sequence the gateway cannot interpret, found past the providers (the
    events' fold, an edge's encoder). An upstream answer that cannot be read at
    all is an UpstreamMalformedError, which a retry or a fallback may cure."""

    reason = "UPSTREAM_PROTOCOL_ERROR"


# -- Upstream failures -------------------------------------------------------
# Provider backends map their SDK's exceptions to these, each in one function
# (server/providers/*). Their metadata names the provider and, when the
# upstream gave one, its request id, so a caller can quote it to the provider.


class UpstreamInvalidRequestError(InvalidArgumentError):
    """The provider refused the request as malformed (HTTP 400/422)."""

    reason = "UPSTREAM_INVALID_REQUEST"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        message: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(violations, message)
        self.metadata.update(metadata or {})


class RequestTooLargeError(UpstreamInvalidRequestError):
    """The provider refused the request for its size (HTTP 413)."""

    reason = "REQUEST_TOO_LARGE"


class UpstreamModelNotFoundError(GatewayError):
    """The provider does not know the model the gateway asked for (HTTP 404)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "UPSTREAM_MODEL_NOT_FOUND"


class RateLimitedError(GatewayError):
    """The provider rate-limited the gateway (HTTP 429); RetryInfo says when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_RATE_LIMITED"


class QuotaExhaustedError(GatewayError):
    """The gateway's account with the provider has no quota or credit left."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_QUOTA_EXHAUSTED"


class UpstreamUnavailableError(UnavailableError):
    """The provider failed or could not be reached; a retry may succeed."""

    reason = "UPSTREAM_UNAVAILABLE"


class UpstreamOverloadedError(UpstreamUnavailableError):
    """The provider is overloaded (HTTP 529, or an `overloaded_error` event)."""

    reason = "UPSTREAM_OVERLOADED"


class UpstreamMalformedError(UpstreamUnavailableError):
    """The upstream answered, but with something the gateway cannot read: a cut or
    non-JSON body, an event that is not JSON (a proxy's HTML page with status 200).

    A broken deployment, not a bug of the gateway's: retried, fallen back from
    and counted by the circuit breaker like a 5xx. Its reason is the one an
    unreadable answer always had; metadata `protocol_error` says what was wrong.
    """

    reason = "UPSTREAM_PROTOCOL_ERROR"


class UpstreamStreamInterruptedError(UpstreamUnavailableError):
    """The upstream connection broke, or its stream ended early."""

    reason = "UPSTREAM_STREAM_INTERRUPTED"


class DeadlineExceededError(GatewayError):
    """The caller's deadline ran out while waiting for the provider."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "UPSTREAM_TIMEOUT"


class StalledReaderError(GatewayError):
    """The caller read nothing of its stream for `server.stalled_stream_timeout_s`:
    the gateway's time limit for a stream nobody reads, not the caller's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "STALLED_READER"


class UpstreamAuthError(InternalError):
    """The provider rejected the gateway's credentials: a gateway misconfiguration.

    Never UNAUTHENTICATED: the caller's own credentials were fine.
    """

    reason = "UPSTREAM_AUTH_FAILED"


class UpstreamRejectedError(GatewayError):
    """The provider refused the request for a reason the caller may fix (other 4xx)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "UPSTREAM_REJECTED"


# -- Authentication and authorization ----------------------------------------
# Raised by the auth interceptor (interceptors/auth.py) and the model check
# (server/identity.py). Whatever check failed, an unauthenticated caller gets
# the same message and reason, so nothing tells an attacker which one it was.


class UnauthenticatedError(GatewayError):
    """The call carries no credentials, or ones the gateway does not accept."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"

    def __init__(self) -> None:
        super().__init__("missing or invalid credentials")


class PermissionDeniedError(GatewayError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class ModelNotAllowedError(PermissionDeniedError):
    """The caller's key may not use the requested model."""

    reason = "MODEL_NOT_ALLOWED"

    def __init__(self, model: str) -> None:
        super().__init__(f"this key may not use model {clip(model)!r}", metadata={"model": model})


class MissingScopeError(PermissionDeniedError):
    """The caller's key lacks the scope the method needs."""

    reason = "MISSING_SCOPE"

    def __init__(self, scope: str) -> None:
        super().__init__(f"this key lacks the {scope!r} scope", metadata={"scope": scope})


class AuthDisabledError(GatewayError):
    """Authentication is switched off here (local development), so no tokens are issued."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "AUTH_DISABLED"

    def __init__(self, consequence: str = "no token is needed") -> None:
        super().__init__(f"authentication is disabled on this gateway; {consequence}")


class CredentialUnavailableError(InternalError):
    """The gateway cannot read its own credential for a provider (server/credentials.py)."""

    reason = "UPSTREAM_CREDENTIAL_UNAVAILABLE"


# -- Quotas: rate limits and budgets --------------------------------
# Raised by the rate-limit interceptor (interceptors/rate_limit.py) and the
# admission of the servicer (server/accounting/admission.py), always before
# any upstream call.

RETRY_AFTER_HEADER = "retry-after"


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exceeded quota: `subject` names it (`key:<id>:rpm`), `description` says how."""

    subject: str
    description: str


class QuotaExceededError(GatewayError):
    """A gateway quota refuses the call: QuotaFailure says which, RetryInfo when to retry.

    The status also carries a `retry-after` trailer (whole seconds, rounded
    up) for callers that read plain metadata.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(
        self,
        violations: Sequence[QuotaViolation],
        *,
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = list(violations)
        super().__init__(
            "; ".join(v.description for v in self.violations),
            metadata=metadata,
            retry_after=retry_after,
        )

    def detail_messages(self) -> list[ProtoMessage]:
        return [
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=v.subject, description=v.description
                    )
                    for v in self.violations
                ]
            )
        ]

    def to_status(self, request_id: str = "") -> grpc.Status:
        return _with_retry_after(super().to_status(request_id), self.retry_after)


def _with_retry_after(status: grpc.Status, retry_after: float | None) -> grpc.Status:
    """`status` with a `retry-after` trailer (whole seconds, rounded up), if it says when."""
    if retry_after is None:
        return status
    seconds = str(max(1, math.ceil(retry_after)))
    trailers = (*status.trailing_metadata, (RETRY_AFTER_HEADER, seconds))
    return _Status(status.code, status.details, trailers)


class RateLimitExceededError(QuotaExceededError):
    """The key's requests, tokens or concurrent calls per minute are used up."""

    reason = "RATE_LIMIT_EXCEEDED"


class OverLimitError(QuotaExceededError):
    """The call alone is larger than one of the key's limits: no retry can let it through.

    FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: waiting would not help; a
    smaller request (or a larger limit) would.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "REQUEST_OVER_LIMIT"


class BudgetExceededError(QuotaExceededError):
    """The call could cost more than what is left of the key's budget."""

    reason = "BUDGET_EXCEEDED"


class DeploymentRateLimitedError(QuotaExceededError):
    """Every deployment that could serve the call is at the rate limit its provider gives us.

    Raised by the router (server/routing/deployment_limits.py) before any
    upstream request, instead of letting the provider answer 429.
    """

    reason = "DEPLOYMENT_RATE_LIMITED"


class QuotaBackendUnavailableError(UnavailableError):
    """The shared counters (Redis) are unreachable and limits fail closed."""

    reason = "QUOTA_BACKEND_UNAVAILABLE"


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")),
    grpc.Status,
):
    """A grpc.Status with extra trailers (grpc_status's own type is private)."""


def set_call_status(
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    status: grpc.Status,
    trailers: Sequence[tuple[str, str | bytes]] = (),
) -> None:
    """Sets a failed call's status on its context; grpc sends it when the handler
    returns (a unary handler's response is discarded under a non-OK status).

    Handlers and interceptors fail calls this way, not with `context.abort`:
    its AbortError ends in a reference cycle with grpc's frames that keeps the
    handler's frames, and with them the request and all that was decoded from
    it (native memory the garbage collector does not count), until a full
    collection happens to run (tests/test_refused_call_memory.py).
    """
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata((*status.trailing_metadata, *trailers))
