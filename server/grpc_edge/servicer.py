"""The GenerationService servicer: the edge between gRPC and the gateway.

Each RPC decodes and validates its protobuf request (server/grpc_edge/decoding.py),
hands the internal request to the router and encodes what comes back.
Generate folds the very event stream StreamGenerate forwards. This module
is also the error boundary: the one place a GatewayError (or an unexpected
exception) becomes a gRPC status with google.rpc details.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # type: ignore[import-not-found]

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.cache import CACHE_HEADER, CachedCall, ResponseCache, directives_from_metadata
from server.cache.cache import Upstream
from server.cache.idempotency import Idempotency
from server.calls import (
    CallObserver,
    CallRecord,
    Drain,
    Durability,
    accounted,
    close_record,
    open_record,
    random_id,
)
from server.errors import (
    FieldViolation,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    set_call_status,
)
from server.events import MessageStart, ResponseAccumulator, StreamEvent
from server.grpc_edge.coalescing import coalesce
from server.grpc_edge.decoding import decode_count_tokens, decode_generate
from server.grpc_edge.encoding import encode_event, encode_models, encode_response
from server.grpc_edge.expired_calls import SERVED_CALL
from server.grpc_edge.pages import page_of
from server.identity import current_identity, require_model_access
from server.loop_turns import LARGE_REQUEST, taking_turns
from server.routing import Route, Router
from server.schema import GenerationRequest
from server.stall_watch import watching

if TYPE_CHECKING:
    from server.accounting import Admission

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# The provider's id for the call, for a caller who must quote it to the provider.
UPSTREAM_REQUEST_ID_HEADER = "x-upstream-request-id"
# The edge's protocol, in the response cache's keys (the HTTP edge's are its formats').
EDGE_PROTOCOL = "grpc"
# Request ids travel in metadata, so they must be printable ASCII.
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id_of(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's request id (field, then x-request-id metadata) or a new one."""
    given = getattr(request, "request_id", "")
    if given:
        if not _REQUEST_ID.match(given):
            raise InvalidArgumentError(
                [FieldViolation("request_id", "must be 1-128 printable ASCII characters")]
            )
        return str(given)
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return random_id()


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """When the caller's deadline runs out, on the event loop's clock; None: no deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


def _trailers(
    request_id: str, upstream_request_id: str = "", cache: str = ""
) -> tuple[tuple[str, str], ...]:
    trailers = [(REQUEST_ID_HEADER, request_id)]
    if upstream_request_id:
        trailers.append((UPSTREAM_REQUEST_ID_HEADER, upstream_request_id))
    if cache:  # the response cache's outcome (server/cache/), when it is on for the model
        trailers.append((CACHE_HEADER, cache))
    return tuple(trailers)


def _fail(
    context: grpc.aio.ServicerContext[Any, Any], error: GatewayError, request_id: str
) -> None:
    """Sets `error` as the call's status; grpc sends it when the handler returns."""
    upstream_request_id = error.metadata.get("upstream_request_id", "")
    set_call_status(
        context, error.to_status(request_id), _trailers(request_id, upstream_request_id)
    )


class _SendFailed(asyncio.CancelledError):
    """grpc core failed to send a message: the caller is gone (it cancelled, or
    its deadline passed) or the message was over `server.max_send_message_bytes`.

    A CancelledError so that the call is recorded as one its caller left (server/
    calls.py `accounted`); the error boundary then hands grpc its own
    ExecuteBatchError back, which grpc logs as it did when it sent the messages
    itself (server/grpc_edge/expired_calls.py).
    """

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error


