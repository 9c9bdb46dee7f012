"""Server-sent events split from a byte stream, each kept as the bytes it came in.

A pass-through call relays an upstream's SSE answer to its client byte for
byte while the gateway reads the events it needs (usage, errors): the
splitter cuts the stream at event boundaries (a blank line, `\\n\\n` or
`\\r\\n\\r\\n`), whatever the chunking, and hands back each event's exact
bytes with its name and data. The buffer of an unfinished event is bounded:
an upstream that never ends one is a protocol error, not unbounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import UpstreamProtocolError

# No event of a provider's stream comes near this (a whole tool input arrives
# in small deltas); more is a broken upstream.
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class SseEvent:
    raw: bytes  # the event's bytes, its terminating blank line included
    name: str  # the `event:` field ("" when absent)
    data: str  # the `data:` lines, joined by newlines


class SseSplitter:
    """Feeds on chunks of an SSE byte stream; returns the events they complete."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SseEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end >= 0:
                cut = end + 2
            else:
                end = buffer.find(b"\r\n\r\n", start)
                if end < 0:
                    break
                cut = end + 4
            crlf = buffer.find(b"\r\n\r\n", start, cut)
            if 0 <= crlf < end:  # a CRLF boundary comes first
                end, cut = crlf, crlf + 4
            events.append(_parse(buffer[start:cut], buffer[start:end]))
            start = cut
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise UpstreamProtocolError("an upstream event exceeded the size limit")
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not finished yet (what a stream cut mid-event leaves)."""
        return self._buffer


def _parse(raw: bytes, text: bytes) -> SseEvent:
    name = ""
    data: list[str] = []
    for line in text.decode("utf-8", errors="replace").splitlines():
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    return SseEvent(raw, name, "\n".join(data))
