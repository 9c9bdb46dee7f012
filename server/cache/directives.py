"""What a caller asks of the cache for one call, read from gRPC metadata or HTTP headers.

    x-llmgw-cache: no-cache      answer from the upstream and store the answer (refresh)
    x-llmgw-cache: no-store      neither look up nor store (bypass)
    x-llmgw-cache-ttl: SECONDS   the answer this call stores expires this soon (at most
                                 the configured ttl_s)

Over HTTP, `Cache-Control: no-cache` and `Cache-Control: no-store` say the
same (other Cache-Control directives are ignored). A value the gateway does
not know is refused as INVALID_ARGUMENT rather than ignored, so a caller never
believes it bypassed the cache when it did not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server.errors import FieldViolation, InvalidArgumentError

CACHE_HEADER = "x-llmgw-cache"
CACHE_TTL_HEADER = "x-llmgw-cache-ttl"
NO_CACHE = "no-cache"
NO_STORE = "no-store"


@dataclass(frozen=True, slots=True)
class CacheDirectives:
    no_cache: bool = False  # do not answer from the cache (store the fresh answer)
    no_store: bool = False  # do not look up, do not store
    ttl_s: float | None = None  # the stored answer's lifetime, when shorter than configured


NONE = CacheDirectives()


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> CacheDirectives:
    """The directives in a gRPC call's invocation metadata."""
    values: list[str] = []
    ttl: str | None = None
    for key, value in metadata or ():
        if key == CACHE_HEADER and isinstance(value, str):
            values.append(value)
        elif key == CACHE_TTL_HEADER and isinstance(value, str):
            ttl = value
    if not values and ttl is None:
        return NONE
    return _directives(values, [], ttl)


def from_headers(headers: Mapping[str, str]) -> CacheDirectives:
    """The directives in an HTTP request's headers (names lower-cased)."""
    own = headers.get(CACHE_HEADER)
    control = headers.get("cache-control")
    ttl = headers.get(CACHE_TTL_HEADER)
    if own is None and control is None and ttl is None:
        return NONE
    return _directives([own] if own is not None else [], [control] if control else [], ttl)


def _directives(own: list[str], control: list[str], ttl: str | None) -> CacheDirectives:
    no_cache = no_store = False
    for value in own:
        for word in _words(value):
            if word == NO_CACHE:
                no_cache = True
            elif word == NO_STORE:
                no_store = True
            else:
                raise InvalidArgumentError(
                    [FieldViolation(CACHE_HEADER, f"{word!r} is not no-cache or no-store")]
                )
    for value in control:
        words = _words(value)
        no_cache = no_cache or NO_CACHE in words
        no_store = no_store or NO_STORE in words
    ttl_s = None
    if ttl is not None:
        try:
            ttl_s = float(ttl.strip())
        except ValueError:
            ttl_s = math.nan
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise InvalidArgumentError(
                [FieldViolation(CACHE_TTL_HEADER, "must be a positive number of seconds")]
            )
    return CacheDirectives(no_cache, no_store, ttl_s)


def _words(value: str) -> list[str]:
    return [w.strip().lower() for w in value.split(",") if w.strip()]
