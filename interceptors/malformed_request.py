"""Turns request bytes that do not parse into INVALID_ARGUMENT, and parses large ones in turns.

Without this, grpc answers a payload its deserializer rejects with UNKNOWN
and logs a traceback. This interceptor wraps each handler's deserializer so
a parse failure reaches the handler as a marker, and the handler sets
INVALID_ARGUMENT and an ErrorInfo (reason MALFORMED_REQUEST) and returns.

grpc parses a request on the event loop, right after receiving it; several
large requests arriving together would stall every other call for all of
their parses at once. A request larger than PARSE_AT_ONCE_BYTES is parsed
by the handler instead, in a step of server/loop_turns.py, and the call is
marked large (LARGE_REQUEST) so that the servicer decodes it in a step of
its own too.

grpc.aio drives a streaming handler by whether it is an async-generator
function, so the streaming wrapper re-yields each response: one generator
hop per message, well under a microsecond. The wrappers are built once per
method.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.errors import InvalidArgumentError, set_call_status
from server.loop_turns import LARGE_REQUEST, taking_turns

# A request up to this size is parsed by grpc as it arrives (a millisecond or
# so); a larger one by the handler, in its own step (see the module's doc).
PARSE_AT_ONCE_BYTES = 1024 * 1024


class MalformedRequestError(InvalidArgumentError):
    reason = "MALFORMED_REQUEST"

    def __init__(self, method: str) -> None:
        super().__init__([], message=f"the request bytes are not a valid request for {method}")


class _Undecodable:
    __slots__ = ()


_UNDECODABLE = _Undecodable()


class _Deferred:
    """A large request's bytes, parsed by the handler (`_parsed`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if len(data) > PARSE_AT_ONCE_BYTES:
            return _Deferred(data)
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return deserialize


async def _parsed(deferred: _Deferred, deserializer: Callable[[bytes], Any]) -> Any:
    """A large request, parsed in a step of its own; the call is marked large."""
    LARGE_REQUEST.set(True)
    async with taking_turns(pause_first=True):  # after grpc's copies of it
        try:
            return deserializer(deferred.data)
        except Exception:
            return _UNDECODABLE


# grpc's type stubs describe method handlers with the synchronous
# ServicerContext; under grpc.aio the behaviours are coroutines taking the aio
# context, so handlers are treated as Any here.
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Any


def _refuse(method: str, context: Context) -> None:
    set_call_status(context, MalformedRequestError(method).to_status())


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers undecodable request messages with INVALID_ARGUMENT."""

    def __init__(self) -> None:
        # method -> (the handler grpc gave, the handler wrapped)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

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
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap(handler: Handler, method: str) -> Handler:
    parse = handler.request_deserializer
    deserializer = _tolerant(parse)
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            if request.__class__ is _Deferred:
                request = await _parsed(request, parse)
            if request is _UNDECODABLE:
                return _refuse(method, context)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, deserializer, handler.response_serializer
        )
    streaming = handler.unary_stream
    if inspect.iscoroutinefunction(streaming):  # writes with context.write (health Watch)

        async def unary_stream_writer(request: Any, context: Context) -> None:
            if request.__class__ is _Deferred:
                request = await _parsed(request, parse)
            if request is _UNDECODABLE:
                return _refuse(method, context)
            await streaming(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream_writer, deserializer, handler.response_serializer
        )

    async def unary_stream(request: Any, context: Context) -> Any:
        if request.__class__ is _Deferred:
            request = await _parsed(request, parse)
        if request is _UNDECODABLE:
            _refuse(method, context)
            return
        async for response in streaming(request, context):
            yield response

    return grpc.unary_stream_rpc_method_handler(
        unary_stream, deserializer, handler.response_serializer
    )
