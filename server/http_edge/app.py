"""The HTTP front door as one ASGI application: routes, credentials, the error boundary.

A pure ASGI callable (no framework middleware: Starlette's
BaseHTTPMiddleware breaks streaming and cancellation, and a table lookup is
all the routing this needs). Per request: find the endpoint (404 in
Anthropic's error shape otherwise), authenticate with the core's
Authenticator (the key or token in `x-api-key` or `Authorization: Bearer`,
one message for every failure, as on gRPC), read the body within
`http.max_body_bytes`, and hand it to the protocol's adapter
(messages.py). Every failure becomes a response in exactly one place,
`_answer_error`. Health endpoints answer without credentials. Every path is
also served under `/anthropic`, the layout of native pass-through proxies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable

from server.auth.authenticator import Authenticator
from server.calls import Drain, random_id
from server.credentials import undecryptable_stored_keys
from server.errors import GatewayError, MissingScopeError, ShuttingDownError
from server.http_edge import models
from server.http_edge.chat import ChatDialect
from server.http_edge.errors import JSON, BodyTooLargeError, HttpError, OpenAIErrors
from server.http_edge.exchange import ClientGoneError, Exchange, Receive, Scope, Send
from server.http_edge.generation import Dialect, ErrorDialect, GenerationEndpoint
from server.http_edge.messages import MessagesDialect, count_tokens
from server.http_edge.responses import ResponsesDialect
from server.identity import IDENTITY, SCOPE_GENERATE, Identity
from server.routing import Router
from server.schema import OPENAI_CHAT
from server.telemetry.audit import AUTH_FAILED, PERMISSION_DENIED, audit_event

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_PREFIX = "/anthropic"
_MODEL_PATH = re.compile(r"^/v1/models/([^/]+)$")

# A handler gets the exchange and the request body (b"" for those without one).
Handler = Callable[[Exchange, bytes], Awaitable[None]]


ANTHROPIC = MessagesDialect()
CHAT = ChatDialect()
RESPONSES = ResponsesDialect()
OPENAI_ERRORS = OpenAIErrors(OPENAI_CHAT)


class _Endpoint:
    __slots__ = ("dialect", "generation", "handler", "private", "reads_body")

    def __init__(
        self,
        handler: Handler,
        *,
        private: bool = True,
        reads_body: bool = False,
        dialect: ErrorDialect | None = None,
        generation: Dialect | None = None,
    ):
        self.handler = handler
        self.private = private  # needs credentials
        self.reads_body = reads_body  # a JSON body
        # The wire format its errors are written in; None: the client's (its
        # `anthropic-version` header says Anthropic's, OpenAI's otherwise).
        self.dialect = dialect
        # A generation endpoint's dialect: a call refused before its body is read
        # is recorded as one of its calls.
        self.generation = generation


class FrontDoor:
    """The ASGI application of the HTTP edge."""

    def __init__(
        self,
        generation: GenerationEndpoint,
        router: Router,
        authenticator: Authenticator | None,
        *,
        max_body_bytes: int,
        ready: Callable[[], bool],
        drain: Drain | None = None,
    ) -> None:
        self._limit = max_body_bytes
        self._generation = generation
        self._router = router
        self._authenticator = authenticator
        self._ready = ready
        # Set once the gateway's drain cuts the calls still running.
        self._drain = drain
        alive = _Endpoint(self._alive, private=False)
        readiness = _Endpoint(self._readiness, private=False)
        empty = _Endpoint(self._empty, private=False)
        self._routes: dict[tuple[str, str], _Endpoint] = {
            ("GET", "/healthz"): alive,
            ("GET", "/readyz"): readiness,
            ("GET", "/health"): readiness,
            ("GET", "/"): alive,
            ("HEAD", "/"): empty,
            ("GET", "/api/hello"): alive,
            ("HEAD", "/api/hello"): empty,
            ("POST", "/v1/messages/count_tokens"): _Endpoint(
                self._count_tokens, reads_body=True, dialect=ANTHROPIC
            ),
            ("GET", "/v1/models"): _Endpoint(self._list_models),
        }
        # The generation endpoints: one loop, a dialect each.
        generation_paths: dict[str, Dialect] = {
            "/v1/messages": ANTHROPIC,
            "/v1/chat/completions": CHAT,
            "/v1/responses": RESPONSES,
        }
        for path, dialect in generation_paths.items():
            self._routes["POST", path] = _Endpoint(
                self._generator(dialect), reads_body=True, dialect=dialect, generation=dialect
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websockets are not served (uvicorn runs with lifespan off)
        exchange = Exchange(scope, receive, send)
        exchange.request_id = _request_id(exchange)
        try:
            await self._serve(exchange, scope)
        except ClientGoneError:
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if exchange.disconnected and task is not None:
                task.uncancel()  # the client left: nothing to answer, the call is recorded
                return
            raise
        finally:
            exchange.close()

    def _endpoint(self, method: str, path: str) -> tuple[_Endpoint | None, str]:
        if path.startswith(_PREFIX + "/"):
            path = path[len(_PREFIX) :]
        endpoint = self._routes.get((method, path))
        if endpoint is None and method == "GET":
            match = _MODEL_PATH.match(path)
            if match is not None:
                return _Endpoint(self._get_model), match.group(1)
        return endpoint, ""

    def _generator(self, dialect: Dialect) -> Handler:
        async def generate(exchange: Exchange, body: bytes) -> None:
            await self._generation.run(dialect, exchange, body)

        return generate

    async def _serve(self, exchange: Exchange, scope: Scope) -> None:
        endpoint, argument = self._endpoint(exchange.method, exchange.path)
        if endpoint is None:
            message = f"{exchange.method} {exchange.path} is not served here"
            error = HttpError(404, "not_found_error", message)
            await self._answer_error(exchange, error, _client_dialect(exchange))
            return
        dialect = endpoint.dialect or _client_dialect(exchange)
        token = None
        try:
            if endpoint.private and self._authenticator is not None:
                token = IDENTITY.set(await self._authenticate(exchange, scope))
            body = argument.encode()
            if endpoint.reads_body:
                _require_json(exchange)
                try:
                    body = await exchange.body(self._limit)
                except BodyTooLargeError as err:
                    if endpoint.generation is not None:  # recorded as its call, refused
                        await self._generation.refused(endpoint.generation, exchange, err)
                    raise
                exchange.watch_disconnect()
            await endpoint.handler(exchange, body)
        except (GatewayError, HttpError) as err:
            await self._answer_error(exchange, err, dialect)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if exchange.disconnected or self._drain is None or not self._drain.cutting:
                raise
            # The drain's grace ran out: the caller hears it, as a gRPC caller does.
            if task is not None:
                task.uncancel()
            cut = ShuttingDownError("the gateway is shutting down; retry on another replica")
            if exchange.started and not exchange.ended and hasattr(dialect, "stream_error"):
                await exchange.write(dialect.stream_error(cut, None))
            await self._answer_error(exchange, cut, dialect)
        except Exception:
            log.exception("unhandled error serving request %s", exchange.request_id)
            message = f"internal error (request id {exchange.request_id})"
            await self._answer_error(exchange, HttpError(500, "api_error", message), dialect)
        finally:
            if token is not None:
                IDENTITY.reset(token)

    async def _authenticate(self, exchange: Exchange, scope: Scope) -> Identity:
        assert self._authenticator is not None
        key_id = ""
        try:
            identity = await self._authenticator.authenticate(exchange.header_list, exchange.path)
            key_id = identity.key_id
            if not identity.has_scope(SCOPE_GENERATE):
                raise MissingScopeError(SCOPE_GENERATE)
        except GatewayError as err:
            denied = isinstance(err, MissingScopeError)
            client = scope.get("client")
            audit_event(
                PERMISSION_DENIED if denied else AUTH_FAILED,
                method=f"{exchange.method} {exchange.path}",
                peer=f"ipv4:{client[0]}:{client[1]}" if client else "",
                reason=err.reason,
                **({"key_id": key_id} if denied else {}),
            )
            raise
        return identity

    async def _answer_error(
        self, exchange: Exchange, error: GatewayError | HttpError, dialect: ErrorDialect
    ) -> None:
        """The one place a failure becomes an HTTP answer (or ends a started stream)."""
        if exchange.started:
            if not exchange.ended:
                await exchange.end()
            return
        if isinstance(error, HttpError):
            request_id = exchange.request_id
            body = dialect.error_body(error.status, error.error_type, error.message, request_id)
            await exchange.respond(error.status, body, [("content-type", JSON)])
            return
        status, body, headers = dialect.error_response(error, exchange.request_id)
        await exchange.respond(status, body, headers)

    # -- the endpoints the front door answers itself ------------------------------------

    async def _alive(self, exchange: Exchange, body: bytes) -> None:
        await exchange.respond(200, b'{"status":"ok"}', [("content-type", JSON)])

    async def _readiness(self, exchange: Exchange, body: bytes) -> None:
        if not self._ready():
            await exchange.respond(503, b'{"status":"draining"}', [("content-type", JSON)])
            return
        # Ready all the same (other providers serve), but a provider whose stored
        # key cannot be decrypted fails closed: the detail names the key.
        failing = undecryptable_stored_keys()
        if not failing:
            await exchange.respond(200, b'{"status":"ok"}', [("content-type", JSON)])
            return
        detail = {"status": "degraded", "stored_provider_keys_undecryptable": failing}
        await exchange.respond(200, json.dumps(detail).encode(), [("content-type", JSON)])

    async def _empty(self, exchange: Exchange, body: bytes) -> None:
        await exchange.respond(200, b"", [])

    async def _list_models(self, exchange: Exchange, body: bytes) -> None:
        await models.list_models(self._router, exchange)

    async def _get_model(self, exchange: Exchange, body: bytes) -> None:
        await models.get_model(self._router, exchange, body.decode())

    async def _count_tokens(self, exchange: Exchange, body: bytes) -> None:
        await count_tokens(self._router, exchange, body)


def _client_dialect(exchange: Exchange) -> ErrorDialect:
    """The dialect a client speaks, for an endpoint both kinds call (models, 404s)."""
    if "anthropic-version" in exchange.headers or exchange.path.startswith(_PREFIX):
        return ANTHROPIC
    return OPENAI_ERRORS


def _request_id(exchange: Exchange) -> str:
    given = exchange.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else random_id()


def _require_json(exchange: Exchange) -> None:
    kind = exchange.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise HttpError(
            400,
            "invalid_request_error",
            f"content-type must be application/json, not {kind or 'missing'!r}",
        )
