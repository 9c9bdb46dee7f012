"""Turns request bytes that do not parse into INVALID_ARGUMENT.

Without this, grpc answers a payload its deserializer rejects with UNKNOWN
and logs a traceback. This interceptor wraps each handler's deserializer so
a parse failure reaches the handler as a marker, and the handler aborts with
INVALID_ARGUMENT and an ErrorInfo (reason MALFORMED_REQUEST). grpc.aio
drives a streaming handler by whether it is an async-generator function, so
the streaming wrapper re-yields each response: one generator hop per message,
well under a microsecond.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.errors import InvalidArgumentError


class MalformedRequestError(InvalidArgumentError):
    reason = "MALFORMED_REQUEST"

    def __init__(self, method: str) -> None:
        super().__init__([], message=f"the request bytes are not a valid request for {method}")


class _Undecodable:
    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return deserialize


# grpc's type stubs describe method handlers with the synchronous
# ServicerContext; under grpc.aio the behaviours are coroutines taking the aio
# context, so handlers are treated as Any here.
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Any


async def _refuse(method: str, context: Context) -> None:
    status = MalformedRequestError(method).to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers undecodable request messages with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming:
            # Streamed requests are deserialized one by one inside the handler's
            # iterator; none of our services take them.
            return handler
        method = handler_call_details.method
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                if request is _UNDECODABLE:
                    await _refuse(method, context)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, deserializer, handler.response_serializer
            )
        streaming = handler.unary_stream
        if inspect.iscoroutinefunction(streaming):  # writes with context.write (health Watch)

            async def unary_stream_writer(request: Any, context: Context) -> None:
                if request is _UNDECODABLE:
                    await _refuse(method, context)
                await streaming(request, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writer, deserializer, handler.response_serializer
            )

        async def unary_stream(request: Any, context: Context) -> Any:
            if request is _UNDECODABLE:
                await _refuse(method, context)
            async for response in streaming(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, deserializer, handler.response_serializer
        )
