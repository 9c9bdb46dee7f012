"""The process-wide bound on calls in flight, applied to gRPC generation calls.

After auth, before the per-key rate limit (auth → overload → rate limit →
tracing): a call that finds every slot of the core's OverloadGate
(server/accounting/overload_gate.py) taken, and none freed within
`server.max_queue_s`, is aborted with UNAVAILABLE, reason
GATEWAY_OVERLOADED, RetryInfo and a `retry-after` trailer, before the
servicer decodes anything; the refusal is recorded like any call (the
gateway's `refusal_hooks`). The slot is given back when the handler ends,
however it ends. Other methods (health, token, usage) pass untouched, so a
full gateway still answers its probes. The wrapped handler of a method is
kept, and built again only when the handler under it is a new one.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from server.accounting.overload_gate import OverloadGate
from server.errors import GatewayError, set_call_status

Context = grpc.aio.ServicerContext[Any, Any]
# grpc's stubs type method handlers for the sync server (see malformed_request.py).
Handler = Any
Behavior = Callable[..., Any]


class OverloadInterceptor(grpc.aio.ServerInterceptor):
    """Bounds the calls of `methods` in flight with `gate`."""

    def __init__(self, gate: OverloadGate, *, methods: Iterable[str]) -> None:
        self._gate = gate
        self._methods = frozenset(methods)
        # Called with each refusal, the method, its request and context: the
        # gateway records the refused call like any other (ledger, metrics, log).
        self.refusal_hooks: list[Callable[[GatewayError, str, Any, Context], None]] = []
        # method -> (the handler grpc gave, the handler wrapped)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._methods or not self._gate.max_calls:
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        behaviors = {
            name: self._bounded(getattr(handler, name), method)
            for name in ("unary_unary", "unary_stream")
            if getattr(handler, name) is not None
        }
        wrapped = handler._replace(**behaviors)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _bounded(self, behavior: Behavior, method: str) -> Behavior:
        """`behavior` behind the gate, in the same shape (see auth.py)."""
        gate = self._gate

        def refuse(error: GatewayError, request: Any, context: Context) -> None:
            """Records the refusal and sets its status; the caller returns at once."""
            for hook in self.refusal_hooks:
                hook(error, method, request, context)
            set_call_status(context, error.to_status())

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: Context) -> Any:
                error = await gate.enter()
                if error is not None:
                    refuse(error, request, context)
                    return
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    gate.leave()

            return streaming

        async def unary(request: Any, context: Context) -> Any:
            error = await gate.enter()
            if error is not None:
                refuse(error, request, context)
                return None
            try:
                return await behavior(request, context)
            finally:
                gate.leave()

        return unary
