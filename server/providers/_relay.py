"""What every provider that relays a client's request verbatim does the same way.

The HTTP front door hands a provider of the same wire format the client's
own bytes (server/schema.py's Passthrough). The provider sends them through
its SDK's generic `client.post` (the SDK still adds the gateway's
credential, base URL and timeouts), rewriting only what the gateway decides:
the model's upstream name, and fields the gateway needs for its own
accounting (OpenAI's `stream_options.include_usage`). An upstream's error
answer is kept whole (UpstreamReply) so that the edge can relay it. A
streamed answer is relayed one upstream read at a time (one RawChunk, one
write to the client, per read: _sse.py's batches; the read that holds the
first content in two, cut after it: SseSplitter.parts), and the typed
events the gateway reads from it are merged the same way (`merged_deltas`).

`send_relayed` is that `client.post` without rebuilding the SDK's request
for every call: the SDK builds it once per client and path (its headers:
credential, version, client and platform headers; its URL), and each call
sends a copy with its own body, forwarded headers, timeout and query
through the SDK's own HTTP client and transport, raising what `client.post`
raises. Building the same request again was a quarter to a third of a
relayed call's CPU (bench/results/2026-12-02-vm-front-door-second.md).

On the SDKs' aiohttp transport as _transport.py builds it (the default) the
copy goes to the transport's relay pool (_http1.py) directly: the bytes
aiohttp would write (the headers in the order and case httpx2 hands them to
aiohttp, aiohttp's own added), the same timeouts and the same exceptions
(aiohttp's, through the transport's own mapping), without httpx2's Request,
its send layers and its reading of a unary answer through five generators,
and without aiohttp's client, which together were most of a pass-through
call's CPU in the gateway. The httpx2.Request a response names is built only
when something asks for it (an error, the SDK's stream).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anthropic
import httpx2
import openai
import yarl
from aiohttp.client_reqrep import ClientRequest
from aiohttp.http import SERVER_SOFTWARE
from anthropic._models import FinalRequestOptions as AnthropicRequestOptions
from openai._models import FinalRequestOptions as OpenAIRequestOptions

from server.errors import UpstreamReply
from server.events import StreamEvent, TextDelta, ThinkingDelta, ToolInputDelta
from server.json_members import members_found, written_with
from server.providers._http1 import Answer, Http1Pool
from server.providers._sse import SseBatch, SseEvent
from server.schema import Passthrough

# The headers of an upstream error answer that a relayed error keeps.
_KEPT = frozenset(
    {
        "content-type",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "request-id",
        "x-request-id",
    }
)


async def relayed_body(passthrough: Passthrough, changes: Mapping[str, Any]) -> bytes:
    """The client's body, byte for byte but for the top-level values `changes` sets
    (json_members.written_with: written where they lie, found in steps for a
    large body; the document encoded again only when a changed key is given
    twice)."""
    document = passthrough.document
    changed = {
        key: value
        for key, value in changes.items()
        if key not in document or document[key] != value
    }
    if not changed:
        return passthrough.body
    members = passthrough.members or await members_found(passthrough.body)
    return await written_with(passthrough.body, members, changed, {**document, **changed})


def relayed_options(passthrough: Passthrough, timeout: float, request_id: str) -> dict[str, Any]:
    """`client.post` options: the client's forwarded headers and query, our timeout."""
    headers = {**passthrough.headers, "Content-Type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    options: dict[str, Any] = {"headers": headers, "timeout": timeout}
    if passthrough.query:
        options["params"] = dict(parse_qsl(passthrough.query, keep_blank_values=True))
    return options


def reply_of(
    protocol: str, response: httpx2.Response, keep: Callable[[str], bool] = lambda name: False
) -> UpstreamReply:
    """An upstream's error answer, with the headers a client may act on."""
    headers = tuple(
        (name.lower(), value)
        for name, value in response.headers.items()
        if name.lower() in _KEPT or keep(name.lower())
    )
    return UpstreamReply(protocol, response.status_code, response.content, headers)


def relayed_bytes(batch: SseBatch, left_out: Sequence[SseEvent], end: int) -> bytes:
    """A batch's bytes up to `end`, without the events `left_out` (in order, before `end`)."""
    if not left_out:
        return batch.raw if end == len(batch.raw) else batch.raw[:end]
    pieces: list[bytes] = []
    at = 0
    for event in left_out:
        pieces.append(batch.raw[at : event.start])
        at = event.end
    pieces.append(batch.raw[at:end])
    return b"".join(pieces)


def merged_deltas(events: list[StreamEvent]) -> list[StreamEvent]:
    """Consecutive deltas of one kind and block as one delta.

    A relayed stream's typed events are the gateway's reading of it (when
    content began, how much came, the usage): one text delta per upstream
    read tells it as much as one per event, for a fraction of the work
    downstream (the router, the call record's estimate of a cut stream).
    """
    if len(events) < 2:
        return events
    merged: list[StreamEvent] = []
    for event in events:
        if not (merged and _absorbed(merged[-1], event)):
            merged.append(event)
    return merged


def _absorbed(last: StreamEvent, event: StreamEvent) -> bool:
    """Whether `event` continues `last` (a delta of the same kind and block): if so,
    its text is appended to `last`."""
    if type(last) is not type(event) or getattr(last, "index", None) != getattr(event, "index", -1):
        return False
    if isinstance(last, TextDelta | ThinkingDelta) and isinstance(event, TextDelta | ThinkingDelta):
        last.text += event.text
        return True
    if isinstance(last, ToolInputDelta) and isinstance(event, ToolInputDelta):
        last.partial_json += event.partial_json
        return True
    return False


# -- Sending -----------------------------------------------------------------------------

# The headers the SDK sets per call: the body's length, and the timeout it was given
# (which of the two an SDK sends is in the template).
_TIMEOUT_HEADERS = frozenset({"x-stainless-timeout", "x-stainless-read-timeout"})
_PER_CALL = _TIMEOUT_HEADERS | {"content-length"}


@dataclass(frozen=True, slots=True)
class _Template:
    """What the SDK built for a client and path: the request every relayed call copies."""

    options: Mapping[str, Any]  # the options besides headers, timeout and query it was built with
    url: httpx2.URL
    headers: tuple[tuple[str, tuple[bytes, bytes]], ...]  # (lower-cased name, raw header)
    timed: tuple[bytes, ...]  # the headers that say the call's timeout
    extensions: Mapping[str, Any]  # the SDK's request extensions but the timeout
    # The aiohttp transport the SDK's client sends `url` through, when the call can
    # go to it directly (_direct_transport), with the headers as aiohttp gets them.
    direct: _Direct | None = None


@dataclass(frozen=True, slots=True)
class _Direct:
    """What sending straight to an SDK's aiohttp transport needs, found once."""

    transport: Any  # the vendored httpx-aiohttp AiohttpTransport, with its relay pool
    mapped: Callable[[], Any]  # its map_aiohttp_exceptions
    url: yarl.URL  # parsed once, as aiohttp would parse its text for every call
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, value), ASCII
    server_hostname: str | None


