"""Server-sent events split from a byte stream, in batches of whole events.

A pass-through call relays an upstream's SSE answer to its client byte for
byte while the gateway reads the events it needs (usage, errors). The
splitter cuts the stream at event boundaries (a blank line, `\\n\\n` or
`\\r\\n\\r\\n`), whatever the chunking: each read gives one batch, the bytes
of every event it completed (relayed with one write) and each event's name,
data and place in those bytes; the start of an unfinished event waits for
the next read, so a batch always ends at an event boundary. The buffer of an
unfinished event is bounded: an upstream that never ends one is a protocol
error, not unbounded memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from server.errors import UpstreamProtocolError

# The inside of a JSON string as a pattern's group, for the events a relay reads
# by a pattern rather than parsing them (a quote or a backslash inside a JSON
# string is escaped, so comes as a pair).
JSON_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'


def string_text(inside: bytes) -> str | None:
    """The text of a JSON string's inside (JSON_STRING's group), its escapes read as
    json.loads reads them; None when it is not UTF-8 or an escape is bad (the
    event must then be parsed, which says what is wrong)."""
    try:
        text = inside.decode()
        return json.loads(f'"{text}"') if "\\" in text else text
    except ValueError:
        return None


# No event of a provider's stream comes near this (a whole tool input arrives
# in small deltas); more is a broken upstream.
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class SseEvent:
    name: str  # the `event:` field ("" when absent)
    data: bytes  # the `data:` lines, joined by newlines
    start: int  # where the event's bytes begin in its batch's `raw`
    end: int  # and where they end, its terminating blank line included


@dataclass(slots=True)
class SseBatch:
    raw: bytes  # the bytes of the events one read completed, in order
    events: list[SseEvent]

    def bytes_of(self, event: SseEvent) -> bytes:
        return self.raw[event.start : event.end]


class SseSplitter:
    """Feeds on chunks of an SSE byte stream; returns the events each completes.

    `first_content`, for `parts`: where the first event that carries content
    ends in a read's whole events (after_first, after_first_match), -1 when
    none does.
    """

    __slots__ = ("_buffer", "_first_content")

    def __init__(self, first_content: Callable[[bytes], int] | None = None) -> None:
        self._buffer = b""
        self._first_content = first_content

    def parts(self, chunk: bytes) -> tuple[bytes, ...]:
        """The whole events `chunk` completes, as bytes to relay: one part, but the
        read holding the first content event in two, cut after it, so that the
        caller's first bytes leave once the events up to it are read (a router
        commits on it) rather than after every event of the read (a short answer
        often comes whole in one read)."""
        raw = self.complete(chunk)
        if raw is None:
            return ()
        find = self._first_content
        if find is None:
            return (raw,)
        cut = find(raw)
        if cut < 0:
            return (raw,)
        self._first_content = None  # once
        return (raw,) if cut == len(raw) else (raw[:cut], raw[cut:])

    def feed(self, chunk: bytes) -> SseBatch | None:
        """The events `chunk` completes, or None when it completes none."""
        raw = self.complete(chunk)
        return None if raw is None else batch_of(raw)

    def complete(self, chunk: bytes) -> bytes | None:
        """The bytes of the events `chunk` completes (None when it completes none),
        their events not read yet: `batch_of` reads them, all or in parts."""
        buffer = self._buffer + chunk if self._buffer else chunk
        end = 0
        for cuts in _boundaries(buffer):
            end = cuts[2]
        self._keep(buffer, end)
        if not end:
            return None
        return buffer if end == len(buffer) else buffer[:end]

    def events(self, chunk: bytes) -> Iterator[SseEvent]:
        """The events `chunk` completes, made one at a time as they are asked for (a
        reader that stops in the middle of a read keeps only its bytes, not its
        events), when their bytes are not needed. Read each to the end before
        the next chunk."""
        buffer = self._buffer + chunk if self._buffer else chunk
        self._buffer = b""
        start = 0
        for cuts in _boundaries(buffer):
            event = _event(buffer, *cuts)
            start = event.end
            yield event
        self._keep(buffer, start)

    def _keep(self, buffer: bytes, start: int) -> None:
        """Keeps the start of an unfinished event, `buffer[start:]`, for the next read."""
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise UpstreamProtocolError("an upstream event exceeded the size limit")

    @property
    def pending(self) -> bytes:
        """Bytes of an event not finished yet (what a stream cut mid-event leaves)."""
        return self._buffer


def batch_of(raw: bytes) -> SseBatch:
    """The events of `raw`, whole events (as `SseSplitter.complete` gives them)."""
    return SseBatch(raw, [_event(raw, *cuts) for cuts in _boundaries(raw)])


def after_first(raw: bytes, name: bytes) -> int:
    """Where the first event named `name` in `raw` (whole events) ends, after its
    blank line; -1 when none is named so.

    Found by its `event:` line at an event's start, without reading the events
    before it (a data line holds no line break, so cannot hold one).
    """
    line = b"event: " + name + b"\n"
    at = raw.find(line)
    while at > 0 and raw[at - 1 : at] != b"\n":
        at = raw.find(line, at + 1)
    return _end_of_event(raw, at)


def after_first_match(raw: bytes, pattern: re.Pattern[bytes]) -> int:
    """Where the first event of `raw` (whole events) whose bytes match `pattern`
    ends, after its blank line; -1 when none does (or `raw` has CR line ends)."""
    match = pattern.search(raw)
    return -1 if match is None else _end_of_event(raw, match.end() - 1)


def _end_of_event(raw: bytes, at: int) -> int:
    """Where the event holding `raw[at]` ends, after its blank line; -1 when `at` is
    (nothing found) or `raw` has CR line ends (whose events these finders do not cut)."""
    if at < 0 or b"\r" in raw:
        return -1
    end = raw.find(b"\n\n", at)
    return -1 if end < 0 else end + 2


def _boundaries(buffer: bytes) -> Iterator[tuple[int, int, int]]:
    """Where each complete event of `buffer` starts, ends, and is cut (after its
    blank line), in order; the CR scans only when the buffer holds a CR."""
    start = 0
    if b"\r" not in buffer:  # `\n` line ends only, as providers send: one scan an event
        while (end := buffer.find(b"\n\n", start)) >= 0:
            yield start, end, end + 2
            start = end + 2
        return
    while True:
        end = buffer.find(b"\n\n", start)
        if end >= 0:
            cut = end + 2
        else:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                return
            cut = end + 4
        crlf = buffer.find(b"\r\n\r\n", start, cut)
        if 0 <= crlf < end:  # a CRLF boundary comes first
            end, cut = crlf, crlf + 4
        yield start, end, cut
        start = cut


def _event(buffer: bytes, start: int, end: int, cut: int) -> SseEvent:
    """The event in buffer[start:end] (its fields; `cut`: after its blank line)."""
    # What providers send: `event: NAME` and one `data: ...` line, or the data
    # line alone, with `\n` line ends. Anything else is parsed field by field.
    if buffer.find(b"\r", start, end) < 0:
        if buffer.startswith(b"event: ", start):
            line = buffer.find(b"\n", start, end)
            if (
                line >= 0
                and buffer.startswith(b"data: ", line + 1)
                and buffer.find(b"\n", line + 1, end) < 0
            ):
                return SseEvent(
                    buffer[start + 7 : line].decode(), buffer[line + 7 : end], start, cut
                )
        elif buffer.startswith(b"data: ", start) and buffer.find(b"\n", start, end) < 0:
            return SseEvent("", buffer[start + 6 : end], start, cut)
    return _parsed(buffer[start:end], start, cut)


def _parsed(text: bytes, start: int, cut: int) -> SseEvent:
    name = ""
    data: list[bytes] = []
    for line in text.splitlines():
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", errors="replace")
    return SseEvent(name, b"\n".join(data), start, cut)
