"""The cache key: SHA-256 of a canonical encoding of everything that shapes an answer.

The whole decoded GenerationRequest is encoded generically, field by field
(dataclasses, lists, dicts with sorted keys, enums, bytes, numbers), less an
explicit list of fields that cannot change the answer. A field added to the
request later is therefore in the key by default: leaving it out takes a
line in EXCLUDED, never forgetting one in an allow-list (the bug of caches
that served one request another's answer). An HTTP pass-through request
brings its Passthrough: the body's bytes as relayed, the forwarded headers
and the query string.

Besides the request, the key holds the edge's protocol (gRPC, Messages, Chat
Completions, Responses: one answer is not valid in another's format), the
route and the deployments it may use, and the tenant scope (the API key's
id, or the namespace the configuration shares). Every value is written with
a type tag and, for strings and bytes, its length, so two different
requests can never encode alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
from typing import Any

from server.loop_turns import LARGE_REQUEST
from server.routing import Route
from server.schema import GenerationRequest, Passthrough

KEY_VERSION = b"llmgw-cache-key-v1"

# The fields that cannot change the answer, by the class that holds them.
EXCLUDED: dict[type, frozenset[str]] = {
    GenerationRequest: frozenset(
        {
            "request_id",  # the caller's id for the call
            "metadata",  # who the call is for (end user, tags): see smart routes below
            "deadline",  # when the caller stops waiting
            # Generate (False) and StreamGenerate (True) share their answers.
            "incremental",
        }
    ),
    # `body`, parsed, and where its values lie: the body's bytes are in the key already.
    Passthrough: frozenset({"document", "members"}),
}


def cache_key(request: GenerationRequest, route: Route, *, protocol: str, scope: str) -> str:
    """The hex SHA-256 key of `request` on `route`, asked over `protocol` by `scope`."""
    return hashlib.sha256(b"".join(_parts(request, route, protocol, scope))).hexdigest()


async def cache_key_async(
    request: GenerationRequest, route: Route, *, protocol: str, scope: str
) -> str:
    """cache_key; a large request's (LARGE_REQUEST) hashed in a thread, as hashlib
    lets go of the GIL while it hashes: SHA-256 of a 4 MB text is 2.5-3.5 ms
    that the event loop spends on the other calls instead (the whole key was
    7 ms of one step)."""
    parts = _parts(request, route, protocol, scope)
    if not LARGE_REQUEST.get():
        return hashlib.sha256(b"".join(parts)).hexdigest()
    return await asyncio.to_thread(_digest, parts)


def _digest(parts: list[bytes]) -> str:
    """The hex SHA-256 of the parts joined, without joining them."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _parts(request: GenerationRequest, route: Route, protocol: str, scope: str) -> list[bytes]:
    parts: list[bytes] = [KEY_VERSION]
    _encode(protocol, parts)
    _encode(scope, parts)
    _encode(route.model.id, parts)
    _encode([d.name for d in route.deployments], parts)
    if route.choose is not None:
        # A smart alias picks its tier from the request, a hint tag included.
        _encode(request.metadata.tags, parts)
    _encode(request, parts)
    return parts


def _encode(value: Any, out: list[bytes]) -> None:
    """Appends the canonical encoding of `value` (type-tagged, length-prefixed)."""
    kind = type(value)
    if kind is str:
        data = value.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(data))
        out.append(data)
    elif kind is list or kind is tuple:
        out.append(b"[%d:" % len(value))
        for item in value:
            _encode(item, out)
    elif kind in _DATACLASS_FIELDS:
        _encode_dataclass(value, _DATACLASS_FIELDS[kind], out)
    elif value is None:
        out.append(b"N")
    elif value is True:
        out.append(b"T")
    elif value is False:
        out.append(b"F")
    elif isinstance(value, str):  # a str subclass
        _encode(str(value), out)
    elif isinstance(value, enum.Enum):
        out.append(b"e")
        _encode(type(value).__name__, out)
        _encode(value.value, out)
    elif isinstance(value, int):
        out.append(b"i%d;" % value)
    elif isinstance(value, float):
        out.append(b"f" + value.hex().encode() + b";")
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"b%d:" % len(data))
        out.append(data)
    elif isinstance(value, list | tuple):
        _encode(list(value), out)
    elif isinstance(value, dict):
        items = []
        for key, item in value.items():
            encoded: list[bytes] = []
            _encode(key, encoded)
            items.append((b"".join(encoded), item))
        items.sort(key=lambda pair: pair[0])
        out.append(b"{%d:" % len(items))
        for key_bytes, item in items:
            out.append(key_bytes)
            _encode(item, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _encode_dataclass(value, _dataclass_fields(kind), out)
    else:
        # A type the key does not know: refuse rather than guess (the caller
        # skips the cache for this call).
        raise TypeError(f"cannot put a {type(value).__name__} in a cache key")


def _encode_dataclass(
    value: Any, encoding: tuple[bytes, tuple[tuple[str, bytes], ...]], out: list[bytes]
) -> None:
    head, fields = encoding
    out.append(head)
    for name, encoded_name in fields:
        out.append(encoded_name)
        _encode(getattr(value, name), out)
    out.append(b">")


# A dataclass's encoding, once per class: "<" and its name, and each field's
# name (less EXCLUDED's) encoded, in order.
_DATACLASS_FIELDS: dict[type, tuple[bytes, tuple[tuple[str, bytes], ...]]] = {}


def _dataclass_fields(kind: type) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    excluded = EXCLUDED.get(kind, frozenset())
    head: list[bytes] = [b"<"]
    _encode(kind.__name__, head)
    fields = []
    for field in dataclasses.fields(kind):
        if field.name not in excluded:
            name: list[bytes] = []
            _encode(field.name, name)
            fields.append((field.name, b"".join(name)))
    found = _DATACLASS_FIELDS[kind] = (b"".join(head), tuple(fields))
    return found
