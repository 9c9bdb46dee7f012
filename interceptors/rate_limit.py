"""Per-key requests per minute and concurrent calls, refused before the handler works.

Second in the chain (auth → rate limit → tracing): the auth interceptor has
bound the caller's Identity while this one builds its handler, so a key
without these limits gets the handler back untouched (no per-call cost at
all). For a limited key the handler is wrapped: when it starts, it takes a
concurrency slot and one request from the key's minute, or aborts with
RESOURCE_EXHAUSTED, a QuotaFailure naming the limit, RetryInfo and a
`retry-after` trailer, before the servicer has decoded anything or called
an upstream. The slot is given back when the handler ends, however it ends.

Tokens per minute and budgets need the decoded request, so they are
reserved by the servicer (server/accounting/admission.py). Retries happen
inside the router, below this interceptor: a call counts once however many
upstream attempts it takes.
"""

from __future__ import annotations

import inspect
import math
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from server.accounting.backend import Background, QuotaBackend
from server.accounting.quotas import EffectiveLimits, QuotaPolicy
from server.errors import GatewayError, QuotaViolation, RateLimitExceededError
from server.identity import current_identity

Context = grpc.aio.ServicerContext[Any, Any]
# grpc's stubs type method handlers for the sync server (see malformed_request.py).
Handler = Any
Behavior = Callable[..., Any]

# A slot outlives a replica that died holding it by at most this long.
SLOT_TTL_S = 3600.0
# When a concurrency slot frees up is unknown: suggest retrying this soon.
CONCURRENCY_RETRY_S = 1.0


def rpm_key(key_id: str) -> str:
    return f"rpm:{{{key_id}}}"


def slots_key(key_id: str) -> str:
    return f"inflight:{{{key_id}}}"


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Enforces requests per minute and concurrent calls per key on `methods`."""

    def __init__(
        self,
        policy: QuotaPolicy,
        backend: QuotaBackend,
        background: Background,
        *,
        methods: Iterable[str],
    ) -> None:
        self._policy = policy
        self._backend = backend
        self._background = background
        self._methods = frozenset(methods)
        # Called with each refusal, the method, its request and context: the
        # gateway records the refused call like any other (ledger, metrics, log).
        self.refusal_hooks: list[Callable[[GatewayError, str, Any, Context], None]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self._methods:
            return handler
        identity = current_identity()
        limits = self._policy.limits_for(identity)
        if limits is None or not limits.gates_calls:
            return handler
        key_id = identity.key_id if identity is not None else ""
        behaviors = {
            name: self._limited(getattr(handler, name), key_id, limits, handler_call_details.method)
            for name in ("unary_unary", "unary_stream")
            if getattr(handler, name) is not None
        }
        return handler._replace(**behaviors)

    async def _enter(
        self, key_id: str, limits: EffectiveLimits, holder: str
    ) -> GatewayError | None:
        """Takes a slot and a request, or says why not (taking nothing)."""
        cap = limits.max_concurrent
        if cap is not None and not await self._backend.enter(
            slots_key(key_id), cap, holder, SLOT_TTL_S
        ):
            return RateLimitExceededError(
                [
                    QuotaViolation(
                        f"key:{key_id}:max_concurrent",
                        f"this key already has {cap} calls in flight, its limit",
                    )
                ],
                retry_after=CONCURRENCY_RETRY_S,
                metadata={"limit": "max_concurrent", "key_id": key_id},
            )
        rpm = limits.requests_per_minute
        if rpm is not None:
            try:
                wait = await self._backend.take(rpm_key(key_id), rpm, 1)
            except BaseException:
                if cap is not None:
                    self._leave(key_id, holder)
                raise
            if wait:
                if cap is not None:
                    self._leave(key_id, holder)
                return RateLimitExceededError(
                    [
                        QuotaViolation(
                            f"key:{key_id}:requests_per_minute",
                            f"this key's limit of {rpm} requests per minute is used up",
                        )
                    ],
                    retry_after=60.0 if math.isinf(wait) else wait,
                    metadata={"limit": "requests_per_minute", "key_id": key_id},
                )
        return None

    def _leave(self, key_id: str, holder: str) -> None:
        self._background.run("leave", self._backend.leave(slots_key(key_id), holder))

    def _limited(
        self, behavior: Behavior, key_id: str, limits: EffectiveLimits, method: str
    ) -> Behavior:
        """`behavior` behind the key's limits, in the same shape (see auth.py)."""
        has_slot = limits.max_concurrent is not None

        async def refuse(error: GatewayError, request: Any, context: Context) -> None:
            for hook in self.refusal_hooks:
                hook(error, method, request, context)
            status = error.to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: Context) -> Any:
                holder = uuid.uuid4().hex
                try:
                    error = await self._enter(key_id, limits, holder)
                except GatewayError as err:  # the backend is down and fails closed
                    error = err
                if error is not None:
                    await refuse(error, request, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    if has_slot:
                        self._leave(key_id, holder)

            return streaming

        async def unary(request: Any, context: Context) -> Any:
            holder = uuid.uuid4().hex
            try:
                error = await self._enter(key_id, limits, holder)
            except GatewayError as err:
                error = err
            if error is not None:
                await refuse(error, request, context)
            try:
                return await behavior(request, context)
            finally:
                if has_slot:
                    self._leave(key_id, holder)

        return unary
