"""The asyncio client: GatewayClient, over a grpc.aio channel.

    async with GatewayClient("localhost:50051", api_key=key) as client:
        response = await client.generate("echo", "Hello")
        async with client.stream("echo", "Hello") as stream:
            async for text in stream.text_stream:
                print(text, end="")
        print(stream.response().usage, stream.response().stop_reason)  # "end_turn"

With an API key the client trades it for short-lived tokens and keeps one
fresh (clients/credentials.py, `credentials="token"`, the default), or sends
the key on every call (`credentials="key"`). A call that fails UNAVAILABLE,
or RESOURCE_EXHAUSTED with RetryInfo, is retried up to `max_retries` times
(clients/_retries.py). Every failure is raised as a clients.errors.GatewayError
subclass; responses are clients.response.Response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, Unpack

import grpc

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc

from ._channel import DEFAULT_TIMEOUT_S, channel_options, default_address, default_api_key
from ._retries import DEFAULT_MAX_RETRIES, retry_delay, with_request_id
from .accumulator import StreamAccumulator
from .credentials import TokenSource
from .errors import GatewayError, from_rpc_error
from .messages import Prompt, RequestOptions, build_request, user
from .response import Response

__all__ = ["GatewayClient", "ResponseStream", "TextStream"]

Metadata = Sequence[tuple[str, str]]
Credentials = Literal["token", "key"]
# How long to wait before retry number `retries` + 1 after a failure; None: raise it.
RetryDelay = Callable[[GatewayError, int], float | None]


def _no_retries(error: GatewayError, retries: int) -> float | None:
    return None


class TextStream:
    """`stream.text_stream`: the text deltas, as they arrive (the anthropic SDK's name).

    Calling it returns itself, so `stream.text_stream()`, the old spelling, still works.
    """

    def __init__(self, events: AsyncIterator[pb.StreamGenerateResponse]) -> None:
        self._events = events

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        while True:
            event = await anext(self._events)  # StopAsyncIteration ends this too
            if event.HasField("content_block_delta") and event.content_block_delta.HasField("text"):
                return event.content_block_delta.text

    def __call__(self) -> TextStream:
        return self


class ResponseStream:
    """A StreamGenerate call: iterate it for typed events, or use the helpers.

    `text_stream` yields only the text as it arrives; `final_response()`
    reads to the end and returns the folded Response; `response()` is what
    was folded so far. A retryable failure before the first event starts
    the call again (see GatewayClient's `max_retries`); after it, never.
    Leaving `async with` cancels an unfinished call.
    """

    def __init__(self, start: Callable[[], Any], retry: RetryDelay = _no_retries) -> None:
        # start() begins the call, with what is left of its deadline.
        self._start = start
        self._retry = retry
        self._call = start()
        self.accumulator = StreamAccumulator()
        # One iterator for the call's life, so the helpers resume where a loop stopped.
        self._iterator = self._events()

    def __aiter__(self) -> AsyncIterator[pb.StreamGenerateResponse]:
        return self._iterator

    async def _events(self) -> AsyncIterator[pb.StreamGenerateResponse]:
        received, retries = False, 0
        while True:
            try:
                async for event in self._call:
                    received = True
                    self.accumulator.add(event)
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
                delay = None if received else self._retry(failure, retries)
                if delay is None:
                    raise failure from error
            retries += 1
            await asyncio.sleep(delay)
            self._call = self._start()

    @property
    def text_stream(self) -> TextStream:
        """The text deltas, as they arrive: `async for text in stream.text_stream`."""
        return TextStream(self._iterator)

    async def final_response(self) -> Response:
        """Reads the rest of the stream and returns the complete response."""
        async for _ in self:
            pass
        return self.accumulator.result()

    def response(self) -> Response:
        """The response folded from the events read so far."""
        return self.accumulator.result()

    def cancel(self) -> None:
        """Cancels the call (the gateway stops the upstream request)."""
        self._call.cancel()

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.accumulator.finished:
            self.cancel()


class GatewayClient:
    """An asyncio client for the gateway's GenerationService.

    `address` defaults to $LLMGW_ADDRESS, else localhost:50051; `api_key` to
    $LLMGW_API_KEY (no credentials when neither is set: a gateway run with
    `--no-auth`). `channel_credentials` (for example
    `grpc.ssl_channel_credentials()`) makes the channel a TLS one. `timeout`
    is the default deadline of every call, in seconds; `metadata` is sent
    with every call. `max_retries` (2, as in the official SDKs) is how often
    a call that failed UNAVAILABLE, or RESOURCE_EXHAUSTED with RetryInfo, is
    made again, within its deadline (clients/_retries.py). Create it inside
    a running event loop.

    Methods take `timeout` (hence the ASYNC109 waivers) because it is the
    gRPC deadline: it travels to the gateway, which gives its upstream calls
    only what is left of it; `asyncio.timeout` would cancel only this side.
    """

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        credentials: Credentials = "token",
        channel_credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        metadata: Metadata = (),
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.address = address or default_address()
        api_key = api_key or default_api_key()
        self.timeout = timeout
        self.max_retries = max_retries
        self._metadata = tuple(metadata)
        self._tokens: TokenSource | None = None
        interceptors: list[grpc.aio.ClientInterceptor] = []
        if api_key and credentials == "token":
            self._tokens = TokenSource(
                self.address, api_key, channel_credentials=channel_credentials
            )
            interceptors = self._tokens.interceptors()
        elif api_key:
            self._metadata += (("authorization", f"Bearer {api_key}"),)
        options = channel_options()
        if channel_credentials is None:
            self._channel = grpc.aio.insecure_channel(
                self.address, options=options, interceptors=interceptors
            )
        else:
            self._channel = grpc.aio.secure_channel(
                self.address, channel_credentials, options=options, interceptors=interceptors
            )
        self._stub = pb_grpc.GenerationServiceStub(self._channel)

    def __repr__(self) -> str:  # never shows the key
        return f"GatewayClient({self.address!r})"

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _retry_delay(self, deadline: float) -> RetryDelay:
        def delay(error: GatewayError, retries: int) -> float | None:
            remaining = deadline - time.monotonic()
            return retry_delay(error, retries, self.max_retries, remaining)

        return delay

    async def _unary(
        self,
        method: Any,
        request: Any,
        timeout: float | None,  # noqa: ASYNC109
        metadata: Metadata,
    ) -> Any:
        """A unary call, retried as `max_retries` allows; failures as GatewayError."""
        deadline = self._deadline(timeout)
        delay_for = self._retry_delay(deadline)
        metadata = self._metadata + tuple(metadata)
        retries = 0
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                return await method(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                failure = from_rpc_error(error)
                delay = delay_for(failure, retries)
                if delay is None:
                    raise failure from error
            retries += 1
            await asyncio.sleep(delay)

    async def generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
        **options: Unpack[RequestOptions],
    ) -> Response:
        """Generates a complete response; `prompt` is a string or the conversation.

        An option RequestOptions does not name raises TypeError.
        """
        return await self.send(build_request(model, prompt, **options), timeout, metadata)

    async def send(
        self,
        request: pb.GenerateRequest,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> Response:
        """Calls Generate with a request built by hand."""
        request = with_request_id(request, self.max_retries)
        response: pb.GenerateResponse = await self._unary(
            self._stub.Generate, request, timeout, metadata
        )
        return Response(response)

    def stream(
        self,
        model: str,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[RequestOptions],
    ) -> ResponseStream:
        """Starts StreamGenerate; iterate the result for events (see ResponseStream)."""
        return self.send_stream(build_request(model, prompt, **options), timeout, metadata)

    def send_stream(
        self, request: pb.GenerateRequest, timeout: float | None = None, metadata: Metadata = ()
    ) -> ResponseStream:
        """Starts StreamGenerate with a request built by hand."""
        request = with_request_id(request, self.max_retries)
        deadline = self._deadline(timeout)
        metadata = self._metadata + tuple(metadata)

        def start() -> Any:
            remaining = max(0.0, deadline - time.monotonic())
            return self._stub.StreamGenerate(request, timeout=remaining, metadata=metadata)

        return ResponseStream(start, self._retry_delay(deadline))

    async def count_tokens(
        self,
        model: str,
        prompt: Prompt,
        *,
        system: str = "",
        tools: Sequence[pb.Tool] = (),
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.CountTokensResponse:
        """The input tokens the request would use."""
        request = pb.CountTokensRequest(
            model=model,
            system=[pb.ContentBlock(text=system)] if system else [],
            messages=[user(prompt)] if isinstance(prompt, str) else list(prompt),
            tools=tools,
        )
        response: pb.CountTokensResponse = await self._unary(
            self._stub.CountTokens, request, timeout, ()
        )
        return response

    async def list_models(
        self,
        provider: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[pb.Model]:
        """The models the gateway serves (of one provider, if given): every page."""
        models: list[pb.Model] = []
        token = ""
        while True:
            request = pb.ListModelsRequest(provider=provider, page_token=token)
            response: pb.ListModelsResponse = await self._unary(
                self._stub.ListModels, request, timeout, ()
            )
            models.extend(response.models)
            token = response.next_page_token
            if not token:
                return models

    async def close(self) -> None:
        """Closes the channel (and the token channel); calls in flight are cancelled."""
        await self._channel.close()
        if self._tokens is not None:
            await self._tokens.aclose()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
