"""A stored answer: the events the router yielded, in order, and what they cost.

An entry keeps the very event sequence of the answer (message start, each
block's start, deltas and stop, thinking and its signature, tool calls, the
final usage and stop reason, and a pass-through call's relayed bytes as
RawChunks), so a hit replays it event by event, as either RPC or in the
edge's own format, and a relayed answer byte for byte.

Entries are encoded as JSON (never pickle: a Redis shared by replicas must
not be able to run code in the gateway), each dataclass as its class name
and fields, generically, so new event fields are stored without a change
here. Only the classes named in _CLASSES are decoded.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import zlib
from dataclasses import dataclass
from typing import Any

from server import events, schema
from server.events import StreamEvent

ENTRY_VERSION = 1

_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        events.MessageStart,
        events.ContentBlockStart,
        events.TextDelta,
        events.ToolInputDelta,
        events.ThinkingDelta,
        events.SignatureDelta,
        events.ContentBlockStop,
        events.MessageDelta,
        events.MessageStop,
        events.RawChunk,
        schema.TextBlock,
        schema.ImageBlock,
        schema.ToolUseBlock,
        schema.ToolResultBlock,
        schema.ThinkingBlock,
        schema.CacheControl,
        schema.Usage,
        schema.Cost,
        schema.Pricing,
        schema.RoutingDecision,
    )
}
_ENUMS: dict[str, type[enum.Enum]] = {"StopReason": schema.StopReason}


class EntryDecodeError(ValueError):
    """Stored bytes that are not an entry this gateway can read."""


@dataclass(slots=True)
class CacheEntry:
    """One answer, as the router's events, and what making it cost (billionths of a USD)."""

    events: list[StreamEvent]
    cost_nanos: int = 0
    stored_at: float = 0.0  # Unix seconds
    # The key of the request it answered, when stored under another key
    # (a request id: server/cache/idempotency.py), so a repeat can be checked.
    fingerprint: str = ""

    def encode(self) -> bytes:
        document = {
            "v": ENTRY_VERSION,
            "cost_nanos": self.cost_nanos,
            "stored_at": self.stored_at,
            "fingerprint": self.fingerprint,
            "events": [_plain(event) for event in self.events],
        }
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> CacheEntry:
        try:
            document = json.loads(data)
            if document.get("v") != ENTRY_VERSION:
                raise EntryDecodeError(f"entry version {document.get('v')!r}")
            decoded = [_built(item) for item in document["events"]]
            return cls(
                decoded,
                int(document["cost_nanos"]),
                float(document["stored_at"]),
                str(document.get("fingerprint", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise EntryDecodeError(f"unreadable cache entry: {err}") from err


def compress(data: bytes) -> bytes:
    return zlib.compress(data, 1)


def decompress(data: bytes) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error as err:
        raise EntryDecodeError(f"unreadable cache entry: {err}") from err


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return {"$enum": type(value).__name__, "value": value.value}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {"$dict": [[_plain(k), _plain(v)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"$type": type(value).__name__, "fields": fields}
    raise TypeError(f"cannot store a {type(value).__name__} in the cache")


def _built(value: Any) -> Any:
    if isinstance(value, list):
        return [_built(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "$type" in value:
        cls = _CLASSES[value["$type"]]
        return cls(**{name: _built(item) for name, item in value["fields"].items()})
    if "$enum" in value:
        return _ENUMS[value["$enum"]](value["value"])
    if "$bytes" in value:
        return base64.b64decode(value["$bytes"])
    if "$dict" in value:
        return {_built(k): _built(v) for k, v in value["$dict"]}
    raise EntryDecodeError(f"unknown stored value {sorted(value)}")