@asynccontextmanager
async def error_boundary(
    context: grpc.aio.ServicerContext[Any, Any], record: CallRecord | None = None
) -> AsyncIterator[None]:
    """Turns any failure inside into a gRPC status: never UNKNOWN, never a traceback.

    The status is set on the context and the failure is suppressed: the
    handler goes on after the block and returns (a unary handler an empty
    response, which grpc discards under a non-OK status). Not
    `context.abort`, which would keep the request alive (server/errors.py
    `set_call_status`).

    The request id for the status details is read from `record` when the
    failure happens (it is known only once the request has been read).
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except _SendFailed as failed:
        raise failed.error from None
    except GatewayError as err:
        _fail(context, err, record.request_id if record else "")
    except Exception:
        request_id = record.request_id if record else ""
        log.exception("unhandled error serving request %s", request_id)
        _fail(context, InternalError(f"internal error (request id {request_id})"), request_id)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves llmgateway.v1.GenerationService on a Router."""

    def __init__(
        self,
        router: Router,
        *,
        coalesce_deltas: bool = True,
        stalled_stream_timeout_s: float = 0.0,
    ) -> None:
        self._router = router
        self._coalesce = coalesce_deltas
        # A stream whose caller reads nothing this long ends (0: never).
        self.stalled_stream_timeout_s = stalled_stream_timeout_s
        self._in_flight = 0
        # Called with each finished generation call's record (server/calls.py).
        self.observers: list[CallObserver] = []
        # Reserves tokens per minute and budget once the request is decoded
        # (server/accounting/admission.py); settled by an observer.
        self.admission: Admission | None = None
        # ledger.durability: sync: the final status waits for the call's row.
        self.durable: Durability | None = None
        # The gateway's drain: calls it cuts are recorded UNAVAILABLE.
        self.drain: Drain | None = None
        # The response cache (server/cache/), when the configuration enables it.
        self.cache: ResponseCache | None = None
        # The first answers of calls that named a request id (server/cache/idempotency.py).
        self.idempotency: Idempotency | None = None

    @contextmanager
    def _tracked(self) -> Iterator[None]:
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        """Generation calls being served right now (reported when draining)."""
        return self._in_flight

    def record_refused(self, error: GatewayError, method: str, request: Any, context: Any) -> None:
        """Records a call an interceptor refused before it reached us (a rate limit).

        Every call is recorded exactly once, refusals included, so the ledger,
        the metrics and the per-call log see it like any other call.
        """
        record = open_record(method.rpartition("/")[2], getattr(request, "model", ""))
        try:
            record.request_id = request_id_of(request, context)
        except GatewayError:
            record.request_id = random_id()
        close_record(record, self.observers, error.code, error.reason)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        record = open_record("Generate", request.model)
        SERVED_CALL.set(context)
        with self._tracked():
            deadline = deadline_of(context)
            async with error_boundary(context, record), self._accounted(record, deadline):
                request_id, internal, route, cached = await self._admitted(record, request, context)
                internal.incremental = False
                try:
                    accumulator = ResponseAccumulator()
                    async for event in self._events(internal, route, cached):
                        record.observe(event)
                        accumulator.add(event)
                finally:
                    for call in cached:
                        await call.close()
                response = accumulator.result()
                context.set_trailing_metadata(
                    _trailers(request_id, response.upstream_request_id, record.cache)
                )
                return encode_response(response)
        return pb.GenerateResponse()  # error_boundary has set the failure's status

    async def StreamGenerate(  # type: ignore[override]  # writes with context.write
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Writes each event as it comes, each write waiting for the caller's flow
        control (a handler that yields is paced the same way; writing here lets a
        write that waits too long be timed: server/stall_watch.py)."""
        record = open_record("StreamGenerate", request.model)
        SERVED_CALL.set(context)
        with self._tracked():
            deadline = deadline_of(context)
            async with error_boundary(context, record), self._accounted(record, deadline):
                request_id, internal, route, cached = await self._admitted(record, request, context)
                context.set_trailing_metadata(_trailers(request_id, cache=record.cache))
                events = self._events(internal, route, cached)
                # A hit replays the stored events one by one, as they first came.
                hit = any(call.hit for call in cached)
                if self._coalesce and not route.provider.exact_chunks and not hit:
                    events = coalesce(events)
                try:
                    async with watching(self.stalled_stream_timeout_s) as watch:
                        async for event in events:
                            record.observe(event)
                            if isinstance(event, MessageStart) and event.upstream_request_id:
                                trailers = _trailers(
                                    request_id, event.upstream_request_id, record.cache
                                )
                                context.set_trailing_metadata(trailers)
                            if watch is None:
                                await context.write(encode_event(event))
                            else:
                                await watch.write(context.write(encode_event(event)))
                except ExecuteBatchError as err:
                    raise _SendFailed(err) from err
                finally:
                    # However the call ends, the upstream is closed now, not when
                    # the garbage collector finalises the stream.
                    aclose = getattr(events, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    for call in cached:
                        await call.close()

    def _accounted(
        self, record: CallRecord, deadline: float | None
    ) -> AbstractAsyncContextManager[None]:
        """The call closes `record` however it ends (server/calls.py `accounted`)."""
        return accounted(record, self.observers, deadline, durable=self.durable, drain=self.drain)

    async def _admitted(
        self,
        record: CallRecord,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[str, GenerationRequest, Route, tuple[CachedCall, ...]]:
        """Everything a generation call passes before any upstream call: its request
        id, the decoded request and its route, the model check, the first answer of
        its request id (server/cache/idempotency.py) and the response cache's lookup
        (the calls they opened, to be closed when the call ends), and the quotas that
        need the decoded request (not for a replay or a cache hit, which cost no
        tokens: the request limits have counted them already)."""
        request_id = record.request_id = request_id_of(request, context)
        if LARGE_REQUEST.get():  # decoded in a step of its own (server/loop_turns.py)
            async with taking_turns():
                internal, route = decode_generate(
                    request, self._router, request_id, deadline_of(context)
                )
        else:
            internal, route = decode_generate(
                request, self._router, request_id, deadline_of(context)
            )
        # Here, not in the auth interceptor: the model is known only once
        # the request is decoded and its alias resolved.
        require_model_access(request.model, route.model.id)
        # Prices a call that ends without final usage, until the serving
        # deployment's MessageStart names its own prices.
        record.pricing = route.model.pricing
        record.request = internal
        record.end_user = internal.metadata.end_user_id
        opened: list[CachedCall] = []
        try:
            # The request id in the field, not the x-request-id metadata that
            # proxies set on every call: only the caller's own id is a promise.
            if self.idempotency is not None and request.request_id:
                first = await self.idempotency.open(record, internal, route, protocol=EDGE_PROTOCOL)
                if first is not None:
                    opened.append(first)
                    if first.hit:
                        return request_id, internal, route, (first,)
            if self.cache is not None:
                directives = directives_from_metadata(context.invocation_metadata())
                cached = await self.cache.open(
                    record, internal, route, protocol=EDGE_PROTOCOL, directives=directives
                )
                if cached is not None:
                    opened.insert(0, cached)
            if self.admission is not None and not any(call.hit for call in opened):
                await self.admission.admit(record, internal, route)
        except BaseException:
            for call in opened:
                await call.close()
            raise
        return request_id, internal, route, tuple(opened)

    def _events(
        self, internal: GenerationRequest, route: Route, opened: tuple[CachedCall, ...]
    ) -> AsyncIterator[StreamEvent]:
        """The router's events, through the response cache and then the request
        id's store (`opened`, in that order), each replaying on a hit."""
        events: Upstream = self._router.stream
        for call in opened:
            events = functools.partial(call.events, upstream=events)
        return events(internal, route)

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CountTokensResponse:
        async with error_boundary(context):
            if LARGE_REQUEST.get():
                async with taking_turns():
                    internal, route = decode_count_tokens(
                        request, self._router, deadline_of(context)
                    )
            else:
                internal, route = decode_count_tokens(request, self._router, deadline_of(context))
            require_model_access(request.model, route.model.id)
            count = await self._router.count_tokens(internal, route)
            return pb.CountTokensResponse(
                input_tokens=count.input_tokens, estimated=count.estimated
            )
        return pb.CountTokensResponse()  # error_boundary has set the failure's status

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        async with error_boundary(context):
            models = self._router.models(request.provider)
            identity = current_identity()
            if identity is not None:
                # A key sees only the models it may call (by id or alias).
                models = [m for m in models if identity.may_use((m.id, *m.aliases))]
            page = page_of(
                len(models),
                page_size=request.page_size,
                page_token=request.page_token,
                filters=(request.provider,),
            )
            response = encode_models(models[page.start : page.end])
            response.next_page_token = page.next_token
            return response
        return pb.ListModelsResponse()  # error_boundary has set the failure's status