# Per SDK client (a rotated key brings a new client, and so a new template), per path.
_TEMPLATES: weakref.WeakKeyDictionary[Any, dict[str, _Template]] = weakref.WeakKeyDictionary()


async def send_relayed(
    client: Any,
    path: str,
    body: bytes,
    options: Mapping[str, Any],
    *,
    stream: bool,
) -> httpx2.Response:
    """`client.post(path, content=body, options=options, cast_to=httpx2.Response,
    stream=stream)`: the same request on the wire and the same exceptions
    (APIStatusError subclasses with the error body read, APITimeoutError,
    APIConnectionError), the SDK's request built once per client and path.

    `options` are relayed_options' (headers, timeout, params) and any other
    `client.post` option (e.g. OpenAI's `security`). A client whose requests
    the SDK changes per call (retries, middleware, custom auth, refreshed
    credentials, a provider runtime) is sent through `client.post` itself.
    """
    if not _plain(client):
        response: httpx2.Response = await client.post(
            path, content=body, options=options, cast_to=httpx2.Response, stream=stream
        )
        return response
    timeout: float = options["timeout"]
    template = await _template(client, path, options, timeout)
    forwarded: Mapping[str, str] = options.get("headers") or {}
    direct = template.direct
    params = options.get("params")
    if direct is not None and body and not client._client.is_closed:
        sent = _direct_headers(direct, template, forwarded, timeout, len(body))
        if sent is not None:
            return await _send_direct(
                client, template, direct, (forwarded, params), sent, body, timeout, stream=stream
            )
    request = _request(client, template, forwarded, params, body, timeout)
    sdk: Any = anthropic if isinstance(client, anthropic.AsyncAnthropic) else openai
    try:
        response = await client._client.send(request, stream=stream)
    except httpx2.TimeoutException as err:
        raise sdk.APITimeoutError(request=request) from err
    except Exception as err:
        if isinstance(err, anthropic.AnthropicError | openai.OpenAIError):
            raise
        raise sdk.APIConnectionError(request=request) from err
    if not response.is_success:
        if not response.is_closed:
            await response.aread()
        raise client._make_status_error_from_response(response) from None
    return response


