"""The Anthropic provider: Claude models through the official SDK's Messages API.

One `AsyncAnthropic` client per configured instance, reused by every call
(its connection pool); a rotated API key swaps in a copy that shares the
pool (KeyedClient in _upstream.py; the common parts are in
_sdk_provider.py). StreamGenerate streams upstream; Generate makes one non-
streaming call and replays the whole message through the same stream
decoder, so both RPCs share one translation. Calls send the request
`messages.create` would send (pinned by tests/test_sdk_call_parity.py): its
body serialized by the SDK's own `openapi_dumps`, sent by `send_relayed`
(_relay.py: the SDK's `client.post`, its request built once per client and
path), and read the JSON as parsed, without the SDK's pydantic models (why:
`post_arguments` in _upstream.py); a stream's
events are read from the response's bytes (`_translated`), not through the
SDK's stream. The SDK's own
retries are off (max_retries=0): the router owns retries and fallbacks, and
two layers of retries would multiply. Each call's timeout is what is left of
the caller's deadline. Translation rules are in _anthropic_codec.py; every
SDK failure becomes a GatewayError in `_map_error`, and only there.

Provider options: any `messages.create` argument (e.g. `output_config`,
`service_tier`, `extra_headers`), `betas` (a list, sent as the
`anthropic-beta` header), and any other key, sent in the body untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import anthropic
import httpx2
from anthropic._utils._json import openapi_dumps
from anthropic.resources.messages import AsyncMessages
from pydantic import model_validator

from server.catalog import ANTHROPIC_MODELS, ANTHROPIC_PREFIXES
from server.errors import (
    DeadlineExceededError,
    FieldViolation,
    GatewayError,
    UpstreamReply,
    UpstreamStreamInterruptedError,
)
from server.events import RawChunk, StreamEvent
from server.providers import _anthropic_codec as codec
from server.providers._relay import relayed_body, relayed_options, reply_of, send_relayed
from server.providers._sdk_provider import SdkProvider
from server.providers._sse import (
    JSON_STRING,
    SseBatch,
    SseEvent,
    SseSplitter,
    after_first,
    batch_of,
)
from server.providers._transport import transport_failure
from server.providers._upstream import (
    FailureKind,
    UnreadableAnswerError,
    UpstreamModel,
    UpstreamSettings,
    json_object,
    kind_of_status,
    malformed_answer,
    merge_provider_options,
    post_arguments,
    request_content,
    retry_after_seconds,
    sampling_arguments,
    sdk_parameters,
    upstream_failure,
    upstream_timeout,
    with_catalog_defaults,
)
from server.schema import (
    ANTHROPIC_MESSAGES,
    GenerationRequest,
    Passthrough,
    TokenCount,
    TokenCountRequest,
)

UPSTREAM_REQUEST_ID_HEADER = "request-id"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
# The HTTP status Anthropic gives each error type (for an error event).
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# `messages.create` arguments it sends as headers, not in the body.
_HEADER_ARGUMENTS = {
    "user_profile_id": "anthropic-user-profile-id",
    "workspace_id": "anthropic-workspace-id",
}
_CREATE_ARGUMENTS = sdk_parameters(AsyncMessages.create)

# Anthropic's error types, for errors that arrive as a stream event (HTTP 200).
_ERROR_TYPES: dict[str, FailureKind] = {
    "invalid_request_error": "invalid_request",
    "request_too_large": "too_large",
    "authentication_error": "auth",
    "permission_error": "auth",
    "billing_error": "quota",
    "not_found_error": "not_found",
    "rate_limit_error": "rate_limited",
    "overloaded_error": "overloaded",
    "api_error": "unavailable",
    "timeout_error": "unavailable",
}
# What an upstream call may raise: the SDK's errors, its transport's (httpx2's,
# and the few of aiohttp's the aiohttp transport passes on as they are), and an
# answer that is not JSON, or JSON that is not an object. Mapped in `_map_error`.
_FAILURES = (
    anthropic.AnthropicError,
    httpx2.HTTPError,
    aiohttp.ClientError,
    json.JSONDecodeError,
    UnreadableAnswerError,
)


class AnthropicModel(UpstreamModel):
    # How a thinking request is sent: a token budget, or adaptive thinking
    # (Claude 5 models); None: the model does not think on request.
    thinking: Literal["budget", "adaptive"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _catalog(cls, data: Any) -> Any:
        return with_catalog_defaults(data, ANTHROPIC_MODELS)

    @property
    def supports_thinking(self) -> bool:
        return self.thinking is not None


class AnthropicSettings(UpstreamSettings):
    default_key_env = "ANTHROPIC_API_KEY"
    # None: every model of the shipped catalog.
    models: list[AnthropicModel] | None = None


class AnthropicProvider(SdkProvider[AnthropicModel]):
    """Serves Claude models through `anthropic.AsyncAnthropic`."""

    kind = "anthropic"
    Settings = AnthropicSettings
    relays = frozenset({ANTHROPIC_MESSAGES})

    client_class = anthropic.AsyncAnthropic
    http_clients = {
        "aiohttp": anthropic.DefaultAioHttpClient,
        "httpx": anthropic.DefaultAsyncHttpxClient,
    }
    Model = AnthropicModel
    catalog = ANTHROPIC_MODELS
    default_prefixes = ANTHROPIC_PREFIXES

    def _arguments(self, request: GenerationRequest) -> tuple[dict[str, Any], list[FieldViolation]]:
        """The call's keyword arguments and what in `request` they cannot carry: the
        one function both `create_arguments` and `refusal` use."""
        model = self._model(request.model)
        kwargs, violations = codec.request_arguments(request, model.upstream_name, model.thinking)
        sampling, refused = sampling_arguments(
            model, request.temperature, request.top_p, request.top_k
        )
        violations += refused
        if sampling:
            kwargs["extra_body"] = sampling
        kwargs["extra_headers"] = {"x-request-id": request.request_id}
        violations += _merge_options(kwargs, request.provider_options)
        return kwargs, violations

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        passthrough = request.passthrough
        if passthrough is not None and passthrough.protocol in self.relays:
            async for relayed in self._relay(request, passthrough):
                yield relayed
            return
        body, options = post_arguments(self.create_arguments(request), _HEADER_ARGUMENTS)
        upstream_request_id = ""
        stream: httpx2.Response | None = None
        client = await self._sdk.current()
        try:
            options["timeout"] = upstream_timeout(request.deadline, self._timeout)
            # The bytes `messages.create` sends, by the SDK's own serializer, sent
            # without the SDK building the same request again (send_relayed).
            if request.incremental:
                content = await request_content({**body, "stream": True}, openapi_dumps)
                stream = response = await send_relayed(
                    client, MESSAGES_PATH, content, options, stream=True
                )
                upstream_request_id = response.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
                decoder = self._decoder(request, upstream_request_id)
                # The events are read from the response's bytes, not through the
                # SDK's stream (four generators and a JSON parse per event; the
                # deltas are read by a pattern), one gateway event per upstream event.
                # Made one at a time: an unread stream holds one read's bytes, not
                # its events as well (tests/test_slow_readers.py).
                splitter = SseSplitter()
                async for chunk in response.aiter_bytes():
                    for sse in splitter.events(chunk):
                        event = _translated(sse, decoder, client, response)
                        if event is not None:
                            yield event
                decoder.finish()
                return
            # Generate: one non-streaming call, replayed through the same decoder.
            content = await request_content(body, openapi_dumps)
            answer = await send_relayed(client, MESSAGES_PATH, content, options, stream=False)
            upstream_request_id = answer.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
            message = json_object(answer.json(), "the body")
            decoder = self._decoder(request, upstream_request_id)
            for raw in codec.message_as_raw_events(message):
                replayed = decoder.feed(raw)
                if replayed is not None:
                    yield replayed
            decoder.finish()
        except _FAILURES as err:
            raise self._failure(
                err, request.model, upstream_request_id, request.request_id
            ) from err
        finally:
            # Closes the HTTP response at once (not drained), also when the
            # caller cancelled and this generator was closed mid-stream.
            if stream is not None:
                await stream.aclose()

    async def _relayed(
        self, passthrough: Passthrough, model_id: str, deadline: float | None, request_id: str
    ) -> tuple[bytes, dict[str, Any]]:
        """The body and `client.post` options of a pass-through call."""
        body = await relayed_body(passthrough, {"model": self._model(model_id).upstream_name})
        timeout = upstream_timeout(deadline, self._timeout)
        return body, relayed_options(passthrough, timeout, request_id)

    async def _relay(
        self, request: GenerationRequest, passthrough: Passthrough
    ) -> AsyncIterator[StreamEvent]:
        """Serves a Messages request as the client sent it: its bytes go upstream, and
        the upstream's bytes come back as RawChunks beside the events read from them."""
        upstream_request_id = ""
        stream: Any = None
        client = await self._sdk.current()
        try:
            body, options = await self._relayed(
                passthrough, request.model, request.deadline, request.request_id
            )
            if passthrough.document.get("stream") is not True:
                response = await send_relayed(client, MESSAGES_PATH, body, options, stream=False)
                upstream_request_id = response.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
                decoder = self._decoder(request, upstream_request_id)
                raw_body = response.content
                message = json_object(json.loads(raw_body), "the body")
                for raw in codec.message_as_raw_events(message):
                    event = decoder.feed(raw)
                    if event is not None:
                        yield event
                decoder.finish()
                yield RawChunk(raw_body)
                return
            stream = await send_relayed(client, MESSAGES_PATH, body, options, stream=True)
            upstream_request_id = stream.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
            decoder = self._decoder(request, upstream_request_id)
            splitter = SseSplitter(lambda raw: after_first(raw, b"content_block_delta"))
            async for chunk in stream.aiter_bytes():
                for part in splitter.parts(chunk):
                    batch = batch_of(part)
                    relayed, events, error = self._read(batch, decoder, request)
                    # The bytes first: an edge that relays knows from the first
                    # read that it relays, before any typed event reaches it.
                    if relayed:
                        yield RawChunk(part if relayed == len(part) else part[:relayed])
                    for event in events:
                        yield event
                    if error is not None:
                        raise error
            decoder.finish()
        except _FAILURES as err:
            error = self._failure(err, request.model, upstream_request_id, request.request_id)
            if isinstance(err, anthropic.APIStatusError):
                error.upstream_reply = _reply_of(err.response)
            raise error from err
        finally:
            if stream is not None:
                await stream.aclose()

    def _read(
        self, batch: SseBatch, decoder: codec.MessagesStreamDecoder, request: GenerationRequest
    ) -> tuple[int, list[StreamEvent], GatewayError | None]:
        """What the gateway reads from one read of a relayed stream: how many of its
        bytes to relay, its events, and the error event that ends it, if any.

        Parsed: what accounting and routing need (message_start, message_delta,
        content_block_start, error, and events it does not know). Not parsed:
        pings, content_block_stop, message_stop (its name says all), and deltas,
        read by a pattern: consecutive deltas of a block are decoded as one, so
        that the router sees content begin and a cut stream's output is counted.
        """
        events: list[StreamEvent] = []
        run: tuple[bytes, bytes] | None = None  # (upstream index, kind) of `payloads`
        payloads: list[bytes] = []
        for sse in batch.events:
            name = sse.name
            if not sse.data or name in _UNREAD:
                continue
            if name == "content_block_delta":
                match = _DELTA.fullmatch(sse.data)
                if match is not None and _DELTA_FIELDS.get(match[2]) == match[3]:
                    if run != (match[1], match[2]):
                        if run is not None:
                            _decode_run(decoder, run, payloads, events)
                        run, payloads = (match[1], match[2]), []
                    payloads.append(match[4])
                    continue
            if run is not None:
                _decode_run(decoder, run, payloads, events)
                run = None
            raw = (
                _MESSAGE_STOP
                if name == "message_stop"
                else json_object(json.loads(sse.data), f"event {name or '(unnamed)'}")
            )
            if name == "error" or raw.get("type") == "error":
                return (
                    sse.start,
                    events,
                    self._stream_error(raw, sse.data, batch.bytes_of(sse), request),
                )
            event = decoder.feed(raw)
            if event is not None:
                events.append(event)
        if run is not None:
            _decode_run(decoder, run, payloads, events)
        return len(batch.raw), events, None

    def _decoder(
        self, request: GenerationRequest, upstream_request_id: str
    ) -> codec.MessagesStreamDecoder:
        return codec.MessagesStreamDecoder(
            provider=self.name,
            model=request.model,
            request_id=request.request_id,
            upstream_request_id=upstream_request_id,
        )

    def _stream_error(
        self, raw: Any, data: bytes, event: bytes, request: GenerationRequest
    ) -> GatewayError:
        """An `event: error` in a relayed stream, mapped, with its bytes kept for relay."""
        details = raw.get("error") if isinstance(raw, dict) else None
        error_type = details.get("type", "") if isinstance(details, dict) else ""
        message = details.get("message", "") if isinstance(details, dict) else ""
        error = upstream_failure(
            _ERROR_TYPES.get(error_type, "unavailable"),
            provider=self.name,
            model=request.model,
            message=self._sdk.redact(str(message)),
            metadata={"upstream_error_type": str(error_type)},
            retry_after=None,
        )
        error.upstream_reply = UpstreamReply(
            ANTHROPIC_MESSAGES,
            _ERROR_STATUS.get(str(error_type), 500),
            data,
            (("content-type", "application/json"),),
            event=event,
        )
        return error

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        if request.passthrough is not None and request.passthrough.protocol in self.relays:
            return await self._relay_count(request, request.passthrough)
        model = self._model(request.model)
        kwargs: dict[str, Any] = {
            "model": model.upstream_name,
            "messages": codec.messages(request.messages),
        }
        if request.system:
            kwargs["system"] = [codec.content_block(b) for b in request.system]
        if request.tools:
            kwargs["tools"] = codec.tools(request.tools)
        # The body `messages.count_tokens` sends, a large request's written in
        # steps (request_content), posted as the relayed count's is.
        options = {"timeout": upstream_timeout(request.deadline, self._timeout)}
        body = await request_content(kwargs, openapi_dumps)
        return await self._count(request.model, body, options, relayed=False)

    async def _relay_count(
        self, request: TokenCountRequest, passthrough: Passthrough
    ) -> TokenCount:
        body, options = await self._relayed(passthrough, request.model, request.deadline, "")
        return await self._count(request.model, body, options, relayed=True)

    async def _count(
        self, model_id: str, body: bytes, options: dict[str, Any], *, relayed: bool
    ) -> TokenCount:
        """Posts a count_tokens body with these `client.post` options; a relayed
        call's upstream error answer is kept to be relayed as it came."""
        client = await self._sdk.current()
        try:
            response = await client.post(
                COUNT_TOKENS_PATH, content=body, options=options, cast_to=httpx2.Response
            )
            counted = json.loads(response.content)["input_tokens"]
            if not isinstance(counted, int):
                raise UnreadableAnswerError("the answer has no input_tokens count")
        except (
            anthropic.AnthropicError,
            httpx2.HTTPError,
            aiohttp.ClientError,
            ValueError,
            KeyError,
            TypeError,
        ) as err:
            error = self._failure(err, model_id, "", "")
            if relayed and isinstance(err, anthropic.APIStatusError):
                error.upstream_reply = _reply_of(err.response)
            raise error from err
        return TokenCount(input_tokens=counted, estimated=False)

    def _map_error(
        self,
        err: Exception,
        model: str,
        upstream_request_id: str,
    ) -> GatewayError:
        """The one place an Anthropic SDK failure (or its transport's) becomes a GatewayError."""
        metadata = {"upstream_request_id": upstream_request_id}
        # What the transport says it was (_transport.py), else the SDK's class;
        # most specific first: timeouts are connection errors, too.
        failure = transport_failure(err)
        if failure is None and isinstance(err, anthropic.APIConnectionError):
            failure = "timeout" if isinstance(err, anthropic.APITimeoutError) else "connection"
        if failure == "timeout":
            return DeadlineExceededError(
                f"provider {self.name} did not answer within the deadline",
                metadata={"provider": self.name, **_present(metadata)},
            )
        if failure == "connection":
            return UpstreamStreamInterruptedError(
                f"the connection to provider {self.name} failed",
                metadata={"provider": self.name, **_present(metadata)},
            )
        if isinstance(err, anthropic.APIStatusError):
            error_type = err.type or ""
            metadata.update(
                upstream_request_id=err.request_id or upstream_request_id,
                upstream_status=str(err.status_code),
                upstream_error_type=error_type,
            )
            # An `event: error` mid-stream arrives with the stream's status, 200.
            kind = (
                _ERROR_TYPES.get(error_type, "unavailable")
                if err.status_code < 400
                else kind_of_status(err.status_code)
            )
            return upstream_failure(
                kind,
                provider=self.name,
                model=model,
                message=self._sdk.redact(err.api_message or ""),
                metadata=metadata,
                retry_after=retry_after_seconds(err.response.headers),
            )
        # Anything else is an answer the gateway cannot read (a cut body, an
        # event that is not JSON): the deployment's failure, retried like a 5xx.
        return malformed_answer(self.name, err, _present(metadata), self._sdk.redact)


