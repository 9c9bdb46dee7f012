"""What every provider that relays a client's request verbatim does the same way.

The HTTP front door hands a provider of the same wire format the client's
own bytes (server/schema.py's Passthrough). The provider sends them through
its SDK's generic `client.post` (the SDK still adds the gateway's
credential, base URL and timeouts), rewriting only what the gateway decides:
the model's upstream name, and fields the gateway needs for its own
accounting (OpenAI's `stream_options.include_usage`). An upstream's error
answer is kept whole (UpstreamReply) so that the edge can relay it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import httpx2

from server.errors import UpstreamReply
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
