"""When the client calls again after a failure: `max_retries`, as the official SDKs have it.

Which failures: UNAVAILABLE (the gateway draining or restarting, a refused
connection, every upstream deployment down) and RESOURCE_EXHAUSTED that
carries RetryInfo (a rate limit that ends). A quota or budget refusal
without RetryInfo is not retried, and neither is anything else
(INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, DEADLINE_EXCEEDED,
INTERNAL, ...): asking again would get the same answer.

How long to wait: RetryInfo's delay when the gateway sent one (no retry
when it is over a minute: that is the caller's decision), else 0.5 s
doubling to 8 s, less up to a quarter of jitter. A retry gets what is left
of the call's deadline, never a fresh one, and is not made when the wait
would use it all.

Where: around the whole call, above the token interceptors
(clients/credentials.py), so each attempt carries a valid token and keeps
its own once-only UNAUTHENTICATED retry. A stream is retried only before
its first event, so no event is delivered twice. grpc's own retry policy
is off (clients/_channel.py): one layer retries, and `max_retries=0` means
one attempt.

A generation call that may be retried carries a request id (one of its own
when the caller gave none): the gateway answers a retry of a call that did
succeed, whose answer was lost on the way, with that answer, instead of
running and billing it again (server/cache/idempotency.py).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import grpc

from llmgateway.v1 import generation_pb2 as pb

from .errors import GatewayError

__all__ = ["DEFAULT_MAX_RETRIES", "retry_delay", "with_request_id"]

DEFAULT_MAX_RETRIES = 2
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# A RetryInfo delay longer than this is not waited for.
MAX_RETRY_INFO_S = 60.0


def retry_delay(
    error: GatewayError,
    retries: int,
    max_retries: int,
    remaining: float | None,
    rng: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before retrying after `retries` retries, or None: raise `error`."""
    if retries >= max_retries:
        return None
    if error.code == grpc.StatusCode.UNAVAILABLE:
        pass
    elif error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or error.retry_delay is None:
        return None
    if error.retry_delay is not None:
        if error.retry_delay > MAX_RETRY_INFO_S:
            return None
        delay = max(0.0, error.retry_delay)
    else:
        delay = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2**retries) * (1 - 0.25 * rng())
    if remaining is not None and delay >= remaining:
        return None
    return delay


def with_request_id(request: pb.GenerateRequest, max_retries: int) -> pb.GenerateRequest:
    """`request`, given a request id of its own when it may be retried and has
    none (a copy: the caller's message is left as it is)."""
    if max_retries <= 0 or request.request_id:
        return request
    named = pb.GenerateRequest()
    named.CopyFrom(request)
    named.request_id = uuid.uuid4().hex
    return named
