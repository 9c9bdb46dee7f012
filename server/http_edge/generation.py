"""A generation call over HTTP, whatever the wire format: one loop for every protocol.

The Messages, Chat Completions and Responses endpoints differ in how a
request is decoded, how events and errors are written, and which headers
go upstream; each protocol says so in a Dialect (messages.py, chat.py,
responses.py). What they share is here, written once: the call through
the core (calls.py: gate, record, admission), the choice between relaying
the upstream's bytes (a provider of the same format answered, with
RawChunks) and encoding the gateway's events, keep-alive pings while an
upstream is silent, and the end of a stream that fails after it began.

Pings: before the first event the status is not sent, so that a failure
before any content (all retries and fallbacks spent) answers with its own
status; once `http.ping_interval_s` passes in silence the stream commits to
200 and pings, and a later failure ends it with the dialect's error event.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.cache import CACHE_HEADER, CachedCall, ResponseCache, directives_from_headers
from server.calls import CallRecord
from server.errors import (
    FieldViolation,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    ModelNotFoundError,
)
from server.events import RawChunk, ResponseAccumulator, StreamEvent
from server.http_edge.calls import HttpCalls
from server.http_edge.exchange import Exchange
from server.http_edge.json_decoding import (
    free_of_lone_surrogates,
    free_of_lone_surrogates_in_steps,
)
from server.http_edge.unfinished_answers import STALLED_ANSWER
from server.identity import require_model_access
from server.json_members import (
    Members,
    members_of,
    parse_object,
    parse_object_in_steps,
    written_with,
)
from server.loop_turns import LARGE_REQUEST, taking_turns
from server.routing import Route, Router
from server.schema import GenerationRequest, GenerationResponse, Passthrough
from server.stall_watch import CURRENT_WATCH

JSON = "application/json"
SSE_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),  # proxies such as nginx must not buffer the stream
]
# Claude Code and Codex name their session: recorded as the call's end user.
SESSION_HEADERS = ("x-claude-code-session-id", "session-id")


@dataclass(slots=True)
class Decoded:
    """A decoded request, whatever its wire format."""

    request: GenerationRequest
    stream: bool
    # What translating it would lose (server/schema.py's Passthrough).
    untranslatable: list[FieldViolation] = field(default_factory=list)
    # What the dialect needs besides, to finish the request or encode the answer.
    options: dict[str, Any] = field(default_factory=dict)


class Encoder(Protocol):
    def feed(self, event: StreamEvent) -> bytes: ...

    def finish(self) -> bytes: ...


class ErrorDialect(Protocol):
    """How one wire format writes an error answer."""

    def error_response(
        self, error: GatewayError, request_id: str
    ) -> tuple[int, bytes, list[tuple[str, str]]]: ...

    def error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes: ...


class Dialect(ErrorDialect, Protocol):
    """How one wire format reads requests and writes answers and errors."""

    protocol: str  # Passthrough.protocol
    span_name: str  # the server span's name, e.g. "POST /v1/messages"
    ping: bytes  # what keeps a silent stream alive

    def decode(self, document: dict[str, Any], request_id: str, text_checked: bool) -> Decoded:
        """The request; `text_checked`: the body's bytes hold no lone surrogate, the
        decoder need not look for one (json_decoding.py)."""
        ...

    def routed(self, decoded: Decoded, route: Route) -> None:
        """Completes the request once its route is known (e.g. the model's default
        max_tokens for a request that named none)."""
        ...

    def forwarded_headers(self, headers: Mapping[str, str]) -> dict[str, str]: ...

    def relayed(self, document: dict[str, Any]) -> dict[str, Any] | None:
        """What a provider of this format is sent in place of the client's body,
        when it must differ (None, nearly always: the client's bytes as they came)."""
        ...

    def encoder(self, decoded: Decoded, request_id: str) -> Encoder: ...

    def whole(self, response: GenerationResponse, decoded: Decoded, request_id: str) -> bytes: ...

    def stream_error(self, error: GatewayError, encoder: Encoder | None) -> bytes:
        """The event that ends a stream failing after it began (`encoder`: the
        translation's, None when the upstream's bytes were relayed)."""
        ...


# Above this size a body's parse notes where its top-level values lie (a few
# microseconds more, next to a parse of milliseconds): a pass-through that
# changes one then writes it in place without parsing the body again.
FIND_MEMBERS_ABOVE_BYTES = 64 * 1024

# A body up to this size is parsed at once (about a millisecond); a larger one
# in steps of server/loop_turns.py, taking turns with the other heavy work.
PARSE_AT_ONCE_BYTES = 1024 * 1024


async def read_json(body: bytes) -> tuple[dict[str, Any], Members | None]:
    """parse_json, without letting a large body stall the event loop for its whole
    parse, nor large bodies that arrive together for all of theirs.

    json's scanner holds the GIL throughout, so a thread would not help: a
    large body is parsed in steps (server/json_members.py: the values of its
    messages and their content blocks as the walk meets them, a long text in
    pieces), each a turn of `taking_turns`.
    """
    if len(body) <= PARSE_AT_ONCE_BYTES:
        return parse_json(body)
    # A provider that translates it writes its body in steps too (request_content).
    LARGE_REQUEST.set(True)
    async with taking_turns(pause_first=True) as next_step:  # after the body's join
        try:
            parsed = await parse_object_in_steps(body, _DECODER, next_step)
        except (ValueError, RecursionError) as err:
            raise _not_json(err) from None
    return _checked(parsed)


async def _free_of_lone_surrogates(body: bytes) -> bool:
    """free_of_lone_surrogates, a large body's in steps (as read_json parses it)."""
    if len(body) <= PARSE_AT_ONCE_BYTES:
        return free_of_lone_surrogates(body)
    async with taking_turns() as next_step:
        return await free_of_lone_surrogates_in_steps(body, next_step)


async def rewritten(
    body: bytes, members: Members | None, document: dict[str, Any], relayed: dict[str, Any]
) -> bytes:
    """`body` as `relayed` (`document` with some top-level values replaced): the new
    values written where the old ones lie, every other byte kept, a large body's
    in steps (json_members.written_with). Re-encoded whole only when a replaced
    key is given twice, or a key was dropped."""
    changed = {key: value for key, value in relayed.items() if document.get(key) is not value}
    if members is None and len(body) <= FIND_MEMBERS_ABOVE_BYTES:
        members = members_of(body)
    if not relayed.keys() >= document.keys():
        members = None  # a key dropped: written whole
    return await written_with(body, members, changed, relayed)


def parse_json(body: bytes) -> tuple[dict[str, Any], Members | None]:
    """The request body as a JSON object and where its top-level values lie (for a
    pass-through that changes one, server/json_members.py), or a 400 that says
    what is wrong with it."""
    try:
        if len(body) > FIND_MEMBERS_ABOVE_BYTES:
            document, members = parse_object(body, _DECODER)
        else:
            # What json.loads does, on a decoder made once (json.loads makes
            # one per call when given an argument).
            text = body.decode(json.detect_encoding(body), "surrogatepass")
            document, members = _DECODER.decode(text), None
    except (ValueError, RecursionError) as err:
        raise _not_json(err) from None
    return _checked((document, members))


def _not_json(err: Exception) -> InvalidArgumentError:
    return InvalidArgumentError([FieldViolation("body", f"not valid JSON: {err}")])


def _checked(parsed: tuple[Any, Members | None]) -> tuple[dict[str, Any], Members | None]:
    if not isinstance(parsed[0], dict):
        raise InvalidArgumentError([FieldViolation("body", "must be a JSON object")])
    return parsed


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _recordable(model: object) -> str:
    """The model as asked for, for the record of a call refused before decoding
    (JSON may carry lone surrogates, which no ledger can store: the decoder
    refuses them, but the refusal is recorded first)."""
    if not isinstance(model, str):
        return ""
    return model[:256].encode("utf-8", "replace").decode("utf-8")


def _session(headers: Mapping[str, str]) -> str:
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return value[:256]
    return ""


def resolve(router: Router, model: str) -> Route:
    route = router.resolve(model)
    if route is None:
        raise ModelNotFoundError(model)
    return route


class GenerationEndpoint:
    """Runs generation calls of any dialect on the core."""

    def __init__(
        self,
        calls: HttpCalls,
        router: Router,
        ping_interval_s: float,
        *,
        cache: ResponseCache | None = None,
    ) -> None:
        self._calls = calls
        self._router = router
        self._ping_s = ping_interval_s
        # The response cache (server/cache/), when the configuration enables it.
        self.cache = cache

    async def refused(self, dialect: Dialect, exchange: Exchange, error: GatewayError) -> None:
        """Records a call refused before its body was read (too large) and raises
        `error`: the ledger, the call log and the metrics see it like any
        refusal (or the gates' own refusal, should one come first)."""
        async with self._calls.call(
            dialect.protocol, exchange.request_id, exchange.headers, dialect.span_name
        ) as record:
            record.end_user = _session(exchange.headers)
            raise error

    async def run(self, dialect: Dialect, exchange: Exchange, body: bytes) -> None:
        async with self._calls.call(
            dialect.protocol, exchange.request_id, exchange.headers, dialect.span_name
        ) as record:
            record.end_user = _session(exchange.headers)
            document, members = await read_json(body)
            record.model_requested = _recordable(document.get("model"))
            checked = await _free_of_lone_surrogates(body)
            decoded = dialect.decode(document, exchange.request_id, checked)
            request = decoded.request
            route = resolve(self._router, request.model)
            dialect.routed(decoded, route)
            relayed = dialect.relayed(document)
            if relayed is not None:
                body = await rewritten(body, members, document, relayed)
                document, members = relayed, None
            request.passthrough = Passthrough(
                dialect.protocol,
                body,
                document,
                dialect.forwarded_headers(exchange.headers),
                exchange.query,
                decoded.untranslatable,
                members,
            )
            cached = await self._cached(record, request, route, dialect.protocol, exchange)
            try:
                if cached is None or not cached.hit:
                    # A hit costs no tokens: the request limits have counted it already.
                    await self._calls.admit(record, request, route)
                else:
                    record.model_requested = request.model
                    record.request = request
                    if not record.end_user:
                        record.end_user = request.metadata.end_user_id
                if cached is None:
                    events = self._router.stream(request, route)
                else:
                    events = cached.events(request, route, self._router.stream)
                finished = functools.partial(self._calls.finished, record)
                headers = [(CACHE_HEADER, record.cache)] if record.cache else []
                if decoded.stream:
                    await self._stream(
                        dialect, decoded, exchange, events, record.observe, finished, headers
                    )
                else:
                    await self._whole(
                        dialect, decoded, exchange, events, record.observe, finished, headers
                    )
            finally:
                if cached is not None:
                    await cached.close()

    async def _cached(
        self,
        record: CallRecord,
        request: GenerationRequest,
        route: Route,
        protocol: str,
        exchange: Exchange,
    ) -> CachedCall | None:
        """The response cache's lookup, once the caller may use the model."""
        if self.cache is None:
            return None
        require_model_access(request.model, route.model.id)
        directives = directives_from_headers(exchange.headers)
        return await self.cache.open(
            record, request, route, protocol=protocol, directives=directives
        )

    async def _whole(
        self,
        dialect: Dialect,
        decoded: Decoded,
        exchange: Exchange,
        events: AsyncIterator[StreamEvent],
        observe: Any,
        finished: Callable[[], Awaitable[None]],
        headers: list[tuple[str, str]],
    ) -> None:
        # Folded into a response only when no provider relayed the answer's bytes:
        # a relayed answer's events are the gateway's reading of it, for accounting.
        read: list[StreamEvent] = []
        raw: bytes | None = None
        async for event in events:
            observe(event)
            if isinstance(event, RawChunk):
                raw = event.data
            else:
                read.append(event)
        if raw is None:
            accumulator = ResponseAccumulator()
            for event in read:
                accumulator.add(event)
            raw = dialect.whole(accumulator.result(), decoded, exchange.request_id)
        await finished()
        await exchange.respond(200, raw, [("content-type", JSON), *headers])

    async def _stream(
        self,
        dialect: Dialect,
        decoded: Decoded,
        exchange: Exchange,
        events: AsyncIterator[StreamEvent],
        observe: Any,
        finished: Callable[[], Awaitable[None]],
        headers: list[tuple[str, str]],
    ) -> None:
        writer = StreamWriter(exchange, self._ping_s, dialect.ping, headers)
        encoder: Encoder | None = None
        relayed = False
        try:
            async for event in events:
                observe(event)
                if isinstance(event, RawChunk):
                    relayed = True
                    await writer.write(event.data)
                elif not relayed:
                    if encoder is None:
                        encoder = dialect.encoder(decoded, exchange.request_id)
                    data = encoder.feed(event)
                    if data:
                        await writer.write(data)
            await finished()
            if encoder is not None:
                tail = encoder.finish()
                if tail:
                    await writer.write(tail)
        except GatewayError as err:
            if not exchange.started:
                raise
            await writer.write(dialect.stream_error(err, encoder), final=True)
            raise
        except Exception:
            if exchange.started:
                failure = dialect.stream_error(InternalError("internal error"), encoder)
                await writer.write(failure, final=True)
            raise
        finally:
            writer.close()
        await writer.end()


class StreamWriter:
    """Writes a stream's chunks, and pings while nothing else is written.

    Each write waits while the client's socket is full (uvicorn's ASGI send
    awaits its transport's drain), and so does the upstream read behind it.
    The call's StallWatch (server/stall_watch.py, set by HttpCalls) times
    those waits: a client that reads nothing for `server.stalled_stream_timeout_s`
    ends the call, recorded STALLED_READER, and its unfinished answer is left
    to uvicorn to close, as nothing more can be written to it.

    The pings wait on a timer, not in a task of their own: a stream that is
    never silent for `interval` (nearly every stream) starts no task for them.
    """

    __slots__ = (
        "_done",
        "_exchange",
        "_headers",
        "_interval",
        "_last",
        "_lock",
        "_loop",
        "_ping",
        "_pinging",
        "_timer",
    )

    def __init__(
        self,
        exchange: Exchange,
        interval: float,
        ping: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self._exchange = exchange
        # The stream's headers besides SSE_HEADERS (the cache's outcome).
        self._headers = SSE_HEADERS + headers if headers else SSE_HEADERS
        self._interval = interval
        self._ping = ping
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._lock = asyncio.Lock()
        self._done = False
        # The timer runs its callback in a copy of this context, and so the ping
        # task it starts writes under the call's StallWatch.
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._last + interval, self._due
        )
        self._pinging: asyncio.Task[None] | None = None

    async def write(self, data: bytes, *, final: bool = False) -> None:
        watch = CURRENT_WATCH.get()
        if watch is None:
            await self._write(data, final)
        else:
            await watch.write(self._write(data, final))

    async def _write(self, data: bytes, final: bool) -> None:
        async with self._lock:
            if self._done:
                return
            if not self._exchange.started:
                await self._exchange.start(200, self._headers)
            await self._exchange.write(data)
            self._last = self._loop.time()
            self._done = final

    def _due(self) -> None:
        """The timer: a ping if nothing was written for `interval`, else the timer again."""
        due = self._last + self._interval
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._due)
        else:
            self._timer = None
            self._pinging = self._loop.create_task(self._send_ping())

    async def _send_ping(self) -> None:
        await self.write(self._ping)
        self._pinging = None
        if not self._done:
            self._timer = self._loop.call_at(self._last + self._interval, self._due)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pinging is not None:
            self._pinging.cancel()
        watch = CURRENT_WATCH.get()
        if watch is not None and watch.stalled:
            # The client's socket stayed full: not even the answer's end can be
            # written (the error boundary would wait on it forever). uvicorn
            # closes the connection; its word on it is not an error here.
            self._done = self._exchange.ended = True
            STALLED_ANSWER.set(True)

    async def end(self) -> None:
        watch = CURRENT_WATCH.get()
        if watch is None:
            await self._end()
        else:
            await watch.write(self._end())

    async def _end(self) -> None:
        async with self._lock:
            if not self._exchange.started:
                await self._exchange.start(200, self._headers)
            await self._exchange.end()
