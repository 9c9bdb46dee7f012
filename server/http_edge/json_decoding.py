"""What every JSON body must be before a dialect's decoder reads it: text.

JSON may spell a lone UTF-16 surrogate (`"\\ud800"`), and Python's json
module decodes one, and raw UTF-8 bytes of one, into a str that no UTF-8
encoder accepts. Such a string would get as far as the answer (the echo model
repeats it), an error message or the usage ledger before failing to encode,
as a 500 or worse; so each decoder (messages_decoding.py, chat_decoding.py,
responses_decoding.py) refuses it first, naming where it is, as the gRPC edge
refuses invalid UTF-8 in a protobuf string.

Walking a document costs about a millisecond per 200 KiB of a coding
agent's conversation; `free_of_lone_surrogates` tells from the body's bytes,
in a tenth of that, that there is nothing to find, and the walk is skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from server.errors import FieldViolation, InvalidArgumentError

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# How a lone surrogate can get into a UTF-8 body: escaped (\uD800 to \uDFFF,
# which a valid pair also matches), or encoded (ED A0..BF, which UTF-8 forbids
# but the json module decodes).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
# Where a value is: None for the body, else (its parent's path, key or index).
Path = tuple["Path", str | int] | None
NOT_TEXT = "must be valid Unicode text: it holds a lone surrogate (U+D800 to U+DFFF)"


def free_of_lone_surrogates(body: bytes, start: int = 0, end: int | None = None) -> bool:
    """True when a JSON body's bytes (those from `start` to `end`) cannot decode to a
    lone surrogate (UTF-8, with neither a surrogate's escape nor its encoding);
    False when they may."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return False
    end = len(body) if end is None else end
    if body.find(b"\\u", start, end) >= 0 and _SURROGATE_ESCAPE.search(body, start, end):
        return False
    return body.find(b"\xed", start, end) < 0 or not _ENCODED_SURROGATE.search(body, start, end)


# About a millisecond or two of the search, on prose whose every accent is escaped.
SCAN_STEP_BYTES = 1024 * 1024


async def free_of_lone_surrogates_in_steps(
    body: bytes, next_step: Callable[[], Awaitable[None]]
) -> bool:
    """free_of_lone_surrogates a MiB at a time, awaiting `next_step` between (for a
    large body: the search is one step of 20 ms for 11 MiB of such prose)."""
    for start in range(0, len(body), SCAN_STEP_BYTES):
        # Windows overlap by a match's length less one: none is missed.
        end = min(len(body), start + SCAN_STEP_BYTES + 3)
        if not free_of_lone_surrogates(body, start, end):
            return False
        await next_step()
    return True


def refuse_lone_surrogates(document: Any) -> None:
    """Raises InvalidArgumentError naming every string, and object key, of
    `document` that UTF-8 cannot encode. Iterative: a body may nest as deep
    as the JSON parser allowed."""
    violations: list[FieldViolation] = []
    # (value, path), a path being (its parent's path, key or index): built
    # into a string only for what is reported.
    stack: list[tuple[Any, Path]] = [(document, None)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                violations.append(FieldViolation(_field(path), NOT_TEXT))
        elif isinstance(value, dict):
            for key, item in value.items():
                if _encodable(key):
                    stack.append((item, (path, key)))
                else:
                    violations.append(FieldViolation(_field(path), f"a key {NOT_TEXT}"))
        elif isinstance(value, list):
            stack.extend((item, (path, i)) for i, item in enumerate(value))
    if violations:
        violations.reverse()  # roughly in the order of the document
        raise InvalidArgumentError(violations)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(path: Path) -> str:
    steps: list[str | int] = []
    while path is not None:
        path, step = path
        steps.append(step)
    out = ""
    for step in reversed(steps):
        if isinstance(step, int):
            out += f"[{step}]"
        elif _PLAIN_KEY.match(step):
            out += f".{step}" if out else step
        else:
            out += f"[{json.dumps(step)}]"
    return out or "body"
