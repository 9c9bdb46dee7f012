"""The Anthropic Messages API: `POST /v1/messages`, `count_tokens` and `GET /v1/models`.

Two paths, chosen by where the model routes, on one core call (calls.py):

- Pass-through, to an Anthropic deployment: the body goes upstream as it
  came (only `model` renamed for an alias) with every `anthropic-*` header,
  and the upstream's bytes come back as RawChunks, written as they arrive;
  its error answers are relayed with their status. The gateway reads what it
  checks, reserves and prices (model, `max_tokens`, the prompt's size) from
  the very body it forwards.
- Translation, to any other deployment: the body is decoded into the
  gateway's request (messages_decoding.py) and the events are encoded in
  Anthropic's SSE grammar (messages_encoding.py). Fields the translation
  cannot carry are refused with a 400 that names them.

While an upstream is silent, a stream gets `event: ping` every
`http.ping_interval_s`, at event boundaries; after a first ping the status
(200) is sent, so a later failure ends the stream with `event: error`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from server.config import HttpConfig
from server.errors import (
    FieldViolation,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    ModelNotFoundError,
)
from server.events import RawChunk, ResponseAccumulator, StreamEvent
from server.http_edge.calls import HttpCalls
from server.http_edge.errors import JSON, stream_error_event
from server.http_edge.exchange import Exchange
from server.http_edge.messages_decoding import decode_count_tokens, decode_messages
from server.http_edge.messages_encoding import StreamEncoder, encode_message, ping_event
from server.identity import current_identity, require_model_access
from server.providers._upstream import GATEWAY_HEADERS
from server.routing import Route, Router
from server.schema import ANTHROPIC_MESSAGES, ModelInfo, Passthrough
from server.token_estimate import count_request

log = logging.getLogger(__name__)

SSE_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),  # proxies such as nginx must not buffer the stream
]
SESSION_HEADER = "x-claude-code-session-id"
# Listed models carry no release date; the list shape requires one.
_CREATED_AT = "2025-01-01T00:00:00Z"


def forwarded_headers(exchange: Exchange) -> dict[str, str]:
    """The client's `anthropic-*` headers (version, betas, any new one) for the upstream.

    Credentials and billing routing (anthropic-workspace-id) stay the gateway's.
    """
    return {
        name: value
        for name, value in exchange.headers.items()
        if name.startswith("anthropic-") and name not in GATEWAY_HEADERS
    }


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise InvalidArgumentError([FieldViolation("body", f"not valid JSON: {err}")]) from None
    if not isinstance(document, dict):
        raise InvalidArgumentError([FieldViolation("body", "must be a JSON object")])
    return document


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class MessagesApi:
    """Serves the Messages endpoints on the gateway's core."""

    def __init__(self, calls: HttpCalls, router: Router, config: HttpConfig) -> None:
        self._calls = calls
        self._router = router
        self._ping_s = config.ping_interval_s

    def _route(self, model: str) -> Route:
        route = self._router.resolve(model)
        if route is None:
            raise ModelNotFoundError(model)
        return route

    # -- POST /v1/messages ---------------------------------------------------------

    async def create(self, exchange: Exchange, body: bytes) -> None:
        async with self._calls.call(
            ANTHROPIC_MESSAGES, exchange.request_id, exchange.headers, "POST /v1/messages"
        ) as record:
            record.end_user = exchange.headers.get(SESSION_HEADER, "")[:256]
            document = parse_json(body)
            if isinstance(document.get("model"), str):
                record.model_requested = document["model"]
            decoded = decode_messages(document, request_id=exchange.request_id, deadline=None)
            request = decoded.request
            route = self._route(request.model)
            request.passthrough = Passthrough(
                ANTHROPIC_MESSAGES,
                body,
                document,
                forwarded_headers(exchange),
                exchange.query,
                decoded.untranslatable,
            )
            await self._calls.admit(record, request, route)
            events = self._router.stream(request, route)
            if decoded.stream:
                await self._stream(exchange, events, record.observe)
            else:
                await self._whole(exchange, events, record.observe)

    async def _whole(
        self, exchange: Exchange, events: AsyncIterator[StreamEvent], observe: Any
    ) -> None:
        accumulator = ResponseAccumulator()
        raw: bytes | None = None
        async for event in events:
            observe(event)
            if isinstance(event, RawChunk):
                raw = event.data
            else:
                accumulator.add(event)
        if raw is None:
            document = encode_message(accumulator.result())
            raw = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        await exchange.respond(200, raw, [("content-type", JSON)])

    async def _stream(
        self, exchange: Exchange, events: AsyncIterator[StreamEvent], observe: Any
    ) -> None:
        writer = _StreamWriter(exchange, self._ping_s)
        encoder: StreamEncoder | None = None
        relayed = False
        try:
            async for event in events:
                observe(event)
                if isinstance(event, RawChunk):
                    relayed = True
                    await writer.write(event.data)
                elif not relayed:
                    if encoder is None:
                        encoder = StreamEncoder()
                    data = encoder.feed(event)
                    if data:
                        await writer.write(data)
            if encoder is not None:
                tail = encoder.finish()
                if tail:
                    await writer.write(tail)
        except GatewayError as err:
            if not exchange.started:
                raise
            await writer.write(stream_error_event(err), final=True)
            raise
        except Exception:
            if exchange.started:
                await writer.write(stream_error_event(InternalError("internal error")), final=True)
            raise
        finally:
            writer.close()
        await writer.end()

    # -- POST /v1/messages/count_tokens ----------------------------------------------

    async def count_tokens(self, exchange: Exchange, body: bytes) -> None:
        document = parse_json(body)
        request = decode_count_tokens(document, deadline=None)
        route = self._route(request.model)
        require_model_access(request.model, route.model.id)
        request.passthrough = Passthrough(
            ANTHROPIC_MESSAGES, body, document, forwarded_headers(exchange), exchange.query
        )
        count = await self._router.count_tokens(request, route)
        tokens = count.input_tokens
        if count.estimated or not any(
            ANTHROPIC_MESSAGES in d.provider.relays for d in route.deployments
        ):
            # Never below what the gateway itself will hold the request to (the
            # context window, the key's tokens per minute): Claude Code compacts
            # its conversation on this count.
            tokens = max(tokens, count_request(request.system, request.messages, request.tools))
        payload = json.dumps({"input_tokens": tokens}).encode()
        await exchange.respond(200, payload, [("content-type", JSON)])

    # -- GET /v1/models ------------------------------------------------------------------

    def _visible(self) -> list[ModelInfo]:
        models = self._router.models()
        identity = current_identity()
        if identity is not None:
            models = [m for m in models if identity.may_use((m.id, *m.aliases))]
        return models

    async def list_models(self, exchange: Exchange) -> None:
        data = [_model_entry(m) for m in self._visible()]
        document = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
        await exchange.respond(200, json.dumps(document).encode(), [("content-type", JSON)])

    async def get_model(self, exchange: Exchange, model_id: str) -> None:
        for model in self._visible():
            if model_id == model.id or model_id in model.aliases:
                payload = json.dumps(_model_entry(model)).encode()
                await exchange.respond(200, payload, [("content-type", JSON)])
                return
        raise ModelNotFoundError(model_id)


def _model_entry(model: ModelInfo) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model.id,
        "display_name": model.display_name or model.id,
        "created_at": _CREATED_AT,
        "max_input_tokens": model.context_window,
        "max_tokens": model.max_output_tokens,
    }


class _StreamWriter:
    """Writes a stream's chunks, and pings while nothing else is written."""

    __slots__ = ("_done", "_exchange", "_interval", "_last", "_lock", "_loop", "_pinger")

    def __init__(self, exchange: Exchange, interval: float) -> None:
        self._exchange = exchange
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._lock = asyncio.Lock()
        self._done = False
        self._pinger = self._loop.create_task(self._ping())

    async def write(self, data: bytes, *, final: bool = False) -> None:
        async with self._lock:
            if self._done:
                return
            if not self._exchange.started:
                await self._exchange.start(200, SSE_HEADERS)
            await self._exchange.write(data)
            self._last = self._loop.time()
            self._done = final

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self._last + self._interval - self._loop.time())
            if self._loop.time() - self._last >= self._interval:
                await self.write(ping_event())

    def close(self) -> None:
        self._pinger.cancel()

    async def end(self) -> None:
        async with self._lock:
            if not self._exchange.started:
                await self._exchange.start(200, SSE_HEADERS)
            await self._exchange.end()
