"""What every provider that relays a client's request verbatim does the same way.

The HTTP front door hands a provider of the same wire format the client's
own bytes (server/schema.py's Passthrough). The provider sends them through
its SDK's generic `client.post` (the SDK still adds the gateway's
credential, base URL and timeouts), rewriting only what the gateway decides:
the model's upstream name, and fields the gateway needs for its own
accounting (OpenAI's `stream_options.include_usage`). An upstream's error
answer is kept whole (UpstreamReply) so that the edge can relay it. A
streamed answer is relayed one upstream read at a time (one RawChunk, one
write to the client, per read: _sse.py's batches), and the typed events the
gateway reads from it are merged the same way (`merged_deltas`).

`send_relayed` is that `client.post` without rebuilding the SDK's request
for every call: the SDK builds it once per client and path (its headers:
credential, version, client and platform headers; its URL), and each call
sends a copy with its own body, forwarded headers, timeout and query
through the SDK's own HTTP client and transport, raising what `client.post`
raises. Building the same request again was a quarter to a third of a
relayed call's CPU (bench/results/2026-12-02-vm-front-door-second.md).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import anthropic
import httpx2
import openai
from anthropic._models import FinalRequestOptions as AnthropicRequestOptions
from openai._models import FinalRequestOptions as OpenAIRequestOptions

from server.errors import UpstreamReply
from server.events import StreamEvent, TextDelta, ThinkingDelta, ToolInputDelta
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


def relayed_body(passthrough: Passthrough, changes: Mapping[str, Any]) -> bytes:
    """The client's body, byte for byte unless `changes` (top-level fields) change it."""
    document = passthrough.document
    if all(document.get(key) == value for key, value in changes.items()):
        return passthrough.body
    changed = {**document, **changes}
    return json.dumps(changed, ensure_ascii=False, separators=(",", ":")).encode()


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
    names = {name.lower() for name in forwarded}
    headers = [raw for name, raw in template.headers if name not in names]
    headers += [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in forwarded.items()
    ]
    seconds = str(timeout).encode()
    headers += [(name, seconds) for name in template.timed]
    url = template.url
    params = options.get("params")
    if params:
        url = url.copy_merge_params(httpx2.QueryParams(client.qs.stringify(params)))
    every = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    request = httpx2.Request(
        "POST",
        url,
        headers=headers,
        content=body,
        extensions={**template.extensions, "timeout": every},
    )
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
    templates[path] = template = _Template(extra, built.url, headers, timed, extensions)
    return template
