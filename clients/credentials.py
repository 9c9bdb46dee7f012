"""Client-side credentials: trade an API key for gateway tokens and keep one fresh.

    tokens = TokenSource("localhost:50051", api_key)
    async with grpc.aio.insecure_channel(
        "localhost:50051", interceptors=tokens.interceptors()
    ) as channel:
        stub = GenerationServiceStub(channel)
        await stub.Generate(request)      # carries `authorization: Bearer <token>`
    await tokens.aclose()

The API key travels only to IssueToken, on a channel of the TokenSource's
own. Every other call carries a short-lived token, fetched on first use and
replaced once 80% of its lifetime has passed; concurrent calls share one
IssueToken (single flight), and while a refresh runs they keep using the
current token if it is still valid. When the gateway answers UNAUTHENTICATED
(the token was revoked, or the gateway's signing keys changed), the call
gets one new token and is retried once, never more; a server stream only
when nothing was received yet, so no response is ever duplicated. The token
is checked when a call starts, so a stream that outlives it runs on.

A gateway run with `--no-auth` refuses IssueToken with AUTH_DISABLED: the
calls then go without credentials (the token is "", and no `authorization`
header is sent) until one is refused, which asks IssueToken again.

When IssueToken fails the source backs off (clients/_token_backoff.py):
exponentially with jitter after a transient failure, for minutes after a
refusal of the key (revoked, unknown). Until then a call that needs a new
token fails at once with that error, without reaching the gateway; a call
whose token is still valid uses it.

grpc.aio applies an interceptor to a call type only if it implements that
type's interface, hence one class per type (unary-unary, unary-stream). The
interceptors run once per attempt of grpc's own retries, if configured. The
API key and tokens are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2

from llmgateway.v1 import token_pb2, token_pb2_grpc

from ._token_backoff import IssueTokenBackoff, auth_disabled

__all__ = [
    "IssueTokenBackoff",
    "TokenSource",
    "UnaryStreamTokenInterceptor",
    "UnaryUnaryTokenInterceptor",
]

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
ISSUE_TOKEN_METHOD = "/llmgateway.v1.TokenService/IssueToken"
# Below this much remaining life a token is not used while a refresh runs.
_EXPIRY_MARGIN_S = 1.0


class TokenSource:
    """Holds a gateway token for an API key and refreshes it before it expires.

    `target` is the gateway's address; `channel_credentials` makes the token
    channel a TLS one (insecure when None). `lifetime` asks the gateway for
    tokens shorter than its default. `refresh_fraction` of a token's lifetime
    passes before it is replaced. `backoff` says when to ask IssueToken again
    after it failed (the default: 0.5 s doubling to 30 s; 5 minutes after
    the key was refused).
    """

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        lifetime: float | None = None,
        refresh_fraction: float = 0.8,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        backoff: IssueTokenBackoff | None = None,
    ) -> None:
        if not 0 < refresh_fraction < 1:
            raise ValueError("refresh_fraction must be between 0 and 1")
        self._target = target
        self._api_key = api_key
        self._channel_credentials = channel_credentials
        self._lifetime = lifetime
        self._fraction = refresh_fraction
        self._timeout = timeout
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._refreshing: asyncio.Task[str] | None = None
        self._backoff = backoff or IssueTokenBackoff(clock=clock)
        # The gateway said AUTH_DISABLED: call without credentials.
        self.auth_disabled = False
        self.issued = 0  # tokens obtained so far (for tests and metrics)

    def __repr__(self) -> str:  # never shows the key or the token
        return f"TokenSource({self._target!r})"

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """The interceptors to build a gateway channel with."""
        return [UnaryUnaryTokenInterceptor(self), UnaryStreamTokenInterceptor(self)]

    async def token(self) -> str:
        """A token to call with: the current one while fresh, else a new one.

        "" when the gateway runs without authentication: send no credentials.
        """
        if self.auth_disabled:
            return ""
        now = self._clock()
        if self._token is not None and now < self._refresh_at:
            return self._token
        usable = self._token is not None and now < self._expires_at - _EXPIRY_MARGIN_S
        if self._backoff.wait() > 0:  # IssueToken failed lately: not again yet
            if usable:
                assert self._token is not None
                return self._token
            raise self._backoff.error()
        refreshing = self._start_refresh()
        if usable:
            assert self._token is not None
            return self._token  # still valid: the refresh runs in the background
        return await asyncio.shield(refreshing)

    async def refresh(self, refused: str) -> str:
        """A new token after the gateway refused `refused`.

        Every call refused with the same token shares one refresh; a call
        whose token was already replaced gets the replacement.
        """
        self.auth_disabled = False  # refused without credentials: authentication is back on
        if self._token is not None and self._token != refused:
            return self._token
        if self._backoff.wait() > 0:
            raise self._backoff.error()
        return await asyncio.shield(self._start_refresh())

    def _start_refresh(self) -> asyncio.Task[str]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._fetch())
            self._refreshing.add_done_callback(_consume_failure)
        return self._refreshing

    async def _fetch(self) -> str:
        if self._channel is None:
            if self._channel_credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target)
            else:
                self._channel = grpc.aio.secure_channel(self._target, self._channel_credentials)
        stub = token_pb2_grpc.TokenServiceStub(self._channel)
        request = token_pb2.IssueTokenRequest()
        if self._lifetime:
            request.lifetime.CopyFrom(_duration(self._lifetime))
        # Lifetimes count from before the request, so clock skew and latency
        # can only make the client refresh early, never late.
        sent = self._clock()
        try:
            response = await stub.IssueToken(
                request,
                metadata=((AUTHORIZATION, f"Bearer {self._api_key}"),),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            if auth_disabled(error):
                self._backoff.succeeded()
                if not self.auth_disabled:
                    log.info("the gateway runs without authentication: calling without the key")
                self.auth_disabled, self._token = True, None
                return ""
            failure = self._backoff.failed(error)
            if self._backoff.refused:
                self._token = None  # the key's tokens are refused with it
            raise failure from error
        self._backoff.succeeded()
        lifetime = response.lifetime.ToTimedelta().total_seconds()
        self._token = response.token
        self._refresh_at = sent + self._fraction * lifetime
        self._expires_at = sent + lifetime
        self.issued += 1
        return response.token

    async def aclose(self) -> None:
        """Closes the token channel."""
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> TokenSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _consume_failure(task: asyncio.Task[str]) -> None:
    # A background refresh nobody awaited must not end as "exception never
    # retrieved"; the next call that needs a token tries again.
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        code = error.code() if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
        log.warning("fetching a gateway token failed: %s", code)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method: Any = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


def _with_token(
    details: grpc.aio.ClientCallDetails, token: str, timeout: float | None
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(
        *((key, value) for key, value in (details.metadata or ()) if key.lower() != AUTHORIZATION)
    )
    if token:  # "": the gateway runs without authentication
        metadata.add(AUTHORIZATION, f"Bearer {token}")
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Deadline:
    """What is left of the call's timeout: a retry gets the rest, not a fresh one."""

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._start = time.monotonic()

    def remaining(self) -> float | None:
        if self._timeout is None:
            return None
        return max(0.0, self._timeout - (time.monotonic() - self._start))


class UnaryUnaryTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Attaches a token to unary calls; on UNAUTHENTICATED refreshes once and retries once."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        if _method_name(client_call_details) == ISSUE_TOKEN_METHOD:
            return await continuation(client_call_details, request)
        deadline = _Deadline(client_call_details.timeout)
        token = await self._source.token()
        call = await continuation(
            _with_token(client_call_details, token, deadline.remaining()), request
        )
        try:
            code = await call.code()
        except asyncio.CancelledError:
            call.cancel()
            raise
        if code != grpc.StatusCode.UNAUTHENTICATED:
            return call
        try:
            token = await self._source.refresh(token)
        except grpc.aio.AioRpcError:
            return call  # the key itself is refused now: report the original refusal
        return await continuation(
            _with_token(client_call_details, token, deadline.remaining()), request
        )


class UnaryStreamTokenInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """Attaches a token to server-streaming calls.

    The first response is awaited here, so that an UNAUTHENTICATED that comes
    before any response can be retried once with a new token; afterwards the
    responses are handed on as they arrive.
    """

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        deadline = _Deadline(client_call_details.timeout)
        token = await self._source.token()
        call = await continuation(
            _with_token(client_call_details, token, deadline.remaining()), request
        )
        failure: grpc.aio.AioRpcError | None = None
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                try:
                    token = await self._source.refresh(token)
                except grpc.aio.AioRpcError:
                    pass  # the key itself is refused now: report the original refusal
                else:
                    return await continuation(
                        _with_token(client_call_details, token, deadline.remaining()), request
                    )
            failure = error
        except asyncio.CancelledError:
            call.cancel()
            raise

        # Having read once, the call must be read on with read(): grpc refuses
        # to mix read() and iteration on one call.
        async def responses() -> Any:
            if failure is not None:
                raise failure
            if first is grpc.aio.EOF:
                return
            yield first
            while (response := await call.read()) is not grpc.aio.EOF:
                yield response

        return responses()