def _request(
    client: Any,
    template: _Template,
    forwarded: Mapping[str, str],
    params: Any,
    body: bytes,
    timeout: float,
) -> httpx2.Request:
    """The httpx2.Request the SDK would send: its template, this call's headers,
    query, body and timeout."""
    names = {name.lower() for name in forwarded}
    headers = [raw for name, raw in template.headers if name not in names]
    headers += [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in forwarded.items()
    ]
    seconds = str(timeout).encode()
    headers += [(name, seconds) for name in template.timed]
    url = template.url
    if params:
        url = url.copy_merge_params(httpx2.QueryParams(client.qs.stringify(params)))
    every = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    return httpx2.Request(
        "POST",
        url,
        headers=headers,
        content=body,
        extensions={**template.extensions, "timeout": every},
    )


def _direct_headers(
    direct: _Direct,
    template: _Template,
    forwarded: Mapping[str, str],
    timeout: float,
    length: int,
) -> dict[str, str] | None:
    """The headers aiohttp gets from the transport for this call (httpx2's
    `Headers.items()` of the request `_request` builds: names lower-cased, a
    repeated name's values joined), or None when a forwarded header is not
    ASCII (httpx2 then picks the encoding: the general path keeps its choice)."""
    names = {name.lower() for name in forwarded}
    merged = {name: value for name, value in direct.headers if name not in names}
    for name, value in forwarded.items():
        if not (name.isascii() and value.isascii()):
            return None
        _join(merged, name.lower(), value)
    seconds = str(timeout)
    for raw in template.timed:
        _join(merged, raw.decode("latin-1").lower(), seconds)
    # httpx2.Request sets it last, from the content, unless a header gave it.
    merged.setdefault("content-length", str(length))
    return merged


def _join(headers: dict[str, str], name: str, value: str) -> None:
    """Adds a header as httpx2's `Headers.items()` gives it: a repeated name's
    values joined by a comma."""
    headers[name] = f"{headers[name]}, {value}" if name in headers else value


