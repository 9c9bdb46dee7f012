"""The OpenAI provider: GPT models, or any OpenAI-compatible server, via Chat Completions.

One `AsyncOpenAI` client per configured instance, reused by every call; a
rotated API key swaps in a copy that shares its connection pool (KeyedClient
in _upstream.py).
`type: openai` with a `base_url` and a `models` list serves vLLM, Ollama,
llama.cpp and the like (set `route_prefixes: []` there, so that it does not
claim `gpt-` ids). StreamGenerate streams upstream with
`stream_options.include_usage` (without it the stream carries no usage);
Generate makes one non-streaming call and replays the completion through the
same chunk decoder. Calls send the request `chat.completions.create` would
send (pinned by tests/test_sdk_call_parity.py): its body serialized by the
SDK's own `openapi_dumps`, sent by `send_relayed` (_relay.py: the SDK's
`client.post`, its request built once per client and path), and read the
JSON as parsed, without the SDK's pydantic models (why: `post_arguments` in
_upstream.py); a stream's chunks are read from the response's bytes
(`_chunk_of`), not through the SDK's stream. The SDK's
retries are off (max_retries=0) because the router owns retries, and each
call's timeout is what is left of the caller's deadline. Translation rules
are in _openai_codec.py; every SDK failure becomes a GatewayError in
`_map_error`, and only there.

CountTokens counts with tiktoken and the encodings shipped with the gateway
(server/openai_tokenizer.py: no download, `estimated: false`) for the models
tiktoken knows (gpt-4o, gpt-4.1, gpt-5, the o-series, gpt-4, gpt-3.5); a
request with tools, images or several content parts is flagged `estimated`,
since OpenAI does not publish how it renders them. Other models, and every
model when tiktoken is not installed, get the gateway's estimate
(server/token_estimate.py, `estimated: true`): OpenAI has no counting
endpoint for Chat Completions.

Provider options: any `chat.completions.create` argument (e.g.
`reasoning_effort`, `service_tier`, `extra_headers`), and any other key,
sent in the body untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import httpx2
import openai
from openai._streaming_cleanup import drain_response_async
from openai._utils._json import openapi_dumps
from openai.resources.chat.completions import AsyncCompletions
from pydantic import model_validator

from server import openai_tokenizer, token_estimate
from server.catalog import OPENAI_MODELS, OPENAI_PREFIXES
from server.errors import (
    DeadlineExceededError,
    FieldViolation,
    GatewayError,
    UpstreamReply,
    UpstreamStreamInterruptedError,
)
from server.events import RawChunk, StreamEvent
from server.providers import _openai_codec as codec
from server.providers import _openai_responses_codec as responses_codec
from server.providers._relay import (
    merged_deltas,
    relayed_body,
    relayed_bytes,
    relayed_options,
    reply_of,
    send_relayed,
)
from server.providers._sdk_provider import SdkProvider
from server.providers._sse import (
    SseBatch,
    SseEvent,
    SseSplitter,
    after_first,
    after_first_match,
    batch_of,
)
from server.providers._transport import transport_failure
from server.providers._upstream import (
    FailureKind,
    SamplingParameter,
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
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    GenerationRequest,
    Passthrough,
    TokenCount,
    TokenCountRequest,
)

UPSTREAM_REQUEST_ID_HEADER = "x-request-id"
COMPLETIONS_PATH = "/chat/completions"
RESPONSES_PATH = "/responses"
_CREATE_ARGUMENTS = sdk_parameters(AsyncCompletions.create)

# OpenAI's error types and codes, for an error that arrives inside a stream.
_ERROR_TYPES: dict[str, FailureKind] = {
    "invalid_request_error": "invalid_request",
    "authentication_error": "auth",
    "permission_error": "auth",
    "insufficient_quota": "quota",
    "rate_limit_exceeded": "rate_limited",
    "requests": "rate_limited",
    "tokens": "rate_limited",
    "server_error": "unavailable",
    "overloaded_error": "overloaded",
}
# What an upstream call may raise: the SDK's errors, its transport's (httpx2's,
# and the few of aiohttp's the aiohttp transport passes on as they are), and an
# answer that is not JSON, or JSON that is not an object. Mapped in `_map_error`.
_FAILURES = (
    openai.OpenAIError,
    httpx2.HTTPError,
    aiohttp.ClientError,
    json.JSONDecodeError,
    UnreadableAnswerError,
)


class OpenAIModel(UpstreamModel):
    sampling: list[SamplingParameter] = ["temperature", "top_p"]
    # A reasoning model: thinking requests set reasoning_effort.
    reasoning: bool = False
    # The model takes explicit prompt_cache_breakpoint marks (GPT-5.6 and later).
    cache_breakpoints: bool = False

    @model_validator(mode="before")
    @classmethod
    def _catalog(cls, data: Any) -> Any:
        return with_catalog_defaults(data, OPENAI_MODELS)

    @property
    def supports_thinking(self) -> bool:
        return self.reasoning


class OpenAISettings(UpstreamSettings):
    default_key_env = "OPENAI_API_KEY"
    # None: every model of the shipped catalog.
    models: list[OpenAIModel] | None = None
    # Older OpenAI-compatible servers know only `max_tokens`.
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    # Whether the upstream serves the Responses API (`/v1/responses`), to which
    # the HTTP front door then relays Responses requests verbatim; None: only
    # OpenAI itself (no base_url) is assumed to.
    responses_api: bool | None = None


class OpenAIChatProvider(SdkProvider[OpenAIModel]):
    """Serves models through `openai.AsyncOpenAI().chat.completions`."""

    kind = "openai"
    Settings = OpenAISettings

    client_class = openai.AsyncOpenAI
    http_clients = {
        "aiohttp": openai.DefaultAioHttpClient,
        "httpx": openai.DefaultAsyncHttpxClient,
    }
    Model = OpenAIModel
    catalog = OPENAI_MODELS
    default_prefixes = OPENAI_PREFIXES

    def __init__(self, name: str, settings: OpenAISettings) -> None:
        super().__init__(name, settings)
        self._max_tokens_field = settings.max_tokens_field
        responses = settings.responses_api
        if responses is None:
            responses = settings.base_url is None
        self.relays = frozenset({OPENAI_CHAT, OPENAI_RESPONSES} if responses else {OPENAI_CHAT})

    def _arguments(self, request: GenerationRequest) -> tuple[dict[str, Any], list[FieldViolation]]:
        """The call's keyword arguments and what in `request` they cannot carry: the
        one function both `create_arguments` and `refusal` use."""
        model = self._model(request.model)
        kwargs, violations = codec.request_arguments(
            request,
            model.upstream_name,
            reasoning=model.reasoning,
            cache_breakpoints=model.cache_breakpoints,
            max_tokens_field=self._max_tokens_field,
        )
        sampling, refused = sampling_arguments(
            model, request.temperature, request.top_p, request.top_k
        )
        violations += refused
        # Not a Chat Completions parameter: only for models that list it (vLLM).
        top_k = sampling.pop("top_k", None)
        kwargs.update(sampling)
        if top_k is not None:
            kwargs["extra_body"] = {"top_k": top_k}
        # vLLM and proxies honour X-Request-Id; OpenAI logs X-Client-Request-Id.
        kwargs["extra_headers"] = {
            "x-request-id": request.request_id,
            "x-client-request-id": request.request_id,
        }
        violations += merge_provider_options(kwargs, request.provider_options, _CREATE_ARGUMENTS)
        return kwargs, violations

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        passthrough = request.passthrough
        if passthrough is not None and passthrough.protocol in self.relays:
            relay = (
                self._relay_chat if passthrough.protocol == OPENAI_CHAT else self._relay_responses
            )
            async for relayed in relay(request, passthrough):
                yield relayed
            return
        body, options = post_arguments(self.create_arguments(request))
        # What `create` sends: the API key as a bearer token, not an admin key.
        options["security"] = {"bearer_auth": True}
        upstream_request_id = ""
        stream: httpx2.Response | None = None
        client = await self._sdk.current()
        try:
            options["timeout"] = upstream_timeout(request.deadline, self._timeout)
            # The bytes `chat.completions.create` sends, by the SDK's own serializer,
            # sent without the SDK building the same request again (send_relayed).
            if request.incremental:
                content = await request_content({**body, "stream": True}, openapi_dumps)
                stream = response = await send_relayed(
                    client, COMPLETIONS_PATH, content, options, stream=True
                )
                upstream_request_id = response.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
                decoder = self._decoder(request, upstream_request_id)
                # The chunks are read from the response's bytes, not through the SDK's
                # stream (four generators and a line decoder per event), as its stream
                # reads them (`_chunk_of`); made one at a time, as they are asked for.
                splitter = SseSplitter()
                done = False
                async for piece in response.aiter_bytes():
                    for sse in splitter.events(piece):
                        data = sse.data
                        if data.startswith(b"[DONE]"):
                            done = True
                            break
                        if data:
                            for event in decoder.feed(_chunk_of(data, response)):
                                yield event
                    if done:
                        # As the SDK's stream: nothing after it is read, and over
                        # HTTP/1.1 the rest is, briefly, for the connection's reuse.
                        if response.http_version == "HTTP/1.1":
                            await drain_response_async(response)
                        break
            else:
                # Generate: one non-streaming call, replayed through the same decoder.
                body.pop("stream_options", None)
                content = await request_content(body, openapi_dumps)
                response = await send_relayed(
                    client, COMPLETIONS_PATH, content, options, stream=False
                )
                upstream_request_id = response.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
                decoder = self._decoder(request, upstream_request_id)
                completion = json_object(response.json(), "the body")
                for chunk in codec.completion_as_chunks(completion):
                    for event in decoder.feed(chunk):
                        yield event
            for event in decoder.finish():
                yield event
        except _FAILURES as err:
            raise self._failure(
                err, request.model, upstream_request_id, request.request_id
            ) from err
        finally:
            # Closes the HTTP response at once, also when the caller cancelled.
            if stream is not None:
                await stream.aclose()

    # -- relayed calls (the HTTP front door's pass-through) ---------------------------

    async def _relayed(
        self, request: GenerationRequest, passthrough: Passthrough, changes: dict[str, Any]
    ) -> tuple[bytes, dict[str, Any]]:
        upstream_name = self._model(request.model).upstream_name
        body = await relayed_body(passthrough, {"model": upstream_name, **changes})
        timeout = upstream_timeout(request.deadline, self._timeout)
        options = relayed_options(passthrough, timeout, request.request_id)
        options["security"] = {"bearer_auth": True}
        return body, options

    async def _relay_chat(
        self, request: GenerationRequest, passthrough: Passthrough
    ) -> AsyncIterator[StreamEvent]:
        """A Chat Completions request as the client sent it, the upstream's bytes back.

        A stream always asks for usage (the gateway bills from it); the usage
        chunk reaches the client only if it asked for it too.
        """
        document = passthrough.document
        streaming = document.get("stream") is True
        options_asked = document.get("stream_options")
        wants_usage = isinstance(options_asked, dict) and options_asked.get("include_usage") is True
        changes: dict[str, Any] = {}
        if streaming and not wants_usage:
            given = options_asked if isinstance(options_asked, dict) else {}
            changes["stream_options"] = {**given, "include_usage": True}
        upstream_request_id = ""
        stream: Any = None
        client = await self._sdk.current()
        try:
            body, options = await self._relayed(request, passthrough, changes)
            if not streaming:
                response = await send_relayed(client, COMPLETIONS_PATH, body, options, stream=False)
                upstream_request_id = response.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
                decoder = self._decoder(request, upstream_request_id)
                completion = json_object(json.loads(response.content), "the body")
                for chunk in codec.completion_as_chunks(completion):
                    for event in decoder.feed(chunk):
                        yield event
                for event in decoder.finish():
                    yield event
                yield RawChunk(response.content)
                return
            stream = await send_relayed(client, COMPLETIONS_PATH, body, options, stream=True)
            upstream_request_id = stream.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
            decoder = self._decoder(request, upstream_request_id)
            splitter = SseSplitter(lambda raw: after_first_match(raw, _CHAT_CONTENT))
            async for piece in stream.aiter_bytes():
                for part in splitter.parts(piece):
                    relayed, events, error = self._read_chat(
                        batch_of(part), decoder, wants_usage, request
                    )
                    # The bytes first (one write per upstream read), then what they say.
                    if relayed:
                        yield RawChunk(relayed)
                    for event in events:
                        yield event
                    if error is not None:
                        raise error
            for event in decoder.finish():
                yield event
        except _FAILURES as err:
            raise self._relay_failure(err, OPENAI_CHAT, request, upstream_request_id) from err
        finally:
            if stream is not None:
                await stream.aclose()

    async def _relay_responses(
        self, request: GenerationRequest, passthrough: Passthrough
    ) -> AsyncIterator[StreamEvent]:
        """A Responses API request as the client sent it, the upstream's bytes back."""
        upstream_request_id = ""
        stream: Any = None
        client = await self._sdk.current()
        try:
            body, options = await self._relayed(request, passthrough, {})
            if passthrough.document.get("stream") is not True:
                response = await send_relayed(client, RESPONSES_PATH, body, options, stream=False)
                upstream_request_id = response.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
                decoder = self._responses_decoder(request, upstream_request_id)
                document = json_object(json.loads(response.content), "the body")
                for data in responses_codec.response_as_events(document):
                    for event in decoder.feed(data):
                        yield event
                yield RawChunk(response.content)
                return
            stream = await send_relayed(client, RESPONSES_PATH, body, options, stream=True)
            upstream_request_id = stream.headers.get(UPSTREAM_REQUEST_ID_HEADER, "")
            decoder = self._responses_decoder(request, upstream_request_id)
            splitter = SseSplitter(lambda raw: after_first(raw, b"response.output_text.delta"))
            async for piece in stream.aiter_bytes():
                for part in splitter.parts(piece):
                    relayed, events, error = self._read_responses(batch_of(part), decoder, request)
                    if relayed:
                        yield RawChunk(relayed)
                    for event in events:
                        yield event
                    if error is not None:
                        raise error
            decoder.finish()
        except _FAILURES as err:
            raise self._relay_failure(err, OPENAI_RESPONSES, request, upstream_request_id) from err
        finally:
            if stream is not None:
                await stream.aclose()

    def _read_chat(
        self,
        batch: SseBatch,
        decoder: codec.ChatStreamDecoder,
        wants_usage: bool,
        request: GenerationRequest,
    ) -> tuple[bytes, list[StreamEvent], GatewayError | None]:
        """One read of a relayed Chat Completions stream: the bytes to relay (without
        the usage chunk the client did not ask for), the events read from them, and
        the error chunk that ends them, if any.

        After the first chunk, chunks that only carry text (most of an answer) are
        read by a pattern (`codec.plain_text`), consecutive ones as one delta;
        the others are parsed.
        """
        events: list[StreamEvent] = []
        left_out: list[SseEvent] = []
        texts: list[str] = []  # of the chunks read by the pattern, not yet decoded
        for sse in batch.events:
            data = sse.data
            if not data or data == b"[DONE]":
                continue
            if decoder.started:
                text = codec.plain_text(data)
                if text is not None:
                    texts.append(text)
                    continue
            if texts:
                events += decoder.text("".join(texts))
                texts = []
            chunk = json_object(json.loads(data), "a chunk")
            if "error" in chunk:
                error = self._stream_error(chunk["error"], batch, sse, OPENAI_CHAT, request)
                return relayed_bytes(batch, left_out, sse.start), merged_deltas(events), error
            # The usage chunk (no choices) the client did not ask for.
            if not (wants_usage or chunk.get("choices") or chunk.get("usage") is None):
                left_out.append(sse)
            events += decoder.feed(chunk)
        if texts:
            events += decoder.text("".join(texts))
        return relayed_bytes(batch, left_out, len(batch.raw)), merged_deltas(events), None

    def _read_responses(
        self,
        batch: SseBatch,
        decoder: responses_codec.ResponsesStreamDecoder,
        request: GenerationRequest,
    ) -> tuple[bytes, list[StreamEvent], GatewayError | None]:
        """One read of a relayed Responses stream: the bytes to relay, the events read
        from them (events the decoder has no use for are not parsed, text deltas
        are read by a pattern where they can be), and the error or
        `response.failed` event that ends them, if any."""
        events: list[StreamEvent] = []
        for sse in batch.events:
            if not sse.data or sse.name in _RESPONSES_UNREAD:
                continue
            if sse.name == "response.output_text.delta":
                read = responses_codec.text_delta(sse.data)
                if read is not None:
                    events += decoder.text(*read)
                    continue
            data = json_object(json.loads(sse.data), f"event {sse.name or '(unnamed)'}")
            kind = data.get("type")
            failure: Any = None
            if kind == "error":
                # The error's fields are at the top, or nested under `error`.
                nested = data.get("error")
                failure = nested if isinstance(nested, dict) else data
            elif kind == "response.failed":
                failure = (data.get("response") or {}).get("error") or {}
            if failure is not None:
                error = self._stream_error(failure, batch, sse, OPENAI_RESPONSES, request)
                return relayed_bytes(batch, (), sse.start), merged_deltas(events), error
            events += decoder.feed(data)
        return batch.raw, merged_deltas(events), None

    def _decoder(
        self, request: GenerationRequest, upstream_request_id: str
    ) -> codec.ChatStreamDecoder:
        return codec.ChatStreamDecoder(
            provider=self.name,
            model=request.model,
            request_id=request.request_id,
            upstream_request_id=upstream_request_id,
        )

    def _responses_decoder(
        self, request: GenerationRequest, upstream_request_id: str
    ) -> responses_codec.ResponsesStreamDecoder:
        return responses_codec.ResponsesStreamDecoder(
            provider=self.name,
            model=request.model,
            request_id=request.request_id,
            upstream_request_id=upstream_request_id,
        )

    def _relay_failure(
        self, err: Exception, protocol: str, request: GenerationRequest, upstream_request_id: str
    ) -> GatewayError:
        error = self._failure(err, request.model, upstream_request_id, request.request_id)
        if isinstance(err, openai.APIStatusError):
            error.upstream_reply = reply_of(protocol, err.response, _rate_limit_header)
        return error

    def _stream_error(
        self,
        details: Any,
        batch: SseBatch,
        sse: SseEvent,
        protocol: str,
        request: GenerationRequest,
    ) -> GatewayError:
        """An error event inside a relayed stream, mapped, its bytes kept for relay."""
        details = details if isinstance(details, dict) else {}
        code = str(details.get("code") or "")
        error_type = str(details.get("type") or "")
        kind = _ERROR_TYPES.get(code) or _ERROR_TYPES.get(error_type, "unavailable")
        error = upstream_failure(
            kind,
            provider=self.name,
            model=request.model,
            message=self._sdk.redact(str(details.get("message") or "")),
            metadata={"upstream_error_type": error_type or code},
        )
        error.upstream_reply = UpstreamReply(
            protocol,
            500,
            sse.data,
            (("content-type", "application/json"),),
            batch.bytes_of(sse),
        )
        return error

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        upstream_name = self._model(request.model).upstream_name
        counted = await openai_tokenizer.count_request(
            upstream_name, request.system, request.messages, request.tools
        )
        if counted is not None:
            return TokenCount(input_tokens=counted.tokens, estimated=not counted.exact)
        count = token_estimate.count_request(request.system, request.messages, request.tools)
        return TokenCount(input_tokens=count, estimated=True)

    def _map_error(
        self,
        err: Exception,
        model: str,
        upstream_request_id: str,
    ) -> GatewayError:
        """The one place an OpenAI SDK failure (or its transport's) becomes a GatewayError."""
        base = {"provider": self.name}
        if upstream_request_id:
            base["upstream_request_id"] = upstream_request_id
        # What the transport says it was (_transport.py: this SDK's aiohttp
        # transport calls a dropped connection a connect timeout), else the
        # SDK's class; most specific first: timeouts are connection errors, too.
        failure = transport_failure(err)
        if failure is None and isinstance(err, openai.APIConnectionError):
            failure = "timeout" if isinstance(err, openai.APITimeoutError) else "connection"
        if failure == "timeout":
            return DeadlineExceededError(
                f"provider {self.name} did not answer within the deadline", metadata=base
            )
        if failure == "connection":
            return UpstreamStreamInterruptedError(
                f"the connection to provider {self.name} failed", metadata=base
            )
        if isinstance(err, openai.APIStatusError):
            code = err.code or ""
            kind = "quota" if code == "insufficient_quota" else kind_of_status(err.status_code)
            return upstream_failure(
                kind,
                provider=self.name,
                model=model,
                message=self._sdk.redact(_body_message(err.body)),
                metadata={
                    "upstream_request_id": err.request_id or upstream_request_id,
                    "upstream_status": str(err.status_code),
                    "upstream_error_type": err.type or code,
                },
                retry_after=retry_after_seconds(err.response.headers),
                param=err.param,
            )
        if isinstance(err, openai.APIError) and err.body is not None:
            # An error chunk inside a 200 stream: only its body says what it was.
            error_type = err.type or ""
            kind = _ERROR_TYPES.get(err.code or "") or _ERROR_TYPES.get(error_type, "unavailable")
            return upstream_failure(
                kind,
                provider=self.name,
                model=model,
                message=self._sdk.redact(err.message),
                metadata={**base, "upstream_error_type": error_type},
                param=err.param,
            )
        # Anything else is an answer the gateway cannot read (a cut body, an
        # event that is not JSON): the deployment's failure, retried like a 5xx.
        return malformed_answer(self.name, err, base, self._sdk.redact)