def _merge_options(kwargs: dict[str, Any], options: dict[str, Any]) -> list[FieldViolation]:
    if "betas" not in options:
        return merge_provider_options(kwargs, options, _CREATE_ARGUMENTS)
    options = dict(options)
    betas = options.pop("betas")
    if not (isinstance(betas, list) and all(isinstance(b, str) for b in betas)):
        return [FieldViolation("provider_options.betas", "must be a list of strings")]
    kwargs["extra_headers"] = {**kwargs.get("extra_headers", {}), "anthropic-beta": ",".join(betas)}
    return merge_provider_options(kwargs, options, _CREATE_ARGUMENTS)


# A relayed stream's delta, read without parsing its JSON (compact, or with
# spaces after the separators): the upstream block index, the delta's kind, its
# payload's field, and the payload as escaped on the wire.
_DELTA = re.compile(
    rb'\{"type": ?"content_block_delta", ?"index": ?(\d+), ?"delta": ?'
    rb'\{"type": ?"([a-z_]+)", ?"([a-z_]+)": ?' + JSON_STRING + rb"\}\}"
)
_DELTA_FIELDS = {
    b"text_delta": b"text",
    b"input_json_delta": b"partial_json",
    b"thinking_delta": b"thinking",
    b"signature_delta": b"signature",
}
# Events of a relayed stream the gateway does not read.
_UNREAD = frozenset({"ping", "content_block_stop"})
_MESSAGE_STOP = {"type": "message_stop"}


