"""A JSON object body parsed together with where its top-level members lie.

The HTTP front door's pass-through sends a client's body upstream as it
came, but for a few top-level values the gateway sets: `model` when an alias
maps to another upstream id, Chat Completions' `stream_options` when the
client did not ask for the usage the gateway bills from. Re-encoding the
whole document for that changes bytes the client chose (escapes, number
forms, spacing) and costs, on the event loop, more than parsing it did
(5 ms for a 568 KiB conversation). `parse_object` parses like `json.loads`,
with json's own C scanner for every value, and notes where each top-level
value lies; `Members.with_values` then writes the changed values into the
body and keeps every other byte.

The same walk parses a large body in steps (`parse_object_in_steps`: the
decoding, each top-level value, each element of a top-level array such as
a conversation's messages), so that the event loop serves other calls
between them (server/loop_turns.py).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from json.decoder import JSONDecodeError
from typing import Any

from server.loop_turns import taking_turns

_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as json.decoder skips it
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")  # between a key and its value
_AFTER = re.compile(r"[ \t\n\r]*(?:(,)[ \t\n\r]*|\})")  # after a value: the next, or the end
_AFTER_ITEM = re.compile(r"[ \t\n\r]*(?:(,)[ \t\n\r]*|\])")  # the same in an array
_PLAIN = json.JSONDecoder()
# json's own string scanner (its C one), which typeshed does not declare.
_scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Members:
    """Where a body's top-level values lie, in characters of its UTF-8 text."""

    spans: dict[str, tuple[int, int]]  # key -> (start, end) of its (last) value
    duplicated: frozenset[str]  # keys given more than once: not changed in place
    after_brace: int  # just after the opening brace: where a new key goes
    ascii: bool  # the body is ASCII: offsets in characters are offsets in bytes

    def with_values(self, body: bytes, changes: Mapping[str, Any]) -> bytes | None:
        """`body` with these top-level values set (added first when absent), every
        other byte as it was; None when a changed key is given more than once
        (which of them an upstream reads is its parser's choice)."""
        return self.with_encoded(body, {key: encoded(value) for key, value in changes.items()})

    def with_encoded(self, body: bytes, changes: Mapping[str, str]) -> bytes | None:
        """with_values, given the new values as JSON text."""
        if any(key in self.duplicated for key in changes):
            return None
        edits: list[tuple[int, int, str]] = []
        added: list[str] = []
        for key, text in changes.items():
            span = self.spans.get(key)
            if span is None:
                added.append(f"{json.dumps(key, ensure_ascii=False)}:{text}")
            else:
                edits.append((span[0], span[1], text))
        if added:
            tail = "," if self.spans else ""
            edits.append((self.after_brace, self.after_brace, ",".join(added) + tail))
        edits.sort(reverse=True)  # from the end, so that earlier offsets hold
        changed = body
        for start, end, text in edits:
            if not self.ascii:
                start, end = _byte_offset(body, start), _byte_offset(body, end)
            changed = changed[:start] + text.encode() + changed[end:]
        return changed


def encoded(value: Any) -> str:
    """A value as JSON text, as the gateway writes what it changes in a body."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Base64Text:
    """A string value that is a prefix and the base64 of `data` (an image's bytes,
    encoded for an upstream), written by `encoded_in_steps` in steps rather than
    made whole first: for a large image, the base64 alone is several
    milliseconds of one step. `encoded_in_steps` writes it a piece at a time
    where its walk reaches it; deeper, its `encode` must know it (`text`)."""

    __slots__ = ("data", "prefix")

    def __init__(self, data: bytes, prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix

    def text(self) -> str:
        """The whole string, made at once."""
        return self.prefix + base64.b64encode(self.data).decode("ascii")

    def __repr__(self) -> str:
        return f"Base64Text({self.prefix!r}, {len(self.data)} bytes)"


async def encoded_in_steps(
    value: Any,
    next_step: Callable[[], Awaitable[None]],
    encode: Callable[[Any], str] = encoded,
) -> str:
    """`encode(value)`, awaiting `next_step` after every STEP_CHARS or so of text
    written. The walk goes into objects (with string keys) and arrays down to
    WALKED_DEPTH and writes a long string, or a Base64Text, a piece at a time;
    every other value is written by `encode` whole. `encode` is a
    json.JSONEncoder's `encode` without indent or sorted keys (`encoded`'s by
    default), so that the pieces joined are what it writes of the whole."""
    parts: list[str] = []
    written = 0
    for part in _pieces(value, encode, 0):
        parts.append(part)
        written += len(part)
        if written >= STEP_CHARS:
            written = 0
            await next_step()
    return "".join(parts)


async def encoded_body(value: Any, encode: Callable[[Any], str] = encoded) -> bytes:
    """`encode(value)` in UTF-8, for a large body: written by encoded_in_steps,
    taking turns with the other calls' heavy work (server/loop_turns.py)."""
    async with taking_turns() as next_step:
        text = await encoded_in_steps(value, next_step, encode)
        await next_step()
        return text.encode()


