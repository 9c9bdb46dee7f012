"""The asyncio client: GatewayClient, over a grpc.aio channel.

    async with GatewayClient("localhost:50051", api_key=key) as client:
        response = await client.generate("echo", "Hello")
        async with client.stream("echo", "Hello") as stream:
            async for text in stream.text_stream():
                print(text, end="")
        print(stream.response().usage)

With an API key the client trades it for short-lived tokens and keeps one
fresh (clients/credentials.py, `credentials="token"`, the default), or sends
the key on every call (`credentials="key"`). Every failure is raised as a
clients.errors.GatewayError subclass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, Unpack

import grpc

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc

from ._channel import DEFAULT_TIMEOUT_S, channel_options, default_address, default_api_key
from .accumulator import StreamAccumulator
from .credentials import TokenSource
from .errors import from_rpc_error
from .messages import Prompt, RequestOptions, build_request, user

__all__ = ["GatewayClient", "ResponseStream"]

Metadata = Sequence[tuple[str, str]]
Credentials = Literal["token", "key"]


class ResponseStream:
    """A StreamGenerate call: iterate it for typed events, or use the helpers.

    `text_stream()` yields only the text as it arrives; `final_response()`
    reads to the end and returns the folded GenerateResponse; `response()`
    is what was folded so far. Leaving `async with` cancels an unfinished call.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self.accumulator = StreamAccumulator()
        # One iterator for the call's life, so the helpers resume where a loop stopped.
        self._iterator = self._events()

    def __aiter__(self) -> AsyncIterator[pb.StreamGenerateResponse]:
        return self._iterator

    async def _events(self) -> AsyncIterator[pb.StreamGenerateResponse]:
        try:
            async for event in self._call:
                self.accumulator.add(event)
                yield event
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error

    async def text_stream(self) -> AsyncIterator[str]:
        """The text deltas, as they arrive."""
        async for event in self:
            if event.HasField("content_block_delta") and event.content_block_delta.HasField("text"):
                yield event.content_block_delta.text

    async def final_response(self) -> pb.GenerateResponse:
        """Reads the rest of the stream and returns the complete response."""
        async for _ in self:
            pass
        return self.accumulator.response()

    def response(self) -> pb.GenerateResponse:
        """The response folded from the events read so far."""
        return self.accumulator.response()

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
    with every call. Create it inside a running event loop.

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
    ) -> None:
        self.address = address or default_address()
        api_key = api_key or default_api_key()
        self.timeout = timeout
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

    def _call_options(self, timeout: float | None, metadata: Metadata) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._metadata + tuple(metadata),
        }

    async def generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
        **options: Unpack[RequestOptions],
    ) -> pb.GenerateResponse:
        """Generates a complete response; `prompt` is a string or the conversation."""
        return await self.send(build_request(model, prompt, **options), timeout, metadata)

    async def send(
        self,
        request: pb.GenerateRequest,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> pb.GenerateResponse:
        """Calls Generate with a request built by hand."""
        try:
            response: pb.GenerateResponse = await self._stub.Generate(
                request, **self._call_options(timeout, metadata)
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        return response

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
        call = self._stub.StreamGenerate(request, **self._call_options(timeout, metadata))
        return ResponseStream(call)

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
        try:
            response: pb.CountTokensResponse = await self._stub.CountTokens(
                request, **self._call_options(timeout, ())
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        return response

    async def list_models(
        self,
        provider: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[pb.Model]:
        """The models the gateway serves (of one provider, if given)."""
        try:
            response: pb.ListModelsResponse = await self._stub.ListModels(
                pb.ListModelsRequest(provider=provider), **self._call_options(timeout, ())
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        return list(response.models)

    async def close(self) -> None:
        """Closes the channel (and the token channel); calls in flight are cancelled."""
        await self._channel.close()
        if self._tokens is not None:
            await self._tokens.aclose()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