async def _send_direct(
    client: Any,
    template: _Template,
    direct: _Direct,
    given: tuple[Mapping[str, str], Any],
    headers: dict[str, str],
    body: bytes,
    seconds: float,
    *,
    stream: bool,
) -> httpx2.Response:
    """send_relayed through the transport's relay pool (_http1.py) (`given`: the
    call's forwarded headers and query; `headers`: what aiohttp gets of them)."""
    transport = direct.transport
    pool = transport.relay_pool
    if not isinstance(pool, Http1Pool):
        pool = transport.relay_pool = pool()
    sdk: Any = anthropic if isinstance(client, anthropic.AsyncAnthropic) else openai

    forwarded, params = given
    url = direct.url
    if params:
        query = httpx2.QueryParams(client.qs.stringify(params))
        url = yarl.URL(str(template.url.copy_merge_params(query)))

    def request() -> httpx2.Request:
        return _request(client, template, forwarded, params, body, seconds)

    try:
        with direct.mapped():
            answer = await pool.post(
                url, _head(url, headers), body, seconds, direct.server_hostname
            )
            content = None
            if not stream:
                try:
                    content = await answer.read()
                finally:
                    answer.close()
    except httpx2.TransportError as err:
        sent = request()
        err.request = sent
        if isinstance(err, httpx2.TimeoutException):
            raise sdk.APITimeoutError(request=sent) from err
        raise sdk.APIConnectionError(request=sent) from err
    except Exception as err:
        raise sdk.APIConnectionError(request=request()) from err
    extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
    if answer.reason:
        extensions["reason_phrase"] = answer.reason.encode()
    byte_stream = (
        httpx2.ByteStream(content) if content is not None else _AnswerStream(answer, direct.mapped)
    )
    response = _RelayedResponse(
        answer.status, headers=answer.raw_headers, stream=byte_stream, extensions=extensions
    )
    response.build_request = request
    if content is None:
        response.answer, response.mapped = answer, direct.mapped
    elif answer.header(b"content-encoding") is not None:
        response.read()  # decoded as httpx2 decodes it
    else:
        # What read() leaves, without its five generators: the bytes as they came.
        response._content = content
        response.is_stream_consumed = response.is_closed = True
    if _HTTP_LOG.isEnabledFor(logging.INFO):
        _HTTP_LOG.info(
            'HTTP Request: %s %s "%s %d %s"',
            "POST",
            url,
            response.http_version,
            response.status_code,
            response.reason_phrase,
        )
    if (
        300 <= answer.status < 400
        and client._client.follow_redirects
        and response.has_redirect_location
    ):
        # What httpx2 would do next (no upstream API redirects a POST in practice).
        if content is None:
            await response.aclose()
        redirect = client._client._build_redirect_request(response.request, response)
        response = await client._client.send(redirect, stream=stream)
    if not response.is_success:
        if not response.is_closed:
            await response.aread()
        raise client._make_status_error_from_response(response) from None
    return response


# The headers aiohttp adds to a request that has none of them (its ClientRequest's
# defaults, its User-Agent, the content type of a body of bytes).
_AIOHTTP_DEFAULTS = (
    *ClientRequest.DEFAULT_HEADERS.items(),
    ("User-Agent", SERVER_SOFTWARE),
    ("Content-Type", "application/octet-stream"),
)


def _head(url: yarl.URL, given: dict[str, str]) -> bytes:
    """The request line and headers aiohttp would write for `given` (names
    lower-cased by _direct_headers; its Host taken out): Host first, its own
    defaults last."""
    host = given.pop("host", None) or url.host_port_subcomponent
    lines = [f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in given.items()]
    lines += [
        f"{name}: {value}\r\n" for name, value in _AIOHTTP_DEFAULTS if name.lower() not in given
    ]
    lines.append("\r\n")
    return "".join(lines).encode("ascii")


class _AnswerStream(httpx2.AsyncByteStream):
    """A streamed answer's body for httpx2 (what the transport's AiohttpResponseStream
    is to an aiohttp answer): its chunks, aiohttp's errors mapped to httpx2's."""

    def __init__(self, answer: Answer, mapped: Callable[[], Any]) -> None:
        self._answer, self._mapped = answer, mapped

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with self._mapped():
            async for chunk in self._answer.chunks():
                yield chunk

    async def aclose(self) -> None:
        self._answer.close()


# httpx2's logger: its line per request, written when the configuration turns it on.
_HTTP_LOG = logging.getLogger("httpx2")