# A body up to this size has its changed values, or itself, encoded and its
# members found at once (about a millisecond); a larger one in steps.
AT_ONCE_BYTES = 1024 * 1024


async def written_with(
    body: bytes, members: Members | None, changes: Mapping[str, Any], document: Mapping[str, Any]
) -> bytes:
    """`body` with the top-level values `changes` sets written where they lie
    (`members`), every other byte as it came; when their place is unknown (no
    `members`) or a changed key is given twice, `document` (the body's, changed)
    encoded again whole. For a body over AT_ONCE_BYTES either is encoded in
    steps that take turns with the other calls."""
    large = len(body) > AT_ONCE_BYTES
    if members is not None:
        if not large:
            texts = {key: encoded(value) for key, value in changes.items()}
        else:
            async with taking_turns() as next_step:
                texts = {key: await encoded_in_steps(v, next_step) for key, v in changes.items()}
        written = members.with_encoded(body, texts)
        if written is not None:
            return written
    return await encoded_body(document) if large else encoded(document).encode()


async def members_found(body: bytes) -> Members | None:
    """members_of, a body over AT_ONCE_BYTES found in steps that take turns with
    the other calls (the whole body is parsed again)."""
    if len(body) <= AT_ONCE_BYTES:
        return members_of(body)
    async with taking_turns() as next_step:
        try:
            return (await parse_object_in_steps(body, _PLAIN, next_step))[1]
        except (ValueError, RecursionError):
            return None


def _pieces(value: Any, encode: Callable[[Any], str], depth: int) -> Iterator[str]:
    kind = type(value)
    if kind is str and len(value) > STEP_CHARS:
        # A string is written a character at a time (an escape never spans two),
        # so its pieces' encodings, quotes taken off, are the whole's.
        yield '"'
        for start in range(0, len(value), STEP_CHARS):
            yield encode(value[start : start + STEP_CHARS])[1:-1]
        yield '"'
    elif kind is Base64Text:
        yield encode(value.prefix)[:-1]  # its opening quote and the prefix
        data = memoryview(value.data)
        for start in range(0, len(data), _BASE64_STEP_BYTES):
            yield base64.b64encode(data[start : start + _BASE64_STEP_BYTES]).decode("ascii")
        yield '"'
    elif kind is dict and value and depth < WALKED_DEPTH and all(type(k) is str for k in value):
        opening = "{"
        for key, item in value.items():
            yield f"{opening}{encode(key)}:"
            yield from _pieces(item, encode, depth + 1)
            opening = ","
        yield "}"
    elif kind is list and value and depth < WALKED_DEPTH:
        opening = "["
        for item in value:
            yield opening
            yield from _pieces(item, encode, depth + 1)
            opening = ","
        yield "]"
    else:
        yield encode(value)


# Every byte of UTF-8 but the continuation bytes (0x80-0xBF): each character is
# one byte of the others, followed by its continuation bytes.
_LEADING = bytes(b for b in range(256) if not 0x80 <= b <= 0xBF)


def _byte_offset(body: bytes, chars: int) -> int:
    """Where character `chars` of UTF-8 `body` begins, given that the character
    before it is ASCII (as before and after every JSON value, and after the
    opening brace): the offset b with b - (continuation bytes before b) = chars,
    found by counting continuation bytes, not by decoding."""
    counted = continuations = 0
    end = chars
    while counted < end:
        continuations += len(body[counted:end].translate(None, _LEADING))
        counted, end = end, chars + continuations
    return end


def _skip(text: str, at: int) -> int:
    """The first position from `at` that is not whitespace."""
    space = _SPACE.match(text, at)
    return space.end() if space is not None else at


def parse_object(body: bytes, decoder: json.JSONDecoder) -> tuple[Any, Members | None]:
    """`body` parsed as `decoder.decode` parses it (same values, same errors), and,
    when it is a UTF-8 JSON object, where its top-level values lie.

    Each value is parsed by json's own scanner; the walk over the top level
    costs a few microseconds a member (so small bodies are parsed at once,
    and their members found by `members_of` only when a value must change).
    """
    parsed: list[tuple[Any, Members | None]] = []
    for _ in _steps(body, decoder, parsed, _Pace(0, False)):
        pass
    return parsed[0]