def _decode_run(
    decoder: codec.MessagesStreamDecoder,
    run: tuple[bytes, bytes],
    payloads: list[bytes],
    events: list[StreamEvent],
) -> None:
    """Decodes consecutive deltas of one block as one (their payloads joined)."""
    index, kind = run
    payload = payloads[0] if len(payloads) == 1 else b"".join(payloads)
    event = _delta(decoder, index, kind, payload)
    if event is not None:
        events.append(event)


def _delta(
    decoder: codec.MessagesStreamDecoder, index: bytes, kind: bytes, payload: bytes
) -> StreamEvent | None:
    """The event of a delta read by `_DELTA`: its block's index, its kind, its payload."""
    text = payload.decode("utf-8", errors="replace")
    if "\\" in text:
        text = json.loads(f'"{text}"')  # the escapes of a JSON string
    return decoder.delta(int(index), kind.decode(), text)


# Events of a stream the gateway translates that carry nothing for it: the SDK's
# stream skips pings and events without a name.
_SKIPPED = frozenset({"ping", ""})


def _translated(
    sse: SseEvent, decoder: codec.MessagesStreamDecoder, client: Any, response: httpx2.Response
) -> StreamEvent | None:
    """The gateway event of one upstream event of a translated stream, as the SDK's
    stream would have handed it to the decoder; an `event: error` raises the SDK's
    error (mapped in `_map_error`, like any SDK failure)."""
    name = sse.name
    if not sse.data or name in _SKIPPED:
        return None
    if name == "content_block_delta":
        match = _DELTA.fullmatch(sse.data)
        if match is not None and _DELTA_FIELDS.get(match[2]) == match[3]:
            return _delta(decoder, match[1], match[2], match[4])
    body = json.loads(sse.data)
    if name == "error":
        error: anthropic.APIStatusError = client._make_status_error(
            f"{body}", body=body, response=response
        )
        raise error
    return decoder.feed(json_object(body, "an event"))


def _reply_of(response: httpx2.Response) -> UpstreamReply:
    """An error answer to relay, with Anthropic's rate-limit headers."""
    return reply_of(
        ANTHROPIC_MESSAGES, response, lambda name: name.startswith("anthropic-ratelimit-")
    )


def _present(values: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v}
