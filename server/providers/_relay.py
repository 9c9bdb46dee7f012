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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import httpx2

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