class _RelayedResponse(httpx2.Response):
    """An httpx2.Response whose request is built the first time it is asked for, and
    whose streamed bytes come from the aiohttp answer without httpx2's layers."""

    build_request: Callable[[], httpx2.Request] | None = None
    # A streamed answer and its transport's exception mapping.
    answer: Answer | None = None
    mapped: Callable[[], Any] | None = None

    async def aiter_bytes(self, chunk_size: int | None = None) -> AsyncGenerator[bytes, None]:
        """httpx2's aiter_bytes: the chunks as the pool reads them, the response closed
        at their end; an encoded answer goes through httpx2's decoders."""
        answer, mapped = self.answer, self.mapped
        if (
            answer is None
            or mapped is None
            or chunk_size is not None
            or "content-encoding" in self.headers
            or hasattr(self, "_content")
        ):
            async for chunk in super().aiter_bytes(chunk_size):
                yield chunk
            return
        if self.is_stream_consumed:
            raise httpx2.StreamConsumed()
        if self.is_closed:
            raise httpx2.StreamClosed()
        self.is_stream_consumed = True
        try:
            with mapped():
                async for chunk in answer.chunks():
                    yield chunk
        except httpx2.RequestError as err:
            err.request = self.request  # as httpx2's request_context names it
            raise
        finally:
            await self.aclose()

    @property
    def request(self) -> httpx2.Request:
        if self._request is None and self.build_request is not None:
            self._request = self.build_request()
        return super().request

    @request.setter
    def request(self, value: httpx2.Request) -> None:
        self._request = value


def _plain(client: Any) -> bool:
    """Whether the SDK sends every request of `client` as it built it the first time."""
    return (
        client.max_retries == 0
        and not getattr(client, "_middleware", ())
        and client.custom_auth is None
        and getattr(client, "_token_cache", None) is None
        and getattr(client, "_provider_runtime", None) is None
        and getattr(client, "_api_key_provider", None) is None
    )


async def _template(
    client: Any, path: str, options: Mapping[str, Any], seconds: float
) -> _Template:
    """The SDK's request for `client` and `path`, built by the SDK's own steps once."""
    extra = {k: v for k, v in options.items() if k not in ("headers", "timeout", "params")}
    templates = _TEMPLATES.setdefault(client, {})
    template = templates.get(path)
    if template is not None and template.options == extra:
        return template
    kind = (
        AnthropicRequestOptions
        if isinstance(client, anthropic.AsyncAnthropic)
        else OpenAIRequestOptions
    )
    prepared = await client._prepare_options(
        kind.construct(method="post", url=path, content=b"", headers={}, timeout=seconds, **extra)
    )
    built: httpx2.Request = client._build_request(prepared)
    await client._prepare_request(built)
    headers = tuple(
        (name.decode("latin-1").lower(), (name, value))
        for name, value in built.headers.raw
        if name.decode("latin-1").lower() not in _PER_CALL
    )
    timed = tuple(
        name for name, _ in built.headers.raw if name.decode("latin-1").lower() in _TIMEOUT_HEADERS
    )
    extensions = {k: v for k, v in built.extensions.items() if k != "timeout"}
    template = _Template(extra, built.url, headers, timed, extensions)
    direct = _direct_transport(client, template)
    if direct is not None:
        template = dataclasses.replace(template, direct=direct)
    templates[path] = template
    return template


def _direct_transport(client: Any, template: _Template) -> _Direct | None:
    """What sending `template`'s copies straight to the SDK's aiohttp transport
    needs, or None when httpx2's client could do more than pass them to it (a
    client or transport of another kind, auth, event hooks, a proxy)."""
    http = client._client
    if (
        type(http).send is not httpx2.AsyncClient.send
        or type(http)._send_handling_auth is not httpx2.AsyncClient._send_handling_auth
        or type(http)._send_single_request is not httpx2.AsyncClient._send_single_request
        or http._auth is not None
        or any(http._event_hooks.values())
    ):
        return None
    transport = http._transport_for_url(template.url)
    module = sys.modules.get(type(transport).__module__)
    mapped = getattr(module, "map_aiohttp_exceptions", None)
    if (
        type(transport).__name__ != "AiohttpTransport"
        or mapped is None
        or getattr(transport, "proxy", None) is not None
        or getattr(transport, "relay_pool", None) is None
    ):
        return None
    headers: dict[str, str] = {}
    for name, (_, value) in template.headers:
        if not value.isascii():
            return None
        _join(headers, name, value.decode("ascii"))
    return _Direct(
        transport,
        mapped,
        yarl.URL(str(template.url)),
        tuple(headers.items()),
        template.extensions.get("sni_hostname"),
    )