async def parse_object_in_steps(
    body: bytes, decoder: json.JSONDecoder, next_step: Callable[[], Awaitable[None]]
) -> tuple[Any, Members | None]:
    """parse_object, awaiting `next_step` between steps of about STEP_CHARS
    characters: the body's decoding, then its values as the walk meets them.
    The walk goes into objects and arrays down to WALKED_DEPTH (a conversation's
    messages, their content blocks, a tool result's blocks) and reads a long
    string in pieces, so one long text is many steps; deeper than that, a
    value is parsed whole by json's scanner."""
    parsed: list[tuple[Any, Members | None]] = []
    for _ in _steps(body, decoder, parsed, _Pace(WALKED_DEPTH, True)):
        await next_step()
    return parsed[0]


# About a millisecond of json's scanner on this kind of machine.
STEP_CHARS = 256 * 1024
# How deep the stepped walk goes into objects and arrays: the body (0), its
# messages (1), a message (2), its content (3), a block (4), a tool result's
# content (5), its blocks (6). Each container walked costs a few microseconds
# a member in Python; what lies deeper is parsed by json's scanner in one go.
WALKED_DEPTH = 6
# The bytes of a Base64Text written at a time: a multiple of 3, so that only
# the last piece is padded; about STEP_CHARS of text.
_BASE64_STEP_BYTES = STEP_CHARS // 4 * 3
# A long string is cut only where none of the 6 characters before the cut is
# a backslash: no escape (at most 6 characters: \uXXXX), and no surrogate pair
# of two escapes, spans it. Looked for this far back from each cut.
_CUT_SEARCH = 4096
# The first piece of a string (its end looked for, else copied out): most
# strings end in it.
_FIRST_PIECE = 16 * 1024

_Walk = Generator[None, None, tuple[Any, "Members | None"]]
_Parse = Generator[None, None, tuple[Any, int]]


class _Pace:
    """How a walk steps: how deep it goes, whether it reads long strings in
    pieces, and where its last step ended."""

    __slots__ = ("depth", "last", "pieces")

    def __init__(self, depth: int, pieces: bool) -> None:
        self.depth = depth
        self.pieces = pieces
        self.last = 0

    def due(self, at: int) -> bool:
        """Whether a step ends at `at` (more than STEP_CHARS since the last)."""
        if at - self.last > STEP_CHARS:
            self.last = at
            return True
        return False


def _steps(
    body: bytes,
    decoder: json.JSONDecoder,
    parsed: list[tuple[Any, Members | None]],
    pace: _Pace,
) -> Iterator[None]:
    """The walk's steps; once they are over, its result is in `parsed`."""
    parsed.append((yield from _walk(body, decoder, pace)))


def _walk(body: bytes, decoder: json.JSONDecoder, pace: _Pace) -> _Walk:
    """The parse, as a generator that stops (yields) between its steps."""
    encoding = json.detect_encoding(body)
    text = body.decode(encoding, "surrogatepass")
    at = _skip(text, 0)
    if encoding != "utf-8" or text[at : at + 1] != "{":
        return decoder.decode(text), None
    if len(text) > STEP_CHARS:
        yield
    scan_once = decoder.scan_once  # type: ignore[attr-defined]
    spans: dict[str, tuple[int, int]] = {}
    duplicated: set[str] = set()
    after_brace = pace.last = at + 1
    document, at = yield from _object(text, at, scan_once, 0, pace, (spans, duplicated))
    at = _skip(text, at)
    if at != len(text):
        raise JSONDecodeError("Extra data", text, at)
    return document, Members(spans, frozenset(duplicated), after_brace, body.isascii())


def _value_in_steps(text: str, at: int, scan_once: Any, depth: int, pace: _Pace) -> _Parse:
    """The value at `at` (at `depth` in the document), walked into while the pace
    allows, else parsed whole by json's scanner; a step after it if one is due."""
    first = text[at : at + 1]
    if depth <= pace.depth:
        if first == "[":
            return (yield from _array(text, at, scan_once, depth, pace))
        if first == "{":
            return (yield from _object(text, at, scan_once, depth, pace))
        if first == '"' and pace.pieces:
            return (yield from _string(text, at, pace))
    value, end = _value(text, at, scan_once)
    if pace.due(end):
        yield
    return value, end


