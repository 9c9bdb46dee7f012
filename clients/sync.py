"""The blocking client: GatewayClientSync, over a plain grpc channel.

    with GatewayClientSync("localhost:50051", api_key=key) as client:
        print(response_text(client.generate("echo", "Hello")))
        with client.stream("echo", "Hello") as stream:
            for text in stream.text_stream():
                print(text, end="", flush=True)

The same API as clients.aio.GatewayClient without `await`, for scripts and
threaded servers; it runs no event loop and starts no thread of its own.
Credentials follow the same policy: tokens from the API key (refreshed
before they expire, one retry after UNAUTHENTICATED, a stream only before
its first event), or the key itself with `credentials="key"`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Unpack

import grpc

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc

from ._channel import DEFAULT_TIMEOUT_S, channel_options, default_address, default_api_key
from ._sync_tokens import SyncTokenSource
from .accumulator import StreamAccumulator
from .aio import Credentials, Metadata
from .errors import from_rpc_error
from .messages import Prompt, RequestOptions, build_request, user

__all__ = ["GatewayClientSync", "ResponseStreamSync"]

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


class ResponseStreamSync:
    """A StreamGenerate call: iterate it for typed events, or use the helpers.

    As clients.aio.ResponseStream: `text_stream()`, `final_response()`,
    `response()`, `cancel()`; leaving `with` cancels an unfinished call.
    """

    def __init__(self, start: Callable[[bool], Any], *, retry_unauthenticated: bool) -> None:
        # start(refresh) begins the call, with a refreshed token when asked.
        self._start = start
        self._retry = retry_unauthenticated
        self._call = start(False)
        self.accumulator = StreamAccumulator()
        self._iterator = self._events()

    def _events(self) -> Iterator[pb.StreamGenerateResponse]:
        received = False
        while True:
            try:
                for event in self._call:
                    received = True
                    self.accumulator.add(event)
                    yield event
                return
            except grpc.RpcError as error:
                failure: Any = error
                if not (self._retry and not received and failure.code() == _UNAUTHENTICATED):
                    raise from_rpc_error(error) from error
                self._retry = False
                try:
                    self._call = self._start(True)
                except grpc.RpcError:
                    # The key itself is refused now: report the original refusal.
                    raise from_rpc_error(error) from error

    def __iter__(self) -> Iterator[pb.StreamGenerateResponse]:
        return self._iterator

    def text_stream(self) -> Iterator[str]:
        """The text deltas, as they arrive."""
        for event in self:
            if event.HasField("content_block_delta") and event.content_block_delta.HasField("text"):
                yield event.content_block_delta.text

    def final_response(self) -> pb.GenerateResponse:
        """Reads the rest of the stream and returns the complete response."""
        for _ in self:
            pass
        return self.accumulator.response()

    def response(self) -> pb.GenerateResponse:
        """The response folded from the events read so far."""
        return self.accumulator.response()

    def cancel(self) -> None:
        """Cancels the call (the gateway stops the upstream request)."""
        self._call.cancel()

    def __enter__(self) -> ResponseStreamSync:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.accumulator.finished:
            self.cancel()


class GatewayClientSync:
    """A blocking client for the gateway's GenerationService.

    Arguments as clients.aio.GatewayClient: `address` ($LLMGW_ADDRESS, else
    localhost:50051), `api_key` ($LLMGW_API_KEY), `credentials`,
    `channel_credentials`, `timeout` (the default deadline), `metadata`.
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
        self._tokens: SyncTokenSource | None = None
        if api_key and credentials == "token":
            self._tokens = SyncTokenSource(
                self.address, api_key, channel_credentials=channel_credentials
            )
        elif api_key:
            self._metadata += (("authorization", f"Bearer {api_key}"),)
        if channel_credentials is None:
            self._channel = grpc.insecure_channel(self.address, options=channel_options())
        else:
            self._channel = grpc.secure_channel(
                self.address, channel_credentials, options=channel_options()
            )
        self._stub = pb_grpc.GenerationServiceStub(self._channel)

    def __repr__(self) -> str:  # never shows the key
        return f"GatewayClientSync({self.address!r})"

    def _invoke(self, method: Any, request: Any, timeout: float | None, metadata: Metadata) -> Any:
        """A unary call with credentials; one retry with a new token after UNAUTHENTICATED."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        base = self._metadata + tuple(metadata)
        try:
            if self._tokens is None:
                return method(request, timeout=end - time.monotonic(), metadata=base)
            token = self._tokens.token()
            try:
                return method(
                    request, timeout=end - time.monotonic(), metadata=_bearer(base, token)
                )
            except grpc.RpcError as error:
                failure: Any = error
                if failure.code() != _UNAUTHENTICATED:
                    raise
                try:
                    token = self._tokens.refresh(token)
                except grpc.RpcError:
                    raise error from None  # the key itself is refused: report the first refusal
            # The retry gets what is left of the deadline, not a fresh one.
            remaining = max(0.0, end - time.monotonic())
            return method(request, timeout=remaining, metadata=_bearer(base, token))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def generate(
        self,
        model: str,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[RequestOptions],
    ) -> pb.GenerateResponse:
        """Generates a complete response; `prompt` is a string or the conversation."""
        return self.send(build_request(model, prompt, **options), timeout, metadata)

    def send(
        self, request: pb.GenerateRequest, timeout: float | None = None, metadata: Metadata = ()
    ) -> pb.GenerateResponse:
        """Calls Generate with a request built by hand."""
        response: pb.GenerateResponse = self._invoke(
            self._stub.Generate, request, timeout, metadata
        )
        return response

    def stream(
        self,
        model: str,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[RequestOptions],
    ) -> ResponseStreamSync:
        """Starts StreamGenerate; iterate the result for events (see ResponseStreamSync)."""
        return self.send_stream(build_request(model, prompt, **options), timeout, metadata)

    def send_stream(
        self, request: pb.GenerateRequest, timeout: float | None = None, metadata: Metadata = ()
    ) -> ResponseStreamSync:
        """Starts StreamGenerate with a request built by hand."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        base = self._metadata + tuple(metadata)
        tokens, used = self._tokens, [""]

        def start(refresh: bool) -> Any:
            call_metadata = base
            if tokens is not None:
                used[0] = tokens.refresh(used[0]) if refresh else tokens.token()
                call_metadata = _bearer(base, used[0])
            remaining = max(0.0, end - time.monotonic())
            return self._stub.StreamGenerate(request, timeout=remaining, metadata=call_metadata)

        try:
            return ResponseStreamSync(start, retry_unauthenticated=tokens is not None)
        except grpc.RpcError as error:  # IssueToken failed: the key is refused
            raise from_rpc_error(error) from error

    def count_tokens(
        self,
        model: str,
        prompt: Prompt,
        *,
        system: str = "",
        tools: Sequence[pb.Tool] = (),
        timeout: float | None = None,
    ) -> pb.CountTokensResponse:
        """The input tokens the request would use."""
        request = pb.CountTokensRequest(
            model=model,
            system=[pb.ContentBlock(text=system)] if system else [],
            messages=[user(prompt)] if isinstance(prompt, str) else list(prompt),
            tools=tools,
        )
        response: pb.CountTokensResponse = self._invoke(
            self._stub.CountTokens, request, timeout, ()
        )
        return response

    def list_models(self, provider: str = "", *, timeout: float | None = None) -> list[pb.Model]:
        """The models the gateway serves (of one provider, if given)."""
        response: pb.ListModelsResponse = self._invoke(
            self._stub.ListModels, pb.ListModelsRequest(provider=provider), timeout, ()
        )
        return list(response.models)

    def close(self) -> None:
        """Closes the channel (and the token channel)."""
        self._channel.close()
        if self._tokens is not None:
            self._tokens.close()

    def __enter__(self) -> GatewayClientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bearer(metadata: tuple[tuple[str, str], ...], token: str) -> tuple[tuple[str, str], ...]:
    kept = tuple((key, value) for key, value in metadata if key.lower() != "authorization")
    if not token:  # "": the gateway runs without authentication
        return kept
    return (*kept, ("authorization", f"Bearer {token}"))
