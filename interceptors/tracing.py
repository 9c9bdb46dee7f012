"""Opens an OpenTelemetry SERVER span around each RPC, continuing the caller's trace.

Last in the chain (auth → overload → rate limit → tracing): a refused call
makes no span, and the span covers exactly the handler's work. It is installed only
when tracing is on (server/telemetry/), so an untraced gateway pays nothing.
The caller's W3C `traceparent` (and `baggage`; OTEL_PROPAGATORS decides) is
read from the call's metadata. While the handler runs the span is the
current one, so the observers that run inside it (server/telemetry/
tracing.py) add the GenAI attributes and one child span per upstream
attempt; this module sets the request's attributes and the status.

Status: `rpc.grpc.status_code` always; ERROR for the codes the RPC semantic
conventions count as server failures (UNKNOWN, DEADLINE_EXCEEDED,
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) and, from the call's
record, for any upstream failure; a caller's mistake (INVALID_ARGUMENT,
NOT_FOUND, ...) leaves it unset. The health and reflection services are not
traced. Prompt and completion text are attributes only with
`capture_content`. Like the other interceptors, each wrapper keeps the shape
of what it wraps (async generator or coroutine).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from interceptors.auth import service_of
from llmgateway.v1 import generation_pb2 as pb
from server.config import DEFAULT_PUBLIC_SERVICES
from server.logs import redact

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Any

# Probes and tooling: a span per health check would drown the real calls.
UNTRACED_SERVICES = DEFAULT_PUBLIC_SERVICES
_SERVER_FAILURES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _carrier(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _messages(request: pb.GenerateRequest) -> str:
    """The prompt as gen_ai.input.messages (text parts only)."""
    messages: list[dict[str, object]] = []
    if request.system:
        parts = [{"type": "text", "content": b.text} for b in request.system if b.text]
        messages.append({"role": "system", "parts": parts})
    for message in request.messages:
        role = pb.Role.Name(message.role).removeprefix("ROLE_").lower()
        parts = [{"type": "text", "content": b.text} for b in message.content if b.text]
        messages.append({"role": role, "parts": parts})
    return json.dumps(messages)


def _output(text: str) -> str:
    return json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": text}]}])


def request_attributes(request: Any, capture_content: bool) -> dict[str, AttributeValue]:
    """The GenAI request attributes of a generation request."""
    if not isinstance(request, pb.GenerateRequest):
        model = getattr(request, "model", "")
        return {"gen_ai.request.model": model} if isinstance(model, str) and model else {}
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": request.model,
    }
    if request.HasField("max_tokens"):
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if request.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = request.temperature
    if request.HasField("top_p"):
        attributes["gen_ai.request.top_p"] = request.top_p
    if request.HasField("top_k"):
        attributes["gen_ai.request.top_k"] = request.top_k
    if request.stop_sequences:
        attributes["gen_ai.request.stop_sequences"] = tuple(request.stop_sequences)
    if capture_content:
        attributes["gen_ai.input.messages"] = _messages(request)
    return attributes


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per RPC (but the untraced services), in the caller's trace."""

    def __init__(
        self,
        tracer: trace.Tracer,
        *,
        capture_content: bool = False,
        untraced_services: Iterable[str] = UNTRACED_SERVICES,
    ) -> None:
        self._tracer = tracer
        self._capture = capture_content
        self._untraced = frozenset(untraced_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or service_of(method) in self._untraced:
            return handler
        parent = propagate.extract(_carrier(handler_call_details.invocation_metadata))
        service, _, name = method.lstrip("/").partition("/")
        base: dict[str, AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
        }
        tracer, capture = self._tracer, self._capture
        span_name = method.lstrip("/")

        def start(request: Any) -> tuple[Span, object, asyncio.Task[Any] | None]:
            span = tracer.start_span(
                span_name,
                context=parent,
                kind=SpanKind.SERVER,
                attributes={**base, **request_attributes(request, capture)},
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            return span, token, asyncio.current_task()

        def end(span: Span, token: object, task: object, context: Context, error: Any) -> None:
            # A generator finalised from another task cannot detach (and need
            # not: the call's task, and its context, are gone).
            if asyncio.current_task() is task:
                otel_context.detach(token)  # type: ignore[arg-type]
            code = _code_of(context, error)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_FAILURES:
                details = context.details() if error is None or _aborted(error) else None
                span.set_status(Status(StatusCode.ERROR, redact(str(details or code.name))))
            if error is not None and not _aborted(error) and isinstance(error, Exception):
                span.record_exception(error)
            span.end()

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                span, token, task = start(request)
                try:
                    response = await unary(request, context)
                except BaseException as err:
                    end(span, token, task, context, err)
                    raise
                if capture and isinstance(response, pb.GenerateResponse):
                    text = "".join(block.text for block in response.content)
                    span.set_attribute("gen_ai.output.messages", _output(text))
                end(span, token, task, context, None)
                return response

            return handler._replace(unary_unary=unary_unary)

        streaming = handler.unary_stream
        if not inspect.isasyncgenfunction(streaming):  # writes with context.write

            async def unary_stream_writer(request: Any, context: Context) -> None:
                span, token, task = start(request)
                pieces: list[str] | None = [] if capture else None
                try:
                    if pieces is None:
                        await streaming(request, context)
                    else:
                        await streaming(request, _CapturingContext(context, pieces))
                except BaseException as err:
                    end(span, token, task, context, err)
                    raise
                if pieces is not None:
                    span.set_attribute("gen_ai.output.messages", _output("".join(pieces)))
                end(span, token, task, context, None)

            return handler._replace(unary_stream=unary_stream_writer)

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            span, token, task = start(request)
            pieces: list[str] | None = [] if capture else None
            try:
                async for response in streaming(request, context):
                    if pieces is not None and response.WhichOneof("event") == "content_block_delta":
                        pieces.append(response.content_block_delta.text)
                    yield response
            except BaseException as err:
                end(span, token, task, context, err)
                raise
            if pieces is not None:
                span.set_attribute("gen_ai.output.messages", _output("".join(pieces)))
            end(span, token, task, context, None)

        return handler._replace(unary_stream=unary_stream)


class _CapturingContext:
    """A servicer context whose writes also keep the streamed text (capture_content)."""

    def __init__(self, context: Context, pieces: list[str]) -> None:
        self._context = context
        self._pieces = pieces

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        if (
            isinstance(message, pb.StreamGenerateResponse)
            and message.WhichOneof("event") == "content_block_delta"
        ):
            self._pieces.append(message.content_block_delta.text)
        await self._context.write(message)


def _aborted(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AbortError)


def _code_of(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with."""
    if error is None or _aborted(error):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