def _object(
    text: str,
    at: int,
    scan_once: Any,
    depth: int,
    pace: _Pace,
    members: tuple[dict[str, tuple[int, int]], set[str]] | None = None,
) -> _Parse:
    """The object at `at` (its `{`), member by member, failing as json's scanner
    fails; noting, when given `members`, where each value lies and which keys
    come twice."""
    document: dict[str, Any] = {}
    at = _skip(text, at + 1)
    if text[at : at + 1] == "}":
        return document, at + 1
    while True:
        if text[at : at + 1] != '"':
            raise JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
        key, at = _scanstring(text, at + 1, True)
        colon = _COLON.match(text, at)
        if colon is None:
            raise JSONDecodeError("Expecting ':' delimiter", text, _skip(text, at))
        at = colon.end()
        value, end = yield from _value_in_steps(text, at, scan_once, depth + 1, pace)
        if members is not None:
            if key in document:
                members[1].add(key)
            members[0][key] = (at, end)
        document[key] = value
        after = _AFTER.match(text, end)
        if after is None:
            raise JSONDecodeError("Expecting ',' delimiter", text, _skip(text, end))
        at = after.end()
        if after[1] is None:  # the brace, not a comma
            return document, at


def _array(text: str, at: int, scan_once: Any, depth: int, pace: _Pace) -> _Parse:
    """The array at `at` (its `[`), element by element, as json's scanner reads one."""
    items: list[Any] = []
    at = _skip(text, at + 1)
    if text[at : at + 1] == "]":
        return items, at + 1
    while True:
        value, end = yield from _value_in_steps(text, at, scan_once, depth + 1, pace)
        items.append(value)
        after = _AFTER_ITEM.match(text, end)
        if after is None:
            raise JSONDecodeError("Expecting ',' delimiter", text, _skip(text, end))
        at = after.end()
        if after[1] is None:  # the bracket, not a comma
            return items, at


def _string(text: str, at: int, pace: _Pace) -> _Parse:
    """The string at `at` (its quote), read by json's scanner in pieces of about
    STEP_CHARS, a step after each: the same text as one read (a piece is cut
    between escapes, never in one), the same error (read again at once).

    A piece in which the string ends is read in place; a longer string's
    pieces are copied out first (json's scanner reads to a quote), the first
    of them small, so that a string that turns out short is not copied far."""
    start = piece = at + 1
    pieces: list[str] = []
    size = min(_FIRST_PIECE, STEP_CHARS)
    ended = False  # the string's own quote was met inside a piece
    try:
        while True:
            quote = text.find('"', piece, piece + size)
            if quote >= 0 and not _escaped(text, quote, piece):
                break  # the string ends within this piece
            if len(text) - piece <= size:
                break  # the text ends within this piece
            cut = _cut(text, piece + size, piece)
            if cut < 0:
                break  # escapes all along: the rest in one read
            part, end = _scanstring(text[piece:cut] + '"', 0, True)
            pieces.append(part)
            if end < cut - piece + 1:  # the string's own quote, inside the piece
                ended, end = True, piece + end
                break
            piece = pace.last = cut
            size = min(size * 4, STEP_CHARS)
            yield
        if not ended:
            part, end = _scanstring(text, piece, True)
            pieces.append(part)
    except JSONDecodeError:
        # Read again at once: json's own error, where json puts it.
        return _scanstring(text, start, True)
    if pace.due(end):
        yield
    return "".join(pieces), end  # one piece: join gives it back as it is


def _escaped(text: str, quote: int, after: int) -> bool:
    """Whether the quote at `quote` is escaped: an odd run of backslashes before it
    (counted from `after`, a cut with no backslash just before it)."""
    if quote == after or text[quote - 1] != "\\":
        return False  # nearly always: no copy of the piece to count a run
    before = text[after:quote]
    return (len(before) - len(before.rstrip("\\"))) % 2 == 1


def _cut(text: str, at: int, after: int) -> int:
    """The nearest place at or before `at`, and after `after`, with no backslash
    in the 6 characters before it (looked for up to _CUT_SEARCH back; -1 if none)."""
    low = max(at - _CUT_SEARCH, after)
    while at > low:
        backslash = text.rfind("\\", at - 6, at)
        if backslash < 0:
            return at
        at = backslash
    return -1


def _value(text: str, at: int, scan_once: Any) -> tuple[Any, int]:
    try:
        return scan_once(text, at)  # type: ignore[no-any-return]
    except StopIteration as err:
        raise JSONDecodeError("Expecting value", text, err.value) from None


def members_of(body: bytes) -> Members | None:
    """Where the top-level values of a body already parsed lie (None if it is not a
    UTF-8 JSON object)."""
    try:
        return parse_object(body, _PLAIN)[1]
    except (ValueError, RecursionError):
        return None
