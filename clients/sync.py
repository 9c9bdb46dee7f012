"""The blocking client: GatewayClientSync, over a plain grpc channel.

    with GatewayClientSync("localhost:50051", api_key=key) as client:
        print(response_text(client.generate("echo", "Hello")))
        with client.stream("echo", "Hello") as stream:
            for text in stream.text_stream:
                print(text, end="", flush=True)

The same API as clients.aio.GatewayClient without `await`, for scripts and
threaded servers; it runs no event loop and starts no thread of its own.
Credentials follow the same policy: tokens from the API key (refreshed
before they expire, one retry after UNAUTHENTICATED, a stream only before
its first event), or the key itself with `credentials="key"`. Retries
follow `max_retries` as in the async client (clients/_retries.py), with
time.sleep between attempts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Unpack

import grpc

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc

from ._channel import DEFAULT_TIMEOUT_S, channel_options, default_address, default_api_key
from ._retries import DEFAULT_MAX_RETRIES, retry_delay, with_request_id
from ._sync_tokens import SyncTokenSource
from .accumulator import StreamAccumulator
from .aio import Credentials, Metadata, RetryDelay
from .errors import GatewayError, from_rpc_error
from .messages import Prompt, RequestOptions, build_request, user
from .response import Response

__all__ = ["GatewayClientSync", "ResponseStreamSync", "TextStreamSync"]

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _no_retries(error: GatewayError, retries: int) -> float | None:
    return None


class TextStreamSync:
    """`stream.text_stream`: the text deltas, as they arrive (the anthropic SDK's name).

    Calling it returns itself, so `stream.text_stream()`, the old spelling, still works.
    """

    def __init__(self, events: Iterator[pb.StreamGenerateResponse]) -> None:
        self._events = events

    def __iter__(self) -> TextStreamSync:
        return self

    def __next__(self) -> str:
        while True:
            event = next(self._events)  # StopIteration ends this too
            if event.HasField("content_block_delta") and event.content_block_delta.HasField("text"):
                return event.content_block_delta.text

    def __call__(self) -> TextStreamSync:
        return self


class ResponseStreamSync:
    """A StreamGenerate call: iterate it for typed events, or use the helpers.

    As clients.aio.ResponseStream: `text_stream`, `final_response()`,
    `response()`, `cancel()`; leaving `with` cancels an unfinished call.
    """

    def __init__(
        self,
        start: Callable[[bool], Any],
        *,
        retry_unauthenticated: bool,
        retry: RetryDelay = _no_retries,
    ) -> None:
        # start(refresh) begins the call, with a refreshed token when asked.
        self._start = start
        self._retry_unauthenticated = retry_unauthenticated
        self._retry = retry
        self._call = start(False)
        self.accumulator = StreamAccumulator()
        self._iterator = self._events()

    def _events(self) -> Iterator[pb.StreamGenerateResponse]:
        received, retries = False, 0
        while True:
            try:
                for event in self._call:
                    received = True
                    self.accumulator.add(event)
                    yield event
                return
            except grpc.RpcError as error:
                failure: Any = error
                unauthenticated = failure.code() == _UNAUTHENTICATED
                if self._retry_unauthenticated and not received and unauthenticated:
                    self._retry_unauthenticated = False
                    try:
                        self._call = self._start(True)
                    except grpc.RpcError:
                        # The key itself is refused now: report the original refusal.
                        raise from_rpc_error(error) from error
                    continue
                typed = from_rpc_error(error)
                delay = None if received else self._retry(typed, retries)
                if delay is None:
                    raise typed from error
            retries += 1
            time.sleep(delay)
            try:
                self._call = self._start(False)
            except grpc.RpcError as error:  # IssueToken failed meanwhile
                raise from_rpc_error(error) from error

    def __iter__(self) -> Iterator[pb.StreamGenerateResponse]:
        return self._iterator

    @property
    def text_stream(self) -> TextStreamSync:
        """The text deltas, as they arrive: `for text in stream.text_stream`."""
        return TextStreamSync(self._iterator)

    def final_response(self) -> Response:
        """Reads the rest of the stream and returns the complete response."""
        for _ in self:
            pass
        return self.accumulator.result()

    def response(self) -> Response:
        """The response folded from the events read so far."""
        return self.accumulator.result()

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
    `channel_credentials`, `timeout` (the default deadline), `metadata`,
    `max_retries` (2).
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

    def _retry_delay(self, end: float) -> RetryDelay:
        def delay(error: GatewayError, retries: int) -> float | None:
            return retry_delay(error, retries, self.max_retries, end - time.monotonic())

        return delay

    def _invoke(self, method: Any, request: Any, timeout: float | None, metadata: Metadata) -> Any:
        """A unary call, retried as `max_retries` allows (clients/_retries.py)."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay_for = self._retry_delay(end)
        retries = 0
        while True:
            try:
                return self._attempt(method, request, end, metadata)
            except GatewayError as failure:
                delay = delay_for(failure, retries)
                if delay is None:
                    raise
            retries += 1
            time.sleep(delay)

    def _attempt(self, method: Any, request: Any, end: float, metadata: Metadata) -> Any:
        """One attempt with credentials; one retry with a new token after UNAUTHENTICATED."""
        base = self._metadata + tuple(metadata)
        try:
            if self._tokens is None:
                return method(request, timeout=max(0.0, end - time.monotonic()), metadata=base)
            token = self._tokens.token()
            try:
                return method(
                    request, timeout=max(0.0, end - time.monotonic()), metadata=_bearer(base, token)
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
    ) -> Response:
        """Generates a complete response; `prompt` is a string or the conversation.

        An option RequestOptions does not name raises TypeError.
        """
        return self.send(build_request(model, prompt, **options), timeout, metadata)

    def send(
        self, request: pb.GenerateRequest, timeout: float | None = None, metadata: Metadata = ()
    ) -> Response:
        """Calls Generate with a request built by hand."""
        request = with_request_id(request, self.max_retries)
        response: pb.GenerateResponse = self._invoke(
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
    ) -> ResponseStreamSync:
        """Starts StreamGenerate; iterate the result for events (see ResponseStreamSync)."""
        return self.send_stream(build_request(model, prompt, **options), timeout, metadata)

    def send_stream(
        self, request: pb.GenerateRequest, timeout: float | None = None, metadata: Metadata = ()
    ) -> ResponseStreamSync:
        """Starts StreamGenerate with a request built by hand."""
        request = with_request_id(request, self.max_retries)
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
            return ResponseStreamSync(
                start, retry_unauthenticated=tokens is not None, retry=self._retry_delay(end)
            )
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
        """The models the gateway serves (of one provider, if given): every page."""
        models: list[pb.Model] = []
        token = ""
        while True:
            request = pb.ListModelsRequest(provider=provider, page_token=token)
            response: pb.ListModelsResponse = self._invoke(
                self._stub.ListModels, request, timeout, ()
            )
            models.extend(response.models)
            token = response.next_page_token
            if not token:
                return models

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
