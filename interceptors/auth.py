"""Authenticates every call and binds the caller's identity for the handler.

First in the chain (auth → overload → rate limit → tracing): a call without
valid credentials is answered UNAUTHENTICATED before its request bytes are
even parsed, and one whose key lacks the method's scope PERMISSION_DENIED. An
accepted call runs with its Identity in `server.identity.IDENTITY`, which
the servicer reads to check the requested model (that check needs the
decoded request, so it lives at the servicer, not here).

Public services (health and reflection by default) and unknown methods pass
through untouched. Interceptors after this one see the identity in their
`intercept_service` as well as in the handler; for a refused call they see
none, and its handler never runs. grpc.aio drives a handler by whether it is an
async-generator function or a coroutine function, so each wrapper keeps the
shape of the behaviour it wraps (health Watch is a coroutine that writes).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from server.auth.authenticator import Authenticator
from server.errors import GatewayError, MissingScopeError
from server.identity import IDENTITY, SCOPE_ADMIN, Identity
from server.telemetry.audit import AUTH_FAILED, PERMISSION_DENIED, audit_event, peer_of

Context = grpc.aio.ServicerContext[Any, Any]
# grpc's stubs type method handlers for the sync server; under grpc.aio the
# behaviours are coroutines taking the aio context (see malformed_request.py).
Handler = Any
Behavior = Callable[..., Any]
_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def service_of(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").partition("/")[0]


def _ignore_request(data: bytes) -> None:
    # A refused call's request is never parsed: no attacker bytes reach protobuf.
    return None


def _refusing(handler: Handler, error: GatewayError, method: str, key_id: str) -> Handler:
    status = error.to_status()
    denied = isinstance(error, MissingScopeError)

    async def refuse(request: Any, context: Context) -> None:
        # Here, not in intercept_service: only the handler's context knows the peer.
        audit_event(
            PERMISSION_DENIED if denied else AUTH_FAILED,
            method=method,
            peer=peer_of(context),
            reason=error.reason,
            **({"key_id": key_id} if denied else {}),
        )
        await context.abort(status.code, status.details, status.trailing_metadata)

    behaviors = {name: refuse for name in _BEHAVIORS if getattr(handler, name) is not None}
    return handler._replace(request_deserializer=_ignore_request, **behaviors)


def _binding(behavior: Behavior, identity: Identity) -> Behavior:
    """`behavior` with IDENTITY set to `identity` while it runs, in the same shape."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: Context) -> Any:
            token = IDENTITY.set(identity)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                # A generator closed from another task (finalisation) cannot
                # reset; each call runs in its own task, so nothing leaks.
                with contextlib.suppress(ValueError):
                    IDENTITY.reset(token)

        return streaming

    async def unary(request: Any, context: Context) -> Any:
        token = IDENTITY.set(identity)
        try:
            return await behavior(request, context)
        finally:
            IDENTITY.reset(token)

    return unary


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires valid credentials, and the service's scope, on every non-public call.

    `scopes` maps a service to the scope its methods need (None: any valid
    credential); services not listed need `admin`, so a new service is
    closed until someone decides who may call it.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        public_services: Iterable[str],
        scopes: Mapping[str, str | None],
    ) -> None:
        self._authenticator = authenticator
        self._public = frozenset(public_services)
        self._scopes = dict(scopes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        service = service_of(method)
        if service in self._public:
            return await continuation(handler_call_details)
        key_id = ""  # for the audit trail of a denial
        try:
            identity = await self._authenticator.authenticate(
                handler_call_details.invocation_metadata, method
            )
            key_id = identity.key_id
            scope = self._scopes.get(service, SCOPE_ADMIN)
            if scope is not None and not identity.has_scope(scope):
                raise MissingScopeError(scope)
        except GatewayError as err:
            # The inner interceptors still build the handler (its shape tells
            # how to refuse), but with no identity, and it never runs.
            refused: Handler = await continuation(handler_call_details)
            return None if refused is None else _refusing(refused, err, method, key_id)
        # Set while the inner interceptors build their handlers too, so a
        # rate limiter can see who is calling before the handler runs.
        token = IDENTITY.set(identity)
        try:
            handler: Handler = await continuation(handler_call_details)
        finally:
            IDENTITY.reset(token)
        if handler is None:
            return None
        behaviors = {
            name: _binding(getattr(handler, name), identity)
            for name in _BEHAVIORS
            if getattr(handler, name) is not None
        }
        return handler._replace(**behaviors)
