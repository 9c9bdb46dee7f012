"""Pages of a list call (AIP-158), as ListModels serves them.

A page token is the offset of the next page and a fingerprint of the
request's filter fields, in base64url: opaque to callers, and refused
(INVALID_ARGUMENT) when it comes back with another filter, so that it can
never select a page of a different list. Offsets suit lists that change only
when the gateway's configuration does, as the model list; a list that moves
between calls would want tokens that name the last item instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from server.errors import FieldViolation, InvalidArgumentError

# AIP-158: the server picks the default and the maximum. A page this size
# holds every model of the shipped catalogs, so a caller who never asks for
# pages still sees all of them at once.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_VERSION = "p1"
# A token is well under this; longer strings are refused before decoding.
_MAX_TOKEN_CHARS = 128


@dataclass(frozen=True)
class Page:
    """Items [start, end) of the list; `next_token` is empty on the last page."""

    start: int
    end: int
    next_token: str


def page_of(total: int, *, page_size: int, page_token: str, filters: tuple[str, ...]) -> Page:
    """The page a request asks for, of a list of `total` items.

    `filters` are the request's other fields, which a token must be used with.
    Raises InvalidArgumentError naming `page_size` or `page_token`.
    """
    if page_size < 0:
        raise InvalidArgumentError(
            [FieldViolation("page_size", f"must not be negative (got {page_size})")]
        )
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    fingerprint = _fingerprint(filters)
    start = _offset(page_token, fingerprint) if page_token else 0
    end = min(start + size, total)
    next_token = _token(end, fingerprint) if end < total else ""
    return Page(min(start, total), end, next_token)


def _fingerprint(filters: tuple[str, ...]) -> str:
    return hashlib.sha256("\0".join(filters).encode()).hexdigest()[:16]


def _token(offset: int, fingerprint: str) -> str:
    raw = f"{_VERSION}:{offset}:{fingerprint}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _offset(token: str, fingerprint: str) -> int:
    """The offset a token holds; InvalidArgumentError if it is not one of ours for this filter."""
    fields: list[str] = []
    if len(token) <= _MAX_TOKEN_CHARS:
        try:
            padded = token + "=" * (-len(token) % 4)
            raw = base64.b64decode(padded, altchars=b"-_", validate=True)
            fields = raw.decode("ascii").split(":")
        except (binascii.Error, UnicodeDecodeError):
            fields = []
    if len(fields) != 3 or fields[0] != _VERSION or not fields[1].isdigit():
        raise InvalidArgumentError(
            [FieldViolation("page_token", "not a page token of this list; pass one as received")]
        )
    if fields[2] != fingerprint:
        raise InvalidArgumentError(
            [
                FieldViolation(
                    "page_token",
                    "was returned for a call with other filters (provider):"
                    " repeat the first call's filters, or start again without a token",
                )
            ]
        )
    return int(fields[1])
