"""Per-key requests per minute and concurrent calls, refused before the handler works.

Third in the chain (auth → overload → rate limit → tracing): the auth
interceptor has bound the caller's Identity while this one builds its
handler, so a key
without these limits gets the handler back untouched (no per-call cost at
all). For a limited key the handler is wrapped: when it starts, it passes
the core's CallGate (server/accounting/call_gate.py: a concurrency slot and
one request from the key's minute), or aborts with RESOURCE_EXHAUSTED, a
QuotaFailure naming the limit, RetryInfo and a `retry-after` trailer, before
the servicer has decoded anything or called an upstream. The slot is given
back when the handler ends, however it ends. The HTTP front door passes the
same gate.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from server.accounting.call_gate import CallGate
from server.accounting.quotas import EffectiveLimits
from server.calls import random_id
from server.errors import GatewayError, set_call_status
from server.identity import current_identity

Context = grpc.aio.ServicerContext[Any, Any]
# grpc's stubs type method handlers for the sync server (see malformed_request.py).
Handler = Any
Behavior = Callable[..., Any]


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Enforces requests per minute and concurrent calls per key on `methods`."""

    def __init__(self, gate: CallGate, *, methods: Iterable[str]) -> None:
        self._gate = gate
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
        limits = self._gate.limits_for(identity)
        if limits is None:
            return handler
        key_id = identity.key_id if identity is not None else ""
        behaviors = {
            name: self._limited(getattr(handler, name), key_id, limits, handler_call_details.method)
            for name in ("unary_unary", "unary_stream")
            if getattr(handler, name) is not None
        }
        return handler._replace(**behaviors)

    def _limited(
        self, behavior: Behavior, key_id: str, limits: EffectiveLimits, method: str
    ) -> Behavior:
        """`behavior` behind the key's limits, in the same shape (see auth.py)."""
        has_slot = limits.max_concurrent is not None

        def refuse(error: GatewayError, request: Any, context: Context) -> None:
            """Records the refusal and sets its status; the caller returns at once."""
            for hook in self.refusal_hooks:
                hook(error, method, request, context)
            set_call_status(context, error.to_status())

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: Context) -> Any:
                holder = random_id()
                error = await self._gate.admit(key_id, limits, holder)
                if error is not None:
                    refuse(error, request, context)
                    return
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    if has_slot:
                        self._gate.leave(key_id, holder)

            return streaming

        async def unary(request: Any, context: Context) -> Any:
            holder = random_id()
            error = await self._gate.admit(key_id, limits, holder)
            if error is not None:
                refuse(error, request, context)
                return None
            try:
                return await behavior(request, context)
            finally:
                if has_slot:
                    self._gate.leave(key_id, holder)

        return unary