# A Chat Completions chunk with text in its delta (the first one ends the part of a
# relayed read that goes first): `"content":"` and a character other than the
# closing quote (a JSON string's quote inside text is escaped, so cannot match).
_CHAT_CONTENT = re.compile(rb'"content": ?"[^"]')

# Responses stream events the relay's accounting has no use for, by name: not
# parsed (some repeat a whole output, e.g. response.output_text.done). The
# blocks they would close are closed by response.completed.
_RESPONSES_UNREAD = frozenset(
    {
        "response.in_progress",
        "response.content_part.added",
        "response.content_part.done",
        "response.output_text.done",
        "response.output_text.annotation.added",
        "response.function_call_arguments.done",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_part.done",
        "response.reasoning_summary_text.done",
        "response.output_item.done",
    }
)


def _chunk_of(data: bytes, response: httpx2.Response) -> dict[str, Any]:
    """One chunk of a translated stream, as the SDK's stream hands it on: an error
    chunk raises the SDK's `APIError` (mapped in `_map_error`, like any SDK failure)."""
    chunk = json.loads(data)
    if isinstance(chunk, dict) and chunk.get("error"):
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else None
        if not message or not isinstance(message, str):
            message = "An error occurred during streaming"
        raise openai.APIError(message=message, request=response.request, body=error)
    return json_object(chunk, "a chunk")


def _rate_limit_header(name: str) -> bool:
    return name.startswith("x-ratelimit-")


def _body_message(body: object) -> str:
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str):
            return message
    return ""
